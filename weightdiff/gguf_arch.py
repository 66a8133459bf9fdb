"""Where a module's delta lands in the base model's GGUF: the tensor, and the row and column order it has there.

A LoRA GGUF names base tensors, and llama.cpp adds ``B @ A`` to the tensor as its GGUF holds it. llama.cpp's
converter (``convert_hf_to_gguf.py`` and its ``conversion/`` classes) does not always store a weight as the HF
checkpoint does: it reorders rows, splits one tensor into several, stacks experts. A delta must go through the
same changes. Those that are row reorderings or row splits (the output side) are index arrays applied to
``lora_b``'s rows; a column reordering (the input side) is one applied to ``lora_a``'s columns. This module
knows them per architecture family, read from the llama.cpp release llama-cpp-python vendors:

* ``LlamaModel`` (Llama, Mistral, Mixtral): q/k rows per head from rotate-half to interleaved pairs
  (``LlamaModel.permute``), q by ``num_attention_heads``, k by ``num_key_value_heads``;
* ``Qwen3NextModel``: ``linear_attn.in_proj_qkvz`` (per key head ``[q, k, v, z]``) becomes ``attn_qkv``
  (all q, all k, all v) and ``attn_gate`` (all z);
* ``_LinearAttentionVReorderBase`` (Qwen3.5, Qwen3.5-MoE), when there are more value than key heads: the value
  heads of ``in_proj_qkv``, ``in_proj_z``, ``in_proj_a``, ``in_proj_b`` (rows) and ``out_proj`` (columns) go
  from grouped by key head to tiled;
* ``Qwen2MoeModel`` and its heirs: ``mlp.experts.gate_up_proj`` split into ``ffn_gate_exps`` (rows ``[:I]``) and
  ``ffn_up_exps`` (``[I:]``); ``GptOssModel``: the same with gate and up interleaved (even and odd rows);
* ``GemmaModel``/``Gemma2Model`` drop ``lm_head`` (the output reuses ``token_embd``).

What else these converters change (norms shifted by 1, ``A_log`` to ``-exp``, conv kernels squeezed) touches
tensors a LoRA does not adapt. Tensor names come from gguf-py's own ``TensorNameMap`` for the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR

from weightdiff.errors import WeightdiffError


@dataclass(frozen=True)
class Family:
    """One of llama.cpp's converter classes, as far as a LoRA of its weights must follow what it does."""

    arch: MODEL_ARCH
    hf_architectures: tuple[str, ...]  # config.json `architectures` names the converter registers for it
    model_types: tuple[str, ...]  # config.json `model_type`, for configs that name no architecture
    rope_permuted: bool = False
    fused_qkvz: bool = False
    tiled_v_heads: bool = False
    interleaved_gate_up: bool = False
    keeps_lm_head: bool = True
    expert_width: str = "moe_intermediate_size"  # the config key of one expert's intermediate size

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


FAMILIES = (
    Family(
        MODEL_ARCH.LLAMA,
        ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"),
        ("llama", "mistral", "mixtral"),
        rope_permuted=True,
        expert_width="intermediate_size",
    ),
    Family(MODEL_ARCH.QWEN2, ("Qwen2ForCausalLM",), ("qwen2",)),
    Family(MODEL_ARCH.QWEN2MOE, ("Qwen2MoeForCausalLM",), ("qwen2_moe",)),
    Family(MODEL_ARCH.QWEN3, ("Qwen3ForCausalLM",), ("qwen3",)),
    Family(MODEL_ARCH.QWEN3MOE, ("Qwen3MoeForCausalLM",), ("qwen3_moe",)),
    Family(MODEL_ARCH.QWEN3NEXT, ("Qwen3NextForCausalLM",), ("qwen3_next",), fused_qkvz=True),
    Family(
        MODEL_ARCH.QWEN35,
        ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"),
        ("qwen3_5", "qwen3_5_text"),
        tiled_v_heads=True,
    ),
    Family(
        MODEL_ARCH.QWEN35MOE,
        ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"),
        ("qwen3_5_moe", "qwen3_5_moe_text"),
        tiled_v_heads=True,
    ),
    Family(MODEL_ARCH.GEMMA, ("GemmaForCausalLM",), ("gemma",), keeps_lm_head=False),
    Family(MODEL_ARCH.GEMMA2, ("Gemma2ForCausalLM",), ("gemma2",), keeps_lm_head=False),
    Family(
        MODEL_ARCH.GEMMA3,
        ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
        ("gemma3", "gemma3_text"),
    ),
    Family(
        MODEL_ARCH.GPT_OSS,
        ("GptOssForCausalLM",),
        ("gpt_oss",),
        interleaved_gate_up=True,
        expert_width="intermediate_size",
    ),
)
# The converter splits a fused expert parameter into these projections, each an equal part of its rows.
EXPERT_PROJECTIONS: dict[str, tuple[str, ...]] = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
# Tensors llama.cpp's graphs use other than through a matmul with LoRA (build_lora_mm): a pair for them would load
# and do nothing. Norm weights are skipped by its adapter loader, the rest are convolutions and SSM parameters.
NOT_LORA_APPLIED = frozenset({MODEL_TENSOR.SSM_CONV1D, MODEL_TENSOR.SSM_A, MODEL_TENSOR.SSM_D, MODEL_TENSOR.SSM_DT})


