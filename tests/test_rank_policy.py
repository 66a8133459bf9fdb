"""Adaptive ranks (energy target, noise floor), loaded by PEFT through rank_pattern/alpha_pattern, the
randomized SVD's accuracy bracket (a sampled deeper SVD, an a-posteriori bound), and what the log says when the
ranks keep less energy than the target."""

from __future__ import annotations

import json

import torch

from helpers import edited_copy, run_extract, validated
from weightdiff.rank import auto_rank, energy_rank, noise_floor
from weightdiff.safetensors_io import TensorReader


def test_energy_rank_is_the_smallest_reaching_the_target():
    S = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, .25 of 14.25
    assert energy_rank(S, 14.25, 0.6) == 1 and energy_rank(S, 14.25, 0.7) == 2 and energy_rank(S, 14.25, 0.99) == 4
    assert energy_rank(S, 100.0, 0.99) == 4  # unreachable within S: all of it


def test_noise_floor_matches_the_largest_singular_value_of_rounding_noise():
    torch.manual_seed(0)
    a, b = torch.randn(512, 256) * 0.02, torch.randn(512, 256) * 0.02
    noise = (b.bfloat16().float() - b) - (a.bfloat16().float() - a)
    measured = torch.linalg.svdvals(noise)[0].item()
    predicted = noise_floor((512, 256), "BF16", a.pow(2).mean().sqrt().item(), b.pow(2).mean().sqrt().item())
    assert 0.5 < measured / predicted < 1.5


def test_auto_rank_follows_the_model_size_tree():
    assert (auto_rank(1e9), auto_rank(8e9), auto_rank(405e9)) == (32, 16, 8)


def test_energy_policy_ranks_are_loaded_by_peft_through_patterns(tiny_pair, tmp_path, cfg):
    manifest, metrics, reports = run_extract(
        *tiny_pair, tmp_path / "adapter", cfg, rank_policy="energy", energy=0.99, max_rank=24
    )
    linear = [r for r in reports if r["action"] == "lora" and r["status"] == "extracted"]  # not the unchanged head
    ranks = {r["module"]: r["rank"] for r in linear}
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["r"] == max(ranks.values()) and len(set(ranks.values())) > 2
    assert len(config["rank_pattern"]) == sum(r != config["r"] for r in ranks.values()) > 0
    assert config["alpha_pattern"] == {k: float(v) for k, v in config["rank_pattern"].items()}  # scaling 1 each
    assert all(r["energy"] >= 0.99 for r in linear)
    assert all(r["energy"] - r["singular_values"][-1] ** 2 / r["delta_norm"] ** 2 < 0.99 for r in linear)  # smallest
    result = validated(manifest, tmp_path / "adapter", cfg.validate)  # fails on any key PEFT does not load
    assert result["kl_adapted"] < result["kl_base"] / 100


def test_noise_floor_finds_the_rank_of_two_merged_loras(tiny_pair, tmp_path, cfg):
    """Two r=8 LoRAs merged: signal of rank 16 per module; above it only bf16 rounding noise."""
    manifest, metrics, reports = run_extract(
        *tiny_pair, tmp_path / "adapter", cfg, rank_policy="noise_floor", max_rank=40
    )
    linear = [r for r in reports if r["action"] == "lora" and r["status"] == "extracted"]  # not the unchanged head
    assert {r["rank"] for r in linear} == {16} and len(linear) == 14
    assert all(r["singular_values"][-1] > r["noise_floor"] for r in linear)
    assert validated(manifest, tmp_path / "adapter", cfg.validate)["kl_adapted"] <= 1e-4


def test_energies_are_bracketed_by_a_deeper_svd_and_the_a_posteriori_bound(tiny_pair, tmp_path, cfg):
    """The exact SVD's energy at each rank lies between a sampled deeper SVD's and the bound every report has."""
    _, metrics, reports = run_extract(*tiny_pair, tmp_path / "adapter", cfg, rank=8, svd={"check_every": 4})
    linear = [r for r in reports if r["action"] == "lora" and r.get("status") == "extracted"]
    checked = [r for r in linear if "energy_reference" in r]
    assert len(checked) == metrics["svd_check"]["tensors"] == -(-len(linear) // 4)
    assert 0 <= metrics["svd_check"]["max_energy_gap"] <= 1e-3
    dirs = {side: TensorReader(path) for side, path in zip("ab", tiny_pair, strict=True)}
    for r in linear:
        delta = dirs["b"].get(r["name"]).double() - dirs["a"].get(r["name"]).double()
        S = torch.linalg.svdvals(delta)
        exact = (S[: r["rank"]].square().sum() / S.square().sum()).item()
        assert r["energy"] - 1e-6 <= exact <= r["energy_bound"] + 1e-6, r["name"]
        if "energy_reference" in r:
            assert r["energy_reference"] <= exact + 1e-6


def test_a_full_rank_delta_is_diagnosed_with_the_rank_it_needs(tiny_pair, tmp_path, cfg, caplog):
    g = torch.Generator().manual_seed(0)

    def dense_noise(t):
        for name, w in t.items():
            if w.ndim == 2 and "embed" not in name and "lm_head" not in name:
                t[name] = (w.float() + 0.02 * torch.randn(w.shape, generator=g)).to(w.dtype)

    b = edited_copy(tiny_pair[0], tmp_path / "b", dense_noise)
    _, metrics, _ = run_extract(tiny_pair[0], b, tmp_path / "adapter", cfg, rank=4)
    diagnosis = metrics["diagnosis"]
    assert diagnosis["low_rank"] is False and diagnosis["energy"] < 0.9 and len(diagnosis["worst"]) == 3
    assert all(w["rank_needed"] > 4 for w in diagnosis["worst"])
    # energy explains, it does not judge: extraction runs before validation, which alone can tell
    assert f"rank 4 keeps {100 * diagnosis['energy']:.3g}% of ‖ΔW‖² (below extract.energy 0.9)" in caplog.text
    assert "validate's gap_closed tells whether A + adapter still reproduces B" in caplog.text
    assert "not low-rank" not in caplog.text and diagnosis["worst"][0]["name"] in caplog.text
    _, healthy, _ = run_extract(*tiny_pair, tmp_path / "ok", cfg)
    assert healthy["diagnosis"]["low_rank"] is True
