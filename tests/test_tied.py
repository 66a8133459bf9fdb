"""Tied input/output embeddings: one table on disk, two uses. A change to it changes the input lookup and the LM
head alike, and the adapter must reproduce both, through PEFT's ensure_weight_tying, without a PEFT warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft.utils.constants import EMBEDDING_LAYER_NAMES
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import full_model_log_probs, kl_per_token, run_extract, validated
from weightdiff.errors import WeightdiffError
from weightdiff.peft_format import TIEABLE_EMBEDDINGS

CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    tie_word_embeddings=True,
)
EMBEDDING = "model.embed_tokens.weight"


def low_rank(shape, rank: int, size: float, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """A random rank-`rank` matrix of `size` times the Frobenius norm of `like`."""
    delta = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
    return delta * size * like.norm() / delta.norm()


@pytest.fixture(scope="module")
def tied_model() -> LlamaForCausalLM:
    """A tiny Llama whose LM head is its embedding (no lm_head tensor on disk), scaled up so that predictions are
    peaked, as a trained LM's are."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def save_pair(model: LlamaForCausalLM, root: Path, edit) -> tuple[Path, Path]:
    """A = the model in fp32, B = A's tensors through edit(dict of tensors, generator): only the adapter's choices
    matter."""
    model.save_pretrained(root / "a")
    (root / "b").mkdir(parents=True)
    for f in (root / "a").iterdir():
        (root / "b" / f.name).write_bytes(f.read_bytes())
    tensors = load_file(root / "a" / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: one tensor on disk
    edit(tensors, torch.Generator().manual_seed(1))
    save_file(tensors, root / "b" / "model.safetensors", metadata={"format": "pt"})
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def embedding_pair(tmp_path_factory, tied_model) -> tuple[Path, Path]:
    """B = A with a rank-4 change of the tied embedding alone (a refusal direction ablated from it, say)."""

    def edit(t, g):
        t[EMBEDDING] += low_rank(t[EMBEDDING].shape, 4, 1.0, g, t[EMBEDDING])

    return save_pair(tied_model, tmp_path_factory.mktemp("tied"), edit)


@pytest.fixture(scope="module")
def mixed_pair(tmp_path_factory, tied_model) -> tuple[Path, Path]:
    """B = A with a rank-4 change of the tied embedding and a rank-12 one of layer 0's q_proj alone."""
    q_proj = "model.layers.0.self_attn.q_proj.weight"

    def edit(t, g):
        t[EMBEDDING] += low_rank(t[EMBEDDING].shape, 4, 1.0, g, t[EMBEDDING])
        t[q_proj] += low_rank(t[q_proj].shape, 12, 0.5, g, t[q_proj])

    return save_pair(tied_model, tmp_path_factory.mktemp("tied_mixed"), edit)


TOKENS = torch.randint(0, CONFIG["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(2))


def log_probs(model_dir: Path, adapter_dir: Path | None = None, ignore: str | None = None) -> torch.Tensor:
    return full_model_log_probs(model_dir, TOKENS, adapter_dir, ignore)


def untied_head_copy(adapter: Path, out: Path) -> Path:
    """What extraction wrote before ties were followed: the embedding's LoRA alone, no tie to the LM head."""
    out.mkdir()
    factors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in factors.items() if "lm_head" not in k}, out / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["ensure_weight_tying"]
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_peft_ties_only_what_we_tie():
    assert TIEABLE_EMBEDDINGS == set(EMBEDDING_LAYER_NAMES) - {"lm_head"}


def test_a_tied_embedding_change_is_reproduced_on_both_sides(embedding_pair, tmp_path, cfg):
    """Defaults: the embedding as lora_embedding, and PEFT gives the tied LM head the same factors, transposed.
    Without the head's side (the adapter as written before), most of B's change is missing."""
    adapter = tmp_path / "adapter"
    manifest, metrics, reports = run_extract(*embedding_pair, adapter, cfg, rank=8, dtype="fp32")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True and config["target_modules"] == ["embed_tokens"]
    factors = load_file(adapter / "adapter_model.safetensors")
    assert torch.equal(
        factors["base_model.model.lm_head.lora_A.weight"],
        factors["base_model.model.model.embed_tokens.lora_embedding_B"].T,
    )
    assert torch.equal(
        factors["base_model.model.lm_head.lora_B.weight"],
        factors["base_model.model.model.embed_tokens.lora_embedding_A"].T,
    )
    (embedding,) = [r for r in reports if r["action"] == "lora_embedding"]
    assert embedding["rel_error"] < 1e-5 and metrics["left_out"] == []
    assert not [r for r in reports if r["name"].startswith("lm_head")]  # one table, measured once

    target = log_probs(embedding_pair[1])
    kl, kl_base = (
        kl_per_token(target, log_probs(embedding_pair[0], adapter)),
        kl_per_token(target, log_probs(embedding_pair[0])),
    )
    assert kl < 1e-8 and kl_base > 0.1
    streamed = validated(manifest, adapter, cfg.validate)  # raises on any key PEFT does not load
    assert streamed["kl_adapted"] < 1e-8 and streamed["gap_closed"] > 0.99999
    # PEFT itself warns that such an adapter (a tied layer in it, no tie) is amiss
    untied = log_probs(
        embedding_pair[0], untied_head_copy(adapter, tmp_path / "untied"), ignore=".*tie_word_embeddings"
    )
    assert kl_per_token(target, untied) > 0.1 * kl_base


@pytest.mark.parametrize("alpha", [None, 16])
def test_the_tied_head_gets_the_embeddings_rank_and_alpha(mixed_pair, tmp_path, cfg, alpha):
    """Adaptive ranks: q_proj keeps 12, the embedding its fixed 4, so PEFT's r is 12 and the tied head, which PEFT
    sizes by the patterns, must be patterned as the embedding is. Layer 1's unchanged q_proj makes target_modules a
    regex, in which PEFT looks for the embedding by its bare name."""
    adapter = tmp_path / "adapter"
    manifest, _, reports = run_extract(
        *mixed_pair, adapter, cfg, rank=4, rank_policy="energy", energy=0.9999, max_rank=16, alpha=alpha, dtype="fp32"
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 12 and config["rank_pattern"] == {r"model\.embed_tokens": 4, "lm_head": 4}
    assert config["alpha_pattern"] == ({} if alpha else {r"model\.embed_tokens": 4.0, "lm_head": 4.0})
    assert isinstance(config["target_modules"], str) and config["ensure_weight_tying"] is True
    target = log_probs(mixed_pair[1])
    assert kl_per_token(target, log_probs(mixed_pair[0], adapter)) < 1e-8
    assert validated(manifest, adapter, cfg.validate)["kl_adapted"] < 1e-8


def test_a_tied_embedding_saved_whole_is_saved_for_the_head_too(mixed_pair, tmp_path, cfg):
    adapter = tmp_path / "adapter"
    manifest, metrics, _ = run_extract(*mixed_pair, adapter, cfg, rank=12, dtype="fp32", extras={"embeddings": "save"})
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.embed_tokens"] and config["ensure_weight_tying"] is True
    factors = load_file(adapter / "adapter_model.safetensors")
    assert torch.equal(
        factors["base_model.model.lm_head.weight"], factors["base_model.model.model.embed_tokens.weight"]
    )
    target = log_probs(mixed_pair[1])
    assert kl_per_token(target, log_probs(mixed_pair[0], adapter)) < 1e-8
    assert validated(manifest, adapter, cfg.validate)["kl_adapted"] < 1e-8


def test_a_skipped_tied_embedding_is_left_out_whole(mixed_pair, tmp_path, cfg):
    _, metrics, _ = run_extract(*mixed_pair, tmp_path / "adapter", cfg, extras={"embeddings": "skip"}, rank=4)
    (row,) = metrics["left_out"]
    assert row["module_type"] == "embed_tokens" and row["reason"] == "extract.extras.embeddings=skip"
    assert 0.1 < row["share"] < 1  # of ΔE and Δq_proj together
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "ensure_weight_tying" not in config


def test_a_pair_that_differs_only_outside_the_targets_is_refused_naming_what_differs(embedding_pair, tmp_path, cfg):
    with pytest.raises(
        WeightdiffError, match=r"identical on all 14 LoRA targets.*1 other tensors differ: embed_tokens"
    ):
        run_extract(*embedding_pair, tmp_path / "adapter", cfg, extras={"embeddings": "skip"})
