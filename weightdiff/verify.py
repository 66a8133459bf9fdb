"""Refuses pairs that are not the same architecture, before any tensor is read."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from pathlib import Path

from weightdiff.errors import WeightdiffError
from weightdiff.remote import REMOTE_FILE, RemoteShards
from weightdiff.safetensors_io import TensorInfo, model_config, tensor_infos

log = logging.getLogger(__name__)


def check_files(entry: dict) -> None:
    """The manifest's files must still be there, as they were: weights are not tracked by DVC. A streamed
    checkpoint's shards are on the Hub, pinned by the commit: their headers must be the ones listed."""
    root = Path(entry["path"])
    streamed = RemoteShards.of(root).shards if entry.get("mode") == "stream" else {}
    for f in entry["files"]:
        p = root / f["name"]
        if f["name"] in streamed:
            if streamed[f["name"]].size != f["size"]:
                raise WeightdiffError(
                    f"{root / REMOTE_FILE} gives {f['name']} {streamed[f['name']].size} bytes, the manifest says "
                    f"{f['size']}: rerun the download stage (dvc repro -f -s download)"
                )
            continue
        if not p.is_file():
            raise WeightdiffError(
                f"{p} is missing (listed in the manifest of {entry['source']}): "
                "rerun the download stage (dvc repro -f -s download)"
            )
        if p.stat().st_size != f["size"]:
            raise WeightdiffError(
                f"{p} has {p.stat().st_size} bytes, the manifest says {f['size']}: "
                "the file changed; rerun the download stage (dvc repro -f -s download)"
            )


def config_differences(a: dict, b: dict, ignore: list[str]) -> dict[str, tuple]:
    keys = (a.keys() | b.keys()) - set(ignore)
    return {k: (a.get(k), b.get(k)) for k in sorted(keys) if a.get(k) != b.get(k)}


def resized_tensors(a: dict[str, TensorInfo], b: dict[str, TensorInfo], vocab_a: int, vocab_b: int) -> list[str]:
    """Tensors whose shapes differ only in a vocabulary-sized first axis: the embeddings and the LM head.

    Found by shape rather than by name, so that any architecture's names (embed_tokens, wte, lm_head,
    embed_out...) qualify, and nothing else does.
    """
    return sorted(
        n
        for n in a.keys() & b.keys()
        if a[n].shape[:1] == (vocab_a,) and b[n].shape[:1] == (vocab_b,) and a[n].shape[1:] == b[n].shape[1:]
    )


def tensor_differences(a: dict[str, TensorInfo], b: dict[str, TensorInfo], resized: Collection[str] = ()) -> list[str]:
    """One line per mismatch, naming the tensor and both values; `resized` tensors may differ in shape."""
    lines = [f"{n}: only in A ({a[n].shard})" for n in sorted(a.keys() - b.keys())]
    lines += [f"{n}: only in B ({b[n].shard})" for n in sorted(b.keys() - a.keys())]
    for n in sorted(a.keys() & b.keys()):
        for field in ("dtype",) if n in resized else ("shape", "dtype"):
            va, vb = getattr(a[n], field), getattr(b[n], field)
            if va != vb:
                lines.append(f"{n}: {field} {va} in A ({a[n].shard}) vs {vb} in B ({b[n].shard})")
    return lines


def vocab_sizes(dir_a: Path, dir_b: Path, diff: dict[str, tuple], resized_embeddings: str) -> tuple[int, int] | None:
    """(A's, B's) vocab_size when they differ and verify.resized_embeddings allows it; None when they agree.

    A vocabulary grown by added tokens is the one architecture difference a fine-tune commonly makes; said
    as such, because "different architectures" would send the user looking for the wrong mistake.
    """
    if "vocab_size" not in diff:
        return None
    va, vb = diff["vocab_size"]
    if resized_embeddings == "error" or not (isinstance(va, int) and isinstance(vb, int)):
        raise WeightdiffError(
            f"vocab_size differs: resized embeddings ({dir_a}/config.json has {va!r} tokens, {dir_b}/config.json "
            f"{vb!r}; tokens added in a fine-tune?). Set verify.resized_embeddings=skip to extract every other "
            "tensor and leave the embeddings and the LM head out of the adapter"
        )
    return va, vb


def verify(manifest: dict, ignore_config_keys: list[str], resized_embeddings: str = "error") -> dict:
    """A small report of what was compared; raises on the first kind of mismatch found, listing all of it.

    resized_embeddings: "error" refuses a pair whose vocab_size differs; "skip" accepts it when only the
    vocabulary-sized tensors (embeddings, LM head) differ in shape, and lists them in the report.
    """
    for side in ("model_a", "model_b"):
        check_files(manifest[side])
    dir_a, dir_b = Path(manifest["model_a"]["path"]), Path(manifest["model_b"]["path"])
    config_a = model_config(dir_a)
    diff = config_differences(config_a, model_config(dir_b), ignore_config_keys)
    if diff.keys() - {"vocab_size"}:
        shown = "; ".join(f"{k}: {va!r} vs {vb!r}" for k, (va, vb) in diff.items())
        raise WeightdiffError(f"different architectures: {dir_a}/config.json vs {dir_b}/config.json differ in {shown}")
    vocab = vocab_sizes(dir_a, dir_b, diff, resized_embeddings)
    infos_a, infos_b = tensor_infos(dir_a), tensor_infos(dir_b)
    resized = resized_tensors(infos_a, infos_b, *vocab) if vocab else []
    mismatches = tensor_differences(infos_a, infos_b, resized)
    if mismatches:
        more = f"\n  ... and {len(mismatches) - 20} more" if len(mismatches) > 20 else ""
        raise WeightdiffError(f"tensors of {dir_a} and {dir_b} do not match:\n  " + "\n  ".join(mismatches[:20]) + more)
    if vocab:
        log.warning(
            "vocab_size %d in A, %d in B (verify.resized_embeddings=skip): %s differ in shape and cannot "
            "be part of the adapter",
            *vocab,
            ", ".join(resized) or "no tensor",
        )
    return {
        "tensors": len(infos_a),
        "parameters": sum(math.prod(i.shape) for i in infos_a.values()),
        "architecture": config_a.get("architectures"),
        "model_type": config_a.get("model_type"),
        "resized_embeddings": resized,
    }
