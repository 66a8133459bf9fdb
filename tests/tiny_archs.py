"""Tiny random models of the architectures the LoRA GGUF export covers, and tuned copies B = A + low-rank deltas.

Every model is a transformers class built from a small config (vocabulary 256, hidden 64, 2–4 layers), so a
pair of each saves, extracts and converts with llama.cpp's converter in about a second. The configs exercise
what the export must follow: Qwen3.5-MoE and Qwen3-Next have more value heads than key heads (Qwen3.5's value
heads are reordered, Qwen3-Next's in_proj_qkvz split), gpt-oss stores its experts transposed with gate and up
interleaved, Gemma 3 ties its embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
LINEAR_ATTENTION = dict(
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=40)
HYBRID_LAYERS = ["linear_attention"] * 3 + ["full_attention"]
# kind -> (model class, config); kinds are the HF model_type the export must handle.
MODELS: dict[str, tuple[type[PreTrainedModel], object]] = {
    "llama": (LlamaForCausalLM, LlamaConfig(**COMMON, intermediate_size=128, num_hidden_layers=2)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON, intermediate_size=128, num_hidden_layers=2)),
    "qwen3_5_moe": (
        Qwen3_5MoeForCausalLM,
        Qwen3_5MoeTextConfig(**COMMON, **LINEAR_ATTENTION, **MOE, num_hidden_layers=4, layer_types=HYBRID_LAYERS),
    ),
    "qwen3_next": (
        Qwen3NextForCausalLM,
        Qwen3NextConfig(
            **COMMON, **LINEAR_ATTENTION, **MOE, intermediate_size=128, num_hidden_layers=4, layer_types=HYBRID_LAYERS
        ),
    ),
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig(
            **COMMON, intermediate_size=128, num_hidden_layers=2, sliding_window=32, query_pre_attn_scalar=16
        ),
    ),
    "gpt_oss": (
        GptOssForCausalLM,
        GptOssConfig(
            **COMMON,
            intermediate_size=48,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=32,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
}
# Matrices B's fine-tune changes: every linear layer inside the blocks, each routed expert alike. Not the
# routers, the convolutions of linear attention or anything 1-D (norms, biases, A_log, sinks).
UNEDITED = ("conv1d", "mlp.gate.", "mlp.router.", "norm")


def base_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """A seeded random model of this kind with peaked predictions, as a trained LM has (at initialisation they
    are near-uniform, and top-1 agreement between near-ties would measure rounding, not adapters)."""
    model_class, config = MODELS[kind]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)  # tied models: the embedding, as the output sees it
    return model


def low_rank_edit(model: PreTrainedModel, rank: int = 2, size: float = 0.3, seed: int = 1) -> PreTrainedModel:
    """Adds to every edited matrix (each expert of a stacked [E, ·, ·] parameter alike) a random rank-`rank`
    delta of `size` times its Frobenius norm: what merging a LoRA fine-tune leaves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2 or ".layers." not in name or any(skip in name for skip in UNEDITED):
                continue
            delta = torch.randn(*p.shape[:-1], rank, generator=g) @ torch.randn(
                *p.shape[:-2], rank, p.shape[-1], generator=g
            )
            p.add_(delta * size * p.norm(dim=(-2, -1), keepdim=True) / delta.norm(dim=(-2, -1), keepdim=True))
    return model


def saved_pair(kind: str, root: Path) -> tuple[Path, Path]:
    """A and B = A + rank-2 deltas of this kind, saved with save_pretrained under root/a and root/b."""
    model = base_model(kind)
    model.save_pretrained(root / "a")
    low_rank_edit(model).save_pretrained(root / "b")
    return root / "a", root / "b"
