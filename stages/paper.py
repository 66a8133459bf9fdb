"""Stage 8: reports/paper/paper.typ and paper.pdf from this run's own numbers and figures."""

from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.files import read_csv, read_json
from weightdiff.report.paper import write_paper
from weightdiff.settings import Settings, plain


def main(cfg: Settings) -> None:
    p = cfg.paths
    run = {
        "manifest": read_json(p.manifest),
        "extract": read_json(p.extract_metrics),
        "tensors": read_json(p.tensors),
        "energy": read_csv(p.energy_curve),
        "validate": read_json(p.validate_metrics),
        "layers": read_csv(p.layer_divergence),
        "gguf": read_json(p.gguf_metrics),
        "params": plain(cfg),
    }
    write_paper(run, Path(p.figures), Path(p.paper))


if __name__ == "__main__":
    run_stage(main)
