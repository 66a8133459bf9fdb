"""The paper's figures, drawn from the run's own outputs: the tensor reports, the energy curve extract wrote,
validate's per-layer divergence, and the stage graph as DVC itself resolves it.

Every figure is a pure function of what it is given, so `dvc repro` redraws exactly what changed. Nothing is
recomputed here: the energy curves are extract's, the per-layer numbers come from report.facts, and the
pipeline is DVC's own graph, so the figure cannot drift from the stages DVC runs.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
from dvc.exceptions import DvcException  # noqa: E402
from dvc.repo import Repo  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

from weightdiff.errors import WeightdiffError  # noqa: E402
from weightdiff.files import atomic_path  # noqa: E402
from weightdiff.report.facts import energy_at, in_block_order, layer_norm_grid, unlayered_norms  # noqa: E402

DPI = 150
FIGURE_NAMES = ("delta_norms.png", "energy_vs_rank.png", "heatmap.png", "layer_divergence.png", "pipeline.png")
ZERO_COLOR = "#d62728"
BOX_W, BOX_H, GAP_X, GAP_Y = 2.2, 0.75, 0.35, 0.45  # pipeline boxes and the gaps between them, in inches
NORM_LABEL = r"$\|\Delta W\|_F$"
CURVE_COLUMNS = ("rank", "energy")  # the energy curve's own columns; every other one is a module type's curve


def write_figures(
    reports: list[dict],
    energy_curve: list[dict],
    adapter: dict,
    divergence: list[dict],
    pipeline: nx.DiGraph,
    out_dir: Path,
) -> list[Path]:
    """Draws the figures the paper links to, into out_dir; returns their paths in FIGURE_NAMES order.

    reports: tensors.json; energy_curve: metrics/energy_vs_rank.csv rows; adapter: metrics/extract.json;
    divergence: validate's per-layer rows; pipeline: pipeline_graph() of the repository.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    draw = {
        "delta_norms.png": lambda: delta_norms_figure(reports),
        "energy_vs_rank.png": lambda: energy_figure(energy_curve, adapter),
        "heatmap.png": lambda: heatmap_figure(reports),
        "layer_divergence.png": lambda: divergence_figure(divergence),
        "pipeline.png": lambda: pipeline_figure(pipeline),
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


# ---------------------------------------------------------------- data figures


