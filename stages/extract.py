"""Stage 4: ΔW = W_B − W_A per target tensor → truncated SVD → PEFT adapter, per-tensor stats, metrics."""
from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.extract import energy_curve, extract
from weightdiff.files import read_json, require_writable, write_csv, write_json


def main(cfg) -> None:
    for output in (cfg.paths.adapter, cfg.paths.checkpoints, cfg.paths.tensors, cfg.paths.extract_metrics,
                   cfg.paths.energy_curve):
        require_writable(Path(output).parent)
    metrics, reports = extract(read_json(cfg.paths.index), read_json(cfg.paths.manifest), cfg.extract,
                               Path(cfg.paths.adapter), Path(cfg.paths.checkpoints))
    write_json(Path(cfg.paths.tensors), {"rank": metrics["rank"], "alpha": metrics["alpha"],
                                         "dtype": cfg.extract.dtype, "tensors": reports})
    write_csv(Path(cfg.paths.energy_curve), [{"rank": k, "energy": e} for k, e in energy_curve(reports, metrics["rank_max"])])
    write_json(Path(cfg.paths.extract_metrics), metrics)


if __name__ == "__main__":
    run_stage(main)
