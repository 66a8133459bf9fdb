"""Convert a PEFT LoRA adapter directory into a LoRA GGUF that llama.cpp loads with ``--lora``.

The layout follows what llama.cpp's loader (``src/llama-adapter.cpp``) checks and what its own
``convert_lora_to_gguf.py`` writes:

* metadata ``general.type = "adapter"``, ``general.architecture`` equal to the base model's GGUF
  architecture (a mismatch is refused at load time), ``adapter.type = "lora"``, ``adapter.lora.alpha``;
* tensors ``<base tensor name>.lora_a`` / ``.lora_b`` in PEFT orientation (A ``[r, in]``,
  B ``[out, r]``), named with the ``gguf`` package's own HF-to-GGUF name map so the names track
  llama.cpp instead of a table copied here;
* for the ``llama`` architecture, the rows of q_proj/k_proj reordered exactly as llama.cpp's model
  converter reorders the base model's q/k weights (``LlamaModel.permute``): the base GGUF holds
  those weights in interleaved-RoPE row order, so a delta added to them must be in that order too.
  Only the output side is affected, so the permutation goes on ``lora_b`` alone;
* mixture-of-experts layers adapted through PEFT's ``target_parameters`` (the fused expert
  parameters ``mlp.experts.gate_up_proj`` / ``down_proj``) as llama.cpp's 3D expert LoRA pairs
  ``blk.N.ffn_{gate,up,down}_exps.weight.lora_a`` ``[n_expert, r, in]`` / ``.lora_b``
  ``[n_expert, out, r]`` (numpy order; GGML's ``ne`` is the reverse), which its loader checks against
  the base's ``ffn_*_exps`` ``ne = {in, out, n_expert}`` and applies per routed expert with
  ``ggml_mul_mat_id``. llama.cpp's converter splits ``gate_up_proj`` into separate gate and up
  tensors, so its LoRA is split the same way: both halves share ``lora_a``, and ``lora_b``'s rows
  ``[:I]`` go to gate, ``[I:]`` to up.

Scaling: llama.cpp multiplies every pair by ``alpha / rank`` with one file-wide alpha and the rank
read from each tensor's own shape (``llama-graph.cpp``, ``build_lora_mm``), and by the user's scale
alone when alpha is 0. That cannot express PEFT's per-module ``alpha_pattern`` / ``rank_pattern``
(or rsLoRA's ``alpha / sqrt(r)``); llama.cpp's converter writes the global ``lora_alpha`` and so gets
those modules wrong. We fold PEFT's exact per-module scaling into ``lora_b`` and write alpha 0, so
``B_gguf @ A_gguf`` is exactly the delta PEFT adds and ``--lora-scaled x`` still means "x times it".
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH, MODEL_TENSOR, GGMLQuantizationType
from safetensors import safe_open

from weightdiff.errors import WeightdiffError
from weightdiff.files import atomic_path
from weightdiff.peft_format import PREFIX as PEFT_PREFIX
from weightdiff.peft_format import is_target, pattern_value

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# GGUF suffix of each LoRA half -> the PEFT key suffix it comes from.
FACTOR_SUFFIXES = {"lora_a": ".lora_A.weight", "lora_b": ".lora_B.weight"}

# HF config.json model_type -> the GGUF architecture llama.cpp's converter gives that model.
ARCH_BY_MODEL_TYPE: dict[str, MODEL_ARCH] = {
    "llama": MODEL_ARCH.LLAMA,
    "mistral": MODEL_ARCH.LLAMA,  # convert_hf_to_gguf.py registers MistralForCausalLM as LlamaModel
    "qwen2": MODEL_ARCH.QWEN2,
    "qwen3": MODEL_ARCH.QWEN3,
    "qwen3_moe": MODEL_ARCH.QWEN3MOE,
    "gemma": MODEL_ARCH.GEMMA,
    "gemma2": MODEL_ARCH.GEMMA2,
}
# Architectures whose converter reorders q/k rows for interleaved RoPE; the others use NeoX RoPE
# and keep HF's row order.
ROPE_PERMUTED_ARCHS = {MODEL_ARCH.LLAMA}

# Fused expert parameter (transformers 5 holds experts this way, PEFT adapts them with target_parameters) ->
# the per-expert projections llama.cpp's converter makes of it, each an equal slice of its output rows, in order.
EXPERT_PARAMETERS: dict[str, tuple[str, ...]] = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}

GGML_TYPE_BY_DTYPE: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
}


@dataclass(frozen=True)
class LoraPair:
    """The two saved PEFT factors of one adapted module (or one targeted parameter), as found in the file."""

    module: str  # path without ``base_model.model.``; a parameter wrapper's ends in ``.base_layer`` when nested
    key_a: str
    key_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]


@dataclass(frozen=True)
class Factor:
    """One GGUF tensor to write, planned from shapes alone so the header can precede the data."""

    gguf_name: str
    peft_key: str
    shape: tuple[int, ...]  # numpy order, as written
    ggml_type: GGMLQuantizationType
    scale: float  # PEFT's scaling for lora_b, 1 for lora_a
    rope_heads: int | None  # heads whose rows llama.cpp's converter reorders; None: keep the order
    n_experts: int | None = None  # experts the PEFT tensor stacks (target_parameters layout); None: a linear layer
    out_rows: tuple[int, int] | None = None  # lora_b rows [start, stop) that belong to this GGUF tensor

    @property
    def is_lora_b(self) -> bool:
        return self.gguf_name.endswith(".lora_b")

    @property
    def nbytes(self) -> int:
        return math.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, self.ggml_type))


def write_lora_gguf(adapter_dir: Path, model_config: dict, out_path: Path, dtype: str = "f32") -> dict:
    """Write the PEFT LoRA adapter in ``adapter_dir`` as a llama.cpp LoRA GGUF at ``out_path``.

    ``model_config`` is the base model's HF ``config.json``; it fixes the GGUF architecture, the
    number of blocks for tensor names and the head counts for the q/k row order. ``dtype`` is one
    of f32, f16, bf16, q8_0 (q8_0 falls back to f16 for tensors whose rows are not whole blocks).
    The file appears under ``out_path`` only once complete.

    Returns ``{"arch": str, "tensors": int, "bytes": int, "dtype": str}``.
    """
    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    requested_type = ggml_type_for(dtype)
    arch = arch_for(model_config)
    adapter_config = adapter_config_in(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise WeightdiffError(f"{weights_path} not found: expected a PEFT LoRA adapter directory")

    with atomic_path(out_path) as tmp_path, safe_open(weights_path, framework="pt") as handle:
        factors = planned_factors(handle, adapter_config, model_config, arch, requested_type)
        write_gguf(tmp_path, arch, factors, handle)

    summary = {
        "arch": gguf.MODEL_ARCH_NAMES[arch],
        "tensors": len(factors),
        "bytes": out_path.stat().st_size,
        "dtype": dtype,
    }
    logger.info("wrote %s: %s", out_path, summary)
    return summary


def ggml_type_for(dtype: str) -> GGMLQuantizationType:
    """The GGML tensor type for a ``dtype`` option, validated before any work starts."""
    try:
        return GGML_TYPE_BY_DTYPE[dtype]
    except KeyError:
        raise WeightdiffError(
            f"unsupported GGUF dtype {dtype!r}; choose one of {', '.join(GGML_TYPE_BY_DTYPE)}"
        ) from None


def arch_for(model_config: dict) -> MODEL_ARCH:
    """The GGUF architecture of the base model; llama.cpp refuses an adapter whose arch differs."""
    model_type = model_config.get("model_type")
    if model_type not in ARCH_BY_MODEL_TYPE:
        raise WeightdiffError(
            f"cannot export a LoRA GGUF for model_type {model_type!r}; "
            f"supported model types: {', '.join(sorted(ARCH_BY_MODEL_TYPE))}"
        )
    return ARCH_BY_MODEL_TYPE[model_type]


def adapter_config_in(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's ``adapter_config.json``, checked to be a LoRA config."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise WeightdiffError(f"{path} not found: expected a PEFT LoRA adapter directory")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise WeightdiffError(f"{path}: peft_type is {config['peft_type']!r}, only LORA converts to a LoRA GGUF")
    return config


def planned_factors(
    handle: Any, adapter_config: dict, model_config: dict, arch: MODEL_ARCH, requested_type: GGMLQuantizationType
) -> list[Factor]:
    """Every tensor of the GGUF, in write order, with its name, shape, type and transformation."""
    name_map = gguf.get_tensor_name_map(arch, model_config["num_hidden_layers"])
    factors: list[Factor] = []
    for module in lora_modules(handle.keys()):
        key_a, key_b = (PEFT_PREFIX + module + suffix for suffix in FACTOR_SUFFIXES.values())
        pair = LoraPair(module, key_a, key_b, *(tuple(handle.get_slice(key).get_shape()) for key in (key_a, key_b)))
        if is_expert_wrapper(module, adapter_config):
            factors += expert_factors(pair, name_map, adapter_config, model_config, requested_type)
        else:
            factors += linear_factors(pair, name_map, adapter_config, model_config, arch, requested_type)

    fallbacks = [f.gguf_name for f in factors if f.ggml_type != requested_type]
    if fallbacks:
        logger.info(
            "%s needs rows that are a multiple of %d values; wrote %d tensors as f16 instead: %s",
            requested_type.name,
            gguf.GGML_QUANT_SIZES[requested_type][0],
            len(fallbacks),
            ", ".join(fallbacks),
        )
    return factors


def linear_factors(
    pair: LoraPair,
    name_map: gguf.TensorNameMap,
    adapter_config: dict,
    model_config: dict,
    arch: MODEL_ARCH,
    requested_type: GGMLQuantizationType,
) -> list[Factor]:
    """The lora_a/lora_b tensors of an adapted linear layer: PEFT's factors as they are, scale folded into B."""
    rank, scale = peft_rank_and_scaling(pair.module, adapter_config)
    if len(pair.shape_a) != 2 or len(pair.shape_b) != 2 or pair.shape_a[0] != rank or pair.shape_b[1] != rank:
        raise WeightdiffError(
            f"{pair.key_a} {list(pair.shape_a)} / {pair.key_b} {list(pair.shape_b)}: expected A [{rank}, in] and "
            f"B [out, {rank}] for rank {rank} from {ADAPTER_CONFIG}"
        )
    tensor_type, base_name = base_tensor(name_map, pair.module, pair.key_a, model_config)
    rope_heads = rope_heads_for(arch, tensor_type, model_config, pair.shape_b[0], pair.key_b)
    return factor_pair(base_name, pair, pair.shape_a, pair.shape_b, scale, requested_type, rope_heads=rope_heads)


