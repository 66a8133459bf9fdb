"""Stage 4: ΔW = W_B − W_A per target tensor → truncated SVD → PEFT adapter, per-tensor reports, metrics."""

from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.extract import extract
from weightdiff.files import read_json, require_writable, write_csv, write_json
from weightdiff.settings import Settings


def main(cfg: Settings) -> None:
    p = cfg.paths
    for output in (p.adapter, p.resume, p.tensors, p.extract_metrics, p.energy_curve):
        require_writable(Path(output).parent)
    metrics, reports, curves = extract(
        read_json(p.index), read_json(p.manifest), cfg.extract, Path(p.adapter), Path(p.resume)
    )
    write_json(Path(p.tensors), reports)
    write_csv(Path(p.energy_curve), curves)
    write_json(Path(p.extract_metrics), metrics)


if __name__ == "__main__":
    run_stage(main)
