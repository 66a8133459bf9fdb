"""The paper's figures, drawn from the run's own outputs (tensors.json, the energy curve, dvc.yaml).

Every figure is a pure function of files the pipeline wrote, so `dvc repro` redraws exactly what changed;
the pipeline figure is drawn from dvc.yaml itself so it cannot drift from the real stage graph.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

from weightdiff.errors import WeightdiffError  # noqa: E402
from weightdiff.files import atomic_path  # noqa: E402

DPI = 150
FIGURE_NAMES = ("delta_norms.png", "energy_vs_rank.png", "heatmap.png", "layer_divergence.png", "pipeline.png")
ZERO_COLOR = "#d62728"
BLOCK_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BOX_W, BOX_H, GAP_X, GAP_Y = 2.2, 0.75, 0.35, 0.45  # pipeline boxes and the gaps between them, in inches
NORM_LABEL = r"$\|\Delta W\|_F$"


def write_figures(tensors: dict, energy_curve: list[tuple[int, float]], divergence: list[dict], dvc_yaml: Path,
                  out_dir: Path) -> list[Path]:
    """Draws the figures the paper links to, into out_dir; returns their paths in FIGURE_NAMES order.
    `divergence`: validate's per-layer rows (layer, rel_error_adapted, rel_error_base)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = decomposed(tensors)
    draw = {
        "delta_norms.png": lambda: delta_norms_figure(tensors),
        "energy_vs_rank.png": lambda: energy_figure(tensors, energy_curve),
        "heatmap.png": lambda: heatmap_figure(tensors),
        "layer_divergence.png": lambda: divergence_figure(divergence),
        "pipeline.png": lambda: pipeline_figure(dvc_yaml),
    }
    return [save_png(draw[name](), out_dir / name) for name in FIGURE_NAMES]


def save_png(fig: Figure, path: Path) -> Path:
    """Writes fig atomically, so a crash never leaves a half-written PNG for DVC."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------- per-tensor numbers


def decomposed(tensors: dict) -> dict:
    """tensors.json restricted to the deltas that were decomposed: extras saved whole or skipped have no
    spectrum, and no place among the per-module figures."""
    return tensors | {"tensors": [t for t in tensors["tensors"] if "singular_values" in t]}


def module_kinds(tensors: dict) -> list[str]:
    """The kinds present, in the order of a transformer block (q, k, v, o, gate, up, down), then any others in
    order of appearance: tensors.json follows the checkpoint's alphabetical order, which scatters them."""
    return _block_order(t["kind"] for t in tensors["tensors"])


def _block_order(kinds: Iterable[str]) -> list[str]:
    present = list(dict.fromkeys(kinds))
    return sorted(present, key=lambda k: (BLOCK_ORDER.index(k) if k in BLOCK_ORDER else len(BLOCK_ORDER),
                                          present.index(k)))


def layer_norm_grid(tensors: dict) -> tuple[list[int], list[str], np.ndarray]:
    """(layers, kinds, grid) with grid[i, j] = ‖ΔW‖_F of kind j in layer i; NaN where no such tensor exists.

    Tensors without a layer (embeddings, lm_head) are left out: they have no place on a layer axis.
    """
    layered = [t for t in tensors["tensors"] if t["layer"] is not None]
    layers = sorted({t["layer"] for t in layered})
    kinds = _block_order(t["kind"] for t in layered)
    grid = np.full((len(layers), len(kinds)), np.nan)
    for t in layered:
        grid[layers.index(t["layer"]), kinds.index(t["kind"])] = t["delta_norm"]
    return layers, kinds, grid


def unlayered_norms(tensors: dict) -> dict[str, float]:
    """Module → ‖ΔW‖_F for tensors outside the decoder layers, which the per-layer figures cannot place."""
    return {t["module"]: t["delta_norm"] for t in tensors["tensors"] if t["layer"] is None}