@dataclass(frozen=True, eq=False)
class Placement:
    """One GGUF tensor (part of) a module's delta goes to.

    ``rows``: which of the delta's output rows it holds, in its order (None: all, as they are); ``cols``: the
    order of its input columns (None: as they are). For experts, both index within one expert's matrix.
    """

    tensor: MODEL_TENSOR
    name: str  # blk.0.attn_q.weight
    rows: np.ndarray | None = field(default=None)
    cols: np.ndarray | None = field(default=None)


@dataclass(frozen=True)
class Model:
    """The base model as its GGUF has it: architecture family, hyperparameters and tensor names."""

    family: Family
    hparams: dict
    name_map: gguf.TensorNameMap


def text_hparams(config: dict) -> dict:
    """The hyperparameters the converter reads: a multimodal config's ``text_config`` moved to the top level."""
    return {**config, **(config.get("text_config") or {})}


def family_for(config: dict) -> Family | None:
    """The converter class llama.cpp picks for this config.json (by ``architectures``, its text_config's first),
    or None when weightdiff does not know that class's layout."""
    architectures = (config.get("text_config") or {}).get("architectures") or config.get("architectures") or []
    if architectures:
        return next((f for f in FAMILIES if architectures[0] in f.hf_architectures), None)
    model_type = text_hparams(config).get("model_type")
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def known_architectures() -> list[str]:
    return sorted(name for family in FAMILIES for name in family.hf_architectures)


def base_model(config: dict, family: Family) -> Model:
    hparams = text_hparams(config)
    blocks = hparams["num_hidden_layers"] + (hparams.get("mtp_num_hidden_layers") or 0)
    return Model(family, hparams, gguf.get_tensor_name_map(family.arch, blocks))


def gguf_module(module: str) -> str:
    """The module path the converter maps: a multimodal model's text tower without ``language_model.``."""
    return module.replace("language_model.", "")


def lookup(model: Model, module: str) -> tuple[MODEL_TENSOR, str] | None:
    return model.name_map.get_type_and_name(gguf_module(module) + ".weight", try_suffixes=(".weight",))


def placements(model: Model, module: str) -> list[Placement]:
    """Where a linear layer's delta goes; empty when the architecture has no GGUF tensor for the module."""
    if model.family.fused_qkvz and module.endswith(".linear_attn.in_proj_qkvz"):
        return qkvz_placements(model, module)
    found = lookup(model, module)
    if found is None:
        return []
    tensor, name = found
    return [Placement(tensor, name, rows_for(model, module, tensor), cols_for(model, module))]


def expert_placements(model: Model, owner: str, parameter: str, out_features: int) -> list[Placement]:
    """Where a fused expert parameter's delta goes: one 3D tensor per projection the converter makes of it;
    empty when the architecture has no GGUF tensor for one of them."""
    projections = EXPERT_PROJECTIONS[parameter]
    found = [lookup(model, f"{owner}.{projection}") for projection in projections]
    if None in found:
        return []
    return [
        Placement(tensor, name, projection_rows(model, out_features, index, len(projections)))
        for index, (tensor, name) in enumerate(hit for hit in found if hit is not None)
    ]


def projection_rows(model: Model, out_features: int, index: int, parts: int) -> np.ndarray | None:
    """The rows of projection ``index`` of ``parts`` in a fused expert parameter: consecutive blocks, or for
    gpt-oss every ``parts``-th row."""
    if parts == 1:
        return None
    if model.family.interleaved_gate_up:
        return np.arange(index, out_features, parts)
    return np.arange(out_features).reshape(parts, -1)[index]


