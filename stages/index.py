"""Stage 3: header-only index of every tensor of both models and their module layout (independent of the targets)."""

from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.files import read_json, write_json
from weightdiff.index import build_index
from weightdiff.settings import Settings


def main(cfg: Settings) -> None:
    write_json(Path(cfg.paths.index), build_index(read_json(cfg.paths.manifest)))


if __name__ == "__main__":
    run_stage(main)
