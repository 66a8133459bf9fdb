"""Finished units of an interrupted extraction, kept on disk so that a rerun does not redo them.

A checkpoint is keyed by everything that determines its contents (the models as pinned by the manifest,
the extract settings, the format version): a rerun with other inputs starts afresh instead of mixing
results. Each unit is one small safetensors file written atomically, so a kill -9 loses at most the unit
in progress.
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

FORMAT = 1


def checkpoint_key(manifest: dict, settings: dict) -> str:
    models = {side: {k: manifest[side][k] for k in ("source", "revision", "files")} for side in ("model_a", "model_b")}
    blob = json.dumps({"format": FORMAT, "models": models, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Checkpoint:
    def __init__(self, root: Path, key: str):
        self.dir = root / key
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in root.iterdir():  # checkpoints of other inputs can never be resumed by this run
            if stale != self.dir and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)

    def _path(self, unit_id: str) -> Path:
        return self.dir / (hashlib.sha1(unit_id.encode()).hexdigest() + ".safetensors")

    def load(self, unit_id: str) -> tuple[list[dict], dict[str, torch.Tensor]] | None:
        path = self._path(unit_id)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["reports"]), {k: f.get_tensor(k) for k in f.keys()}

    def save(self, unit_id: str, reports: list[dict], factors: dict[str, torch.Tensor]) -> None:
        with atomic_path(self._path(unit_id)) as tmp:
            save_file(factors, tmp, metadata={"reports": json.dumps(reports), "unit": unit_id})

    def done(self) -> int:
        return sum(1 for _ in self.dir.glob("*.safetensors"))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
