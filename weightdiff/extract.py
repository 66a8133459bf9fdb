"""ΔW = W_B − W_A, one unit of work at a time, compressed into a PEFT adapter by truncated SVD.

Units are read ahead on a background thread (weightdiff.stream), decomposed on the configured device,
and each finished unit is checkpointed (weightdiff.resume) so that an interrupted run resumes; the
adapter is assembled in plan order at the end, so a resumed run writes the same bytes as an
uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
import zlib
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from weightdiff.adapter import (PREFIX, adapter_config, adapter_config_json, exact_pattern, is_target, lora_keys,
                                target_modules_field)
from weightdiff.checkpoint import TensorReader
from weightdiff.errors import WeightdiffError
from weightdiff.experts import (adapted_ranks, decompose_experts, exact_target_modules, linears_as_parameters,
                                parameter_paths, peft_keys, target_parameters_field)
from weightdiff.files import write_atomic
from weightdiff.lowrank import ZERO_DELTA, Truncated, lora_factors, residual_norm, truncated_svd
from weightdiff.plan import Unit, indexed_modules, units
from weightdiff.rank import auto_rank, chosen_rank, energy_rank, noise_floor, sketch_rank
from weightdiff.resume import Checkpoint, checkpoint_key
from weightdiff.stream import Delta, deltas, pair_delta

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STORAGE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass(frozen=True)
class Options:
    """The extract settings, resolved once (auto rank, alpha, device) for every unit."""
    rank: int
    policy: str
    energy: float
    max_rank: int
    alpha: float | None  # None: each module's alpha equals its rank (scaling 1)
    dtype: torch.dtype
    device: torch.device
    svd: DictConfig
    lora_bias: bool  # every LoRA module carries lora_B.bias (PEFT's lora_bias), which holds Δb

    def scaling(self, rank: int) -> float:
        return 1.0 if self.alpha is None else self.alpha / rank

    def svd_of(self, M: torch.Tensor, rank: int, seed: int) -> Truncated:
        s = self.svd
        return truncated_svd(M.to(self.device), rank, s.method, s.oversample, s.power_iters, seed, s.tol)


def resolved_options(settings: DictConfig, parameters: int) -> Options:
    if settings.dtype not in DTYPES:
        raise WeightdiffError(f"extract.dtype must be one of {', '.join(DTYPES)}, not {settings.dtype!r}")
    rank = auto_rank(parameters) if settings.rank == "auto" else settings.rank
    if not isinstance(rank, int) or rank < 1:
        raise WeightdiffError(f"extract.rank must be a positive integer or auto, not {settings.rank!r}")
    device = settings.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise WeightdiffError(f"extract.device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise WeightdiffError("extract.device=cuda but torch sees no CUDA device")
    device = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    policy = settings.get("rank_policy", "fixed")
    max_rank = int(settings.get("max_rank", rank))
    sketch_rank(policy, rank, max_rank)  # validates the policy name
    svd = settings.svd
    if svd.method not in ("randomized", "exact"):
        raise WeightdiffError(f"extract.svd.method must be randomized or exact, not {svd.method!r}")
    if svd.power_iters != "auto" and not (isinstance(svd.power_iters, int) and svd.power_iters >= 0):
        raise WeightdiffError(f"extract.svd.power_iters must be auto or a count >= 0, not {svd.power_iters!r}")
    if not (isinstance(svd.get("tol"), (int, float)) and 0 < svd.tol < 1):
        raise WeightdiffError(f"extract.svd.tol must be a number in (0, 1), not {svd.get('tol')!r}")
    return Options(rank=rank, policy=policy, energy=float(settings.get("energy", 0.9)), max_rank=max_rank,
                   alpha=None if settings.alpha is None else float(settings.alpha), dtype=DTYPES[settings.dtype],
                   device=torch.device(device), svd=settings.svd,
                   lora_bias=settings.get("extras", {}).get("biases", "skip") == "lora")


def tensor_seed(name: str, seed: int) -> int:
    """Per-tensor seed from its name: results do not depend on the order (or resumption) of the loop."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def spectrum(dw: torch.Tensor, rank: int, name: str, opts: Options) -> Truncated:
    return opts.svd_of(dw, rank, tensor_seed(name, opts.svd.seed))


