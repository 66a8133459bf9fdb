"""Stage 7: PNG figures of the run into reports/figures/."""
from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.figures import write_figures
from weightdiff.files import read_csv, read_json


def main(cfg) -> None:
    curve = [(row["rank"], row["energy"]) for row in read_csv(cfg.paths.energy_curve)]
    write_figures(read_json(cfg.paths.tensors), curve, read_csv(cfg.paths.layer_divergence), Path("dvc.yaml"),
                  Path(cfg.paths.figures))


if __name__ == "__main__":
    run_stage(main)