def factor_pair(
    base_name: str,
    pair: LoraPair,
    shape_a: tuple[int, ...],
    shape_b: tuple[int, ...],
    scale: float,
    requested_type: GGMLQuantizationType,
    rope_heads: int | None = None,
    n_experts: int | None = None,
    out_rows: tuple[int, int] | None = None,
) -> list[Factor]:
    """The GGUF ``.lora_a`` and ``.lora_b`` tensors for one base tensor; only lora_b carries scale and row changes."""
    return [
        Factor(f"{base_name}.lora_a", pair.key_a, shape_a, stored_type(shape_a, requested_type), 1.0, None, n_experts),
        Factor(
            f"{base_name}.lora_b",
            pair.key_b,
            shape_b,
            stored_type(shape_b, requested_type),
            scale,
            rope_heads,
            n_experts,
            out_rows,
        ),
    ]


def is_expert_wrapper(module: str, adapter_config: dict) -> bool:
    """Whether the pair is PEFT's ``target_parameters`` wrapper of a layer's fused experts.

    PEFT saves it under the experts module's path, once more wrapped (``.base_layer``) per further
    parameter of the same module it adapts.
    """
    return bool(adapter_config.get("target_parameters")) and experts_owner(module).endswith(".experts")


def experts_owner(module: str) -> str:
    """The experts module a (possibly nested) parameter wrapper belongs to."""
    return module.replace(".base_layer", "")


