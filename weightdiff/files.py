"""Writes that never leave a file looking complete when they were not: temp name in the same directory, then rename."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from weightdiff.errors import WeightdiffError


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_json(path: Path):
    """An upstream stage's output; a missing one means the stages ran out of order."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise WeightdiffError(f"{path} not found: run the stage that writes it first (dvc repro does)") from e
