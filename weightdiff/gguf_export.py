"""Convert a PEFT LoRA adapter directory into a LoRA GGUF that llama.cpp loads with ``--lora``.

The layout follows what llama.cpp's loader (``src/llama-adapter.cpp``) checks and its graphs
(``src/llama-graph.cpp``: ``build_lora_mm``, ``build_lora_mm_id``, ``build_inp_embd``) apply:

* metadata ``general.type = "adapter"``, ``general.architecture`` equal to the base model's GGUF
  architecture (a mismatch is refused at load time), ``adapter.type = "lora"``, ``adapter.lora.alpha``;
* tensors ``<base tensor name>.lora_a`` / ``.lora_b`` in PEFT orientation (A ``[r, in]``, B ``[out, r]``),
  at the GGUF tensor llama.cpp's converter makes of the module and in the row/column order it gives that
  tensor (``weightdiff.gguf_arch``): a delta added to a reordered or split base weight must be reordered
  and split the same way. Row changes go on ``lora_b``, column changes on ``lora_a``;
* mixture-of-experts layers adapted through PEFT's ``target_parameters`` (the fused expert parameters
  ``mlp.experts.gate_up_proj`` / ``down_proj``) as 3D pairs ``blk.N.ffn_{gate,up,down}_exps.weight.lora_a``
  ``[n_expert, r, in]`` / ``.lora_b`` ``[n_expert, out, r]`` (numpy order; GGML's ``ne`` is the reverse),
  applied per routed expert with ``ggml_mul_mat_id``; ``gate_up_proj`` is split as the converter splits it,
  both halves sharing ``lora_a``;
* PEFT's ``lora_embedding_A`` ``[r, vocab]`` / ``lora_embedding_B`` ``[dim, r]`` as ``token_embd.weight``'s
  pair, whose ``lora_a`` llama.cpp reads per token (``ggml_get_rows``), so it is stored transposed
  ``[vocab, r]``.

What a llama.cpp LoRA cannot hold is left out and listed with the reason, never silently: full weights
(``modules_to_save``; the loader skips ``*_norm`` tensors and applies no others), PEFT's ``lora_B.bias``
(llama.cpp's LoRA has no bias), a module without a GGUF tensor in the architecture, and the token
embeddings of a model whose output reuses ``token_embd`` (tied, or an architecture whose converter drops
``lm_head``): llama.cpp looks adapters up by tensor name, so it would also apply token_embd's pair to the
output matmul, where its per-token layout does not fit (ggml aborts on the shapes). An architecture weightdiff
does not know llama.cpp's layout of writes no file and says why. ``strict`` makes either an error.

Scaling: llama.cpp multiplies every pair by ``alpha / rank`` with one file-wide alpha and the rank read from
each tensor's own shape, and by the user's scale alone when alpha is 0. That cannot express PEFT's
per-module ``alpha_pattern`` / ``rank_pattern`` (or rsLoRA's ``alpha / sqrt(r)``); llama.cpp's converter
writes the global ``lora_alpha`` and so gets those modules wrong. We fold PEFT's exact per-module scaling
into ``lora_b`` and write alpha 0, so ``B_gguf @ A_gguf`` is exactly the delta PEFT adds and
``--lora-scaled x`` still means "x times it".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR, GGMLQuantizationType
from safetensors import safe_open

from weightdiff import gguf_arch
from weightdiff.errors import WeightdiffError
from weightdiff.files import atomic_path
from weightdiff.gguf_arch import Model, Placement
from weightdiff.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_target, rank_and_scaling, read_adapter_config
from weightdiff.peft_format import PREFIX as PEFT_PREFIX

logger = logging.getLogger(__name__)

GGUF_FILE = "adapter.gguf"  # the file's name in the stage's output directory
# PEFT key suffixes of each LoRA half (GGUF suffix -> PEFT suffix): linear layers and parameters, embeddings.
LINEAR_HALVES = {"lora_a": ".lora_A.weight", "lora_b": ".lora_B.weight"}
EMBEDDING_HALVES = {"lora_a": ".lora_embedding_A", "lora_b": ".lora_embedding_B"}
LORA_BIAS = ".lora_B.bias"

FULL_WEIGHT = "a full weight (modules_to_save): llama.cpp applies only LoRA pairs from an adapter, and skips norms"
BIAS = "PEFT's lora_B.bias: llama.cpp's LoRA has no bias term"
OTHER_PEFT_TENSOR = "a PEFT tensor that is no LoRA factor (DoRA magnitude, prompt, ...): llama.cpp has none"
NOT_LINEAR = "factors that are not 2-D (a convolution's LoRA): llama.cpp applies LoRA to matrix products only"

GGML_TYPE_BY_DTYPE: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
}


class LeftOut(TypedDict):
    tensor: str  # a PEFT key (without base_model.model.) or, for a LoRA pair, its module path
    reason: str


class GgufSummary(TypedDict):
    """metrics/gguf.json: what the LoRA GGUF holds, or why there is none, and what it leaves out."""

    written: bool
    reason: str | None  # why no file was written; None when one was
    arch: str | None  # the GGUF architecture, None when weightdiff does not know the model's
    tensors: int
    bytes: int
    dtype: str
    left_out: list[LeftOut]


@dataclass(frozen=True)
class LoraPair:
    """The two saved PEFT factors of one adapted module (or one targeted parameter), as found in the file."""

    module: str  # path without ``base_model.model.``; a parameter wrapper's ends in ``.base_layer`` when nested
    key_a: str
    key_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    embedding: bool  # lora_embedding_A/B: A [r, vocab], B [dim, r]


@dataclass(frozen=True, eq=False)
class Factor:
    """One GGUF tensor to write, planned from shapes alone so the header can precede the data."""

    gguf_name: str
    peft_key: str
    shape: tuple[int, ...]  # numpy order, as written
    ggml_type: GGMLQuantizationType
    scale: float = 1.0  # PEFT's scaling for lora_b, 1 for lora_a
    n_experts: int | None = None  # experts the PEFT tensor stacks (target_parameters layout); None: a linear layer
    order: np.ndarray | None = field(default=None)  # lora_b: the rows it takes, lora_a: its column order
    transposed: bool = False  # token_embd's lora_a, stored [vocab, r]

    @property
    def is_lora_b(self) -> bool:
        return self.gguf_name.endswith(".lora_b")

    @property
    def nbytes(self) -> int:
        return math.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, self.ggml_type))


@dataclass(frozen=True)
class Plan:
    """Every tensor of the GGUF in write order, and what the adapter holds that the GGUF cannot."""

    factors: list[Factor]
    left_out: list[LeftOut]


@dataclass(frozen=True)
class Target:
    """The base GGUF a pair is planned against: its model, whether it has an output tensor of its own, the type."""

    model: Model
    has_output: bool
    requested_type: GGMLQuantizationType


def write_lora_gguf(
    adapter_dir: Path,
    model_config: dict,
    out_path: Path,
    dtype: str = "f32",
    *,
    strict: bool = False,
    base_tensors: Collection[str] | None = None,
) -> GgufSummary:
    """Write the PEFT LoRA adapter in ``adapter_dir`` as a llama.cpp LoRA GGUF at ``out_path``, or say why not.

    ``model_config`` is the base model's HF ``config.json``: it fixes the GGUF architecture (as llama.cpp's
    converter picks it), the number of blocks for tensor names and the head counts for row orders.
    ``base_tensors``, the base checkpoint's tensor names, tells whether its GGUF gets an output tensor of its
    own (else ``tie_word_embeddings`` says). ``dtype`` is one of f32, f16, bf16, q8_0 (q8_0 falls back to f16
    for tensors whose rows are not whole blocks). What the GGUF cannot hold is left out and listed; with
    ``strict`` that, or an architecture weightdiff has no llama.cpp layout for, is a WeightdiffError. The
    file appears under ``out_path`` only once complete, and not at all when nothing is written.
    """
    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    requested_type = ggml_type_for(dtype)
    adapter_config = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS

    family = gguf_arch.family_for(model_config)
    if family is None:
        return not_written(unknown_architecture(model_config), None, dtype, [], strict)
    if adapter_config.get("use_dora"):
        reason = "the adapter is DoRA (use_dora): llama.cpp applies plain LoRA only, so its pairs alone would be wrong"
        return not_written(reason, family.name, dtype, [], strict)

    model = gguf_arch.base_model(model_config, family)
    target = Target(model, has_output_tensor(model, base_tensors), requested_type)
    with safe_open(weights_path, framework="pt") as handle:
        plan = planned(handle, adapter_config, target)
        if strict and plan.left_out:
            raise WeightdiffError(f"gguf.strict: the LoRA GGUF cannot hold {describe(plan.left_out)}")
        if not plan.factors:
            reason = "nothing in the adapter is a LoRA pair llama.cpp applies"
            return not_written(reason, family.name, dtype, plan.left_out, strict)
        with atomic_path(out_path) as tmp_path:
            write_gguf(tmp_path, family, plan.factors, handle)

    summary = GgufSummary(
        written=True,
        reason=None,
        arch=family.name,
        tensors=len(plan.factors),
        bytes=out_path.stat().st_size,
        dtype=dtype,
        left_out=plan.left_out,
    )
    logger.info("wrote %s: %s tensors, %s bytes, %s", out_path, summary["tensors"], summary["bytes"], family.name)
    if plan.left_out:
        logger.warning("the LoRA GGUF leaves out %s", describe(plan.left_out))
    return summary


def not_written(reason: str, arch: str | None, dtype: str, left_out: list[LeftOut], strict: bool) -> GgufSummary:
    """The summary of a conversion that writes no file, or with ``strict`` the error saying why."""
    if strict:
        raise WeightdiffError(f"gguf.strict: no LoRA GGUF written: {reason}")
    logger.warning("no LoRA GGUF written: %s", reason)
    if left_out:
        logger.warning("the adapter holds %s", describe(left_out))
    return GgufSummary(written=False, reason=reason, arch=arch, tensors=0, bytes=0, dtype=dtype, left_out=left_out)


def unknown_architecture(config: dict) -> str:
    hparams = gguf_arch.text_hparams(config)
    named = (hparams.get("architectures") or [None])[0] or hparams.get("model_type")
    return (
        f"weightdiff does not know how llama.cpp's converter lays out the weights of {named!r}, so it cannot place a "
        f"LoRA on them; it knows {', '.join(gguf_arch.known_architectures())}"
    )


def describe(left_out: list[LeftOut], shown: int = 4) -> str:
    """What was left out, grouped by reason, a few names each: for the log and errors."""
    by_reason: dict[str, list[str]] = {}
    for entry in left_out:
        by_reason.setdefault(entry["reason"], []).append(entry["tensor"])
    parts = []
    for reason, names in by_reason.items():
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        parts.append(f"{len(names)} × {reason} ({', '.join(names[:shown])}{more})")
    return "; ".join(parts)


def ggml_type_for(dtype: str) -> GGMLQuantizationType:
    """The GGML tensor type for a ``dtype`` option, validated before any work starts."""
    try:
        return GGML_TYPE_BY_DTYPE[dtype]
    except KeyError:
        raise WeightdiffError(
            f"unsupported GGUF dtype {dtype!r}; choose one of {', '.join(GGML_TYPE_BY_DTYPE)}"
        ) from None


def has_output_tensor(model: Model, base_tensors: Collection[str] | None) -> bool:
    """Whether the base GGUF has an ``output`` tensor of its own: the converter writes one from an LM head on
    disk, except for architectures it drops it for. Otherwise llama.cpp's output matmul uses ``token_embd``."""
    if not model.family.keeps_lm_head:
        return False
    if base_tensors is None:
        return not model.hparams.get("tie_word_embeddings", True)
    return any(is_output(model, name) for name in base_tensors)