def expert_factors(
    pair: LoraPair,
    name_map: gguf.TensorNameMap,
    adapter_config: dict,
    model_config: dict,
    requested_type: GGMLQuantizationType,
) -> list[Factor]:
    """The 3D lora_a/lora_b tensors of one fused expert parameter, one pair per projection llama.cpp has.

    PEFT's layout (``ParamWrapper``): A ``[r·E, in]`` with expert e's rows at ``e·r:(e+1)·r``,
    B ``[out, r·E]`` with expert e's columns at ``e::E``, delta[e] = scaling · B_e @ A_e.
    """
    owner = experts_owner(pair.module)
    parameter = expert_parameter(pair, adapter_config, model_config)
    rank, scale = peft_rank_and_scaling(f"{owner}.{parameter}", adapter_config)
    n_experts = experts_in(model_config)
    stacked = rank * n_experts
    if pair.shape_a[0] != stacked or pair.shape_b[1] != stacked:
        raise WeightdiffError(
            f"{pair.key_a} {list(pair.shape_a)} / {pair.key_b} {list(pair.shape_b)}: expected A [{stacked}, in] and "
            f"B [out, {stacked}] for rank {rank} × {n_experts} experts"
        )
    projections = EXPERT_PARAMETERS[parameter]
    rows = pair.shape_b[0] // len(projections)
    shape_a = (n_experts, rank, pair.shape_a[1])
    shape_b = (n_experts, rows, rank)
    factors = []
    for index, projection in enumerate(projections):
        _, base_name = base_tensor(name_map, f"{owner}.{projection}", pair.key_a, model_config)
        factors += factor_pair(
            base_name,
            pair,
            shape_a,
            shape_b,
            scale,
            requested_type,
            n_experts=n_experts,
            out_rows=(index * rows, (index + 1) * rows),
        )
    return factors