def delta_norms_figure(reports: list[dict]) -> Figure:
    """‖ΔW‖_F against layer, one line per module type: where along the depth the two models differ."""
    layers, types, grid = layer_norm_grid(reports)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, module_type in enumerate(types):
        ax.plot(layers, grid[:, j], marker="o", markersize=4, label=module_type)
    zeros = np.argwhere(grid == 0)
    if len(zeros):
        ax.scatter(
            [layers[i] for i, _ in zeros],
            np.zeros(len(zeros)),
            marker="x",
            s=60,
            color=ZERO_COLOR,
            zorder=5,
            label=r"$\Delta W = 0$",
        )
    ax.set_xlabel("layer")
    ax.set_ylabel(NORM_LABEL)
    ax.set_title("Frobenius norm of the weight delta per layer and module type")
    ax.set_xticks(layers if len(layers) <= 32 else layers[:: max(1, len(layers) // 16)])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=min(4, len(types) + 1))
    unlayered = unlayered_norms(reports)
    if unlayered:
        note = "not per-layer (not plotted): " + ", ".join(f"{m} ‖ΔW‖_F={v:.4g}" for m, v in unlayered.items())
        fig.text(0.01, -0.02, note, fontsize=9, ha="left", va="top", wrap=True)
    return fig


def module_type_curves(energy_curve: list[dict]) -> dict[str, list[float]]:
    """Module type → its own curve, from the energy curve's extra columns, in block order; a column with no
    defined value (a type whose every delta is zero) is left out rather than drawn as a broken line."""
    columns = in_block_order(c for c in (energy_curve[0] if energy_curve else {}) if c not in CURVE_COLUMNS)
    curves = {c: [float(row[c]) for row in energy_curve] for c in columns}
    return {c: values for c, values in curves.items() if not np.isnan(values).any()}


def energy_figure(energy_curve: list[dict], adapter: dict) -> Figure:
    """Energy kept vs rank, global and per module type, with the adapter's r marked: how low-rank ΔW really is, and
    past r (dotted: the randomized SVD's lower bounds) what a larger rank would keep, with 2r marked.

    Under an adaptive rank policy the adapter is not a point of these fixed-rank curves; it is drawn as its own
    point, at its mean module rank and the energy it keeps.
    """
    ranks = [row["rank"] for row in energy_curve]
    r = int(adapter["rank"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    within = [k <= r for k in ranks]
    for module_type, curve in module_type_curves(energy_curve).items():
        (line,) = ax.plot(ranks[: sum(within)], curve[: sum(within)], linewidth=1, alpha=0.8, label=module_type)
        ax.plot(
            ranks[sum(within) - 1 :],
            curve[sum(within) - 1 :],
            linewidth=1,
            alpha=0.8,
            linestyle=":",
            color=line.get_color(),
        )
    total = [row["energy"] for row in energy_curve]
    ax.plot(ranks[: sum(within)], total[: sum(within)], color="black", linewidth=2.5, label="all targets")
    if not all(within):
        ax.plot(
            ranks[sum(within) - 1 :],
            total[sum(within) - 1 :],
            color="black",
            linewidth=2.5,
            linestyle=":",
            label="past r (at least)",
        )
    ax.axvline(r, color="gray", linestyle="--", linewidth=1)
    if 2 * r in ranks:
        _mark(
            ax,
            2 * r,
            energy_at(energy_curve, 2 * r),
            f"2r = {2 * r}: ≥ {energy_at(energy_curve, 2 * r):.6g}",
            "o",
            left=True,
        )
    if adapter["rank_policy"] == "fixed":
        _mark(ax, r, energy_at(energy_curve, r), f"r = {r}: {energy_at(energy_curve, r):.6g}", "o", left=True)
    else:
        _mark(
            ax,
            adapter["rank_mean"],
            adapter["energy"],
            f"adapter (ranks ≤ r = {r}): {adapter['energy']:.6g} at mean rank {adapter['rank_mean']:.1f}",
            "*",
            left=False,
        )
    ax.set_xlabel("rank k")
    ax.set_ylabel(r"energy kept  $\sum_{i \leq k} \sigma_i^2 \,/\, \|\Delta W\|_F^2$")
    ax.set_title("Spectral energy of ΔW kept by a rank-k truncation")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(min(ranks, default=0) - 0.5, max([*ranks, r]) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    return fig


def _mark(ax: plt.Axes, x: float, y: float, label: str, marker: str, left: bool) -> None:
    ax.plot([x], [y], marker=marker, markersize=9 if marker == "*" else 6, color="black", linestyle="none")
    ax.annotate(
        label,
        (x, y),
        textcoords="offset points",
        xytext=(-10 if left else 10, -12),
        ha="right" if left else "left",
        va="top",
        fontsize=9,
        bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1),
    )


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


def heatmap_figure(reports: list[dict]) -> Figure:
    """Layer × module type map of ‖ΔW‖_F; zero deltas hatched in red so "unchanged" never reads as "small"."""
    layers, types, grid = layer_norm_grid(reports)
    fig, ax = plt.subplots(figsize=(1.1 * len(types) + 2.5, min(12.0, 0.35 * len(layers) + 2.0)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0)
    fig.colorbar(image, ax=ax, label=NORM_LABEL)
    for i, j in np.argwhere(grid == 0):
        ax.add_patch(
            Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor=ZERO_COLOR, hatch="xx", linewidth=0)
        )
    if len(layers) <= 40:
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(
                    j,
                    i,
                    f"{value:.3g}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if value == 0 else _label_color(image, value),
                    fontweight="bold" if value == 0 else "normal",
                    bbox=dict(facecolor="white", edgecolor="none", pad=1) if value == 0 else None,
                )
    ax.set_xticks(range(len(types)), types, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(NORM_LABEL + " by layer and module (red hatch: ΔW = 0, blank: no tensor)", fontsize=10)
    return fig


def _label_color(image: matplotlib.image.AxesImage, value: float) -> str:
    """Black on light cells, white on dark ones, so every annotation stays readable."""
    r, g, b, _ = image.to_rgba(np.asarray(value))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


# ---------------------------------------------------------------- pipeline DAG


def pipeline_graph(root: Path) -> nx.DiGraph:
    """The stage graph as DVC resolves it (interpolation, vars, outs inside outs): an edge X → Y when Y
    depends on something X writes; each node carries `outs`, the paths the stage writes (metrics and plots
    included), in dvc.yaml's order.

    This reads DVC's index, which takes no lock, so it works inside a stage that `dvc repro` is running.
    """
    try:
        with Repo(str(root)) as repo:
            dvc_graph = repo.index.graph
            names = {stage: stage_name(stage, Path(repo.root_dir)) for stage in dvc_graph}
            graph = nx.DiGraph()
            for stage, name in names.items():
                graph.add_node(name, outs=[str(PurePosixPath(out.def_path)) for out in stage.outs])
            # DVC's edges point from a stage to the stages it depends on; ours follow the data.
            graph.add_edges_from((names[producer], names[consumer]) for consumer, producer in dvc_graph.edges)
    except DvcException as e:
        raise WeightdiffError(f"{root}: DVC cannot read the pipeline: {e}") from e
    return graph


def stage_name(stage, root: Path) -> str:
    """A stage as `dvc dag` names it from the repository root: its name for the root dvc.yaml, else
    file:name (or the .dvc file's path)."""
    path = Path(stage.path).resolve().relative_to(root.resolve()).as_posix()
    name = getattr(stage, "name", None)
    if name is None:
        return path
    return name if path == "dvc.yaml" else f"{path}:{name}"


def pipeline_rows(graph: nx.DiGraph) -> list[list[str]]:
    """The stages layered top to bottom, each one row below the lowest stage it reads from (the longest path
    reaching it), and in dvc.yaml's order within a row."""
    order = list(graph)
    return [sorted(generation, key=order.index) for generation in nx.topological_generations(graph)]


def pipeline_figure(graph: nx.DiGraph) -> Figure:
    """The stage DAG, layered top to bottom, each box listing the files the stage writes.

    Arrows between adjacent rows are straight; arrows that skip rows run in the gaps between rows and
    in lanes beside the boxes (dashed), so that no arrow crosses a box it does not connect.
    """
    rows = pipeline_rows(graph)
    depth = {stage: d for d, row in enumerate(rows) for stage in row}
    centers = {
        stage: ((k - (len(row) - 1) / 2) * (BOX_W + GAP_X), -d * (BOX_H + GAP_Y))
        for d, row in enumerate(rows)
        for k, stage in enumerate(row)
    }
    routes = _edge_routes(list(graph.edges), depth, centers, max(map(len, rows), default=1) * (BOX_W + GAP_X) / 2)
    half_w = max([BOX_W / 2, *(abs(x) for route in routes for x, _ in route)]) + 0.3
    fig, ax = plt.subplots(figsize=(max(4.5, 2 * half_w), len(rows) * (BOX_H + GAP_Y) + 0.3))
    for stage, (x, y) in centers.items():
        ax.add_patch(
            Rectangle(
                (x - BOX_W / 2, y - BOX_H / 2), BOX_W, BOX_H, facecolor="#e8f0fe", edgecolor="#1a4c8b", linewidth=1.2
            )
        )
        ax.text(x, y + 0.14, stage, ha="center", va="center", fontsize=12, fontweight="bold")
        ax.text(
            x,
            y - 0.17,
            _outs_label(graph.nodes[stage].get("outs", [])),
            ha="center",
            va="center",
            fontsize=8,
            family="monospace",
            color="#333333",
        )
    for route in routes:
        straight = len(route) == 2
        ax.add_patch(
            FancyArrowPatch(
                path=MplPath(route),
                arrowstyle="-|>",
                mutation_scale=12,
                shrinkA=0,
                shrinkB=0,
                color="#555555" if straight else "#888888",
                linestyle="-" if straight else "--",
                linewidth=1.1,
            )
        )
    ax.set_xlim(-half_w, half_w)
    ax.set_ylim(-(len(rows) - 1) * (BOX_H + GAP_Y) - BOX_H / 2 - 0.15, BOX_H / 2 + 0.15)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig


def _edge_routes(
    edges: list[tuple[str, str]], depth: dict[str, int], centers: dict[str, tuple[float, float]], half_width: float
) -> list[list[tuple[float, float]]]:
    """The polyline of each arrow: bottom-centre to top-centre between adjacent rows; otherwise down into
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
        routes.append(
            [(x0 + dx, bottom[1]), (x0 + dx, below), (lane, below), (lane, above), (x1 + dx, above), (x1 + dx, top[1])]
        )
    return routes


def _outs_label(outs: list[str], width: int = 28) -> str:
    """The first outs of a stage that fit its box (at least one), and how many more: enough to see what it
    hands on."""
    names = [PurePosixPath(o).name for o in outs]
    shown = names[:1]
    for name in names[1:]:
        if len(", ".join([*shown, name])) + len(f" +{len(names)}") > width:
            break
        shown.append(name)
    rest = len(names) - len(shown)
    return ", ".join(shown) + (f" +{rest}" if rest else "") if names else "(no outs)"
