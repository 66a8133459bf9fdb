"""ΔW = W_B − W_A, one tensor pair at a time, compressed into PEFT LoRA factors by truncated SVD."""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from weightdiff.adapter import (adapter_config, adapter_config_json, exact_pattern, is_target, lora_keys,
                                target_modules_field)
from weightdiff.checkpoint import TensorReader
from weightdiff.errors import WeightdiffError
from weightdiff.files import write_atomic
from weightdiff.lowrank import lora_factors, truncated_svd

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def linear_modules(config: dict) -> set[str] | None:
    """Paths of the nn.Linear modules of the model as transformers builds it (on the meta device: no memory).

    LoRA factors only mean something on a Linear; an embedding or a norm that matches a target name
    must be refused, not silently given lora_A/lora_B keys PEFT would drop. None when transformers
    cannot build the architecture.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # unknown model_type, remote code...: fall back to the checkpoint's shapes
        log.warning("transformers cannot build %s (%s): taking every 2D .weight as a linear layer",
                    config.get("model_type"), e)
        return None
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def target_tensors(tensors: dict[str, dict], target_modules: list[str], linears: set[str] | None) -> list[str]:
    """Names of the weight tensors extraction decomposes, in checkpoint order."""
    names = [n for n, t in tensors.items() if n.endswith(".weight") and is_target(t["module"], target_modules)]
    if not names:
        kinds = sorted({t["kind"] for t in tensors.values() if len(t["shape"]) == 2})
        raise WeightdiffError(f"extract.target_modules={list(target_modules)} matches no weight of the model; "
                              f"modules with 2D weights are: {', '.join(kinds)}")
    not_linear = [n for n in names if (linears is not None and tensors[n]["module"] not in linears)
                  or len(tensors[n]["shape"]) != 2]
    if not_linear:
        raise WeightdiffError(f"extract.target_modules={list(target_modules)} selects tensors that are not linear "
                              f"layers, which LoRA factors cannot express: {', '.join(not_linear[:5])}")
    return names


def delta(name: str, reader_a: TensorReader, reader_b: TensorReader) -> torch.Tensor:
    """W_B − W_A in fp32; non-finite weights are an error naming the model and the tensor, not a NaN adapter."""
    wa, wb = reader_a.get(name).float(), reader_b.get(name).float()
    for reader, w in ((reader_a, wa), (reader_b, wb)):
        bad = (~torch.isfinite(w)).sum().item()
        if bad:
            raise WeightdiffError(f"{reader.model_dir / reader.shards[name]}: tensor {name} has {bad} NaN/Inf values")
    return wb - wa


def tensor_seed(name: str, seed: int) -> int:
    """Per-tensor seed from its name: results do not depend on the order (or resumption) of the loop."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def decompose(name: str, module: str, dw: torch.Tensor, settings: DictConfig, alpha: float) -> tuple[dict, dict]:
    """(tensor report, {key: factor}) for one delta."""
    norm = dw.norm().item()
    report = {"name": name, "module": module, "shape": list(dw.shape), "delta_norm": norm}
    if norm == 0.0:
        return report | {"status": "zero", "rank": 0, "energy": 1.0, "rel_error": 0.0, "singular_values": []}, {}
    rank = min(settings.rank, *dw.shape)
    svd = settings.svd
    t = truncated_svd(dw, rank, svd.method, svd.oversample, svd.power_iters, tensor_seed(name, svd.seed))
    scaling = alpha / rank
    B, A = (f.to(DTYPES[settings.dtype]).contiguous() for f in lora_factors(t, scaling))
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise WeightdiffError(f"{name}: LoRA factors (largest singular value {t.S[0].item():.4g}) overflow "
                              f"{settings.dtype}; use extract.dtype=bf16 or fp32")
    rel_error = (dw - scaling * (B.float() @ A.float())).norm().item() / norm
    key_a, key_b = lora_keys(module)
    return report | {"status": "extracted", "rank": rank, "energy": (t.S.square().sum().item()) / norm**2,
                     "rel_error": rel_error, "singular_values": t.S.tolist()}, {key_a: A, key_b: B}


