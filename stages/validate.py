"""Stage 5: KL(B ‖ A+adapter) and KL(B ‖ A) per token on real text, top-1 agreement, per-layer divergence, with
the adapter loaded by PEFT and both models run a decoder layer at a time; and the verdict those numbers give."""

import logging
from pathlib import Path

from weightdiff.cli import run_stage
from weightdiff.files import read_json, require_writable, write_csv, write_json
from weightdiff.settings import Settings
from weightdiff.validate import validate
from weightdiff.verdict import judged

log = logging.getLogger(__name__)


def main(cfg: Settings) -> None:
    for output in (cfg.paths.validate_metrics, cfg.paths.layer_divergence):
        require_writable(Path(output).parent)
    metrics, layers = validate(read_json(cfg.paths.index), Path(cfg.paths.adapter), cfg.validate)
    judgement = judged(metrics, read_json(cfg.paths.extract_metrics), cfg.validate.gap_closed_target)
    good = judgement["verdict"] in ("reproduces", "no_gap")
    (log.info if good else log.warning)("%s", judgement["verdict_summary"])
    write_csv(Path(cfg.paths.layer_divergence), layers)
    write_json(Path(cfg.paths.validate_metrics), metrics | judgement)


if __name__ == "__main__":
    run_stage(main)
