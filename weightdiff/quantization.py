"""Checkpoints stored quantized, read as the weights they stand for: dequantized on read, one tensor at a time.

A scheme (one per `quantization_config.quant_method` read) says, from the stored names alone, which tensors of
the model are stored as several (a packed weight and its scales), what dtype and shape each stands for from
their headers, and how to turn the stored tensors into the weight, in fp32, with the format's own reference
code. The companions are not tensors of the model: the index never lists them.

Any other quantization is refused by name: read as if its packed integers or codes were weights, it would give
a wrong adapter without a word.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Protocol

import torch

from weightdiff.errors import WeightdiffError
from weightdiff.fp8 import Fp8Blocks
from weightdiff.int4 import PackedInt4
from weightdiff.mxfp4 import Mxfp4


class Scheme(Protocol):
    def parts(self, names: Collection[str], where: Path) -> dict[str, dict[str, str]]:
        """Each tensor of the model stored quantized → its stored tensors by role; incomplete sets are errors."""
        ...

    def header(
        self, name: str, parts: Mapping[str, tuple[str, tuple[int, ...]]], where: Path
    ) -> tuple[str, tuple[int, ...]]:
        """The dtype and shape the tensor stands for, from its parts' (dtype, shape) headers."""
        ...

    def dequantized(self, name: str, parts: Mapping[str, torch.Tensor], where: Path) -> torch.Tensor:
        """The tensor in fp32, from its stored parts."""
        ...


SCHEMES: dict[str, Callable[[Path, dict], Scheme]] = {
    "fp8": Fp8Blocks.of,  # e4m3 with weight_scale_inv block scales
    "compressed-tensors": PackedInt4.of,  # pack-quantized INT4
    "mxfp4": Mxfp4.of,  # gpt-oss's experts
}


def scheme_of(config_path: Path, config: dict) -> Scheme | None:
    """The checkpoint's quantization from its config.json (None: not quantized); an unsupported one is an error
    naming it."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method not in SCHEMES:
        raise WeightdiffError(
            f"{config_path}: quantization_config.quant_method {method!r} is not read by weightdiff (fp8 e4m3 with "
            "weight_scale_inv block scales, compressed-tensors pack-quantized INT4 and mxfp4 are); dequantize the "
            "checkpoint to bf16 first, e.g. by loading it with transformers and saving it with save_pretrained"
        )
    return SCHEMES[method](config_path, q)