def rows_for(model: Model, module: str, tensor: MODEL_TENSOR) -> np.ndarray | None:
    """The converter's reordering of this tensor's rows, or None."""
    hp = model.hparams
    if model.family.rope_permuted and tensor in (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K):
        n_head = hp["num_attention_heads"]
        heads = n_head if tensor == MODEL_TENSOR.ATTN_Q else hp.get("num_key_value_heads") or n_head
        if rope_head_dim(hp) % 2:
            raise WeightdiffError(f"{module}: head_dim {rope_head_dim(hp)} is odd, so RoPE cannot pair its rows")
        return interleaved_rope_order(heads * rope_head_dim(hp), heads)
    if not tiled(model) or ".linear_attn." not in module:
        return None
    heads, per_key = hp["linear_num_key_heads"], hp["linear_num_value_heads"] // hp["linear_num_key_heads"]
    v_dim = hp["linear_value_head_dim"]
    if module.endswith(".in_proj_qkv"):
        qk = 2 * heads * hp["linear_key_head_dim"]
        return np.concatenate([np.arange(qk), qk + tiled_order(heads, per_key, v_dim)])
    if module.endswith(".in_proj_z"):
        return tiled_order(heads, per_key, v_dim)
    if module.endswith((".in_proj_a", ".in_proj_b")):
        return tiled_order(heads, per_key, 1)
    return None


def cols_for(model: Model, module: str) -> np.ndarray | None:
    """The converter's reordering of this tensor's columns, or None: Qwen3.5's out_proj reads tiled value heads."""
    if not tiled(model) or not module.endswith(".linear_attn.out_proj"):
        return None
    hp = model.hparams
    heads = hp["linear_num_key_heads"]
    return tiled_order(heads, hp["linear_num_value_heads"] // heads, hp["linear_value_head_dim"])


def tiled(model: Model) -> bool:
    hp = model.hparams
    keys, values = hp.get("linear_num_key_heads", 0), hp.get("linear_num_value_heads", 0)
    return model.family.tiled_v_heads and keys > 0 and values > 0 and keys != values


def rope_head_dim(hparams: dict) -> int:
    return hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]


def interleaved_rope_order(rows: int, heads: int) -> np.ndarray:
    """HF row indices in llama.cpp's order: within each head of ``d`` rows, rows ``i`` and ``d/2 + i`` become
    rows ``2i`` and ``2i + 1`` (rotate-half to interleaved pairs)."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(0, 2, 1).reshape(-1)


def tiled_order(key_heads: int, per_key: int, head_dim: int) -> np.ndarray:
    """Value-head rows from grouped by key head (``[k0: v0 v1 …][k1: v0 v1 …]``) to tiled
    (``[k0 v0][k1 v0]…[k0 v1][k1 v1]…``), each head ``head_dim`` rows."""
    return np.arange(key_heads * per_key * head_dim).reshape(key_heads, per_key, head_dim).transpose(1, 0, 2).ravel()


def qkvz_placements(model: Model, module: str) -> list[Placement]:
    """Qwen3-Next's in_proj_qkvz, per key head ``[q, k, v, z]``, as llama.cpp's ``attn_qkv`` (every head's q,
    then k, then v) and ``attn_gate`` (every head's z)."""
    hp = model.hparams
    heads, key_dim = hp["linear_num_key_heads"], hp["linear_key_head_dim"]
    value_dim = hp["linear_num_value_heads"] // heads * hp["linear_value_head_dim"]
    found = lookup(model, module)
    if found is None:
        return []
    layer = int(found[1].split(".")[1])
    per_head = np.arange(heads * (2 * key_dim + 2 * value_dim)).reshape(heads, -1)
    q, k, v, z = np.split(per_head, np.cumsum([key_dim, key_dim, value_dim]), axis=1)
    return [
        Placement(tensor, gguf.TENSOR_NAMES[tensor].format(bid=layer) + ".weight", rows)
        for tensor, rows in (
            (MODEL_TENSOR.ATTN_QKV, np.concatenate([q.ravel(), k.ravel(), v.ravel()])),
            (MODEL_TENSOR.ATTN_GATE, z.ravel()),
        )
    ]
