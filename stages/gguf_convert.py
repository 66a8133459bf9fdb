"""Stage 6: the adapter as a LoRA GGUF for llama.cpp."""

from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.files import read_json, write_json
from weightdiff.gguf_export import write_lora_gguf
from weightdiff.settings import Settings


def main(cfg: Settings) -> None:
    config = read_json(cfg.paths.index)["model_a"]["config"]
    write_json(
        Path(cfg.paths.gguf_metrics),
        write_lora_gguf(Path(cfg.paths.adapter), config, Path(cfg.paths.gguf), str(cfg.gguf.dtype)),
    )


if __name__ == "__main__":
    run_stage(main)
