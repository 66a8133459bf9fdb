"""Figures from synthetic run outputs shaped as FORMATS.md describes; the pipeline graph from DVC itself."""

from __future__ import annotations

import json
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from dvc.repo import Repo

from helpers_report import (
    RANK,
    TYPES,
    expert_reports,
    extra_reports,
    extract_metrics,
    synthetic_divergence,
    synthetic_reports,
)
from weightdiff.errors import WeightdiffError
from weightdiff.figures import (
    FIGURE_NAMES,
    module_type_curves,
    pipeline_figure,
    pipeline_graph,
    pipeline_rows,
    write_figures,
)
from weightdiff.metrics import energy_curves
from weightdiff.report.facts import PAPER_FIGURES, layer_norm_grid, unlayered_norms

REPO = Path(__file__).resolve().parents[1]
STAGES = ["download", "verify", "index", "extract", "validate", "gguf-convert", "figures", "paper"]

# The pipeline's 8 stages with the dvc.yaml spellings DVC must resolve: ${...} from a vars file and from an
# inline vars mapping, metrics and plots as outs, outs with options, a dep under a directory out, and a dep
# (adapter.gguf) that shares a string prefix with an out (artifacts/adapter) of a stage it does not depend on.
PATHS_YAML = "paths:\n  manifest: artifacts/manifest.json\n"
DVC_YAML = """
vars:
  - paths.yaml
  - adapter_dir: artifacts/adapter
stages:
  download:
    cmd: python -m stages.download
    outs:
      - ${paths.manifest}:
          cache: false
  verify:
    cmd: python -m stages.verify
    deps: ["${paths.manifest}"]
    outs: [artifacts/verify.json]
  index:
    cmd: python -m stages.index
    deps: [artifacts/verify.json]
    outs: [artifacts/index.json]
  extract:
    cmd: python -m stages.extract
    deps: [artifacts/index.json, artifacts/manifest.json, weightdiff/extract.py]
    outs: [artifacts/adapter, artifacts/extract/tensors.json]
    metrics:
      - metrics/extract.json:
          cache: false
    plots:
      - metrics/energy_vs_rank.csv:
          x: rank
          y: energy
  validate:
    cmd: python -m stages.validate
    deps: [artifacts/adapter/adapter_model.safetensors, artifacts/manifest.json]
    metrics: [metrics/validate.json]
  gguf-convert:
    cmd: python -m stages.gguf_convert
    deps: ["${adapter_dir}/"]
    outs: [artifacts/adapter.gguf]
    metrics: [metrics/gguf.json]
  figures:
    cmd: python -m stages.figures
    deps: [artifacts/extract/tensors.json, metrics/energy_vs_rank.csv]
    outs: [reports/figures]
  paper:
    cmd: python -m stages.paper
    deps: [reports/figures/heatmap.png, metrics/validate.json, artifacts/adapter.gguf]
    outs: [reports/paper]
"""
EXPECTED_EDGES = {
    ("download", "verify"),
    ("download", "extract"),
    ("download", "validate"),
    ("verify", "index"),
    ("index", "extract"),
    ("extract", "validate"),
    ("extract", "gguf-convert"),
    ("extract", "figures"),
    ("validate", "paper"),
    ("gguf-convert", "paper"),
    ("figures", "paper"),
}


def dvc_project(directory: Path, dvc_yaml: str = DVC_YAML) -> Path:
    """A DVC project without git holding dvc_yaml, as `dvc init --no-scm` makes it."""
    Repo.init(str(directory), no_scm=True).close()
    (directory / "paths.yaml").write_text(PATHS_YAML)
    (directory / "dvc.yaml").write_text(dvc_yaml)
    return directory


def dvc(*args: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=os.environ | {"DVC_NO_ANALYTICS": "1"},
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> nx.DiGraph:
    return pipeline_graph(dvc_project(tmp_path_factory.mktemp("project")))


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory, pipeline: nx.DiGraph) -> list[Path]:
    reports = synthetic_reports()
    return write_figures(
        reports,
        energy_curves(reports, RANK),
        extract_metrics(reports),
        synthetic_divergence(),
        pipeline,
        tmp_path_factory.mktemp("figures") / "out",
    )


def test_write_figures_makes_every_named_png(figures: list[Path]) -> None:
    assert [p.name for p in figures] == list(FIGURE_NAMES)
    assert set(FIGURE_NAMES) == set(PAPER_FIGURES), "every figure drawn is one the paper shows"
    for path in figures:
        width, height = png_size(path)
        assert 300 <= width <= 4000 and 200 <= height <= 4000, (path.name, width, height)
        assert path.stat().st_size > 10_000, f"{path.name} is suspiciously small"
    assert sorted(p.name for p in figures[0].parent.iterdir()) == sorted(FIGURE_NAMES), "temp files left behind"


