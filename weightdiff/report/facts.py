"""What the report states, derived once from the stages' outputs: numbers, verdicts and their formatting.

Pure functions of tensors.json (a list of tensor reports), metrics/*.json, the energy curve CSV and the
params, so that each can be tested on hand-made inputs. Verdicts are short keys (e.g. "not_low_rank"), not
sentences: the sentences live in paper.typ.j2, where a reviewer sees which of them are conditional.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from weightdiff.records import decomposed, energy_kept, saved
from weightdiff.verdict import percent

# Module types in the order of a transformer block; tensors.json follows the checkpoint's alphabetical order,
# which would scatter them across tables and legends.
BLOCK_ORDER = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "experts.gate_up_proj",
    "experts.down_proj",
)
# The figures in the order the paper shows them (magnitudes, rank, pipeline, layers, depth).
PAPER_FIGURES = ("delta_norms.png", "energy_vs_rank.png", "pipeline.png", "heatmap.png", "layer_divergence.png")
SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


# ---------------------------------------------------------------- number formatting


def fmt_num(x: float, digits: int = 3) -> str:
    """x to `digits` significant digits; tiny or huge values as 2.50 × 10⁻⁶ (KL values span many decades)."""
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        decimals = max(0, digits - 1 - math.floor(math.log10(abs(x)))) if x else 0
        return f"{x:.{decimals}f}"
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa} × 10{str(int(exponent)).translate(SUPERSCRIPTS)}"


def fmt_energy(x: float) -> str:
    """An energy fraction: 4 decimals, or 1 − residual when that would print a misleading 1.0000."""
    return f"1 − {fmt_num(1 - x)}" if 0.9999 <= x < 1 else f"{x:.4f}"


def fmt_bytes(n: int) -> str:
    """Bytes in binary units (KiB, MiB, GiB, TiB), as file sizes are usually quoted."""
    value, unit = float(n), "bytes"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def fmt_ratio(x: float) -> str:
    """A compression ratio, e.g. 37.2:1."""
    return f"{x:,.1f}:1"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def fmt_range(low: int, high: int) -> str:
    """A span of ranks, collapsed to one number when it is not a span."""
    return str(low) if low == high else f"{low}–{high}"


def fmt_count(n: int, noun: str) -> str:
    """n and the noun, plural unless n is 1: "1 tensor", "3 tensors"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


FILTERS = {
    "num": fmt_num,
    "energy": fmt_energy,
    "bytes": fmt_bytes,
    "ratio": fmt_ratio,
    "pct": fmt_pct,
    "share": percent,
    "count": fmt_count,
}


# ---------------------------------------------------------------- which reports are which


def lora_biases(reports: list[dict]) -> list[dict]:
    """Biases carried whole in lora_B.bias (PEFT lora_bias): extracted, but with no rank of their own."""
    return [r for r in reports if r["action"] == "lora" and r["status"] == "extracted" and "rank" not in r]


def with_action(reports: list[dict], action: str) -> list[dict]:
    return [r for r in reports if r["action"] == action]


def extracted(reports: list[dict]) -> list[dict]:
    return [r for r in decomposed(reports) if r["status"] == "extracted"]


def in_block_order(types: Iterable[str]) -> list[str]:
    """The distinct module types in the order of a transformer block, then any others as they first appear."""
    present = list(dict.fromkeys(types))
    return sorted(
        present, key=lambda t: (BLOCK_ORDER.index(t) if t in BLOCK_ORDER else len(BLOCK_ORDER), present.index(t))
    )


def pooled_norm(reports: Iterable[dict]) -> float:
    """‖ΔW‖_F of several tensors taken together: √ of the summed squares."""
    return math.sqrt(sum(r["delta_norm"] ** 2 for r in reports))


# ---------------------------------------------------------------- per-layer and per-module-type numbers


def layer_norm_grid(reports: list[dict]) -> tuple[list[int], list[str], np.ndarray]:
    """(layers, module types, grid) with grid[i, j] = ‖ΔW‖_F of type j in layer i; NaN where no such tensor.

    Only the LoRA targets, and only those inside a decoder layer: embeddings and the LM head have no place
    on a layer axis (unlayered_norms lists them).
    """
    layered = [r for r in decomposed(reports) if r["layer"] is not None]
    layers = sorted({r["layer"] for r in layered})
    types = in_block_order(r["module_type"] for r in layered)
    grid = np.full((len(layers), len(types)), np.nan)
    for r in layered:
        grid[layers.index(r["layer"]), types.index(r["module_type"])] = r["delta_norm"]
    return layers, types, grid


