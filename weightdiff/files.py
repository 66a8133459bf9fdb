"""Writes that never leave a file looking complete when they were not: temp name in the same directory, then rename."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from weightdiff.errors import WeightdiffError

# What a failed write raises: OSError from Python's own I/O, SafetensorError from safetensors' save_file,
# which reports a full disk as "Error while serializing: I/O error: No space left on device".
WRITE_ERRORS = (OSError, SafetensorError)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` only if the block completes.

    A failed write (disk full, no permission, read-only mount) is a WeightdiffError naming `path`, and the
    temporary file goes: an earlier complete file at `path` stays as it was, and nothing partial is left.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise WeightdiffError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except WRITE_ERRORS as e:
        raise WeightdiffError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def fresh_directory(path: Path) -> Iterator[Path]:
    """A temporary directory beside `path` to fill; it replaces `path` only if the block completes, so a crash
    leaves the earlier `path` (or none), never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp's 0o700 would keep the result from other users
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def existing_ancestor(path: Path) -> Path:
    """path itself or its nearest ancestor that exists: where a directory not made yet would be made."""
    return next(p for p in (path, *path.parents) if p.exists())


def require_writable(directory: Path) -> None:
    """Fails in seconds, not after hours of work, when a stage could not write its outputs into `directory`.

    A probe file rather than os.access: root passes os.access everywhere, and only a real file creation
    meets read-only mounts, quotas and special file systems. Nothing is left behind, not even the directory.
    """
    try:
        with tempfile.TemporaryFile(dir=existing_ancestor(directory)):
            pass
    except OSError as e:
        raise WeightdiffError(f"output directory {directory} is not writable: {e.strerror or e}") from e


def write_atomic(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_json(path: str | Path):
    """An upstream stage's output; a missing one means the stages ran out of order, an unreadable one that it was
    cut short or edited by hand."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise WeightdiffError(f"{path} not found: run the stage that writes it first (dvc repro does)") from e
    except json.JSONDecodeError as e:
        raise WeightdiffError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): rerun the stage that writes it"
        ) from e


def write_csv(path: Path, rows: list[dict]) -> None:
    """A table with the first row's keys as header (DVC plots read it): numbers to 8 significant digits."""
    columns = list(rows[0]) if rows else []
    cell = lambda v: f"{v:.8g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [",".join(columns)] + [",".join(cell(row[c]) for c in columns) for row in rows]
    write_atomic(path, ("\n".join(lines) + "\n").encode())


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a table write_csv wrote, numbers parsed (int where they are whole in the file, else float)."""
    try:
        with open(path, newline="") as f:
            return [
                {k: int(v) if v.lstrip("-").isdigit() else float(v) for k, v in row.items()}
                for row in csv.DictReader(f)
            ]
    except FileNotFoundError as e:
        raise WeightdiffError(f"{path} not found: run the stage that writes it first (dvc repro does)") from e