def is_output(model: Model, tensor: str) -> bool:
    found = gguf_arch.lookup(model, tensor.removesuffix(".weight"))
    return found is not None and found[0] == MODEL_TENSOR.OUTPUT


def planned(handle: Any, adapter_config: dict, target: Target) -> Plan:
    """Every tensor of the GGUF, in write order, with its name, shape, type and transformation."""
    pairs, left_out = adapter_contents(handle)
    factors: list[Factor] = []
    for pair in pairs:
        if is_expert_wrapper(pair.module, adapter_config):
            result = expert_factors(pair, adapter_config, target)
        elif pair.embedding:
            result = embedding_factors(pair, adapter_config, target)
        else:
            result = linear_factors(pair, adapter_config, target)
        if isinstance(result, str):
            left_out.append(LeftOut(tensor=pair.module, reason=result))
        else:
            factors += result

    fallbacks = [f.gguf_name for f in factors if f.ggml_type != target.requested_type]
    if fallbacks:
        logger.info(
            "%s needs rows that are a multiple of %d values; wrote %d tensors as f16 instead: %s",
            target.requested_type.name,
            gguf.GGML_QUANT_SIZES[target.requested_type][0],
            len(fallbacks),
            ", ".join(fallbacks),
        )
    return Plan(factors, left_out)