def keep(t: Truncated, rank: int) -> Truncated:
    return Truncated(t.U[:, :rank].cpu(), t.S[:rank].cpu(), t.Vh[:rank].cpu())


def stats(delta: Delta) -> dict:
    return {"name": delta.name, "shape": list(delta.value.shape), "delta_norm": delta.norm}


def decompose_linear(unit: Unit, ds: list[Delta], opts: Options, storage_dtype: str) -> tuple[list[dict], dict]:
    """LoRA factors with scaling·B·A = the kept part of the SVD of ΔW (and lora_B.bias = Δb / scaling)."""
    weight, bias = ds[0], (ds[1] if len(ds) > 1 else None)
    dw, norm = weight.value, weight.norm
    report = stats(weight)
    if norm == 0.0 and (bias is None or not bias.value.any()):
        return [report | ZERO_DELTA], {}
    cap = min(sketch_rank(opts.policy, opts.rank, opts.max_rank), *dw.shape)
    full = spectrum(dw, cap, weight.name, opts)
    floor = noise_floor(tuple(dw.shape), storage_dtype, weight.rms_a, weight.rms_b) if opts.policy == "noise_floor" else 0.0
    rank = chosen_rank(opts.policy, full.S, norm**2, energy=opts.energy, floor=floor) if norm else 1
    t = keep(full, rank)
    scaling = opts.scaling(rank)
    B, A = (f.to(opts.dtype).contiguous() for f in lora_factors(t, scaling))
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise WeightdiffError(f"{weight.name}: LoRA factors (largest singular value {t.S[0].item():.4g}) overflow "
                              f"{opts.dtype}; use extract.dtype=bf16 or fp32")
    key_a, key_b = lora_keys(unit.module)
    factors = {key_a: A, key_b: B}
    if opts.lora_bias:
        db = bias.value if bias is not None else torch.zeros(dw.shape[0])
        factors[key_b.removesuffix("weight") + "bias"] = (db / scaling).to(opts.dtype)
    rel_error = residual_norm(dw, B.float(), A.float(), scaling) / norm if norm else 0.0
    energy = t.S.square().sum().item() / norm**2 if norm else 1.0
    report |= {"status": "extracted", "rank": rank, "energy": energy, "rel_error": rel_error,
               "singular_values": t.S.tolist()}
    if opts.policy == "noise_floor":
        report["noise_floor"] = floor
    reports = [report] + ([stats(bias) | {"status": "lora_bias"}] if bias else [])
    return reports, factors


def decompose_embedding(unit: Unit, ds: list[Delta], opts: Options) -> tuple[list[dict], dict]:
    """PEFT's Embedding LoRA adds scaling·(B·A)ᵀ to the [vocab, dim] table: A = √Σ·Uᵀ [r, vocab], B = V·√Σ [dim, r]."""
    (d,) = ds
    norm = d.norm
    if norm == 0.0:
        return [stats(d) | ZERO_DELTA], {}
    t = keep(spectrum(d.value, min(opts.rank, *d.value.shape), d.name, opts), min(opts.rank, *d.value.shape))
    scaling = opts.scaling(len(t.S))
    B_t, A_t = lora_factors(Truncated(t.Vh.T, t.S, t.U.T), scaling)  # the SVD of ΔWᵀ
    factors = {f"{PREFIX}{unit.module}.lora_embedding_A": A_t.to(opts.dtype).contiguous(),
               f"{PREFIX}{unit.module}.lora_embedding_B": B_t.to(opts.dtype).contiguous()}
    rel_error = residual_norm(d.value.T, B_t, A_t, scaling) / norm
    return [stats(d) | {"status": "extracted", "rank": len(t.S), "energy": t.S.square().sum().item() / norm**2,
                              "rel_error": rel_error, "singular_values": t.S.tolist()}], factors