def expert_parameter(pair: LoraPair, adapter_config: dict, model_config: dict) -> str:
    """Which fused expert parameter the pair adapts (``gate_up_proj`` or ``down_proj``), told by its shape.

    The keys alone do not say it: the nesting depth depends on which parameters were targeted.
    ``[out, in]`` does: gate_up_proj is ``[2·I, hidden]``, down_proj ``[hidden, I]``.
    """
    owner = experts_owner(pair.module)
    hidden, inter = model_config["hidden_size"], model_config["moe_intermediate_size"]
    shapes = {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}
    found = [
        name
        for name, shape in shapes.items()
        if shape == (pair.shape_b[0], pair.shape_a[-1])
        and is_target(f"{owner}.{name}", adapter_config["target_parameters"])
    ]
    if len(found) != 1:
        raise WeightdiffError(
            f"{pair.key_a} {list(pair.shape_a)} / {pair.key_b} {list(pair.shape_b)}: not a LoRA of a fused expert "
            f"parameter listed in target_parameters ({', '.join(adapter_config['target_parameters'])}); "
            f"expected [out, in] of " + ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
        )
    return found[0]


def experts_in(model_config: dict) -> int:
    """Routed experts per layer: Hub Qwen3-MoE configs say ``num_experts``, transformers 5 saves
    ``num_local_experts``."""
    return model_config.get("num_local_experts") or model_config["num_experts"]


def lora_modules(keys: Iterable[str]) -> list[str]:
    """Module paths (no ``base_model.model.`` prefix) that have both LoRA halves, in file order.

    Any other tensor is an error rather than something to skip: dropping it would write an adapter
    that silently differs from the PEFT one.
    """
    halves: dict[str, list[str]] = {}
    for key in keys:
        half = next((h for h, suffix in FACTOR_SUFFIXES.items() if key.endswith(suffix)), None)
        if half is None or not key.startswith(PEFT_PREFIX):
            raise unconvertible_key_error(key)
        halves.setdefault(key[len(PEFT_PREFIX) : -len(FACTOR_SUFFIXES[half])], []).append(half)
    for module, found in halves.items():
        if sorted(found) != sorted(FACTOR_SUFFIXES):
            raise WeightdiffError(
                f"{PEFT_PREFIX}{module}: needs exactly one lora_A and one lora_B weight, found {', '.join(found)}"
            )
    return list(halves)


def unconvertible_key_error(key: str) -> WeightdiffError:
    """The error for a tensor that is not a lora_A/lora_B weight, saying what it likely is."""
    if ".lora_" in key:
        return WeightdiffError(
            f"{key}: unsupported LoRA tensor; only lora_A/lora_B weights of linear layers "
            f"convert to a llama.cpp LoRA GGUF"
        )
    return WeightdiffError(
        f"{key} is a full weight (modules_to_save); llama.cpp cannot apply full weights from a LoRA adapter"
    )


def peft_rank_and_scaling(module: str, adapter_config: dict) -> tuple[int, float]:
    """The rank and the factor PEFT multiplies ``B @ A`` by for this module.

    ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha`` per module, keys tried in
    order as PEFT does; rsLoRA divides by ``sqrt(r)`` instead of ``r``.
    """
    rank = pattern_value(adapter_config.get("rank_pattern") or {}, module, adapter_config["r"])
    alpha = pattern_value(adapter_config.get("alpha_pattern") or {}, module, adapter_config["lora_alpha"])
    divisor = math.sqrt(rank) if adapter_config.get("use_rslora") else rank
    return int(rank), float(alpha) / divisor


