"""compressed-tensors `pack-quantized` INT4 (Kimi K2 Thinking, llm-compressor's W4A16: `quantization_config.
quant_method: compressed-tensors`, `format: pack-quantized`), one of the quantizations weightdiff.quantization reads.

Each quantized linear `X` is stored as `X.weight_packed` (int32, eight 4-bit values each), `X.weight_scale` (one
per `group_size` input columns), `X.weight_shape` ([out, in]) and, when asymmetric, `X.weight_zero_point`; there
is no `X.weight`. The index shows `X.weight` with dtype `I4` and the shape the scales give ([out, scale columns ×
group_size], compressed-tensors' own rule without the data): reading `weight_shape` for it would cost a streamed
checkpoint one request per linear. Reading checks `weight_shape` against it. The compressed-tensors package's
own decompression does the arithmetic, in fp32: a 4-bit value times a bf16 scale is exact there, where
transformers' loader, computing in the scale's dtype, rounds.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightdiff.errors import WeightdiffError

PACKED, SCALE, SHAPE, ZERO = "_packed", "_scale", "_shape", "_zero_point"  # `X.weight<suffix>`
ROLES = {"packed": PACKED, "scale": SCALE, "shape": SHAPE, "zero_point": ZERO}
BITS = 4
FORMAT = "pack-quantized"
DTYPE = "I4"  # the index's dtype of a virtual `X.weight`: 4-bit integers, with scales
SCALE_DTYPES = {"BF16", "F16", "F32"}
INTEGER_DTYPES = {"I8", "I16", "I32", "I64", "U8"}


@dataclass(frozen=True)
class PackedInt4:
    """The config's groups (name → compressed-tensors QuantizationScheme), each INT4 with groups of columns."""

    groups: dict[str, Any]

    @classmethod
    def of(cls, config_path: Path, q: dict) -> PackedInt4:
        """The quantization_config parsed by compressed-tensors itself; what its checkpoint would not read
        correctly (another format, bit width or strategy, sparsity, transforms) refused by name."""
        try:
            from compressed_tensors.quantization import QuantizationConfig
        except ImportError as e:
            raise WeightdiffError(
                f"{config_path}: a compressed-tensors checkpoint needs the compressed-tensors package to be read "
                f"(pip install compressed-tensors; it needs Python >= 3.11): {e}"
            ) from e
        from pydantic import ValidationError

        for key in ("sparsity_config", "transform_config"):
            if q.get(key):
                raise WeightdiffError(
                    f"{config_path}: quantization_config.{key} is set: weightdiff reads dense, untransformed "
                    f"{FORMAT} INT4 only; dequantize the checkpoint to bf16 first"
                )
        try:
            config = QuantizationConfig.model_validate(q)
        except ValidationError as e:
            shown = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise WeightdiffError(
                f"{config_path}: quantization_config is not a compressed-tensors config: {shown}"
            ) from e
        for group, scheme in config.config_groups.items():
            fmt, w = scheme.format or config.format, scheme.weights
            found = None if w is None else (w.type, w.num_bits, w.strategy)
            if fmt != FORMAT or found != ("int", BITS, "group"):
                raise WeightdiffError(
                    f"{config_path}: quantization_config group {group!r} is format {fmt!r}, weights (type, "
                    f"num_bits, strategy) {found}: weightdiff reads format {FORMAT!r} with ('int', {BITS}, 'group') "
                    "only; dequantize the checkpoint to bf16 first, e.g. by loading it with transformers "
                    "(CompressedTensorsConfig(dequantize=True)) and saving it with save_pretrained"
                )
        return cls(dict(config.config_groups))

    def parts(self, names: Collection[str], where: Path) -> dict[str, dict[str, str]]:
        """`X.weight` → its stored tensors by role, for every `X.weight_packed`; a packed weight without its scale
        or shape, a companion without its packed weight, or a plain `X.weight` beside it, is an error."""
        present = set(names)
        weights = {n.removesuffix(PACKED) for n in present if n.endswith(".weight" + PACKED)}
        quantized = {}
        for weight in sorted(weights):
            parts = {role: weight + suffix for role, suffix in ROLES.items() if weight + suffix in present}
            symmetric = self._scheme(weight, where).weights.symmetric
            wanted = {"packed", "scale", "shape"} | (set() if symmetric else {"zero_point"})
            problems = [f"no {weight + ROLES[role]}" for role in sorted(wanted - parts.keys())]
            if parts.keys() - wanted:
                problems.append(f"a {weight + ZERO} though its group is symmetric")
            if weight in present:
                problems.append(f"a plain {weight} beside it")
            if problems:
                raise WeightdiffError(f"{where}: {weight + PACKED} is a {FORMAT} weight with {'; '.join(problems)}")
            quantized[weight] = parts
        for n in sorted(present):
            for suffix in (SCALE, SHAPE, ZERO):
                if n.endswith(".weight" + suffix) and n.removesuffix(suffix) not in weights:
                    raise WeightdiffError(
                        f"{where}: {n} has no {n.removesuffix(suffix) + PACKED}: a {FORMAT} checkpoint stores every "
                        "quantized weight packed"
                    )
        return quantized

    def header(
        self, name: str, parts: Mapping[str, tuple[str, tuple[int, ...]]], where: Path
    ) -> tuple[str, tuple[int, ...]]:
        """`I4` and [out, scale columns × group_size], from the headers: the stored dtypes and shapes must agree."""
        dtypes = {role: dtype for role, (dtype, _) in parts.items()}
        allowed = {"packed": {"I32"}, "scale": SCALE_DTYPES, "shape": INTEGER_DTYPES, "zero_point": {"I32"}}
        for role, dtype in dtypes.items():
            if dtype not in allowed[role]:
                raise WeightdiffError(
                    f"{where}: {name + ROLES[role]} has dtype {dtype}, expected one of {sorted(allowed[role])}"
                )
        return DTYPE, self._shape(name, {role: shape for role, (_, shape) in parts.items()}, where)

    def dequantized(self, name: str, parts: Mapping[str, torch.Tensor], where: Path) -> torch.Tensor:
        """The weight in fp32, by compressed-tensors' own decompression of the module's stored tensors."""
        from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

        shape = self._shape(name, {role: tuple(t.shape) for role, t in parts.items()}, where)
        declared = parts["shape"].tolist()
        if declared != list(shape):
            raise WeightdiffError(
                f"{where}: {name + SHAPE} is {declared}, expected {list(shape)} from {name + PACKED} and "
                f"{name + SCALE} (a last group narrower than group_size is not read)"
            )
        state = {"weight" + ROLES[role]: t for role, t in parts.items()} | {"weight_scale": parts["scale"].float()}
        try:
            return PackedQuantizationCompressor.decompress(state, self._scheme(name, where))["weight"].float()
        except (ValueError, RuntimeError, AssertionError) as e:
            raise WeightdiffError(f"{where}: cannot dequantize {name}: {e}") from e

    def _shape(self, name: str, shapes: Mapping[str, tuple[int, ...]], where: Path) -> tuple[int, ...]:
        """[out, in] with in = scale columns × group_size, checked against the packed and zero-point shapes."""
        group_size = self._scheme(name, where).weights.group_size
        scale = tuple(shapes["scale"])
        if len(scale) != 2:
            raise WeightdiffError(f"{where}: {name + SCALE} has shape {list(scale)}, expected [rows, groups]")
        rows, groups = scale
        shape = (rows, groups * group_size)
        expected = {
            "packed": (rows, math.ceil(shape[1] * BITS / 32)),
            "scale": scale,
            "shape": (2,),
            "zero_point": (math.ceil(rows * BITS / 32), groups),  # packed along the rows
        }
        for role, found in shapes.items():
            if tuple(found) != expected[role]:
                raise WeightdiffError(
                    f"{where}: {name + ROLES[role]} has shape {list(found)}, expected {list(expected[role])} for a "
                    f"weight of shape {list(shape)} in groups of {group_size} columns"
                )
        return shape

    def _scheme(self, weight: str, where: Path) -> Any:
        """The config group that quantizes the module of `weight`: the one whose targets name it (exactly or by a
        `re:` pattern), else the one targeting module classes; the model's classes are not known here, so two
        candidates are an error."""
        from compressed_tensors.utils.match import match_name

        if len(self.groups) == 1:
            return next(iter(self.groups.values()))
        module = weight.removesuffix(".weight")
        named = [g for g, s in self.groups.items() if any(match_name(module, t) for t in s.targets)]
        classes = [
            g for g, s in self.groups.items() if any(not t.startswith("re:") and "." not in t for t in s.targets)
        ]
        candidates = named or classes
        if len(candidates) != 1:
            raise WeightdiffError(
                f"{where}: {len(candidates)} quantization_config groups ({', '.join(candidates) or 'none'}) may "
                f"quantize {module}: weightdiff tells groups apart by module name only"
            )
        return self.groups[candidates[0]]
