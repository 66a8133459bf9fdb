"""Deltas that are not LoRA-shaped (norms, biases, embeddings, lm_head): saved, decomposed or skipped, and
PEFT must apply whatever is saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from helpers import local_manifest, validated
from weightdiff.errors import WeightdiffError
from weightdiff.extract import extract
from weightdiff.index import build_index
from weightdiff.settings import updated


def low_rank(shape, rank: int, g: torch.Generator, scale: float = 0.05) -> torch.Tensor:
    return scale * torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) / rank**0.5


@pytest.fixture(scope="module")
def pair_with_extras(tmp_path_factory) -> tuple[Path, Path]:
    """A Qwen2 (biased q/k/v) pair whose every kind of tensor differs: linears and embeddings by rank-4 deltas,
    biases, norms and the untied lm_head by dense ones. fp32, so that only the adapter's choices matter."""
    root = tmp_path_factory.mktemp("extras")
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(root / "a")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                p += low_rank(p.shape, 4, g)
            elif "embed" in name:
                p += low_rank(p.shape, 4, g, scale=0.5)
            elif "lm_head" in name:
                p += 0.05 * torch.randn(p.shape, generator=g)
            else:  # norms and biases
                p += 0.1 * torch.randn(p.shape, generator=g)
    model.save_pretrained(root / "b")
    return root / "a", root / "b"


def run(pair, tmp_path, cfg, **extras):
    manifest = local_manifest(*pair)
    settings = updated(cfg.extract, rank=8, dtype="fp32", extras=extras)
    metrics, reports, _ = extract(build_index(manifest), manifest, settings, tmp_path / "adapter", tmp_path / "ckpt")
    return manifest, metrics, reports, validated(manifest, tmp_path / "adapter", cfg.validate)


def test_all_extras_applied_reproduce_b(pair_with_extras, tmp_path, cfg):
    _, metrics, reports, result = run(
        pair_with_extras, tmp_path, cfg, norms="save", biases="lora", embeddings="save", lm_head="save"
    )
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert (
        config["lora_bias"] is True
        and "model.norm" in config["modules_to_save"]
        and "lm_head" in config["modules_to_save"]
    )
    action = {r["name"]: (r["action"], r.get("status")) for r in reports}
    assert action["model.embed_tokens.weight"] == ("save", None)
    assert action["model.layers.0.self_attn.q_proj.bias"] == ("lora", "extracted")  # as lora_B.bias
    assert action["model.layers.1.post_attention_layernorm.weight"] == ("save", None)
    assert metrics["extras"]["skipped"] == 0 and metrics["extras"]["saved_bytes"] > 128 * 64 * 4
    assert result["kl_adapted"] < 1e-6 and result["top1_adapted"] == 1.0


def test_skipped_extras_are_measured_and_cost_fidelity(pair_with_extras, tmp_path, cfg):
    _, metrics, reports, result = run(pair_with_extras, tmp_path, cfg)
    skipped = {r["name"]: r for r in reports if r["action"] == "skip"}
    assert {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.k_proj.bias",
    } <= set(skipped)
    assert all(r["delta_norm"] > 0 for r in skipped.values())
    assert metrics["extras"]["skipped"] == len(skipped) and metrics["extras"]["skipped_delta_norm"] > 1
    assert result["kl_adapted"] > 1e-3  # what the skipped deltas were worth


def test_lm_head_as_a_lora_target(pair_with_extras, tmp_path, cfg):
    _, _, reports, _ = run(pair_with_extras, tmp_path, cfg, lm_head="lora")
    head = next(r for r in reports if r["name"] == "lm_head.weight")
    assert head["status"] == "extracted" and head["rank"] == 8 and head["energy"] < 1  # dense delta: truncated


def test_embedding_as_lora_embedding_factors(pair_with_extras, tmp_path, cfg):
    """A rank-4 embedding delta decomposed into lora_embedding_A/B is exact, and PEFT loads it (validate checks
    keys)."""
    _, _, reports, with_embedding = run(
        pair_with_extras, tmp_path, cfg, norms="save", embeddings="lora", lm_head="save"
    )
    embedding = next(r for r in reports if r["name"] == "model.embed_tokens.weight")
    assert embedding["status"] == "extracted" and embedding["rel_error"] < 1e-5
    _, _, _, without = run(pair_with_extras, tmp_path / "skip", cfg, norms="save", lm_head="save")
    assert with_embedding["kl_adapted"] < without["kl_adapted"] / 10


def test_lora_bias_with_lora_embeddings_is_refused(pair_with_extras, tmp_path, cfg):
    with pytest.raises(WeightdiffError, match="lora_bias.*does not support Embedding"):
        run(pair_with_extras, tmp_path, cfg, biases="lora", embeddings="lora")