def whole_module(unit: Unit, ds: list[Delta]) -> tuple[list[dict], dict]:
    """modules_to_save: B's own weights, stored under the module path, replace A's module entirely."""
    factors = {f"{PREFIX}{d.name}": d.b.contiguous() for d in ds}
    return [stats(d) | {"status": "saved", "bytes": d.b.numel() * d.b.element_size()}
            for d in ds], factors


def measured(ds: list[Delta]) -> list[dict]:
    return [stats(d) | {"status": "skipped"} for d in ds]


def decompose(unit: Unit, ds: list[Delta], opts: Options, tensors: dict) -> tuple[list[dict], dict]:
    if unit.kind == "linear":
        return decompose_linear(unit, ds, opts, tensors[unit.tensors[0]]["dtype"])
    if unit.kind == "embedding":
        return decompose_embedding(unit, ds, opts)
    if unit.kind == "whole":
        return whole_module(unit, ds)
    if unit.kind == "experts":
        return decompose_experts(unit, ds, opts, tensors, tensor_seed(unit.module, opts.svd.seed))
    return measured(ds), {}


def energy_curve(reports: list[dict], max_rank: int) -> list[tuple[int, float]]:
    """Global energy kept if every decomposed tensor were cut at rank k, for k = 1..max_rank, from the spectra."""
    reports = [r for r in reports if "singular_values" in r]
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


def sampled_exact_check(ds: list[Delta], report: dict, opts: Options) -> None:
    """Adds the exact SVD's energy at the same rank, to measure what the randomized one gives up."""
    S = torch.linalg.svdvals(ds[0].value.to(opts.device)).cpu()
    report["energy_exact"] = S[: report["rank"]].square().sum().item() / report["delta_norm"] ** 2


def rank_needed(delta: Delta, target: float, opts: Options) -> int | None:
    """The rank the energy target would take for one delta (None: more than 1024), for the diagnosis."""
    dw = delta.value
    cap = min(1024, *dw.shape)
    t = truncated_svd(dw.to(opts.device), cap, "randomized", opts.svd.oversample, 2, tensor_seed(delta.name, opts.svd.seed))
    norm_sq = delta.norm ** 2
    r = energy_rank(t.S.cpu(), norm_sq, target)
    return None if r == cap and cap < min(dw.shape) and t.S.square().sum() < target * norm_sq else r


def diagnosis(reports: list[dict], opts: Options, target: float, readers, worst: int = 3) -> dict:
    """Whether ΔW looks low-rank at this rank; if not, the worst tensors and the rank the energy target needs."""
    extracted = [r for r in reports if r.get("status") == "extracted" and "singular_values" in r]
    total = sum(r["delta_norm"] ** 2 for r in extracted) or 1.0
    energy = sum(r["energy"] * r["delta_norm"] ** 2 for r in extracted) / total
    if energy >= target:
        return {"low_rank": True, "energy": energy, "target": target}
    # experts are left to tensors.json's per-expert energies: their report names no single checkpoint tensor
    worst_reports = sorted((r for r in extracted if r.get("unit") != "experts"), key=lambda r: r["energy"])[:worst]
    rows = []
    for r in worst_reports:
        rows.append({"name": r["name"], "energy": r["energy"], "rank": r["rank"],
                     "rank_needed": rank_needed(pair_delta(r["name"], *readers), target, opts)})
    for reader in readers:
        reader.unmap()
    shown = "; ".join(f"{w['name']}: energy {w['energy']:.3f} at rank {w['rank']}, needs "
                      f"{w['rank_needed'] or '>1024'} for {target:g}" for w in rows)
    log.warning("ΔW is not low-rank at this rank (energy kept %.3f < %g): a full fine-tune rather than a merged "
                "LoRA? Worst tensors: %s", energy, target, shown)
    return {"low_rank": False, "energy": energy, "target": target, "worst": rows}


def same_shapes(index: dict) -> dict[str, dict]:
    """Model A's tensors without those whose shape differs in B.

    Verify lets such tensors through only as resized embeddings (verify.resized_embeddings=skip): they have
    no delta, so extraction must neither decompose nor measure them.
    """
    a, b = index["model_a"]["tensors"], index["model_b"]["tensors"]
    return {n: t for n, t in a.items() if n in b and b[n]["shape"] == t["shape"]}


