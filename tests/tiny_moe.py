"""A tiny Qwen3-MoE and a PEFT adapter on it in ``target_parameters`` layout, made by PEFT itself.

Our extractor does not write MoE adapters yet, so the reference adapter comes from PEFT: whatever
PEFT saves for fused experts is by definition the layout the GGUF export has to read.
"""

from __future__ import annotations

import copy
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

# moe_intermediate_size 48: gate_up_proj is [E, 96, 64], down_proj [E, 64, 48], so no two shapes coincide.
CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Non-uniform on purpose: experts and attention at different ranks and alphas, one layer's q_proj apart.
LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    target_parameters=EXPERT_PARAMETERS,
    rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 8},
    alpha_pattern={"gate_up_proj": 3.0, r"layers\.1\.self_attn\.q_proj": 4.0},
)


def base_model(seed: int = 0) -> Qwen3MoeForCausalLM:
    """A randomly initialised tiny Qwen3-MoE (fused experts in memory, as transformers 5 holds them).

    lm_head is scaled up so that predictions are peaked, as a trained LM's are: at initialisation
    they are near-uniform, and top-1 agreement between near-ties would measure rounding, not adapters.
    """
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**CONFIG)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def peft_adapter(model: Qwen3MoeForCausalLM, seed: int = 1, std: float = 0.1) -> PeftModel:
    """PEFT's LoRA on a copy of ``model``: attention via target_modules, experts via target_parameters.

    Both factors are random (PEFT's default init leaves B zero, which would make every delta vanish).
    """
    with warnings.catch_warnings():
        # peft 0.21.2 checks pattern keys against target_modules only, so it warns that the expert patterns
        # were "ignored" while it applies them (the saved shapes and the scalings show they are).
        warnings.filterwarnings("ignore", message=".*pattern keys did not match any targeted module.*")
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**LORA))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return peft_model.eval()
