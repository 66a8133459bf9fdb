"""Refuses pairs that are not the same architecture, before any tensor is read."""
from __future__ import annotations

import json
from pathlib import Path

from weightdiff.checkpoint import TensorInfo, tensor_infos
from weightdiff.errors import WeightdiffError


def model_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightdiffError(f"{path}: cannot read the model config ({e})") from e


def check_files(entry: dict) -> None:
    """The manifest's files must still be there, as they were: weights are not tracked by DVC."""
    root = Path(entry["path"])
    for f in entry["files"]:
        p = root / f["name"]
        if not p.is_file():
            raise WeightdiffError(f"{p} is missing (listed in the manifest of {entry['source']}): "
                                  "rerun the download stage (dvc repro -f -s download)")
        if p.stat().st_size != f["size"]:
            raise WeightdiffError(f"{p} has {p.stat().st_size} bytes, the manifest says {f['size']}: "
                                  "the file changed; rerun the download stage (dvc repro -f -s download)")


def config_differences(a: dict, b: dict, ignore: list[str]) -> dict[str, tuple]:
    keys = (a.keys() | b.keys()) - set(ignore)
    return {k: (a.get(k), b.get(k)) for k in sorted(keys) if a.get(k) != b.get(k)}


def tensor_differences(a: dict[str, TensorInfo], b: dict[str, TensorInfo]) -> list[str]:
    """One line per mismatch, naming the tensor and both values."""
    lines = [f"{n}: only in A ({a[n].shard})" for n in sorted(a.keys() - b.keys())]
    lines += [f"{n}: only in B ({b[n].shard})" for n in sorted(b.keys() - a.keys())]
    for n in sorted(a.keys() & b.keys()):
        for field in ("shape", "dtype"):
            va, vb = getattr(a[n], field), getattr(b[n], field)
            if va != vb:
                lines.append(f"{n}: {field} {va} in A ({a[n].shard}) vs {vb} in B ({b[n].shard})")
    return lines


def verify(manifest: dict, ignore_config_keys: list[str]) -> dict:
    """A small report of what was compared; raises on the first kind of mismatch found, listing all of it."""
    for side in ("model_a", "model_b"):
        check_files(manifest[side])
    dir_a, dir_b = Path(manifest["model_a"]["path"]), Path(manifest["model_b"]["path"])
    diff = config_differences(model_config(dir_a), model_config(dir_b), ignore_config_keys)
    if diff:
        shown = "; ".join(f"{k}: {va!r} vs {vb!r}" for k, (va, vb) in diff.items())
        raise WeightdiffError(f"different architectures: {dir_a}/config.json vs {dir_b}/config.json differ in {shown}")
    infos_a, infos_b = tensor_infos(dir_a), tensor_infos(dir_b)
    mismatches = tensor_differences(infos_a, infos_b)
    if mismatches:
        more = f"\n  ... and {len(mismatches) - 20} more" if len(mismatches) > 20 else ""
        raise WeightdiffError(f"tensors of {dir_a} and {dir_b} do not match:\n  " + "\n  ".join(mismatches[:20]) + more)
    return {"tensors": len(infos_a), "parameters": sum(_numel(i.shape) for i in infos_a.values()),
            "architecture": model_config(dir_a).get("architectures"), "model_type": model_config(dir_a).get("model_type")}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