def extract(index: dict, manifest: dict, settings: DictConfig, adapter_dir: Path,
            checkpoint_root: Path | None = None) -> tuple[dict, list[dict]]:
    """Writes the adapter; returns (summary metrics, per-tensor reports)."""
    start = time.perf_counter()
    tensors = same_shapes(index)
    parameters = sum(math.prod(t["shape"]) for t in tensors.values())
    opts = resolved_options(settings, parameters)
    modules = indexed_modules(index["model_a"])
    plan = units(tensors, settings, modules)
    log.info("extracting %d linear modules and %d expert parameters (%s) at rank %d (%s policy%s), alpha %s, "
             "factors in %s, on %s", sum(u.kind == "linear" for u in plan), sum(u.kind == "experts" for u in plan),
             settings.target_modules if isinstance(settings.target_modules, str) else ",".join(settings.target_modules),
             opts.rank if opts.policy == "fixed" else opts.max_rank, opts.policy,
             "" if opts.policy == "fixed" else f", capped at {opts.max_rank}",
             "= rank" if opts.alpha is None else f"{opts.alpha:g}", settings.dtype, opts.device)
    checkpoint = Checkpoint(checkpoint_root or adapter_dir.parent / ".checkpoints",
                            checkpoint_key(manifest, OmegaConf.to_container(settings, resolve=True)))
    if finished := checkpoint.done():
        log.info("resuming: %d of %d units already done (%s)", finished, len(plan), checkpoint.dir)
    results: dict[int, tuple[list[dict], dict]] = {}
    todo = []
    for i, unit in enumerate(plan):
        done = checkpoint.load(unit_id(unit))
        if done is None:
            todo.append(i)
        else:
            results[i] = done
    samples = opts.svd.get("check_samples", 0) if opts.svd.method != "exact" else 0
    check_every = max(1, math.ceil(sum(plan[i].kind == "linear" for i in todo) / max(samples, 1)))
    readers = (TensorReader(Path(manifest["model_a"]["path"])), TensorReader(Path(manifest["model_b"]["path"])))
    stream = deltas([plan[i] for i in todo], *readers, prefetch=int(settings.get("prefetch", 1)),
                    rms=opts.policy == "noise_floor")
    linear_seen = 0
    with closing(stream):
        for i, ds in tqdm(zip(todo, stream), total=len(plan), initial=len(plan) - len(todo), desc="extract", unit="module"):
            unit = plan[i]
            reports, factors = decompose(unit, ds, opts, tensors)
            if unit.kind == "linear" and reports[0]["status"] == "extracted":
                if samples and linear_seen % check_every == 0:
                    sampled_exact_check(ds, reports[0], opts)
                linear_seen += 1
            for r in reports:
                entry = tensors[unit.tensors[0]]
                r |= {"module": unit.module, "layer": entry["layer"], "kind": r.get("kind", entry["kind"]), "unit": unit.kind}
            checkpoint.save(unit_id(unit), reports, factors)
            results[i] = (reports, factors)
    reports = [r for i in range(len(plan)) for r in results[i][0]]
    factors = peft_keys({k: v for i in range(len(plan)) for k, v in results[i][1].items()}, modules.experts if modules else ())
    metrics = summary(reports, factors, opts, manifest)
    metrics["diagnosis"] = diagnosis(reports, opts, opts.energy, readers)
    config = adapter_config_for(plan, reports, tensors, settings, opts, manifest)
    write_adapter(adapter_dir, factors, config)
    checkpoint.remove()
    metrics["adapter_bytes"] = (adapter_dir / "adapter_model.safetensors").stat().st_size
    metrics["compression_ratio"] = metrics["model_bytes"] / metrics["adapter_bytes"]
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return metrics, reports


def unit_id(unit: Unit) -> str:
    return unit.module + ":" + ",".join(unit.tensors)


