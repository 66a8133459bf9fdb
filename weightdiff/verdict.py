"""Whether A + adapter reproduces B, judged by function (validate's gap_closed), with the energy as the explanation.

Energy kept is a property of the matrices, not of the model's behaviour: a short full fine-tune can keep 37% of
‖ΔW‖² at rank 32 and still close 99% of the KL gap on real text, while an adapter that keeps 99.9% of its targets'
energy can fall short because something it left out (a tied LM head, say) carries the change. So the verdict
comes from gap_closed against a target, and the sentence the user reads says what the energy and the left-out
deltas tell about it, for validate's log, its metrics and the paper alike.
"""

from __future__ import annotations

from typing import Literal, TypedDict

Verdict = Literal["reproduces", "falls_short", "worse", "no_gap"]


class Judgement(TypedDict):
    """The keys validate adds to metrics/validate.json (FORMATS.md), which the paper reads."""

    verdict: Verdict
    gap_closed_target: float
    verdict_summary: str


def judged(validate_metrics: dict, extract_metrics: dict, target: float) -> Judgement:
    """The verdict on one run and the sentence that explains it."""
    gap = validate_metrics["gap_closed"]
    verdict = verdict_of(gap, target)
    return {
        "verdict": verdict,
        "gap_closed_target": target,
        "verdict_summary": summary(verdict, gap, target, extract_metrics),
    }


def verdict_of(gap_closed: float | None, target: float) -> Verdict:
    if gap_closed is None:
        return "no_gap"
    if gap_closed >= target:
        return "reproduces"
    return "falls_short" if gap_closed > 0 else "worse"


def summary(verdict: Verdict, gap: float | None, target: float, extract_metrics: dict) -> str:
    """One sentence: what the adapter does on the evaluation text, and why, from energy and what was left out."""
    kept = f"{rank_words(extract_metrics)} keeps {percent(extract_metrics['energy'])} of ‖ΔW‖²"
    if verdict == "no_gap" or gap is None:
        return "A and B agree on the evaluation text (KL(B ‖ A) = 0): there is no gap to judge the adapter by"
    closes = f"closes {percent(gap)} of the KL gap on the evaluation text"
    energy_target = (extract_metrics.get("diagnosis") or {}).get("target", 0.9)
    low_energy = extract_metrics["energy"] < energy_target
    if verdict == "reproduces":
        if low_energy:
            return (
                f"A + adapter reproduces B: {kept} yet {closes}; the directions it drops matter little to B's "
                f"next-token distributions"
            )
        return f"A + adapter reproduces B: it {closes} ({kept})"
    left_out = largest_left_out(extract_metrics)
    if verdict == "worse":
        return f"the adapter moves A away from B: it {closes} ({kept}){left_out}"
    if low_energy:
        return (
            f"A + adapter falls short of B (target {percent(target)}): {kept} and {closes}; a higher extract.rank "
            f"or rank_policy=energy keeps more{left_out}"
        )
    return (
        f"A + adapter falls short of B (target {percent(target)}) although {kept}: it {closes}, so part of B's change "
        f"lies in what the adapter leaves out{left_out}"
    )


def rank_words(extract_metrics: dict) -> str:
    low, high = extract_metrics.get("rank_min", extract_metrics["rank"]), extract_metrics["rank"]
    return f"rank {high}" if low == high else f"ranks {low}–{high}"


def largest_left_out(extract_metrics: dict) -> str:
    """'; the largest delta left out: ...' for the biggest group extraction did not carry, or ''."""
    groups = [g for g in extract_metrics.get("left_out") or [] if g.get("share", 0) > 0]
    if not groups:
        return ""
    top = max(groups, key=lambda g: g["share"])
    return (
        f"; the largest delta left out is {top['module_type']} ({top['tensors']} tensor"
        f"{'s' if top['tensors'] != 1 else ''}, {percent(top['share'])} of ‖ΔW‖²: {top['reason']})"
    )


def percent(x: float) -> str:
    """Enough digits to tell 99.3% from 99.99% from 100%: as many as a float near 100 holds (13 decimals), past which
    it is 100%. An fp32 adapter of an exactly low-rank delta closes all but ~1e-12 of the gap."""
    value = 100 * x
    digits = next((d for d in range(1, 14) if round(value, d) < 100), None) if 99 <= value < 100 else None
    return f"{value:.{digits}f}%" if digits else f"{value:.3g}%"