def base_tensor(name_map: gguf.TensorNameMap, module: str, key: str, model_config: dict) -> tuple[MODEL_TENSOR, str]:
    """The GGUF tensor the module's delta applies to, refusing ones llama.cpp could not apply it to."""
    found = name_map.get_type_and_name(module + ".weight", try_suffixes=(".weight",))
    if found is None:
        raise WeightdiffError(f"{key}: module {module!r} has no GGUF tensor name for this architecture")
    tensor_type, name = found
    if tensor_type == MODEL_TENSOR.TOKEN_EMBD:
        raise WeightdiffError(f"{key}: LoRA on the token embeddings is not supported in a llama.cpp LoRA GGUF export")
    if tensor_type == MODEL_TENSOR.OUTPUT and model_config.get("tie_word_embeddings"):
        raise WeightdiffError(
            f"{key}: the base model ties lm_head to the embeddings, so its GGUF has no "
            f"{name} for llama.cpp to apply this LoRA to"
        )
    return tensor_type, name


def rope_heads_for(arch: MODEL_ARCH, tensor_type: MODEL_TENSOR, model_config: dict, rows: int, key: str) -> int | None:
    """How many heads llama.cpp's converter splits this tensor's rows into when it reorders them, or None.

    Like ``LlamaModel.permute``: q uses ``num_attention_heads``, k ``num_key_value_heads``.
    """
    if arch not in ROPE_PERMUTED_ARCHS or tensor_type not in (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K):
        return None
    n_head = model_config["num_attention_heads"]
    heads = n_head if tensor_type == MODEL_TENSOR.ATTN_Q else model_config.get("num_key_value_heads", n_head)
    if rows % (2 * heads):
        raise WeightdiffError(f"{key}: {rows} output rows do not split into {heads} heads of even size")
    return heads


def stored_type(shape: tuple[int, ...], requested: GGMLQuantizationType) -> GGMLQuantizationType:
    """The requested type, or f16 where a block type's blocks do not tile a row (GGML quantizes by row)."""
    block_size = gguf.GGML_QUANT_SIZES[requested][0]
    return requested if shape[-1] % block_size == 0 else GGMLQuantizationType.F16


def write_gguf(path: Path, arch: MODEL_ARCH, factors: list[Factor], handle: Any) -> None:
    """Write header, metadata and tensor index from the plan, then stream the tensors one at a time."""
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # 0: llama.cpp then applies each pair unscaled; PEFT's scaling is already folded into lora_b.
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
        for factor in factors:
            writer.add_tensor_info(
                factor.gguf_name, factor.shape, np.dtype(np.float32), factor.nbytes, raw_dtype=factor.ggml_type
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for factor in factors:
            writer.write_tensor_data(encoded_tensor(factor, handle))
    finally:
        writer.close()


def encoded_tensor(factor: Factor, handle: Any) -> np.ndarray:
    """The factor's data as stored in the GGUF: scaled, row-reordered where needed, in its GGML type."""
    data = handle.get_tensor(factor.peft_key).to(torch.float32).numpy() * np.float32(factor.scale)
    if factor.n_experts is not None:
        data = per_expert(data, factor.n_experts, factor.is_lora_b)
    if factor.out_rows is not None:
        data = data[..., slice(*factor.out_rows), :]
    if factor.rope_heads is not None:
        data = interleaved_rope_rows(data, factor.rope_heads)
    return gguf.quants.quantize(np.ascontiguousarray(data), factor.ggml_type)


def per_expert(data: np.ndarray, n_experts: int, is_lora_b: bool) -> np.ndarray:
    """PEFT's stacked expert factor as llama.cpp's 3D one: A ``[r·E, in]`` -> ``[E, r, in]``,
    B ``[out, r·E]`` -> ``[E, out, r]``."""
    if is_lora_b:
        return data.reshape(data.shape[0], -1, n_experts).transpose(2, 0, 1)
    return data.reshape(n_experts, -1, data.shape[1])


def interleaved_rope_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows reordered per head from HF's rotate-half layout (first half, second half) to pairs.

    Within each head of ``d`` rows, row ``i`` and row ``d/2 + i`` become rows ``2i`` and ``2i + 1``:
    the order llama.cpp's interleaved RoPE expects, the same reordering its converter gives q/k.
    """
    half = rows.shape[0] // n_heads // 2
    return rows.reshape(n_heads, 2, half, -1).transpose(0, 2, 1, 3).reshape(rows.shape)