def adapter_contents(handle: Any) -> tuple[list[LoraPair], list[LeftOut]]:
    """The file's LoRA pairs in file order, and every other tensor with the reason a LoRA GGUF leaves it out.

    A pair missing a half is an error rather than something to skip: the file is not what PEFT saves.
    """
    halves: dict[tuple[str, bool], dict[str, str]] = {}
    left_out: list[LeftOut] = []
    for key in handle.keys():
        found = lora_half(key)
        if found is None:
            left_out.append(LeftOut(tensor=key.removeprefix(PEFT_PREFIX), reason=other_tensor_reason(key)))
            continue
        module, embedding, half = found
        halves.setdefault((module, embedding), {})[half] = key
    pairs = []
    for (module, embedding), keys in halves.items():
        if sorted(keys) != ["lora_a", "lora_b"]:
            raise WeightdiffError(
                f"{PEFT_PREFIX}{module}: needs both LoRA factors, found only {', '.join(keys.values())}"
            )
        shape_a, shape_b = (tuple(handle.get_slice(keys[half]).get_shape()) for half in ("lora_a", "lora_b"))
        pairs.append(LoraPair(module, keys["lora_a"], keys["lora_b"], shape_a, shape_b, embedding))
    return pairs, left_out


def lora_half(key: str) -> tuple[str, bool, str] | None:
    """(module, is an embedding's, GGUF half) of a LoRA factor's key, or None for any other tensor."""
    if not key.startswith(PEFT_PREFIX):
        return None
    for embedding, suffixes in ((False, LINEAR_HALVES), (True, EMBEDDING_HALVES)):
        for half, suffix in suffixes.items():
            if key.endswith(suffix):
                return key[len(PEFT_PREFIX) : -len(suffix)], embedding, half
    return None


