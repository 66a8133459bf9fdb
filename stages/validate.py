"""Stage 5: KL(B ‖ A+adapter) and KL(B ‖ A) per token, top-1 agreement, with the adapter loaded by PEFT."""
from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.files import read_json, write_json
from weightdiff.validate import validate


def main(cfg) -> None:
    write_json(Path(cfg.paths.validate_metrics), validate(read_json(cfg.paths.manifest), Path(cfg.paths.adapter), cfg.validate))


if __name__ == "__main__":
    run_stage(main)
