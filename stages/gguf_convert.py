"""Stage 6: the adapter as a LoRA GGUF for llama.cpp, or the reason there is none; never a failed pipeline over
what GGUF cannot hold (unless gguf.strict)."""

from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.files import fresh_directory, read_json, require_writable, write_json
from weightdiff.gguf_export import GGUF_FILE, write_lora_gguf
from weightdiff.settings import Settings


def main(cfg: Settings) -> None:
    p = cfg.paths
    for output in (p.gguf, p.gguf_metrics):
        require_writable(Path(output).parent)
    base = read_json(p.index)["model_a"]
    # A directory DVC can track whether or not a file is written; rebuilt whole, so no earlier file survives.
    with fresh_directory(Path(p.gguf)) as directory:
        summary = write_lora_gguf(
            Path(p.adapter),
            base["config"],
            directory / GGUF_FILE,
            str(cfg.gguf.dtype),
            strict=cfg.gguf.strict,
            base_tensors=base["tensors"],
        )
    write_json(Path(p.gguf_metrics), summary)


if __name__ == "__main__":
    run_stage(main)