def summary(reports: list[dict], factors: dict, opts: Options, manifest: dict) -> dict:
    linear = [r for r in reports if r.get("unit") in ("linear", "experts") and "energy" in r]
    extracted = [r for r in linear if r["status"] == "extracted"]
    if not extracted:
        raise WeightdiffError(f"A and B are identical on all {len(linear)} target tensors: there is nothing to extract")
    zero = [r["name"] for r in linear if r["status"] == "zero"]
    if zero:
        log.warning("%d tensors have an all-zero delta and are left out of the adapter: %s", len(zero), ", ".join(zero[:5]))
    clamped = [r for r in extracted if opts.policy == "fixed" and r["rank"] < opts.rank]
    for r in clamped:
        log.warning("%s %s is smaller than rank %d: clamped to rank %d", r["name"], r["shape"], opts.rank, r["rank"])
    total_sq = sum(r["delta_norm"] ** 2 for r in linear)
    checked = [r for r in extracted if "energy_exact" in r]
    skipped = [r for r in reports if r["status"] == "skipped"]
    saved = [r for r in reports if r["status"] == "saved"]
    return {
        "rank": opts.rank, "rank_policy": opts.policy, "alpha": opts.alpha if opts.alpha is not None else float(opts.rank),
        "tensors_total": len(linear), "tensors_extracted": len(extracted), "tensors_zero": len(zero),
        "tensors_clamped": len(clamped),
        "rank_mean": sum(r["rank"] for r in extracted) / len(extracted),
        "rank_max": max(r["rank"] for r in extracted),
        "energy": sum(r["energy"] * r["delta_norm"] ** 2 for r in linear) / total_sq if total_sq else 1.0,
        "energy_min": min(r["energy"] for r in extracted),
        "rel_error_max": max(r["rel_error"] for r in extracted),
        "delta_norm_total": math.sqrt(total_sq),
        "svd_check": {"tensors": len(checked),
                      "max_energy_gap": max((r["energy_exact"] - r["energy"] for r in checked), default=0.0)},
        "extras": {"saved": len(saved), "saved_bytes": sum(r["bytes"] for r in saved), "skipped": len(skipped),
                   "skipped_delta_norm": math.sqrt(sum(r["delta_norm"] ** 2 for r in skipped))},
        "model_bytes": sum(f["size"] for f in manifest["model_b"]["files"] if f["name"].endswith(".safetensors")),
        "adapter_params": sum(f.numel() for f in factors.values()),
    }


def adapter_config_for(plan: list[Unit], reports: list[dict], tensors: dict, settings: DictConfig, opts: Options,
                       manifest: dict) -> dict:
    by_module = {r["module"]: r for r in reports if r["name"].endswith(".weight")}
    candidates = [u.module for u in plan if u.kind in ("linear", "embedding")]
    extracted = [m for m in candidates if by_module[m]["status"] == "extracted"]
    names = [] if isinstance(settings.target_modules, str) else list(settings.target_modules)
    names += sorted({m.rpartition(".")[2] for m in candidates if not is_target(m, names)})
    weights = linears_as_parameters(extracted, tensors)
    listed = [m for m in extracted if m not in weights]
    parameters = {f"{m}.weight": by_module[m]["rank"] for m in weights} | adapted_ranks(reports)
    ranks = {m: by_module[m]["rank"] for m in listed} | parameters
    r = opts.rank if opts.policy == "fixed" else max(ranks.values())
    field = target_modules_field(listed, names, sorted({t["module"] for t in tensors.values()}))
    config = adapter_config(
        base_model=base_model_name(manifest["model_a"]), rank=r,
        alpha=float(r) if opts.alpha is None else opts.alpha,
        target_modules=exact_target_modules(field, listed, tensors),
        rank_pattern={exact_pattern(m): k for m, k in ranks.items() if k != r},
        alpha_pattern={exact_pattern(m): float(k) for m, k in ranks.items() if k != r and opts.alpha is None})
    if parameters:
        config["target_parameters"] = target_parameters_field(list(parameters), parameter_paths(tensors))
    saved = sorted({u.module for u in plan if u.kind == "whole"})
    if saved:
        config["modules_to_save"] = saved
    if opts.lora_bias:
        config["lora_bias"] = True
    return config
