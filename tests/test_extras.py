"""Deltas that are not LoRA factors of a target layer (norms, biases, embeddings, lm_head): by default each in the
most faithful form PEFT loads, PEFT must apply whatever is written without a warning, and whatever is left out is
named with its share of ‖ΔW‖². The serving profile writes only what LoRA servers load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from helpers import assert_streamed_equals_in_memory, edited_copy, local_manifest
from weightdiff.extract import extract
from weightdiff.index import build_index
from weightdiff.settings import updated

UNBIASED = ("o_proj", "gate_proj", "up_proj", "down_proj")  # Qwen2's linear layers without a bias
SKIP_ALL = dict(norms="skip", biases="skip", embeddings="skip", lm_head="skip")  # the defaults before issue 12


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


@pytest.fixture(scope="module")
def biased_only_pair(pair_with_extras, tmp_path_factory) -> tuple[Path, Path]:
    """The same pair with B's unbiased linear layers set back to A's: every changed LoRA target has a bias, which
    is when PEFT's lora_bias can carry the bias deltas."""
    a = load_file(pair_with_extras[0] / "model.safetensors")

    def undo(tensors: dict) -> None:
        for name in tensors:
            if name.rpartition(".")[0].endswith(UNBIASED):
                tensors[name] = a[name].clone()

    return pair_with_extras[0], edited_copy(pair_with_extras[1], tmp_path_factory.mktemp("biased") / "b", undo)


def run(pair, tmp_path, cfg, **settings):
    """(metrics, reports, validate's metrics, adapter_config) of extracting the pair at rank 8 in fp32 with the
    committed settings changed by `settings`; PEFT must load the adapter without a warning."""
    manifest = local_manifest(*pair)
    settings = updated(cfg.extract, **({"rank": 8, "dtype": "fp32"} | settings))
    adapter = tmp_path / "adapter"
    metrics, reports, _ = extract(build_index(manifest), manifest, settings, adapter, tmp_path / "ckpt")
    result = assert_streamed_equals_in_memory(manifest, adapter, cfg.validate)  # PEFT's own loader, in memory too
    return metrics, reports, result, json.loads((adapter / "adapter_config.json").read_text())


def left_out_shares(metrics: dict, reports: list[dict]) -> None:
    """left_out accounts for every changed tensor the adapter leaves out, in shares of the whole model's ‖ΔW‖²."""
    total = sum(r["delta_norm"] ** 2 for r in reports)
    skipped = sum(r["delta_norm"] ** 2 for r in reports if r["action"] == "skip")
    assert sum(g["share"] for g in metrics["left_out"]) == pytest.approx(skipped / total)
    assert sum(g["tensors"] for g in metrics["left_out"]) == sum(
        r["action"] == "skip" and r["delta_norm"] > 0 for r in reports
    )
    assert metrics["delta_norm_model"] == pytest.approx(total**0.5)


def test_all_extras_applied_reproduce_b(biased_only_pair, tmp_path, cfg):
    metrics, reports, result, config = run(
        biased_only_pair, tmp_path, cfg, extras=dict(norms="save", biases="lora", embeddings="save", lm_head="save")
    )
    assert config["lora_bias"] is True and "model.norm" in config["modules_to_save"]
    assert "lm_head" in config["modules_to_save"] and "model.embed_tokens" in config["modules_to_save"]
    action = {r["name"]: (r["action"], r.get("status")) for r in reports}
    assert action["model.embed_tokens.weight"] == ("save", None)
    assert action["model.layers.0.self_attn.q_proj.bias"] == ("lora", "extracted")  # as lora_B.bias
    assert action["model.layers.0.mlp.down_proj.weight"] == ("lora", "zero")
    assert action["model.layers.1.post_attention_layernorm.weight"] == ("save", None)
    assert metrics["extras"]["skipped"] == 0 and metrics["extras"]["saved_bytes"] > 128 * 64 * 4
    assert metrics["left_out"] == []
    assert result["kl_adapted"] < 1e-6 and result["top1_adapted"] == 1.0


def test_defaults_keep_the_embedding_lora_and_name_the_biases_peft_cannot_take(pair_with_extras, tmp_path, cfg):
    """PEFT's lora_bias is one flag for the whole adapter and refuses Embedding layers: with the embedding's LoRA
    kept, the bias deltas are left out and named, with their share; they are what the adapter then misses."""
    metrics, reports, result, config = run(pair_with_extras, tmp_path, cfg)
    assert "lora_bias" not in config and "model.norm" in config["modules_to_save"]
    assert {"embed_tokens", "lm_head"} <= set(config["target_modules"]) and "ensure_weight_tying" not in config
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not [k for k in factors if k.endswith(".bias")] and "base_model.model.lm_head.lora_A.weight" in factors
    left = {g["module_type"]: g for g in metrics["left_out"]}
    assert set(left) == {"q_proj.bias", "k_proj.bias", "v_proj.bias"}
    assert all(g["tensors"] == 2 and "embedding LoRA" in g["reason"] for g in left.values())
    left_out_shares(metrics, reports)
    # the LM head's delta here is dense noise, which rank 8 truncates: saved whole, only the biases are missing
    _, _, head_saved, _ = run(pair_with_extras, tmp_path / "head", cfg, extras={"lm_head": "save"})
    _, _, skipped, _ = run(pair_with_extras, tmp_path / "skip", cfg, extras=SKIP_ALL)
    assert head_saved["kl_adapted"] < result["kl_adapted"] < skipped["kl_adapted"]
    assert 1e-4 < head_saved["kl_adapted"] < skipped["kl_adapted"] / 10


