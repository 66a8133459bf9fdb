"""ΔW = W_B − W_A, one unit of work at a time, compressed into a PEFT adapter: plan → execute → assemble.

The plan (weightdiff.plan) splits the checkpoints into units. An executor (weightdiff.executor: this process, one
unit after another, or Ray tasks) reads each unit's tensors and forms their deltas (weightdiff.stream), turns
them into reports and adapter entries by the unit's action (weightdiff.actions) on the configured device, and
keeps each finished unit in the resume store, so that an interrupted run resumes, under either executor. The
adapter is assembled from the store in plan order at the end: a resumed run, or one on Ray, writes the same
bytes as an uninterrupted local one.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from weightdiff.actions import Result
from weightdiff.decompose import Method
from weightdiff.errors import WeightdiffError
from weightdiff.executor import Job, Task, execute
from weightdiff.layout import ModelModules
from weightdiff.metrics import diagnosis, energy_curves, left_out, log_left_out, summary
from weightdiff.peft_format import (
    ADAPTER_WEIGHTS,
    Targets,
    adapter_config,
    is_target,
    peft_keys,
    target_fields,
    wrapper_paths,
    write_adapter,
)
from weightdiff.plan import Unit, plan_units
from weightdiff.records import TensorReport
from weightdiff.resume import ResumeStore, resume_key
from weightdiff.settings import RUN_ONLY_KEYS, ExtractSettings, SvdSettings, plain

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
    store = ResumeStore(resume_root.resolve(), resume_key(manifest, result_settings(settings))).open()
    if finished := store.done():
        log.info("resuming: %d of %d units already done (%s)", finished, len(plan), store.dir)
    checked = energy_checked(plan, settings.svd, tensors)
    tasks = [
        Task(unit, {n: tensors[n] for n in unit.tensors}, i in checked)
        for i, unit in enumerate(plan)
        if not store.has(unit.id)
    ]
    model_a, model_b = (Path(manifest[side]["path"]).resolve() for side in ("model_a", "model_b"))
    job = Job(model_a, model_b, method, store, torch.get_num_threads())
    with tqdm(total=len(plan), initial=len(plan) - len(tasks), desc="extract", unit="module") as bar:
        execute(job, tasks, settings, bar.update)
    results = [finished_unit(store, unit) for unit in plan]
    reports = [r for result in results for r in result[0]]
    raw_factors = {k: v for result in results for k, v in result[1].items()}
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
    in_adapter = [u for u, result in zip(plan, results, strict=True) if result[1]]
    config = adapter_config(
        base_model=base_model_name(manifest["model_a"]),
        rank=rank,
        alpha=method.alpha,
        targets=targets,
        saved=sorted({u.module for u in in_adapter if u.action == "save"}),
        lora_bias=lora_bias,
        tied=any(u.tied for u in in_adapter),
    )
    write_adapter(adapter_dir, factors, config, provenance(manifest, plan, reports, modules.experts))
    store.remove()
    adapter_bytes = (adapter_dir / ADAPTER_WEIGHTS).stat().st_size
    model_bytes = sum(f["size"] for f in manifest["model_b"]["files"] if f["name"].endswith(".safetensors"))
    metrics |= {
        "model_bytes": model_bytes,
        "adapter_params": sum(f.numel() for f in factors.values()),
        "adapter_bytes": adapter_bytes,
        "compression_ratio": model_bytes / adapter_bytes,
        "inputs": inputs(index, manifest, settings),
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


def energy_checked(plan: list[Unit], svd: SvdSettings, tensors: dict[str, dict]) -> set[int]:
    """The plan indices of the units whose randomized SVD gets a second opinion (weightdiff.executor's
    second_opinion): every `check_every`-th lora unit of the decoder layers in plan order, the first included.

    Chosen from the plan alone, so that neither the order in which an executor finishes units nor what a resumed
    run had already done changes which reports carry `energy_reference`; from the layers' units, which are what a
    fine-tune changes: the LM head, first in checkpoint order, is often unchanged (no SVD to check).
    """
    every = svd.check_every if svd.method == "randomized" else 0
    layers = [i for i, u in enumerate(plan) if u.action == "lora" and tensors[u.tensors[0]]["layer"] is not None]
    return set(layers[::every]) if every else set()


def finished_unit(store: ResumeStore, unit: Unit) -> Result:
    """A unit's result as its executor left it in the store."""
    result = store.load(unit.id)
    if result is None:  # a Ray worker that wrote to a store the driver cannot see
        raise WeightdiffError(
            f"unit {unit.id} ran but is not in the resume store {store.dir}: with extract.executor=ray, paths.resume "
            "must be on a filesystem that every Ray node shares"
        )
    return result


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
    return target_fields(modules, parameters, names, tensors, tied_lora(plan, list(modules)))


def tied_lora(plan: list[Unit], modules: list[str]) -> tuple[str, str] | None:
    """(embedding, LM head) when a tied embedding has factors, which PEFT ties to the head."""
    return next(
        ((u.module, u.tied) for u in plan if u.action == "lora_embedding" and u.tied and u.module in modules), None
    )


def provenance(manifest: dict, plan: list[Unit], reports: list[TensorReport], order: tuple[str, ...]) -> dict:
    """What the adapter file records of its making (peft_format.write_adapter): the models it goes between, each
    expert parameter's ParamWrapper and expert count, and a tied embedding with factors and its head."""
    experts = {
        r["name"]: r["shape"][0] for r in reports if r["action"] == "lora_experts" and r["status"] == "extracted"
    }
    extracted = [r["module"] for r in reports if r.get("status") == "extracted"]
    return {
        "model_a": base_model_name(manifest["model_a"]),
        "model_b": base_model_name(manifest["model_b"]),
        "experts": {p: {"wrapper": w, "experts": experts[p]} for p, w in wrapper_paths(list(experts), order).items()},
        "tied": tied_lora(plan, extracted),
    }


def inputs(index: dict, manifest: dict, settings: ExtractSettings) -> dict:
    """How the run read its inputs, for the metrics and the paper: where each model's tensors came from (a local
    directory, a fetched snapshot, byte ranges streamed from the Hub), which executor ran the units, and what the
    checkpoints store (tensors by stored dtype, and the quantization dequantized on read, if any)."""
    sides = {}
    for side in ("model_a", "model_b"):
        entry, config = manifest[side], index[side]["config"]
        sides[side] = {
            "read": entry.get("mode", "local"),  # a Hub source's manifest entry has its mode; local and demo none
            "dtypes": dict(sorted(Counter(t["dtype"] for t in index[side]["tensors"].values()).items())),
            "quantization": (config.get("quantization_config") or {}).get("quant_method"),
        }
    return {"executor": str(settings.executor)} | sides


def base_model_name(entry: dict) -> str:
    """What adapter_config.json names as the base: the repo id for Hub models (portable), else the directory."""
    return entry["source"].partition("@")[0] if entry["kind"] == "hub" else entry["path"]
