"""What the per-tensor reports add up to: the run's summary metrics, the diagnosis of a delta that is not
low-rank, and the energy-vs-rank curves, computed once here for the metrics, the figures and the paper.

"Decomposed" means every report with a spectrum (the lora actions), embeddings included: one definition of
the energy an adapter keeps, wherever it is quoted.
"""

from __future__ import annotations

import logging
import math

from weightdiff.decompose import Method, tensor_seed
from weightdiff.errors import WeightdiffError
from weightdiff.lowrank import truncated_svd
from weightdiff.rank import energy_rank
from weightdiff.records import LORA_ACTIONS, TensorReport, decomposed, energy_kept
from weightdiff.safetensors_io import TensorReader
from weightdiff.stream import Delta, pair_delta

log = logging.getLogger(__name__)


def energy_curves(reports: list[TensorReport], max_rank: int) -> list[dict[str, float]]:
    """Energy kept if every decomposed tensor were cut at rank k, for k = 1..max_rank: `energy` over all of them,
    and one column per module type (q_proj, experts.gate_up_proj...), from the kept spectra."""
    groups: dict[str, list[TensorReport]] = {"energy": decomposed(reports)}
    for r in groups["energy"]:
        groups.setdefault(r["module_type"], []).append(r)
    totals = {g: sum(r["delta_norm"] ** 2 for r in rs) or 1.0 for g, rs in groups.items()}
    rows = []
    for k in range(1, max_rank + 1):
        rows.append(
            {"rank": k}
            | {g: sum(sum(s * s for s in r["singular_values"][:k]) for r in rs) / totals[g] for g, rs in groups.items()}
        )
    return rows


def summary(reports: list[TensorReport], method: Method, adapter_rank: int) -> dict:
    """The run's headline numbers; refuses a pair with no delta in any target."""
    targets = [r for r in reports if r["action"] in LORA_ACTIONS and "rank" in r]
    chosen = [r for r in targets if r["status"] == "extracted"]
    if not chosen:
        raise WeightdiffError(
            f"A and B are identical on all {len(targets)} target tensors: there is nothing to extract"
        )
    zero = [r["name"] for r in targets if r["status"] == "zero"]
    if zero:
        log.warning(
            "%d tensors have an all-zero delta and are left out of the adapter: %s", len(zero), ", ".join(zero[:5])
        )
    clamped = [r for r in chosen if method.policy == "fixed" and r["rank"] < method.rank]
    for r in clamped:
        log.warning("%s %s is smaller than rank %d: clamped to rank %d", r["name"], r["shape"], method.rank, r["rank"])
    checked = [r for r in chosen if "energy_exact" in r]
    skipped = [r for r in reports if r["action"] == "skip"]
    saved = [r for r in reports if r["action"] == "save"]
    ranks = [r["rank"] for r in chosen]
    return {
        "rank": adapter_rank,
        "rank_policy": method.policy,
        "alpha": method.alpha if method.alpha is not None else float(adapter_rank),
        "tensors_total": len(targets),
        "tensors_extracted": len(chosen),
        "tensors_zero": len(zero),
        "tensors_clamped": len(clamped),
        "rank_min": min(ranks),
        "rank_mean": sum(ranks) / len(ranks),
        "rank_max": max(ranks),
        "energy": energy_kept(decomposed(reports)),
        "energy_min": min(r["energy"] for r in chosen),
        "rel_error_max": max(r["rel_error"] for r in chosen),
        "delta_norm_total": math.sqrt(sum(r["delta_norm"] ** 2 for r in targets)),
        "svd_check": {
            "tensors": len(checked),
            "max_energy_gap": max((r["energy_exact"] - r["energy"] for r in checked), default=0.0),
        },
        "extras": {
            "saved": len(saved),
            "saved_bytes": sum(r["bytes"] for r in saved),
            "skipped": len(skipped),
            "skipped_delta_norm": math.sqrt(sum(r["delta_norm"] ** 2 for r in skipped)),
        },
    }


def rank_needed(delta: Delta, target: float, method: Method) -> int | None:
    """The rank the energy target would take for one delta (None: more than 1024), for the diagnosis."""
    dw = delta.value
    cap = min(1024, *dw.shape)
    t = truncated_svd(
        dw.to(method.device),
        cap,
        "randomized",
        method.svd.oversample,
        2,
        tensor_seed(delta.name, method.svd.seed),
        method.svd.tol,
    )
    norm_sq = delta.norm**2
    r = energy_rank(t.S.cpu(), norm_sq, target)
    return None if r == cap and cap < min(dw.shape) and t.S.square().sum() < target * norm_sq else r


def diagnosis(
    reports: list[TensorReport], method: Method, readers: tuple[TensorReader, TensorReader], worst: int = 3
) -> dict:
    """Whether ΔW looks low-rank at this rank; if not, the worst tensors and the rank the energy target needs."""
    target = method.energy
    chosen = [r for r in decomposed(reports) if r["status"] == "extracted"]
    energy = energy_kept(chosen)
    if energy >= target:
        return {"low_rank": True, "energy": energy, "target": target}
    # experts are left to tensors.json's per-expert energies: their report names no single checkpoint tensor
    worst_reports = sorted((r for r in chosen if r["action"] != "lora_experts"), key=lambda r: r["energy"])[:worst]
    rows = [
        {
            "name": r["name"],
            "energy": r["energy"],
            "rank": r["rank"],
            "rank_needed": rank_needed(pair_delta(r["name"], *readers), target, method),
        }
        for r in worst_reports
    ]
    for reader in readers:
        reader.unmap()
    shown = "; ".join(
        f"{w['name']}: energy {w['energy']:.3f} at rank {w['rank']}, needs {w['rank_needed'] or '>1024'} for {target:g}"
        for w in rows
    )
    log.warning(
        "ΔW is not low-rank at this rank (energy kept %.3f < %g): a full fine-tune rather than a merged "
        "LoRA? Worst tensors: %s",
        energy,
        target,
        shown,
    )
    return {"low_rank": False, "energy": energy, "target": target, "worst": rows}
