"""Figures from synthetic run outputs shaped as FORMATS.md describes; the pure helpers on hand-made cases."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from weightdiff.errors import WeightdiffError
from weightdiff.figures import (
    decomposed,
    FIGURE_NAMES, dvc_stages, energy_curves, layer_norm_grid, pipeline_edges, stage_depths, unlayered_norms,
    write_figures,
)

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4
ZERO_TENSOR = "model.layers.1.self_attn.v_proj.weight"

# The pipeline's 8 stages, with the dvc.yaml spellings that matter: ${...} from params.yaml and from vars,
# metrics and plots as outs, outs with options, a dep under a directory out, and a dep (adapter.gguf) that
# shares a string prefix with an out (artifacts/adapter) of a stage it does not depend on.
PARAMS_YAML = "paths:\n  manifest: artifacts/manifest.json\n"
DVC_YAML = """
vars:
  - adapter_dir: artifacts/adapter
stages:
  download:
    cmd: python -m stages.download
    params: [model_a, model_b]
    outs:
      - ${paths.manifest}:
          cache: false
  verify:
    cmd: python -m stages.verify
    deps: ["${paths.manifest}", "${paths.unknown}"]
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
    deps: [artifacts/extract/tensors.json, metrics/energy_vs_rank.csv, dvc.yaml]
    outs: [reports/figures]
  paper:
    cmd: python -m stages.paper
    deps: [reports/figures/heatmap.png, metrics/validate.json, artifacts/adapter.gguf]
    outs: [reports/paper]
"""
EXPECTED_EDGES = {
    ("download", "verify"), ("download", "extract"), ("download", "validate"),
    ("verify", "index"), ("index", "extract"),
    ("extract", "validate"), ("extract", "gguf-convert"), ("extract", "figures"),
    ("validate", "paper"), ("gguf-convert", "paper"), ("figures", "paper"),
}


def synthetic_tensors() -> dict:
    """tensors.json for 3 layers × 7 kinds at rank 4 (one tensor unchanged) plus an embedding with no layer."""
    rng = np.random.default_rng(0)
    rows = []
    for layer in range(3):
        for j, kind in enumerate(KINDS):
            module = f"model.layers.{layer}.{'mlp' if j > 3 else 'self_attn'}.{kind}"
            rows.append(tensor_row(module, layer, kind, [] if module + ".weight" == ZERO_TENSOR
                                   else sorted(rng.uniform(0.1, 1.0 + j, RANK), reverse=True), energy=0.8))
    rows.append(tensor_row("model.embed_tokens", None, "embed_tokens", [2.0, 1.0, 0.5, 0.25], energy=0.5))
    return {"rank": RANK, "alpha": 8.0, "dtype": "bf16", "tensors": rows}


def tensor_row(module: str, layer: int | None, kind: str, singular_values: list[float], energy: float) -> dict:
    kept = sum(s * s for s in singular_values)
    return {"name": f"{module}.weight", "module": module, "layer": layer, "kind": kind, "shape": [32, 64],
            "status": "extracted" if singular_values else "zero", "rank": len(singular_values),
            "delta_norm": math.sqrt(kept / energy), "energy": energy if singular_values else 0.0,
            "rel_error": math.sqrt(1 - energy), "singular_values": [float(s) for s in singular_values]}


def synthetic_divergence(layers: int = 4) -> list[dict]:
    """validate's per-layer rows: the adapter's error grows along the depth, far below A's."""
    return [{"layer": i, "rel_error_adapted": 1e-4 * (i + 1), "rel_error_base": 0.1 * (i + 1)} for i in range(layers)]


def synthetic_energy_curve(tensors: dict) -> list[tuple[int, float]]:
    """metrics/energy_vs_rank.csv as the extract stage defines it: the curve of all tensors pooled."""
    curve = energy_curves(tensors, tensors["rank"], group_of=lambda t: "all")["all"]
    return [(k + 1, e) for k, e in enumerate(curve)]


def write_dvc_yaml(directory: Path) -> Path:
    (directory / "params.yaml").write_text(PARAMS_YAML)
    path = directory / "dvc.yaml"
    path.write_text(DVC_YAML)
    return path


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("figures")
    tensors = synthetic_tensors()
    return write_figures(tensors, synthetic_energy_curve(tensors), synthetic_divergence(), write_dvc_yaml(tmp), tmp / "out")


def test_write_figures_makes_every_named_png(figures: list[Path]) -> None:
    assert [p.name for p in figures] == list(FIGURE_NAMES)
    for path in figures:
        width, height = png_size(path)
        assert 300 <= width <= 4000 and 200 <= height <= 4000, (path.name, width, height)
        assert path.stat().st_size > 10_000, f"{path.name} is suspiciously small"
    assert sorted(p.name for p in figures[0].parent.iterdir()) == sorted(FIGURE_NAMES), "temp files left behind"