def energy_curve(reports: list[dict], max_rank: int) -> list[tuple[int, float]]:
    """Global energy kept if every tensor were cut at rank k, for k = 1..max_rank, from the stored spectra."""
    total = sum(r["delta_norm"] ** 2 for r in reports) or 1.0
    return [(k, sum(sum(s * s for s in r["singular_values"][:k]) for r in reports) / total)
            for k in range(1, max_rank + 1)]


def base_model_name(entry: dict) -> str:
    """What adapter_config.json names as the base: the repo id for Hub models (portable), else the directory."""
    return entry["source"].partition("@")[0] if entry["kind"] == "hub" else entry["path"]


def write_adapter(out_dir: Path, factors: dict[str, torch.Tensor], config: dict) -> None:
    """Both files into a fresh directory that replaces out_dir only once complete."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_atomic(tmp / "adapter_model.safetensors", safetensors_bytes(factors, metadata={"format": "pt"}))
        write_atomic(tmp / "adapter_config.json", adapter_config_json(config))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract(index: dict, manifest: dict, settings: DictConfig, adapter_dir: Path) -> tuple[dict, list[dict]]:
    """Writes the adapter; returns (summary metrics, per-tensor reports)."""
    if settings.dtype not in DTYPES:
        raise WeightdiffError(f"extract.dtype must be one of {', '.join(DTYPES)}, not {settings.dtype!r}")
    if int(settings.rank) < 1:
        raise WeightdiffError(f"extract.rank must be a positive integer, not {settings.rank!r}")
    start = time.perf_counter()
    tensors = index["model_a"]["tensors"]
    names = target_tensors(tensors, list(settings.target_modules), linear_modules(index["model_a"]["config"]))
    alpha = float(settings.alpha if settings.alpha is not None else settings.rank)
    log.info("extracting %d tensors at rank %d, alpha %g, factors in %s", len(names), settings.rank, alpha, settings.dtype)
    reports, factors = [], {}
    with TensorReader(Path(manifest["model_a"]["path"])) as ra, TensorReader(Path(manifest["model_b"]["path"])) as rb:
        for name in tqdm(names, desc="extract", unit="tensor"):
            entry = tensors[name]
            report, f = decompose(name, entry["module"], delta(name, ra, rb), settings, alpha)
            reports.append(report | {"layer": entry["layer"], "kind": entry["kind"]})
            factors.update(f)
    extracted = [r for r in reports if r["status"] == "extracted"]
    if not extracted:
        raise WeightdiffError(f"A and B are identical on all {len(names)} target tensors: there is nothing to extract")
    clamped = [r for r in extracted if r["rank"] < settings.rank]
    for r in clamped:
        log.warning("%s %s is smaller than rank %d: clamped to rank %d", r["name"], r["shape"], settings.rank, r["rank"])
    zero = [r["name"] for r in reports if r["status"] == "zero"]
    if zero:
        log.warning("%d tensors have an all-zero delta and are left out of the adapter: %s", len(zero), ", ".join(zero[:5]))
    config = adapter_config(
        base_model=base_model_name(manifest["model_a"]), rank=int(settings.rank), alpha=alpha,
        target_modules=target_modules_field([r["module"] for r in extracted], list(settings.target_modules),
                                            [tensors[n]["module"] for n in names]),
        rank_pattern={exact_pattern(r["module"]): r["rank"] for r in clamped})
    write_adapter(adapter_dir, factors, config)
    total_sq = sum(r["delta_norm"] ** 2 for r in reports)
    adapter_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    model_bytes = sum(f["size"] for f in manifest["model_b"]["files"] if f["name"].endswith(".safetensors"))
    metrics = {
        "rank": int(settings.rank), "alpha": alpha,
        "tensors_total": len(reports), "tensors_extracted": len(extracted), "tensors_zero": len(zero),
        "tensors_clamped": len(clamped),
        "energy": sum(r["energy"] * r["delta_norm"] ** 2 for r in reports) / total_sq if total_sq else 1.0,
        "energy_min": min(r["energy"] for r in extracted),
        "rel_error_max": max(r["rel_error"] for r in extracted),
        "delta_norm_total": math.sqrt(total_sq),
        "adapter_bytes": adapter_bytes, "model_bytes": model_bytes,
        "compression_ratio": model_bytes / adapter_bytes,
        "adapter_params": sum(f.numel() for f in factors.values()),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return metrics, reports