def test_pipeline_graph_is_dvcs_with_interpolation_resolved(pipeline: nx.DiGraph) -> None:
    assert list(pipeline) == STAGES
    assert set(pipeline.edges) == EXPECTED_EDGES
    assert pipeline.nodes["download"]["outs"] == ["artifacts/manifest.json"]
    assert pipeline.nodes["extract"]["outs"] == [
        "artifacts/adapter",
        "artifacts/extract/tensors.json",
        "metrics/extract.json",
        "metrics/energy_vs_rank.csv",
    ]


def test_pipeline_graph_of_this_repository_matches_dvc_dag() -> None:
    """The repository's own 9 stages (the synthetic pipeline's and publish) and the edges `dvc dag --dot` prints."""
    dot = dvc("dag", "--dot", cwd=REPO)
    edges = set(re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.MULTILINE))
    graph = pipeline_graph(REPO)
    assert list(graph) == [*STAGES, "publish"]
    assert edges and set(graph.edges) == edges
    assert ("extract", "figures") in edges and ("figures", "paper") in edges and ("paper", "publish") in edges


def test_pipeline_graph_can_be_read_inside_a_running_repro(tmp_path: Path) -> None:
    """`dvc repro` holds the repository lock while a stage runs; reading DVC's index must not need it."""
    read = (
        f"{shlex.quote(sys.executable)} -c 'import json, pathlib; from weightdiff.figures import pipeline_graph; "
        "g = pipeline_graph(pathlib.Path.cwd()); "
        'pathlib.Path("graph.json").write_text(json.dumps(list(g.edges)))\''
    )
    project = dvc_project(
        tmp_path,
        f"""
stages:
  first:
    cmd: echo a > a.txt
    outs: [a.txt]
  second:
    cmd: {json.dumps(read)}
    deps: [a.txt]
    outs: [graph.json]
""",
    )
    dvc("repro", cwd=project)
    assert json.loads((project / "graph.json").read_text()) == [["first", "second"]]


def test_pipeline_graph_reports_a_directory_that_is_no_dvc_project(tmp_path: Path) -> None:
    with pytest.raises(WeightdiffError, match="DVC cannot read the pipeline"):
        pipeline_graph(tmp_path)


def test_pipeline_rows_layer_by_longest_path(pipeline: nx.DiGraph) -> None:
    assert pipeline_rows(pipeline) == [
        ["download"],
        ["verify"],
        ["index"],
        ["extract"],
        ["validate", "gguf-convert", "figures"],
        ["paper"],
    ]
    fig = pipeline_figure(pipeline)
    assert {t.get_text() for t in fig.axes[0].texts} >= set(STAGES)


def test_module_type_curves_come_from_the_csv_columns_in_block_order() -> None:
    rows = [
        {"rank": 1, "energy": 0.5, "down_proj": 0.4, "q_proj": 0.6, "k_proj": float("nan")},
        {"rank": 2, "energy": 0.9, "down_proj": 0.8, "q_proj": 1.0, "k_proj": float("nan")},
    ]
    assert module_type_curves(rows) == {"q_proj": [0.6, 1.0], "down_proj": [0.4, 0.8]}
    assert module_type_curves([]) == {}


def test_layer_norm_grid_keeps_zero_deltas_and_sets_aside_unlayered_tensors() -> None:
    reports = synthetic_reports()
    layers, types, grid = layer_norm_grid(reports)
    assert layers == [0, 1, 2] and types == TYPES
    assert grid.shape == (3, 7) and not np.isnan(grid).any()
    assert grid[1, TYPES.index("v_proj")] == 0
    assert (np.delete(grid.ravel(), 1 * 7 + TYPES.index("v_proj")) > 0).all()
    assert list(unlayered_norms(reports)) == ["model.embed_tokens"]

    del reports[0]  # layer 0 q_proj missing: a hole, not a zero
    _, types, grid = layer_norm_grid(reports)
    assert np.isnan(grid[0, types.index("q_proj")])
    assert np.isnan(grid).sum() == 1


def test_extras_stay_out_of_the_per_module_figures_and_experts_join_them(tmp_path: Path, pipeline) -> None:
    """A bias in lora_B.bias, a module saved whole and a skipped norm have no spectrum of their own (the
    bias would otherwise overwrite its layer's q_proj cell); fused experts are columns like any module type."""
    base = synthetic_reports()
    reports = base + extra_reports() + expert_reports()
    layers, types, grid = layer_norm_grid(reports)
    assert types == TYPES + ["experts.gate_up_proj", "experts.down_proj"]
    np.testing.assert_array_equal(grid[:, :7], layer_norm_grid(base)[2])
    assert "input_layernorm" not in types and "model.norm" not in unlayered_norms(reports)
    metrics = extract_metrics(reports, policy="energy")
    assert len(
        write_figures(
            reports,
            energy_curves(reports, metrics["rank_max"]),
            metrics,
            synthetic_divergence(),
            pipeline,
            tmp_path / "f",
        )
    ) == len(FIGURE_NAMES)
