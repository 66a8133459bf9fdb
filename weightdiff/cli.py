"""What every stage's `python -m stages.<name> [overrides]` shares: config, logging, user-facing errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from weightdiff.config import run_config
from weightdiff.errors import WeightdiffError
from weightdiff.settings import Settings


def run_stage(stage: Callable[[Settings], None], argv: list[str] | None = None) -> None:
    """Runs stage(config); a WeightdiffError becomes one clear line on stderr and exit status 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("weightdiff").setLevel(logging.INFO)  # ours at INFO; libraries' chatter stays out
    try:
        stage(run_config(sys.argv[1:] if argv is None else argv))
    except WeightdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
