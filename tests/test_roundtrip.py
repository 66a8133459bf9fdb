"""The product's promise, on real tiny models: PEFT loading the extracted adapter on A reproduces B."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import edited_copy, local_manifest, run_extract, validated
from weightdiff.errors import WeightdiffError
from weightdiff.index import build_index
from weightdiff.settings import plain


@pytest.mark.parametrize("alpha", [None, 32])  # the stage's default (alpha = rank) and alpha = 2·rank
def test_rank16_adapter_reproduces_b(tiny_pair, tmp_path, cfg, alpha):
    manifest, metrics, _ = run_extract(*tiny_pair, tmp_path / "adapter", cfg, rank=16, alpha=alpha)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 16 and saved["lora_alpha"] == (alpha or 16)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        result = validated(manifest, tmp_path / "adapter", cfg.validate)
    assert result["kl_adapted"] <= 1e-4
    # Top-1 on every token would hang on near-ties that any CPU's rounding flips; where B is confident it must hold.
    assert result["top1_adapted_confident"] == 1.0 and result["top1_adapted"] >= 0.98
    assert result["gap_closed"] > 0.9999
    assert result["kl_base"] > 100 * result["kl_adapted"]  # the pair really differs, and the adapter closes it
    assert metrics["energy"] > 0.999 and metrics["tensors_extracted"] == 14
    # The defaults carry every extra, and the pair changes none: nothing is saved whole, nothing is left out
    assert not {"modules_to_save", "lora_bias", "ensure_weight_tying"} & set(saved) and metrics["left_out"] == []


def test_adapter_keys_are_the_ones_peft_loads(tiny_pair, tmp_path, cfg):
    run_extract(*tiny_pair, tmp_path / "adapter", cfg, rank=4)
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")
    assert len(keys) == 28 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert a.shape == (4, 64) and b.shape == (64, 4) and a.dtype == torch.float16


def test_low_rank_loses_measurable_fidelity(tiny_pair, tmp_path, cfg):
    manifest, metrics, _ = run_extract(*tiny_pair, tmp_path / "adapter", cfg, rank=2)
    result = validated(manifest, tmp_path / "adapter", cfg.validate)
    assert metrics["energy"] < 0.99
    assert 1e-4 < result["kl_adapted"] < result["kl_base"]


def test_the_energy_curve_shows_what_doubling_the_rank_would_keep(tiny_pair, tmp_path, cfg):
    """Two LoRA r=8 fine-tunes differ by rank ≤ 16: at rank 8 the curve must reach 16 and find nearly all there."""
    from weightdiff.metrics import energy_curves

    _, metrics, reports = run_extract(*tiny_pair, tmp_path / "adapter", cfg, rank=8)
    curve = energy_curves(reports, metrics["rank_max"])
    assert [row["rank"] for row in curve] == list(range(1, 17))
    assert curve[7]["energy"] == pytest.approx(metrics["energy"], rel=1e-9) and metrics["energy"] < 0.95
    assert curve[15]["energy"] > 0.9999
    energies = [row["energy"] for row in curve]
    assert energies == sorted(energies)
    a, b = (load_file(d / "model.safetensors") for d in tiny_pair)
    report = next(r for r in reports if r["name"].endswith("layers.0.mlp.down_proj.weight"))
    exact = torch.linalg.svdvals(b[report["name"]].float() - a[report["name"]].float())
    beyond = torch.tensor(report["singular_values_beyond"])
    assert len(beyond) == 8 and bool((beyond <= exact[8:16] * (1 + 1e-5)).all())


def test_zero_delta_tensor_is_skipped_and_the_adapter_still_loads_cleanly(tiny_pair, tmp_path, cfg):
    dir_a, dir_b = tiny_pair
    a = load_file(dir_a / "model.safetensors")
    name = "model.layers.1.self_attn.v_proj.weight"
    b = edited_copy(dir_b, tmp_path / "b", lambda t: t.__setitem__(name, a[name].clone()))
    manifest, metrics, reports = run_extract(dir_a, b, tmp_path / "adapter", cfg)
    # the embedding and the LM head, LoRA targets by default, are unchanged by the demo's fine-tunes too
    unchanged = {r["name"] for r in reports if r.get("status") == "zero" and "rank" in r}  # (norms: saved if changed)
    assert unchanged == {name, "model.embed_tokens.weight", "lm_head.weight"} and metrics["tensors_zero"] == 3
    assert metrics["tensors_extracted"] == 13
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)  # exact regex: the skipped module must not be wrapped
    result = validated(manifest, tmp_path / "adapter", cfg.validate)  # raises on any missing key
    assert result["kl_adapted"] <= 1e-4


def test_rank_above_dimensions_is_clamped_per_module(tiny_pair, tmp_path, cfg):
    manifest, metrics, reports = run_extract(*tiny_pair, tmp_path / "adapter", cfg, rank=100, alpha=50)
    assert metrics["tensors_clamped"] == 14
    # min(out, in): k/v project to 2 kv heads × 16
    assert {r["rank"] for r in reports if r["action"] == "lora" and r["status"] == "extracted"} == {64, 32}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"][r"model\.layers\.0\.self_attn\.k_proj"] == 32
    assert len(config["rank_pattern"]) == 14
    result = validated(manifest, tmp_path / "adapter", cfg.validate)
    assert result["kl_adapted"] <= 1e-4


def test_identical_models_are_refused(tiny_pair, tmp_path, cfg):
    with pytest.raises(WeightdiffError, match="identical"):
        run_extract(tiny_pair[0], tiny_pair[0], tmp_path / "adapter", cfg)
    assert not (tmp_path / "adapter").exists()


def test_targets_that_are_not_linear_are_refused(tiny_pair, tmp_path, cfg):
    with pytest.raises(WeightdiffError, match="not linear layers.*embed_tokens"):
        run_extract(*tiny_pair, tmp_path / "adapter", cfg, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(WeightdiffError, match="matches no weight.*q_proj"):
        run_extract(*tiny_pair, tmp_path / "adapter", cfg, target_modules=["qkv_proj"])


def test_extraction_is_deterministic(tiny_pair, tmp_path, cfg):
    run_extract(*tiny_pair, tmp_path / "one", cfg)
    run_extract(*tiny_pair, tmp_path / "two", cfg)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()


@pytest.mark.parametrize(
    "rename",
    [
        lambda k: k.replace(".weight", ".default"),  # the prototype scripts' key format: PEFT loads nothing
        lambda k: k.replace("q_proj", "qkv_proj"),  # keys PEFT has no module for
    ],
)
def test_validate_fails_on_keys_peft_does_not_load(tiny_pair, tmp_path, cfg, rename):
    manifest, _, _ = run_extract(*tiny_pair, tmp_path / "adapter", cfg)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({rename(k): v for k, v in load_file(path).items()}, path)
    with pytest.raises(WeightdiffError, match=r"PEFT does not load this adapter as written: \d+ missing keys"):
        validated(manifest, tmp_path / "adapter", cfg.validate)


def test_extraction_needs_no_model_code(tiny_pair, tmp_path, cfg):
    """A rank sweep reruns extract alone: the module layout comes from the index, never from importing
    transformers' model code and building the model (~3 s of start-up each time)."""
    manifest = local_manifest(*tiny_pair)
    for name, obj in (
        ("index", build_index(manifest)),
        ("manifest", manifest),
        ("settings", plain(cfg.extract) | {"rank": 4}),
    ):
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
    code = (
        "import json, sys; from pathlib import Path; "
        "from weightdiff.extract import extract; from weightdiff.settings import ExtractSettings, typed; "
        "index, manifest, settings = (json.loads(Path(sys.argv[1], n + '.json').read_text()) "
        "for n in ('index', 'manifest', 'settings')); "
        "metrics, _, _ = extract(index, manifest, typed(ExtractSettings, settings), Path(sys.argv[1], 'adapter'), "
        "Path(sys.argv[1], 'resume')); "
        "print(metrics['tensors_extracted'], sorted(m for m in sys.modules if m.startswith('transformers')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert out.stdout.split() == ["14", "[]"]
