"""Stage 7: PNG figures of the run into reports/figures/."""
import csv
from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.figures import write_figures
from weightdiff.files import read_json


def main(cfg) -> None:
    with open(cfg.paths.energy_curve) as f:
        curve = [(int(row["rank"]), float(row["energy"])) for row in csv.DictReader(f)]
    write_figures(read_json(cfg.paths.tensors), curve, Path("dvc.yaml"), Path(cfg.paths.figures))


if __name__ == "__main__":
    run_stage(main)
