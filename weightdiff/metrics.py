"""What the per-tensor reports add up to: the run's summary metrics, what the adapter leaves out, the tensors that
keep least energy when the rank keeps less than the target, and the energy-vs-rank curves, computed once here for
the metrics, the figures and the paper.

Energy explains; it does not judge. Extraction runs before validation, so nothing here says whether A + adapter
reproduces B: validate's gap_closed does.

"Decomposed" means every report with a spectrum (the lora actions), embeddings included: one definition of
the energy an adapter keeps, wherever it is quoted.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

from typing_extensions import TypedDict

from weightdiff.decompose import Method
from weightdiff.errors import WeightdiffError
from weightdiff.records import LORA_ACTIONS, TensorReport, decomposed, energy_kept, saved

log = logging.getLogger(__name__)


def spectrum(r: TensorReport) -> list[float]:
    """Every singular value the SVD found for the tensor: the kept ones, then those past its rank."""
    return r["singular_values"] + r.get("singular_values_beyond", [])


def curve_reach(reports: list[TensorReport], max_rank: int) -> int:
    """How far the energy curve goes: as far as every decomposed tensor's spectrum does (one known whole, a small
    matrix's or a zero delta's, counts as reaching anywhere), and at least to the adapter's largest rank."""
    partial = [
        len(spectrum(r)) for r in decomposed(reports) if r["delta_norm"] > 0 and len(spectrum(r)) < min(r["shape"][-2:])
    ]
    return max(max_rank, min(partial, default=max_rank))


def energy_curves(reports: list[TensorReport], max_rank: int) -> list[dict[str, float]]:
    """Energy kept if every decomposed tensor were cut at rank k, for k = 1 … curve_reach: `energy` over all of them,
    and one column per module type (q_proj, experts.gate_up_proj...), from their spectra. Past a tensor's rank the
    randomized SVD's singular values are each a lower bound on ΔW's: there the curve is one too."""
    groups: dict[str, list[TensorReport]] = {"energy": decomposed(reports)}
    for r in groups["energy"]:
        groups.setdefault(r["module_type"], []).append(r)
    totals = {g: sum(r["delta_norm"] ** 2 for r in rs) or 1.0 for g, rs in groups.items()}
    spectra = {id(r): spectrum(r) for r in groups["energy"]}
    rows = []
    for k in range(1, curve_reach(reports, max_rank) + 1):
        rows.append(
            {"rank": k}
            | {g: sum(sum(s * s for s in spectra[id(r)][:k]) for r in rs) / totals[g] for g, rs in groups.items()}
        )
    return rows


def summary(reports: list[TensorReport], method: Method, adapter_rank: int) -> dict:
    """The run's headline numbers; refuses a pair with no delta in any target."""
    targets = [r for r in reports if r["action"] in LORA_ACTIONS and "rank" in r]
    chosen = [r for r in targets if r["status"] == "extracted"]
    if not chosen:
        changed = [r for r in reports if r["action"] not in LORA_ACTIONS and r["delta_norm"] > 0]
        elsewhere = (
            f"; {len(changed)} other tensors differ: {', '.join(sorted({r['module_type'] for r in changed}))} "
            "(see extract.target_modules and extract.extras)"
            if changed
            else ""
        )
        raise WeightdiffError(
            f"A and B are identical on all {len(targets)} LoRA targets: nothing to decompose{elsewhere}"
        )
    zero = [r["name"] for r in targets if r["status"] == "zero"]
    if zero:
        log.info("%d tensors are unchanged (all-zero delta) and need no factors: %s", len(zero), ", ".join(zero[:5]))
    clamped = [r for r in chosen if method.policy == "fixed" and r["rank"] < method.rank]
    for r in clamped:
        log.warning("%s %s is smaller than rank %d: clamped to rank %d", r["name"], r["shape"], method.rank, r["rank"])
    checked = [r for r in chosen if "energy_reference" in r]
    skipped = [r for r in reports if r["action"] == "skip"]
    held = saved(reports)
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
            "max_energy_gap": max((r["energy_reference"] - r["energy"] for r in checked), default=0.0),
            "max_energy_gap_bound": max(
                (r["energy_bound"] - r["energy"] for r in chosen if "energy_bound" in r), default=0.0
            ),
        },
        "extras": {
            "saved": len(held),
            "saved_bytes": sum(r["bytes"] for r in held),
            "skipped": len(skipped),
            "skipped_delta_norm": math.sqrt(sum(r["delta_norm"] ** 2 for r in skipped)),
            "skipped_unchanged": sum(r["delta_norm"] == 0 for r in skipped),
        },
        "delta_norm_model": math.sqrt(sum(r["delta_norm"] ** 2 for r in reports)),
    }