def energy_curves(tensors: dict, max_rank: int, group_of: Callable[[dict], str] = lambda t: t["kind"]
                  ) -> dict[str, list[float]]:
    """Group (module kind by default) → [energy kept at rank k for k = 1..max_rank], pooled over its tensors.

    energy(k) = Σ_tensors Σ_{i≤k} σᵢ² / Σ_tensors ‖ΔW‖²_F, the definition of metrics/energy_vs_rank.csv
    (which is the curve of the single group of all tensors). A tensor whose rank was clamped below k keeps
    all its stored singular values. Groups whose every delta is zero have no defined energy and are omitted.
    """
    kept: dict[str, np.ndarray] = {}
    total: dict[str, float] = {}
    for t in tensors["tensors"]:
        sq = np.square(np.asarray(t["singular_values"][:max_rank], dtype=float))
        cumulative = np.concatenate([np.cumsum(sq), np.full(max_rank - len(sq), sq.sum())])
        group = group_of(t)
        kept[group] = kept.get(group, np.zeros(max_rank)) + cumulative
        total[group] = total.get(group, 0.0) + float(t["delta_norm"]) ** 2
    return {group: (kept[group] / total[group]).tolist() for group in kept if total[group] > 0}


# ---------------------------------------------------------------- data figures


def delta_norms_figure(tensors: dict) -> Figure:
    """‖ΔW‖_F against layer, one line per module kind: where along the depth the two models differ."""
    layers, kinds, grid = layer_norm_grid(tensors)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, kind in enumerate(kinds):
        ax.plot(layers, grid[:, j], marker="o", markersize=4, label=kind)
    zeros = np.argwhere(grid == 0)
    if len(zeros):
        ax.scatter([layers[i] for i, _ in zeros], np.zeros(len(zeros)), marker="x", s=60, color=ZERO_COLOR,
                   zorder=5, label=r"$\Delta W = 0$")
    ax.set_xlabel("layer")
    ax.set_ylabel(NORM_LABEL)
    ax.set_title("Frobenius norm of the weight delta per layer and module kind")
    ax.set_xticks(layers if len(layers) <= 32 else layers[:: max(1, len(layers) // 16)])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=min(4, len(kinds) + 1))
    unlayered = unlayered_norms(tensors)
    if unlayered:
        note = "not per-layer (not plotted): " + ", ".join(f"{m} ‖ΔW‖_F={v:.4g}" for m, v in unlayered.items())
        fig.text(0.01, -0.02, note, fontsize=9, ha="left", va="top", wrap=True)
    return fig


def energy_figure(tensors: dict, energy_curve: list[tuple[int, float]]) -> Figure:
    """Energy kept vs rank, global and per kind, with the chosen rank marked: how low-rank ΔW really is."""
    ranks = [r for r, _ in energy_curve]
    global_energy = [e for _, e in energy_curve]
    chosen = int(tensors["rank"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    curves = energy_curves(tensors, len(ranks))
    for kind in (k for k in module_kinds(tensors) if k in curves):
        ax.plot(ranks, curves[kind], linewidth=1, alpha=0.8, label=kind)
    ax.plot(ranks, global_energy, color="black", linewidth=2.5, label="all tensors")
    ax.axvline(chosen, color="gray", linestyle="--", linewidth=1)
    if chosen in ranks:
        at_chosen = global_energy[ranks.index(chosen)]
        ax.plot([chosen], [at_chosen], marker="o", color="black")
        ax.annotate(f"r = {chosen}: {at_chosen:.6g}", (chosen, at_chosen), textcoords="offset points",
                    xytext=(-10, -12), ha="right", va="top", fontsize=9,
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    ax.set_xlabel("rank k")
    ax.set_ylabel(r"energy kept  $\sum_{i \leq k} \sigma_i^2 \,/\, \|\Delta W\|_F^2$")
    ax.set_title("Spectral energy of ΔW kept by a rank-k truncation")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(min(ranks, default=0) - 0.5, max(ranks, default=chosen) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    return fig


def divergence_figure(divergence: list[dict]) -> Figure:
    """Relative error of the hidden state after each layer against B's: where along the depth A + adapter
    loses B, next to how far A alone is from it."""
    layers = [row["layer"] for row in divergence]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(layers, [row["rel_error_base"] for row in divergence], marker="o", color="gray", label="A alone")
    ax.plot(layers, [row["rel_error_adapted"] for row in divergence], marker="o", color="black", label="A + adapter")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(r"$\|h_{X} - h_B\|_F \,/\, \|h_B\|_F$")
    ax.set_title("Divergence from B of the hidden state after each layer (validation batch)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def heatmap_figure(tensors: dict) -> Figure:
    """Layer × kind map of ‖ΔW‖_F; zero deltas hatched in red so "unchanged" never reads as "small"."""
    layers, kinds, grid = layer_norm_grid(tensors)
    fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2.5, min(12.0, 0.35 * len(layers) + 2.0)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0)
    fig.colorbar(image, ax=ax, label=NORM_LABEL)
    for i, j in np.argwhere(grid == 0):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor=ZERO_COLOR, hatch="xx",
                               linewidth=0))
    if len(layers) <= 40:
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7,
                        color="black" if value == 0 else _label_color(image, value),
                        fontweight="bold" if value == 0 else "normal",
                        bbox=dict(facecolor="white", edgecolor="none", pad=1) if value == 0 else None)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("module kind")
    ax.set_ylabel("layer")
    ax.set_title(NORM_LABEL + " by layer and module (red hatch: ΔW = 0, blank: no tensor)", fontsize=10)
    return fig


def _label_color(image: matplotlib.image.AxesImage, value: float) -> str:
    """Black on light cells, white on dark ones, so every annotation stays readable."""
    r, g, b, _ = image.cmap(image.norm(value))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


# ---------------------------------------------------------------- pipeline DAG


def dvc_stages(dvc_yaml: Path) -> dict[str, dict[str, list[str]]]:
    """Stage → {"deps": [...], "outs": [...]} from dvc.yaml, with ${...} resolved as DVC does from
    params.yaml beside it and the file's own `vars` mappings; metrics and plots files count as outs."""
    try:
        doc = yaml.safe_load(dvc_yaml.read_text()) or {}
        stages = doc["stages"]
        context = _interpolation_context(dvc_yaml.parent / "params.yaml", doc.get("vars") or [])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise WeightdiffError(f"{dvc_yaml}: cannot read its stages: {e}") from e
    return {
        name: {
            "deps": _paths(stage.get("deps"), context),
            "outs": [p for key in ("outs", "metrics", "plots") for p in _paths(stage.get(key), context)],
        }
        for name, stage in stages.items()
    }


def _interpolation_context(params_yaml: Path, dvc_vars: list) -> dict:
    context = (yaml.safe_load(params_yaml.read_text()) or {}) if params_yaml.is_file() else {}
    for entry in dvc_vars:
        if isinstance(entry, dict):
            context.update(entry)
    return context


def _paths(entries: list | None, context: dict) -> list[str]:
    """Normalised paths of a dvc.yaml list, whose items are either "path" or {"path": {options}}."""
    return [str(PurePosixPath(_interpolated(e if isinstance(e, str) else next(iter(e)), context)))
            for e in entries or []]


def _interpolated(text: str, context: dict) -> str:
    """text with each ${dotted.key} found in context replaced by its value; unknown keys are kept as written."""
    def value(match: re.Match) -> str:
        node = context
        for key in match[1].split("."):
            if not isinstance(node, dict) or key not in node:
                return match[0]
            node = node[key]
        return str(node)
    return INTERPOLATION.sub(value, text)


INTERPOLATION = re.compile(r"\$\{\s*([\w.-]+)\s*\}")


def pipeline_edges(dvc_yaml: Path) -> list[tuple[str, str]]:
    """(X, Y) for each pair of stages where one of Y's deps is one of X's outs or lies under it."""
    stages = dvc_stages(dvc_yaml)
    return [
        (producer, consumer)
        for producer, p in stages.items()
        for consumer, c in stages.items()
        if producer != consumer and any(_within(dep, out) for dep in c["deps"] for out in p["outs"])
    ]


def _within(dep: str, out: str) -> bool:
    dep_path, out_path = PurePosixPath(dep), PurePosixPath(out)
    return dep_path == out_path or out_path in dep_path.parents


def stage_depths(stages: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Stage → length of the longest path reaching it: its column in a left-to-right layered drawing."""
    depth = {s: 0 for s in stages}
    for _ in stages:  # longest paths settle within len(stages) relaxations on a DAG
        changed = False
        for x, y in edges:
            if depth[y] < depth[x] + 1:
                depth[y], changed = depth[x] + 1, True
        if not changed:
            return depth
    raise WeightdiffError(f"the dvc.yaml stage graph has a cycle: {edges}")


def pipeline_figure(dvc_yaml: Path) -> Figure:
    """The stage DAG, layered top-to-bottom by depth, each box listing the files the stage writes.

    Arrows between adjacent layers are straight; arrows that skip layers run in the gaps between rows and
    in lanes beside the boxes (dashed), so that no arrow crosses a box it does not connect.
    """
    stages = dvc_stages(dvc_yaml)
    edges = pipeline_edges(dvc_yaml)
    depth = stage_depths(list(stages), edges)
    rows = [[s for s in stages if depth[s] == d] for d in range(max(depth.values(), default=0) + 1)]
    centers = {stage: ((k - (len(row) - 1) / 2) * (BOX_W + GAP_X), -d * (BOX_H + GAP_Y))
               for d, row in enumerate(rows) for k, stage in enumerate(row)}
    routes = _edge_routes(edges, depth, centers, max(map(len, rows)) * (BOX_W + GAP_X) / 2)
    half_w = max(abs(x) for route in routes for x, _ in route) + 0.3
    fig, ax = plt.subplots(figsize=(max(4.5, 2 * half_w), len(rows) * (BOX_H + GAP_Y) + 0.3))
    for stage, (x, y) in centers.items():
        ax.add_patch(Rectangle((x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H, facecolor="#e8f0fe",
                               edgecolor="#1a4c8b", linewidth=1.2))
        ax.text(x, y + 0.14, stage, ha="center", va="center", fontsize=12, fontweight="bold")
        ax.text(x, y - 0.17, _outs_label(stages[stage]["outs"]), ha="center", va="center", fontsize=8,
                family="monospace", color="#333333")
    for route in routes:
        straight = len(route) == 2
        ax.add_patch(FancyArrowPatch(path=MplPath(route), arrowstyle="-|>", mutation_scale=12, shrinkA=0,
                                     shrinkB=0, color="#555555" if straight else "#888888",
                                     linestyle="-" if straight else "--", linewidth=1.1))
    ax.set_xlim(-half_w, half_w)
    ax.set_ylim(-(len(rows) - 1) * (BOX_H + GAP_Y) - BOX_H / 2 - 0.15, BOX_H / 2 + 0.15)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig


def _edge_routes(edges: list[tuple[str, str]], depth: dict[str, int], centers: dict[str, tuple[float, float]],
                 half_width: float) -> list[list[tuple[float, float]]]:
    """The polyline of each arrow: bottom-centre to top-centre between adjacent layers; otherwise down into
    the gap below the source, out to a lane beyond every box, down, and back in through the gap above the
    target. Lanes stack outwards and alternate sides so that skip arrows do not overlap one another."""
    routes, lanes = [], {-1: 0, 1: 0}
    for x_stage, y_stage in edges:
        (x0, y0), (x1, y1) = centers[x_stage], centers[y_stage]
        top, bottom = (x1, y1 + BOX_H / 2), (x0, y0 - BOX_H / 2)
        if depth[y_stage] - depth[x_stage] == 1:
            routes.append([bottom, top])
            continue
        side = 1 if x0 + x1 > 0 or (x0 + x1 == 0 and lanes[1] <= lanes[-1]) else -1
        k = lanes[side]
        lanes[side] += 1
        lane = side * (half_width + 0.2 + 0.2 * k)
        dx = side * (BOX_W / 2 - 0.25 - 0.12 * (k % 8))
        below, above = y0 - BOX_H / 2 - GAP_Y * (0.3 + 0.1 * (k % 4)), y1 + BOX_H / 2 + GAP_Y * (0.7 - 0.1 * (k % 4))
        routes.append([(x0 + dx, bottom[1]), (x0 + dx, below), (lane, below), (lane, above), (x1 + dx, above),
                       (x1 + dx, top[1])])
    return routes


def _outs_label(outs: list[str], limit: int = 2) -> str:
    """The first few outs of a stage, for its box: enough to see what it hands on."""
    shown = ", ".join(PurePosixPath(o).name for o in outs[:limit])
    return shown + (f" +{len(outs) - limit}" if len(outs) > limit else "") if outs else "(no outs)"
