"""Checkpoints stored quantized, read as the weights they stand for: dequantized on read, one tensor at a time.

FP8 e4m3 with block scales (DeepSeek-V3/R1, Kimi K2: `quantization_config.quant_method: fp8`,
`weight_block_size`): each quantized `*.weight` (float8_e4m3fn) has a `*.weight_scale_inv` companion, one fp32
scale per block, and stands for weight·scale; transformers' own FP8 dequantization does the arithmetic. The
companions are not tensors of the model: the index never lists them.

Any other quantization is refused by name: read as if its packed integers or fp8 codes were weights, it would
give a wrong adapter without a word.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from weightdiff.errors import WeightdiffError

SCALE = "_scale_inv"  # the companion of `<name>`: `<name>_scale_inv`
FP8 = (torch.float8_e4m3fn,)


@dataclass(frozen=True)
class Fp8Blocks:
    """FP8 weights with one scale per `block` (rows, columns) of each matrix; None: one scale per tensor."""

    block: tuple[int, int] | None

    @classmethod
    def of(cls, config_path: Path, config: dict) -> Fp8Blocks | None:
        """The checkpoint's quantization from its config.json (None: not quantized); an unsupported one is an error
        naming it."""
        q = config.get("quantization_config")
        if not q:
            return None
        method = q.get("quant_method")
        if method != "fp8":
            raise WeightdiffError(
                f"{config_path}: quantization_config.quant_method {method!r} is not read by weightdiff (FP8 e4m3 with "
                "weight_scale_inv block scales is); dequantize the checkpoint to bf16 first, e.g. by loading it with "
                "transformers and saving it with save_pretrained"
            )
        block = q.get("weight_block_size")
        if block is not None and not (len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise WeightdiffError(f"{config_path}: weight_block_size {block!r} is not [rows, columns]")
        return cls(None if block is None else (block[0], block[1]))

    @staticmethod
    def companions(names: Iterable[str]) -> set[str]:
        """The scale tensors among `names`: those that are `<weight>_scale_inv` of another of them."""
        present = set(names)
        return {n for n in present if n.endswith(SCALE) and n.removesuffix(SCALE) in present}

    def dequantized(self, name: str, weight: torch.Tensor, scale: torch.Tensor, where: Path) -> torch.Tensor:
        """weight·scale in fp32, blockwise, checked against the block grid the config declares."""
        from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

        if weight.dtype not in FP8:
            raise WeightdiffError(
                f"{where}: {name} has a {SCALE} companion but dtype {weight.dtype}, not float8_e4m3fn"
            )
        if self.block is not None:
            grid = tuple(-(-size // b) for size, b in zip(weight.shape[-2:], self.block, strict=True))
            if tuple(scale.shape[-2:]) != grid:
                raise WeightdiffError(
                    f"{where}: {name}{SCALE} has shape {list(scale.shape)}, expected {list(grid)} for a weight of "
                    f"shape {list(weight.shape)} in blocks of {list(self.block)}"
                )
        return _dequantize_fp8_weight(weight, scale, None if self.block is None else list(self.block), torch.float32)