def other_tensor_reason(key: str) -> str:
    """Why a tensor that is not a LoRA factor stays out of the GGUF."""
    if key.endswith(LORA_BIAS):
        return BIAS
    return OTHER_PEFT_TENSOR if ".lora_" in key else FULL_WEIGHT


def linear_factors(pair: LoraPair, adapter_config: dict, target: Target) -> list[Factor] | str:
    """The lora_a/lora_b tensors of an adapted linear layer (one pair per GGUF tensor the converter makes of it),
    or the reason there are none."""
    if len(pair.shape_a) != 2 or len(pair.shape_b) != 2:
        return NOT_LINEAR
    rank, scale = rank_and_scaling(pair.module, adapter_config)
    if pair.shape_a[0] != rank or pair.shape_b[1] != rank:
        raise WeightdiffError(
            f"{pair.key_a} {list(pair.shape_a)} / {pair.key_b} {list(pair.shape_b)}: expected A [{rank}, in] and "
            f"B [out, {rank}] for rank {rank} from {ADAPTER_CONFIG}"
        )
    places = gguf_arch.placements(target.model, pair.module)
    reason = unplaceable(places, target)
    if reason:
        return reason
    check_placements(pair, places, pair.shape_b[0], pair.shape_a[1], target.model)
    factors = []
    for place in places:
        out = pair.shape_b[0] if place.rows is None else len(place.rows)
        factors += factor_pair(place.name, pair, pair.shape_a, (out, rank), scale, target, place)
    return factors


