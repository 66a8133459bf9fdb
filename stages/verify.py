"""Stage 2: same architecture, tensor names, shapes and dtypes, from config.json and headers only."""

from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.files import read_json, write_json
from weightdiff.settings import Settings
from weightdiff.verify import verify


def main(cfg: Settings) -> None:
    write_json(
        Path(cfg.paths.verify),
        verify(read_json(cfg.paths.manifest), list(cfg.verify.ignore_config_keys), cfg.verify.resized_embeddings),
    )


if __name__ == "__main__":
    run_stage(main)