def unlayered_norms(reports: list[dict]) -> dict[str, float]:
    """Module → ‖ΔW‖_F for the LoRA targets outside the decoder layers, which per-layer figures cannot place."""
    return {r["module"]: r["delta_norm"] for r in decomposed(reports) if r["layer"] is None}


def layer_totals(reports: list[dict]) -> dict[int, float]:
    """Layer → ‖ΔW‖_F of all its LoRA targets together."""
    layers, _, grid = layer_norm_grid(reports)
    return dict(zip(layers, np.sqrt(np.nansum(np.square(grid), axis=1)).tolist(), strict=True))


def layer_range(reports: list[dict]) -> dict | None:
    """The quietest and the most changed layer, and the mean over layers; None without layered targets."""
    totals = layer_totals(reports)
    if not totals:
        return None
    lowest, highest = min(totals, key=lambda k: totals[k]), max(totals, key=lambda k: totals[k])
    return {
        "lowest": lowest,
        "lowest_norm": totals[lowest],
        "highest": highest,
        "highest_norm": totals[highest],
        "mean_norm": float(np.mean(list(totals.values()))),
        "count": len(totals),
    }


def kept_energy(reports: list[dict]) -> float | None:
    """What the adapter keeps of these decomposed tensors at the ranks it really has (records.energy_kept);
    None when every delta is zero, which the paper shows as a dash rather than as 1."""
    return energy_kept(reports) if pooled_norm(reports) else None


def module_type_rows(reports: list[dict]) -> list[dict]:
    """Per module type, in block order: shapes, tensor counts, pooled ‖ΔW‖_F, the span of ranks, energy kept."""
    targets = decomposed(reports)
    rows = []
    for module_type in in_block_order(r["module_type"] for r in targets):
        members = [r for r in targets if r["module_type"] == module_type]
        ranks = [r["rank"] for r in members if r["status"] == "extracted"]
        rows.append(
            {
                "module_type": module_type,
                "shapes": ", ".join(dict.fromkeys("×".join(map(str, r["shape"])) for r in members)),
                "count": len(members),
                "zero": sum(r["status"] == "zero" for r in members),
                "norm": pooled_norm(members),
                "ranks": fmt_range(min(ranks), max(ranks)) if ranks else "—",
                "energy": kept_energy(members),
            }
        )
    return rows


def zero_tensors(reports: list[dict]) -> list[str]:
    """Targets identical in A and B: they contribute nothing to the adapter."""
    return [r["name"] for r in decomposed(reports) if r["status"] == "zero"]


def largest_delta(reports: list[dict]) -> dict:
    return max(decomposed(reports), key=lambda r: r["delta_norm"])


def smallest_nonzero_delta(reports: list[dict]) -> dict | None:
    return min(extracted(reports), key=lambda r: r["delta_norm"], default=None)


# ---------------------------------------------------------------- ranks and the energy curve


def rank_facts(metrics: dict, params: dict) -> dict:
    """The adapter's r (PEFT's r: the configured rank under rank_policy=fixed, the largest module rank under
    the adaptive policies) and the spread of the ranks the modules really got, which the adaptive policies'
    prose prints; the configured extract.rank is not among them, as no module need have it."""
    settings = params["extract"]
    return {
        "r": int(metrics["rank"]),
        "policy": metrics["rank_policy"],
        "adaptive": metrics["rank_policy"] != "fixed",
        "min": int(metrics["rank_min"]),
        "mean": float(metrics["rank_mean"]),
        "max": int(metrics["rank_max"]),
        "target_energy": settings.get("energy"),
        "cap": settings.get("max_rank"),
    }


def rank_text(ranks: dict) -> str:
    """How the paper names the ranks in a verdict: "rank 16", or "ranks 3–37 (mean 12.4)" when they vary."""
    if ranks["adaptive"] and ranks["min"] != ranks["max"]:
        return f"ranks {fmt_range(ranks['min'], ranks['max'])} (mean {ranks['mean']:.1f})"
    return f"rank {ranks['r']}"


def energy_at(curve: list[dict], k: int, column: str = "energy") -> float:
    """The energy curve (metrics/energy_vs_rank.csv rows) at rank k. The curve ends where the spectra the SVD
    found do (extract.svd.curve_to): past the end it stays at its last value."""
    rows = sorted(curve, key=lambda row: row["rank"])
    return next((row[column] for row in rows if row["rank"] >= k), rows[-1][column])