def embedding_factors(pair: LoraPair, adapter_config: dict, target: Target) -> list[Factor] | str:
    """token_embd's pair from PEFT's lora_embedding_A [r, vocab] / _B [dim, r]: lora_a transposed to
    [vocab, r] (llama.cpp gathers its rows per token), lora_b as it is."""
    rank, scale = rank_and_scaling(pair.module, adapter_config)
    places = gguf_arch.placements(target.model, pair.module)
    reason = unplaceable(places, target)
    if reason:
        return reason
    (place,) = places
    if place.tensor != MODEL_TENSOR.TOKEN_EMBD:
        return f"an embedding LoRA on {place.name}, which llama.cpp applies as a matrix product"
    if not target.has_output:
        return (
            f"the {target.model.family.name} GGUF's output matmul reuses token_embd (tied embeddings), and llama.cpp "
            "applies a pair by tensor name, so token_embd's [vocab, r] pair would meet the output's [dim] input "
            "there: ggml aborts on the shapes"
        )
    vocab, dim = pair.shape_a[1], pair.shape_b[0]
    return [
        Factor(f"{place.name}.lora_a", pair.key_a, (vocab, rank), stored_type((vocab, rank), target), transposed=True),
        Factor(f"{place.name}.lora_b", pair.key_b, (dim, rank), stored_type((dim, rank), target), scale),
    ]


def unplaceable(places: list[Placement], target: Target) -> str | None:
    """Why a delta cannot go to these GGUF tensors, or None when it can."""
    arch = target.model.family.name
    if not places:
        return f"no tensor of the {arch} GGUF corresponds to this module"
    for place in places:
        if place.tensor == MODEL_TENSOR.OUTPUT and not target.has_output:
            return (
                f"the {arch} GGUF has no {place.name} of its own (tied embeddings, or a converter that drops lm_head): "
                "its output reuses token_embd"
            )
        if place.tensor in gguf_arch.NOT_LORA_APPLIED or gguf.TENSOR_NAMES[place.tensor].endswith("_norm"):
            return f"llama.cpp applies no LoRA to {place.name}"
    return None


def check_placements(pair: LoraPair, places: list[Placement], rows: int, cols: int, model: Model) -> None:
    """The config's layout must fit the factors' shapes: else the adapter was made for another model."""
    for place in places:
        taken = rows if place.rows is None else len(place.rows)
        fits = place.rows is None or (taken <= rows and int(place.rows.max()) < rows)
        if not fits or (place.cols is not None and len(place.cols) != cols):
            raise WeightdiffError(
                f"{pair.key_b} [{rows}, r] / {pair.key_a} [r, {cols}]: the {model.family.name} config's layout of "
                f"{place.name} expects other sizes; was the adapter made for this base model?"
            )