def test_skipped_extras_are_measured_named_and_cost_fidelity(pair_with_extras, tmp_path, cfg):
    metrics, reports, result, _ = run(pair_with_extras, tmp_path, cfg, extras=SKIP_ALL)
    skipped = {r["name"]: r for r in reports if r["action"] == "skip"}
    assert {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.k_proj.bias",
    } <= set(skipped)
    assert all(r["delta_norm"] > 0 for r in skipped.values())
    assert metrics["extras"]["skipped"] == len(skipped) and metrics["extras"]["skipped_delta_norm"] > 1
    reasons = {g["module_type"]: g["reason"] for g in metrics["left_out"]}
    assert reasons["embed_tokens"] == "extract.extras.embeddings=skip" and reasons["lm_head"].endswith("lm_head=skip")
    assert reasons["input_layernorm"] == "extract.extras.norms=skip" and reasons["q_proj.bias"].endswith("biases=skip")
    left_out_shares(metrics, reports)
    assert result["kl_adapted"] > 1e-3  # what the skipped deltas were worth


def test_lora_bias_is_not_set_where_a_target_has_no_bias(pair_with_extras, tmp_path, cfg):
    """On targets without a bias (o_proj, the MLP) PEFT warns, and merge_and_unload raises: the biases go out."""
    metrics, _, _, config = run(pair_with_extras, tmp_path, cfg, extras=dict(embeddings="save", lm_head="save"))
    assert "lora_bias" not in config
    (reason,) = {g["reason"] for g in metrics["left_out"]}
    assert all(t in reason for t in UNBIASED) and "merge_and_unload" in reason


def test_lm_head_as_a_lora_target(pair_with_extras, tmp_path, cfg):
    _, reports, _, _ = run(pair_with_extras, tmp_path, cfg, extras={"lm_head": "lora"})
    head = next(r for r in reports if r["name"] == "lm_head.weight")
    assert head["status"] == "extracted" and head["rank"] == 8 and head["energy"] < 1  # dense delta: truncated


def test_embedding_as_lora_embedding_factors(pair_with_extras, tmp_path, cfg):
    """A rank-4 embedding delta decomposed into lora_embedding_A/B is exact, and PEFT loads it (validate checks
    keys)."""
    extras = dict(norms="save", biases="skip", lm_head="save")
    _, reports, with_embedding, _ = run(pair_with_extras, tmp_path, cfg, extras=extras | {"embeddings": "lora"})
    embedding = next(r for r in reports if r["name"] == "model.embed_tokens.weight")
    assert embedding["status"] == "extracted" and embedding["rel_error"] < 1e-5
    _, _, without, _ = run(pair_with_extras, tmp_path / "skip", cfg, extras=extras | {"embeddings": "skip"})
    assert with_embedding["kl_adapted"] < without["kl_adapted"] / 10


def test_serving_profile_writes_only_what_lora_servers_load(pair_with_extras, tmp_path, cfg, caplog):
    """No modules_to_save, lm_head, embeddings or lora_bias, every rank within max_rank (a fixed rank above it
    too, said in the log); what that drops is named, with its share."""
    metrics, reports, serving, config = run(pair_with_extras, tmp_path, cfg, profile="serving", rank=48, max_rank=16)
    assert "capped to 16 for the serving profile" in caplog.text
    assert not {"modules_to_save", "lora_bias", "ensure_weight_tying"} & set(config)
    assert config["r"] == 16 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", *UNBIASED}
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) and "lm_head" not in k for k in factors)
    assert max(r["rank"] for r in reports if "rank" in r) == 16
    left = {g["module_type"]: g["reason"] for g in metrics["left_out"]}
    assert {"embed_tokens", "lm_head", "norm", "input_layernorm", "q_proj.bias"} <= set(left)
    assert all(reason.startswith("extract.profile=serving") for reason in left.values())
    left_out_shares(metrics, reports)
    faithful, _, _, _ = run(pair_with_extras, tmp_path / "faithful", cfg, rank=16)
    assert sum(g["share"] for g in faithful["left_out"]) < sum(g["share"] for g in metrics["left_out"])
