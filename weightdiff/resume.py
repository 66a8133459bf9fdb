"""Finished units of an interrupted extraction, kept on disk so that a rerun does not redo them.

A store is keyed by everything that determines its contents (the models as pinned by the manifest, the
extract settings that change the result, the format version): a rerun with other inputs starts afresh instead
of mixing results. Each unit is one small safetensors file written atomically, so a kill -9 loses at most the
unit in progress.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weightdiff.files import atomic_path
from weightdiff.records import TensorReport

FORMAT = 3  # 2: reports name their action and module_type; 3: the units checked (check_every) follow the plan


def resume_key(manifest: dict, settings: dict) -> str:
    """What identifies a run's results: the pinned models and the settings (those that change the result)."""
    models = {side: {k: manifest[side][k] for k in ("source", "revision", "files")} for side in ("model_a", "model_b")}
    blob = json.dumps({"format": FORMAT, "models": models, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ResumeStore:
    """The finished units of one run (one key) under root/key."""

    def __init__(self, root: Path, key: str):
        self.root = root
        self.dir = root / key

    def open(self) -> ResumeStore:
        """Creates the store, and deletes the stores of other keys: no run with these inputs can resume them."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.root.iterdir():
            if stale != self.dir and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        return self

    def _path(self, unit_id: str) -> Path:
        return self.dir / (hashlib.sha1(unit_id.encode()).hexdigest() + ".safetensors")

    def has(self, unit_id: str) -> bool:
        return self._path(unit_id).is_file()

    def load(self, unit_id: str) -> tuple[list[TensorReport], dict[str, torch.Tensor]] | None:
        """A finished unit's reports and adapter entries, or None when it is still to do."""
        if not self.has(unit_id):
            return None
        path = self._path(unit_id)
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["reports"]), {k: f.get_tensor(k) for k in f.keys()}

    def save(self, unit_id: str, reports: list[TensorReport], factors: dict[str, torch.Tensor]) -> None:
        with atomic_path(self._path(unit_id)) as tmp:
            save_file(factors, tmp, metadata={"reports": json.dumps(reports), "unit": unit_id})

    def done(self) -> int:
        return sum(1 for _ in self.dir.glob("*.safetensors"))

    def remove(self) -> None:
        """Once the adapter is written: nothing is left to resume."""
        shutil.rmtree(self.dir, ignore_errors=True)