class LeftOut(TypedDict):
    """One group of what the adapter leaves out: metrics/extract.json's `left_out`, which the paper reads."""

    module_type: str  # q_proj, input_layernorm, q_proj.bias...
    tensors: int
    share: float  # of the whole model's ‖ΔW‖² (Σ over every tensor of B − A)
    reason: str


def left_out(reports: list[TensorReport], reasons: dict[str, str]) -> list[LeftOut]:
    """What the adapter leaves out, by module type and reason, each group with its share of the whole model's
    ‖ΔW‖², largest first: every skipped tensor whose delta is not zero (an unchanged one loses nothing).

    reasons: tensor name → why it is left out. A bias is its own type (`q_proj.bias`), apart from its weight.
    """
    total = sum(r["delta_norm"] ** 2 for r in reports)
    groups: dict[tuple[str, str], list[TensorReport]] = defaultdict(list)
    for r in reports:
        if r["action"] == "skip" and r["delta_norm"] > 0:
            kind = r["module_type"] + (".bias" if r["name"].endswith(".bias") else "")
            groups[kind, reasons[r["name"]]].append(r)
    rows = [
        LeftOut(module_type=kind, tensors=len(rs), share=sum(r["delta_norm"] ** 2 for r in rs) / total, reason=why)
        for (kind, why), rs in groups.items()
    ]
    return sorted(rows, key=lambda row: -row["share"])


def log_left_out(rows: list[LeftOut], unchanged: int) -> None:
    """The last word of the extract log: what the adapter leaves out of B, with its share, or that it leaves
    nothing out."""
    if not rows:
        log.info("left out of the adapter: nothing (%d unchanged tensors need nothing)", unchanged)
        return
    log.warning(
        "left out of the adapter: %.3g%% of the model's ‖ΔW‖², in %d tensors (%d unchanged tensors need nothing)\n%s",
        100 * sum(row["share"] for row in rows),
        sum(row["tensors"] for row in rows),
        unchanged,
        "\n".join(
            f"  {row['module_type']}: {row['tensors']} tensors, {100 * row['share']:.3g}% of ‖ΔW‖²: {row['reason']}"
            for row in rows
        ),
    )


def rank_needed(r: TensorReport, target: float) -> int:
    """A lower bound on the rank the energy target would take for one tensor, from its report alone: every
    direction beyond the kept ones adds at most the smallest kept σ², so the target takes at least
    (target − energy)·‖ΔW‖² / σ_r² more of them (at most all, min(m, n)).

    Free, where the estimate it replaces (a randomized SVD at rank 1024 of the three worst tensors) cost ten times
    the whole extraction of a full fine-tune-like pair; on a slowly decaying spectrum the true rank lies above it.
    """
    kept = [s for s in r["singular_values"] if s > 0]
    everything = min(r["shape"][-2:])
    if not kept:
        return everything
    missing = max(target - r["energy"], 0.0) * r["delta_norm"] ** 2
    return min(len(kept) + math.ceil(missing / kept[-1] ** 2), everything)


def ranks_of(method: Method) -> str:
    return f"rank {method.rank}" if method.policy == "fixed" else f"{method.policy} ranks (at most {method.max_rank})"


def diagnosis(reports: list[TensorReport], method: Method, worst: int = 3) -> dict:
    """The energy the ranks keep against extract.energy; below it, the tensors that keep least and the rank the
    target would need: what explains a gap that validate may find, not a verdict (a full fine-tune can keep 37%
    of ‖ΔW‖² and still close 99% of the KL gap)."""
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
            "rank_needed": rank_needed(r, target),
        }
        for r in worst_reports
    ]
    shown = "; ".join(
        f"{w['name']}: {w['energy']:.1%} at rank {w['rank']}, {target:g} would take rank ≥ {w['rank_needed']}"
        for w in rows
    )
    log.warning(
        "%s keeps %.3g%% of ‖ΔW‖² (below extract.energy %g); validate's gap_closed tells whether A + adapter still "
        "reproduces B. Tensors that keep least: %s",
        ranks_of(method),
        100 * energy,
        target,
        shown,
    )
    return {"low_rank": False, "energy": energy, "target": target, "worst": rows}
