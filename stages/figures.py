"""Stage 7: PNG figures of the run into reports/figures/, the pipeline's drawn from DVC's own stage graph."""

from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.figures import pipeline_graph, write_figures
from weightdiff.files import read_csv, read_json
from weightdiff.settings import Settings


def main(cfg: Settings) -> None:
    p = cfg.paths
    write_figures(
        read_json(p.tensors),
        read_csv(p.energy_curve),
        read_json(p.extract_metrics),
        read_csv(p.layer_divergence),
        pipeline_graph(Path.cwd()),
        Path(p.figures),
    )


if __name__ == "__main__":
    run_stage(main)
