"""Does A + adapter behave like B? Next-token distributions of A, A+adapter and B on a fixed batch.

The adapter goes through PEFT's own loader, as users will load it; any key PEFT expects but the file
lacks (the adapter silently stays zero there) or any key in the file PEFT does not use (dropped silently)
is an error, not a warning.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from weightdiff.errors import WeightdiffError

log = logging.getLogger(__name__)


@torch.no_grad()
def fixed_batch(model_b: torch.nn.Module, settings: DictConfig) -> torch.Tensor:
    """Seeded random prompts continued by sampling from B: text B would write, where its predictions are
    confident, rather than uniform random tokens, where near-ties make top-1 agreement a coin toss."""
    g = torch.Generator().manual_seed(settings.seed)
    tokens = torch.randint(0, model_b.config.vocab_size, (settings.batch_size, settings.prompt_len), generator=g)
    while tokens.shape[1] < settings.seq_len:
        probs = log_probs(model_b, tokens)[:, -1].exp()
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=g)], dim=1)
    return tokens


def load_model(path: str, device: str) -> torch.nn.Module:
    """fp32, so that the comparison measures the adapter, not bf16 matmul noise."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


@torch.no_grad()
def log_probs(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=tokens.to(model.device)).logits.float(), dim=-1).cpu()


def key_mismatches(model: PeftModel, adapter_dir: Path) -> tuple[list[str], list[str]]:
    """(keys PEFT expects that the file lacks, keys in the file PEFT has no place for)."""
    # save_embedding_layers=False: PEFT would otherwise expect the base embedding/lm_head weights of a
    # LoRA-targeted embedding, which it saves for resized vocabularies but never needs to load.
    expected = set(get_peft_model_state_dict(model, save_embedding_layers=False).keys())
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        present = set(f.keys())
    return sorted(expected - present), sorted(present - expected)


def kl_per_token(target: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean over tokens of KL(target ‖ approx), both given as log-probabilities."""
    return (target.exp() * (target - approx)).sum(-1).mean().item()


def top1_agreement(target: torch.Tensor, approx: torch.Tensor) -> float:
    return (target.argmax(-1) == approx.argmax(-1)).float().mean().item()


def validate(manifest: dict, adapter_dir: Path, settings: DictConfig) -> dict:
    device = settings.device
    model_b = load_model(manifest["model_b"]["path"], device)
    tokens = fixed_batch(model_b, settings)
    lp_b = log_probs(model_b, tokens)
    del model_b
    model = load_model(manifest["model_a"]["path"], device)
    lp_a = log_probs(model, tokens)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    missing, unexpected = key_mismatches(model, adapter_dir)
    if missing or unexpected:
        raise WeightdiffError(f"{adapter_dir}: PEFT does not load this adapter as written: "
                              f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    lp_adapted = log_probs(model, tokens)
    return {
        "kl_adapted": kl_per_token(lp_b, lp_adapted), "kl_base": kl_per_token(lp_b, lp_a),
        "top1_adapted": top1_agreement(lp_b, lp_adapted), "top1_base": top1_agreement(lp_b, lp_a),
        "tokens": tokens.numel(),
    }