def curve_facts(curve: list[dict], ranks: dict) -> dict:
    """Points of the global curve the rank subsection compares: rank 1, r/2, r, 2r where the curve reaches it
    (what doubling the rank would keep, at least: past a tensor's rank its singular values are lower bounds), and
    the mean module rank (what a fixed rank of the same average size would keep, against an adaptive policy)."""
    r = ranks["r"]
    half, mean = max(1, r // 2), max(1, round(ranks["mean"]))
    reach = max((row["rank"] for row in curve), default=0)
    return {
        "double": 2 * r,
        "at_double": energy_at(curve, 2 * r) if reach >= 2 * r else None,
        "half": half,
        "at_1": energy_at(curve, 1),
        "at_half": energy_at(curve, half),
        "at_r": energy_at(curve, r),
        "mean_rank": mean,
        "at_mean": energy_at(curve, mean),
    }


# ---------------------------------------------------------------- extras and experts


def extras_facts(reports: list[dict], metrics: dict) -> dict:
    """What the adapter carries beyond low-rank factors of linear layers, and what it measured and left out."""
    skipped = sorted(with_action(reports, "skip"), key=lambda r: r["delta_norm"], reverse=True)
    facts = {
        "saved": list(dict.fromkeys(r["module"] for r in saved(reports))),
        "saved_bytes": metrics["extras"]["saved_bytes"],
        "biases": [r["name"] for r in lora_biases(reports)],
        "embeddings": [r["module"] for r in decomposed(reports) if r["action"] == "lora_embedding"],
        "skipped": len(skipped),
        "skipped_norm": metrics["extras"]["skipped_delta_norm"],
        "skipped_types": in_block_order(r["module_type"] for r in skipped),
        "skipped_largest": skipped[:3],
        "targets_norm": pooled_norm(decomposed(reports)),
    }
    counts = [
        (len(facts["saved"]), "saved whole"),
        (len(facts["biases"]), "in lora_B.bias"),
        (len(facts["embeddings"]), "as lora_embedding"),
        (facts["skipped"], "left out"),
    ]
    return facts | {
        "carried": bool(facts["saved"] or facts["biases"] or facts["embeddings"]),
        "summary": ", ".join(f"{n} {what}" for n, what in counts if n),
    }


def left_out_facts(metrics: dict) -> list[dict]:
    """The deltas extraction did not carry, by group with their share of ‖ΔW‖² and the reason, largest first."""
    return sorted(metrics["left_out"], key=lambda group: group["share"], reverse=True)


def gguf_facts(gguf: dict) -> dict:
    """The GGUF export as written (or why not), with what it left out grouped by reason, largest group first."""
    by_reason: dict[str, list[str]] = {}
    for entry in gguf["left_out"]:
        by_reason.setdefault(entry["reason"], []).append(entry["tensor"])
    groups = [{"reason": reason, "tensors": names} for reason, names in by_reason.items()]
    return gguf | {"left_out_groups": sorted(groups, key=lambda g: len(g["tensors"]), reverse=True)}


def experts_facts(reports: list[dict]) -> dict | None:
    """The fused MoE expert parameters (lora_experts), each decomposed expert by expert; None without them."""
    fused = [r for r in decomposed(reports) if r["action"] == "lora_experts"]
    if not fused:
        return None
    per_expert = [r["experts"] for r in fused if r["status"] == "extracted"]
    ranks = [k for e in per_expert for k in e["rank"]]
    energies = [x for e in per_expert for x in e["energy"]]
    return {
        "parameters": len(fused),
        "experts": max(r["shape"][0] for r in fused),
        "layers": len({r["layer"] for r in fused}),
        "types": in_block_order(r["module_type"] for r in fused),
        "ranks": fmt_range(min(ranks), max(ranks)) if ranks else "—",
        "energy_min": min(energies, default=None),
    }


# ---------------------------------------------------------------- verdicts


def energy_verdict(energy: float) -> str:
    """How low-rank ΔW is, judged by the energy the adapter keeps."""
    if energy >= 0.999:
        return "numerically_low_rank"
    return "approximately_low_rank" if energy >= 0.9 else "not_low_rank"


def fidelity_facts(v: dict) -> dict:
    """Validate's verdict (does A + adapter reproduce B, by gap_closed) and the sentence that explains it."""
    return {"verdict": v["verdict"], "target": v["gap_closed_target"], "summary": v["verdict_summary"]}


def kl_verdict(v: dict) -> str:
    """What the adapter does to KL(B ‖ ·): nothing to measure, brings it to 0, reduces it or increases it."""
    if v["kl_base"] <= 0:
        return "no_gap"
    if v["kl_adapted"] == 0:
        return "exact"
    return "reduces" if v["kl_adapted"] <= v["kl_base"] else "increases"


def kl_factor(v: dict) -> float | None:
    """By how much the adapter changes KL(B ‖ ·), as a factor ≥ 1 in whichever direction it goes."""
    if v["kl_base"] <= 0 or v["kl_adapted"] == 0:
        return None
    return max(v["kl_base"], v["kl_adapted"]) / min(v["kl_base"], v["kl_adapted"])


def texts_kind(v: dict) -> str:
    """Which validation texts were used: seeded ids, the built-in set, or the user's file."""
    return {"seeded ids": "seeded", "built-in": "built-in"}.get(v.get("texts", ""), "file")


def divergence_facts(layers: list[dict]) -> dict | None:
    """After the last layer and at its worst: where along the depth A + adapter departs from B."""
    if not layers:
        return None
    return {"last": layers[-1], "worst": max(layers, key=lambda row: row["rel_error_adapted"])}


# ---------------------------------------------------------------- the run's setting


def model_facts(entry: dict) -> dict:
    """Where a model came from: source, kind, the pinned revision (None when none was recorded), weights' bytes."""
    weights = sum(f["size"] for f in entry.get("files", []) if f["name"].endswith(".safetensors"))
    return {"source": entry["source"], "kind": entry["kind"], "revision": entry.get("revision"), "weights": weights}


READ = {
    "local": "read from a local directory",
    "fetch": "read from a fetched snapshot",
    "stream": "streamed from the Hub",
}
QUANTIZATION = {"fp8": "FP8 e4m3 with block scales", "compressed-tensors": "pack-quantized INT4", "mxfp4": "MXFP4"}


def inputs_line(inputs: dict) -> str:
    """How extraction read its inputs: per model where from, the stored dtypes and any quantization dequantized on
    read, and the executor."""
    sides = []
    for label, side in (("A", inputs["model_a"]), ("B", inputs["model_b"])):
        dtypes = ", ".join(f"{n:,} {dtype}" for dtype, n in side["dtypes"].items())
        q = side["quantization"]
        dequantized = f"; {QUANTIZATION.get(q, q)}, dequantized on read" if q else ""
        sides.append(f"{label} {READ[side['read']]} ({dtypes} tensors{dequantized})")
    return "; ".join(sides) + f"; units run by the {inputs['executor']} executor"


def hardware_line() -> str:
    """The machine that generated this report (normally the one that ran the pipeline)."""
    return (
        f"{platform.system()} {platform.release()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}"
    )


def target_names(params: dict) -> list[str]:
    """extract.target_modules as a list: a preset name (auto, all-linear) is one entry, not its letters."""
    targets = params["extract"]["target_modules"]
    return [targets] if isinstance(targets, str) else list(targets)


def figure_links(figures_dir: Path, out_dir: Path) -> dict[str, str]:
    """Figure name → its path relative to the paper, as Typst resolves an image path (it numbers the figures)."""
    return {name: Path(os.path.relpath(figures_dir / name, out_dir)).as_posix() for name in PAPER_FIGURES}


def paper_facts(run: dict, figures_dir: Path, out_dir: Path) -> dict:
    """Everything paper.typ.j2 prints, from the dict the paper stage assembles (FORMATS.md's files by name)."""
    reports, metrics, v, params = run["tensors"], run["extract"], run["validate"], run["params"]
    ranks = rank_facts(metrics, params)
    return {
        "params": params,
        "extract": metrics,
        "validate": v,
        "gguf": gguf_facts(run["gguf"]),
        "model_a": model_facts(run["manifest"]["model_a"]),
        "model_b": model_facts(run["manifest"]["model_b"]),
        "hardware": hardware_line(),
        "inputs": inputs_line(metrics["inputs"]),
        "targets": target_names(params),
        "svd": params["extract"].get("svd") or {},
        "ranks": ranks,
        "rank_text": rank_text(ranks),
        "curve": curve_facts(run["energy"], ranks),
        "module_types": module_type_rows(reports),
        "zero_tensors": zero_tensors(reports),
        "layers": layer_range(reports),
        "largest": largest_delta(reports),
        "smallest": smallest_nonzero_delta(reports),
        "extras": extras_facts(reports, metrics),
        "left_out": left_out_facts(metrics),
        "experts": experts_facts(reports),
        "divergence": divergence_facts(run.get("layers") or []),
        "fidelity": fidelity_facts(v),
        "energy_verdict": energy_verdict(metrics["energy"]),
        "kl_verdict": kl_verdict(v),
        "kl_factor": kl_factor(v),
        "texts": texts_kind(v),
        "figures": figure_links(figures_dir, out_dir),
    }