def factor_pair(
    base_name: str,
    pair: LoraPair,
    shape_a: tuple[int, ...],
    shape_b: tuple[int, ...],
    scale: float,
    target: Target,
    place: Placement,
    n_experts: int | None = None,
) -> list[Factor]:
    """The GGUF ``.lora_a`` and ``.lora_b`` tensors for one base tensor: lora_a with the column order, lora_b with
    the scale and the rows."""
    return [
        Factor(f"{base_name}.lora_a", pair.key_a, shape_a, stored_type(shape_a, target), 1.0, n_experts, place.cols),
        Factor(f"{base_name}.lora_b", pair.key_b, shape_b, stored_type(shape_b, target), scale, n_experts, place.rows),
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


def expert_factors(pair: LoraPair, adapter_config: dict, target: Target) -> list[Factor] | str:
    """The 3D lora_a/lora_b tensors of one fused expert parameter, one pair per projection llama.cpp has.

    PEFT's layout (``ParamWrapper``): A ``[r·E, in]`` with expert e's rows at ``e·r:(e+1)·r``,
    B ``[out, r·E]`` with expert e's columns at ``e::E``, delta[e] = scaling · B_e @ A_e, whether the
    parameter is stored ``[E, out, in]`` or transposed ``[E, in, out]`` (gpt-oss).
    """
    owner = experts_owner(pair.module)
    parameter = expert_parameter(pair, adapter_config, target.model)
    rank, scale = rank_and_scaling(f"{owner}.{parameter}", adapter_config)
    n_experts = experts_in(target.model.hparams)
    stacked = rank * n_experts
    if pair.shape_a[0] != stacked or pair.shape_b[1] != stacked:
        raise WeightdiffError(
            f"{pair.key_a} {list(pair.shape_a)} / {pair.key_b} {list(pair.shape_b)}: expected A [{stacked}, in] and "
            f"B [out, {stacked}] for rank {rank} × {n_experts} experts"
        )
    places = gguf_arch.expert_placements(target.model, owner, parameter, pair.shape_b[0])
    reason = unplaceable(places, target)
    if reason:
        return reason
    factors = []
    for place in places:
        rows = pair.shape_b[0] if place.rows is None else len(place.rows)
        shape_a, shape_b = (n_experts, rank, pair.shape_a[1]), (n_experts, rows, rank)
        factors += factor_pair(place.name, pair, shape_a, shape_b, scale, target, place, n_experts)
    return factors


def expert_parameter(pair: LoraPair, adapter_config: dict, model: Model) -> str:
    """Which fused expert parameter the pair adapts (``gate_up_proj`` or ``down_proj``), told by its shape.

    The keys alone do not say it: the nesting depth depends on which parameters were targeted.
    ``[out, in]`` does: gate_up_proj is ``[2·I, hidden]``, down_proj ``[hidden, I]``.
    """
    owner = experts_owner(pair.module)
    hidden, inter = model.hparams["hidden_size"], model.hparams[model.family.expert_width]
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


def experts_in(hparams: dict) -> int:
    """Routed experts per layer: Hub Qwen3-MoE configs say ``num_experts``, transformers 5 saves
    ``num_local_experts``."""
    return hparams.get("num_local_experts") or hparams["num_experts"]


def stored_type(shape: tuple[int, ...], target: Target) -> GGMLQuantizationType:
    """The requested type, or f16 where a block type's blocks do not tile a row (GGML quantizes by row)."""
    block_size = gguf.GGML_QUANT_SIZES[target.requested_type][0]
    return target.requested_type if shape[-1] % block_size == 0 else GGMLQuantizationType.F16


def write_gguf(path: Path, family: gguf_arch.Family, factors: Iterable[Factor], handle: Any) -> None:
    """Write header, metadata and tensor index from the plan, then stream the tensors one at a time."""
    factors = list(factors)
    writer = gguf.GGUFWriter(path, family.name)
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
    """The factor's data as stored in the GGUF: scaled, reordered where needed, in its GGML type."""
    data = handle.get_tensor(factor.peft_key).to(torch.float32).numpy() * np.float32(factor.scale)
    if factor.n_experts is not None:
        data = per_expert(data, factor.n_experts, factor.is_lora_b)
    if factor.order is not None:
        data = data[..., factor.order, :] if factor.is_lora_b else data[..., factor.order]
    if factor.transposed:
        data = data.T
    return gguf.quants.quantize(np.ascontiguousarray(data), factor.ggml_type)


def per_expert(data: np.ndarray, n_experts: int, is_lora_b: bool) -> np.ndarray:
    """PEFT's stacked expert factor as llama.cpp's 3D one: A ``[r·E, in]`` -> ``[E, r, in]``,
    B ``[out, r·E]`` -> ``[E, out, r]``."""
    if is_lora_b:
        return data.reshape(data.shape[0], -1, n_experts).transpose(2, 0, 1)
    return data.reshape(n_experts, -1, data.shape[1])
