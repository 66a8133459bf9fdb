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
from weightdiff.metrics import diagnosis, energy_curves, summary
from weightdiff.peft_format import Targets, adapter_config, is_target, peft_keys, target_fields, write_adapter
from weightdiff.plan import Unit, plan_units
from weightdiff.records import TensorReport
from weightdiff.resume import ResumeStore, resume_key
from weightdiff.safetensors_io import TensorReader
from weightdiff.settings import RUN_ONLY_KEYS, ExtractSettings, plain
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
    exact_checks = ExactChecks(settings, sum(plan[i].action == "lora" for i in todo), method)
    stream = deltas([plan[i] for i in todo], *readers, prefetch=settings.prefetch, rms=method.policy == "noise_floor")
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
            exact_checks.add(unit, ds, result)
            store.save(unit.id, *result)
            results[i] = result
    reports = [r for i in range(len(plan)) for r in results[i][0]]
    factors = peft_keys({k: v for i in range(len(plan)) for k, v in results[i][1].items()}, modules.experts)
    targets = targets_of(plan, reports, settings, tensors)
    # PEFT's r: the configured rank, or under an adaptive policy the largest (the others go in rank_pattern)
    rank = method.rank if method.policy == "fixed" or not targets.ranks else max(targets.ranks.values())
    metrics = summary(reports, method, rank) | {"diagnosis": diagnosis(reports, method, readers)}
    config = adapter_config(
        base_model=base_model_name(manifest["model_a"]),
        rank=rank,
        alpha=method.alpha,
        targets=targets,
        saved=sorted({u.module for u in plan if u.action == "save"}),
        lora_bias=method.lora_bias,
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
    return metrics, reports, energy_curves(reports, metrics["rank_max"])


def log_plan(plan: list[Unit], settings: ExtractSettings, method: Method) -> None:
    targets = settings.target_modules
    log.info(
        "extracting %d linear modules and %d expert parameters (%s) at rank %d (%s policy%s), alpha %s, "
        "factors in %s, on %s",
        sum(u.action == "lora" for u in plan),
        sum(u.action == "lora_experts" for u in plan),
        targets if isinstance(targets, str) else ",".join(targets),
        method.rank if method.policy == "fixed" else method.max_rank,
        method.policy,
        "" if method.policy == "fixed" else f", capped at {method.max_rank}",
        "= rank" if method.alpha is None else f"{method.alpha:g}",
        settings.dtype,
        method.device,
    )


class ExactChecks:
    """Every so many lora units, the exact SVD's energy at the same rank, to measure what the randomized SVD
    gives up (extract.svd.check_samples spread evenly over the units still to do)."""

    def __init__(self, settings: ExtractSettings, units: int, method: Method):
        self.samples = settings.svd.check_samples if settings.svd.method == "randomized" else 0
        self.every = max(1, math.ceil(units / max(self.samples, 1)))
        self.seen = 0
        self.device = method.device

    def add(self, unit: Unit, ds: list[Delta], result: Result) -> None:
        report = result[0][0]
        if unit.action != "lora" or report["status"] != "extracted":
            return
        if self.samples and self.seen % self.every == 0:
            S = torch.linalg.svdvals(ds[0].value.to(self.device)).cpu()
            report["energy_exact"] = S[: report["rank"]].square().sum().item() / report["delta_norm"] ** 2
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
    return target_fields(modules, parameters, names, tensors)


def base_model_name(entry: dict) -> str:
    """What adapter_config.json names as the base: the repo id for Hub models (portable), else the directory."""
    return entry["source"].partition("@")[0] if entry["kind"] == "hub" else entry["path"]
