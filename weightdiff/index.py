"""A header-only index of every tensor of both models, independent of the targets chosen later."""
from __future__ import annotations

import re
from pathlib import Path

from weightdiff.checkpoint import tensor_infos
from weightdiff.verify import model_config

LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")


def tensor_entry(name: str, shard: str, dtype: str, shape: tuple[int, ...]) -> dict:
    module, _, _ = name.rpartition(".")
    layer = LAYER.search(name)
    return {"shard": shard, "dtype": dtype, "shape": list(shape), "layer": int(layer.group(1)) if layer else None,
            "module": module, "kind": module.rpartition(".")[2]}


def model_index(model_dir: Path) -> dict:
    return {"path": str(model_dir), "config": model_config(model_dir),
            "tensors": {n: tensor_entry(n, i.shard, i.dtype, i.shape) for n, i in sorted(tensor_infos(model_dir).items())}}


def build_index(manifest: dict) -> dict:
    return {side: model_index(Path(manifest[side]["path"])) for side in ("model_a", "model_b")}
