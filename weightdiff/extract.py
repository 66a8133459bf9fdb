"""ΔW = W_B − W_A, one unit of work at a time, compressed into a PEFT adapter: plan → stream → decompose →
resume store → assemble.

Units are read ahead on a background thread (weightdiff.stream), turned into reports and adapter entries by
their action (weightdiff.actions) on the configured device, and each finished unit is kept in the resume store
so that an interrupted run resumes; the adapter is assembled in plan order at the end, so a resumed run writes
the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import closing
from pathlib import Path

import torch
from tqdm import tqdm

from weightdiff.actions import ACTIONS, Result
from weightdiff.decompose import Method
from weightdiff.layout import ModelModules
from weightdiff.metrics import diagnosis, energy_curves, left_out, log_left_out, summary
from weightdiff.peft_format import Targets, adapter_config, is_target, peft_keys, target_fields, write_adapter
from weightdiff.plan import Unit, plan_units
from weightdiff.records import TensorReport
from weightdiff.resume import ResumeStore, resume_key
from weightdiff.safetensors_io import TensorReader
from weightdiff.settings import RUN_ONLY_KEYS, ExtractSettings, SvdSettings, plain
from weightdiff.stream import Delta, deltas

log = logging.getLogger(__name__)


def same_shapes(index: dict) -> dict[str, dict]:
    """Model A's tensors without those whose shape differs in B.

    Verify lets such tensors through only as resized embeddings (verify.resized_embeddings=skip): they have
    no delta, so extraction must neither decompose nor measure them.
    """
    a, b = index["model_a"]["tensors"], index["model_b"]["tensors"]
    return {n: t for n, t in a.items() if n in b and b[n]["shape"] == t["shape"]}


def result_settings(settings: ExtractSettings) -> dict:
    """The settings that change the adapter: what a resume store is keyed by."""
    return {k: v for k, v in plain(settings).items() if k not in RUN_ONLY_KEYS}


def extract(
    index: dict, manifest: dict, settings: ExtractSettings, adapter_dir: Path, resume_root: Path
) -> tuple[dict, list[TensorReport], list[dict[str, float]]]:
    """Writes the adapter; returns (summary metrics, per-tensor reports, energy-vs-rank curves)."""
    start = time.perf_counter()
    tensors = same_shapes(index)
    method = Method.resolve(settings, sum(math.prod(t["shape"]) for t in tensors.values()))
    modules = ModelModules.from_json(index["model_a"]["modules"])
    plan = plan_units(tensors, settings, modules)
    log_plan(plan, settings, method)
    store = ResumeStore(resume_root, resume_key(manifest, result_settings(settings))).open()
    if finished := store.done():
        log.info("resuming: %d of %d units already done (%s)", finished, len(plan), store.dir)
    results = {i: done for i, unit in enumerate(plan) if (done := store.load(unit.id)) is not None}
    todo = [i for i in range(len(plan)) if i not in results]
    readers = (TensorReader(Path(manifest["model_a"]["path"])), TensorReader(Path(manifest["model_b"]["path"])))
    checks = EnergyChecks(settings.svd, method)
    stream = deltas([plan[i] for i in todo], *readers, rms=method.policy == "noise_floor")
    with closing(stream):
        for i, ds in tqdm(
            zip(todo, stream, strict=True),
            total=len(plan),
            initial=len(plan) - len(todo),
            desc="extract",
            unit="module",
        ):
            unit = plan[i]
            result = ACTIONS[unit.action](unit, ds, method, tensors)
            checks.add(unit, ds, result)
            store.save(unit.id, *result)
            results[i] = result
    reports = [r for i in range(len(plan)) for r in results[i][0]]
    raw_factors = {k: v for i in range(len(plan)) for k, v in results[i][1].items()}
    lora_bias, reasons = settle_biases(reports, raw_factors)
    factors = peft_keys(raw_factors, modules.experts)
    targets = targets_of(plan, reports, settings, tensors)
    # PEFT's r: the configured rank, or under an adaptive policy the largest (the others go in rank_pattern)
    rank = method.rank if method.policy == "fixed" or not targets.ranks else max(targets.ranks.values())
    reasons |= {name: u.reason for u in plan if u.reason for name in u.tensors}
    metrics = summary(reports, method, rank) | {
        "diagnosis": diagnosis(reports, method),
        "left_out": left_out(reports, reasons),
    }
    in_adapter = [u for i, u in enumerate(plan) if results[i][1]]
    config = adapter_config(
        base_model=base_model_name(manifest["model_a"]),
        rank=rank,
        alpha=method.alpha,
        targets=targets,
        saved=sorted({u.module for u in in_adapter if u.action == "save"}),
        lora_bias=lora_bias,
        tied=any(u.tied for u in in_adapter),
    )
    write_adapter(adapter_dir, factors, config)
    store.remove()
    adapter_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    model_bytes = sum(f["size"] for f in manifest["model_b"]["files"] if f["name"].endswith(".safetensors"))
    metrics |= {
        "model_bytes": model_bytes,
        "adapter_params": sum(f.numel() for f in factors.values()),
        "adapter_bytes": adapter_bytes,
        "compression_ratio": model_bytes / adapter_bytes,
        "seconds": round(time.perf_counter() - start, 3),
    }
    log_left_out(metrics["left_out"], sum(r["delta_norm"] == 0 for r in reports))
    return metrics, reports, energy_curves(reports, metrics["rank_max"])


def log_plan(plan: list[Unit], settings: ExtractSettings, method: Method) -> None:
    targets = settings.target_modules
    log.info(
        "extracting %d linear modules, %d embeddings and %d expert parameters (%s; %s profile) at rank %d (%s "
        "policy%s), alpha %s, factors in %s, on %s; %d modules saved whole if changed, %d measured and left out",
        sum(u.action == "lora" for u in plan),
        sum(u.action == "lora_embedding" for u in plan),
        sum(u.action == "lora_experts" for u in plan),
        targets if isinstance(targets, str) else ",".join(targets),
        settings.profile,
        method.rank if method.policy == "fixed" else method.max_rank,
        method.policy,
        "" if method.policy == "fixed" else f", capped at {method.max_rank}",
        "= rank" if method.alpha is None else f"{method.alpha:g}",
        settings.dtype,
        method.device,
        sum(u.action == "save" for u in plan),
        sum(u.action == "skip" for u in plan),
    )


def lora_bias_obstacle(reports: list[TensorReport]) -> str | None:
    """Why PEFT's lora_bias, one flag for the whole adapter, cannot carry this adapter's bias deltas (None: it can).

    PEFT refuses lora_bias on Embedding layers and on expert parameters (ParamWrapper), and on a target without a
    bias of its own it warns, and merge_and_unload raises.
    """
    with_factors = [r for r in reports if r.get("status") == "extracted" and "rank" in r]
    if any(r["action"] == "lora_embedding" for r in with_factors):
        return "PEFT's lora_bias is not supported with an embedding LoRA, which is kept"
    if any(r["action"] == "lora_experts" for r in with_factors):
        return "PEFT's lora_bias is not supported with expert LoRAs (target_parameters), which are kept"
    biased = {r["module"] for r in reports if r["action"] == "lora" and r["name"].endswith(".bias")}
    bare = sorted({r["module_type"] for r in with_factors if r["module"] not in biased})
    if bare:
        return f"PEFT's lora_bias on targets without a bias ({', '.join(bare)}) warns and breaks merge_and_unload"
    return None


def settle_biases(reports: list[TensorReport], factors: dict[str, torch.Tensor]) -> tuple[bool, dict[str, str]]:
    """Whether the adapter sets lora_bias; reports and factors are updated in place, and the biases that do not
    go in are returned with the reason (tensor name → why).

    Extraction carries each target's bias with its weight; here, with the whole adapter known, they stay only if
    some bias delta is not zero and PEFT can apply lora_bias to every layer of this adapter. Otherwise their
    lora_B.bias entries go, and their reports say so: unchanged (status zero) or left out (action skip).
    """
    carried = [r for r in reports if r["action"] == "lora" and r["name"].endswith(".bias")]
    changed = any(r["delta_norm"] > 0 for r in carried)
    obstacle = lora_bias_obstacle(reports) if changed else None
    if changed and obstacle is None:
        return True, {}
    for key in [k for k in factors if k.endswith(".lora_B.bias")]:
        del factors[key]
    for r in carried:
        if obstacle is None:
            r["status"] = "zero"
        else:
            r["action"] = "skip"
            del r["status"]
    return False, {r["name"]: obstacle for r in carried} if obstacle else {}


class EnergyChecks:
    """What the randomized SVD gives up, from below: every `check_every`-th extracted lora unit (the first
    included) gets a second opinion (Method.reference_energy), whose energy at the same rank is the report's
    `energy_reference`. Every report's `energy_bound` bounds the optimum from above at no cost: it lies between.

    The exact SVD this replaces cost 90% of a default extraction (svdvals of a 14336×4096 delta: seconds); the
    second opinion costs two fp32 passes over one unit in `check_every`.
    """

    def __init__(self, settings: SvdSettings, method: Method):
        self.every = settings.check_every if settings.method == "randomized" else 0
        self.seen = 0
        self.method = method

    def add(self, unit: Unit, ds: list[Delta], result: Result) -> None:
        report = result[0][0]
        if unit.action != "lora" or report["status"] != "extracted":
            return
        if self.every and self.seen % self.every == 0:
            A = next(f for key, f in result[1].items() if key.endswith("lora_A.weight"))
            report["energy_reference"] = self.method.reference_energy(ds[0], A)
        self.seen += 1


def targets_of(
    plan: list[Unit], reports: list[TensorReport], settings: ExtractSettings, tensors: dict[str, dict]
) -> Targets:
    """adapter_config's target fields for the modules and expert parameters that got factors."""
    by_module = {r["module"]: r for r in reports if r["name"].endswith(".weight")}
    candidates = [u.module for u in plan if u.action in ("lora", "lora_embedding")]
    modules = {m: by_module[m]["rank"] for m in candidates if by_module[m]["status"] == "extracted"}
    parameters = {r["name"]: r["rank"] for r in reports if r["action"] == "lora_experts" and r["status"] == "extracted"}
    names = [] if isinstance(settings.target_modules, str) else list(settings.target_modules)
    names += sorted({m.rpartition(".")[2] for m in candidates if not is_target(m, names)})
    tied = next(
        ((u.module, u.tied) for u in plan if u.action == "lora_embedding" and u.tied and u.module in modules), None
    )
    return target_fields(modules, parameters, names, tensors, tied)


def base_model_name(entry: dict) -> str:
    """What adapter_config.json names as the base: the repo id for Hub models (portable), else the directory."""
    return entry["source"].partition("@")[0] if entry["kind"] == "hub" else entry["path"]