def test_pipeline_edges_follow_outs_to_deps(tmp_path: Path) -> None:
    edges = pipeline_edges(write_dvc_yaml(tmp_path))
    assert len(edges) == len(set(edges))
    assert set(edges) == EXPECTED_EDGES


def test_dvc_stages_resolve_interpolation_and_keep_unknown_keys(tmp_path: Path) -> None:
    stages = dvc_stages(write_dvc_yaml(tmp_path))
    assert stages["download"]["outs"] == ["artifacts/manifest.json"]
    assert stages["verify"]["deps"] == ["artifacts/manifest.json", "${paths.unknown}"]
    assert stages["gguf-convert"]["deps"] == ["artifacts/adapter"]
    assert stages["extract"]["outs"] == ["artifacts/adapter", "artifacts/extract/tensors.json",
                                         "metrics/extract.json", "metrics/energy_vs_rank.csv"]


def test_stage_depths_layer_the_dag_and_reject_cycles(tmp_path: Path) -> None:
    stages = ["download", "verify", "index", "extract", "validate", "gguf-convert", "figures", "paper"]
    depth = stage_depths(stages, sorted(EXPECTED_EDGES))
    assert depth == {"download": 0, "verify": 1, "index": 2, "extract": 3, "validate": 4, "gguf-convert": 4,
                     "figures": 4, "paper": 5}
    with pytest.raises(WeightdiffError, match="cycle"):
        stage_depths(["a", "b"], [("a", "b"), ("b", "a")])


def test_pipeline_edges_reports_an_unreadable_dvc_yaml(tmp_path: Path) -> None:
    path = tmp_path / "dvc.yaml"
    path.write_text("vars: []\n")
    with pytest.raises(WeightdiffError, match="stages"):
        pipeline_edges(path)


def test_energy_curves_pool_tensors_by_kind() -> None:
    tensors = {"rank": 3, "tensors": [
        # q_proj: σ² cumulative [9, 10, 10] and (rank clamped to 1) [4, 4, 4]; ‖ΔW‖² 12 + 4 = 16
        {"kind": "q_proj", "singular_values": [3.0, 1.0], "delta_norm": math.sqrt(12)},
        {"kind": "q_proj", "singular_values": [2.0], "delta_norm": 2.0},
        # v_proj: [1, 2, 3] / 4
        {"kind": "v_proj", "singular_values": [1.0, 1.0, 1.0], "delta_norm": 2.0},
        # k_proj: all zero, so no defined energy
        {"kind": "k_proj", "singular_values": [], "delta_norm": 0.0},
    ]}
    curves = energy_curves(tensors, 3)
    assert set(curves) == {"q_proj", "v_proj"}
    np.testing.assert_allclose(curves["q_proj"], [13 / 16, 14 / 16, 14 / 16])
    np.testing.assert_allclose(curves["v_proj"], [0.25, 0.5, 0.75])
    np.testing.assert_allclose(energy_curves(tensors, 3, group_of=lambda t: "all")["all"], [0.7, 0.8, 0.85])


def test_layer_norm_grid_keeps_zero_deltas_and_sets_aside_unlayered_tensors() -> None:
    tensors = synthetic_tensors()
    layers, kinds, grid = layer_norm_grid(tensors)
    assert layers == [0, 1, 2] and kinds == KINDS
    assert grid.shape == (3, 7) and not np.isnan(grid).any()
    assert grid[1, KINDS.index("v_proj")] == 0
    assert (np.delete(grid.ravel(), 1 * 7 + KINDS.index("v_proj")) > 0).all()
    assert list(unlayered_norms(tensors)) == ["model.embed_tokens"]

    del tensors["tensors"][0]  # layer 0 q_proj missing: a hole, not a zero
    _, kinds, grid = layer_norm_grid(tensors)
    assert np.isnan(grid[0, kinds.index("q_proj")])
    assert np.isnan(grid).sum() == 1


def test_extras_without_a_spectrum_stay_out_of_the_figures(tmp_path):
    tensors = synthetic_tensors()
    tensors["tensors"].append({"name": "model.norm.weight", "module": "model.norm", "layer": None, "kind": "norm",
                               "unit": "measure", "shape": [64], "status": "skipped", "delta_norm": 0.3})
    assert "model.norm.weight" not in {t["name"] for t in decomposed(tensors)["tensors"]}
    curve = synthetic_energy_curve(decomposed(tensors))
    assert len(write_figures(tensors, curve, synthetic_divergence(), write_dvc_yaml(tmp_path), tmp_path / "f")) == len(FIGURE_NAMES)
