"""Stage 1: resolve model_a / model_b to local directories (Hub snapshot, local path or demo pair) → manifest."""

from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.download import manifest
from weightdiff.files import require_writable, write_json
from weightdiff.settings import Settings


def main(cfg: Settings) -> None:
    require_writable(Path(cfg.paths.manifest).parent)  # before the download, which can take hours
    write_json(Path(cfg.paths.manifest), manifest(cfg))


if __name__ == "__main__":
    run_stage(main)
