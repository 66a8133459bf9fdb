"""FP8 e4m3 with block scales (DeepSeek-V3/R1, Kimi K2: `quantization_config.quant_method: fp8`,
`weight_block_size`), one of the quantizations weightdiff.quantization reads.

Each quantized `*.weight` (float8_e4m3fn) has a `*.weight_scale_inv` companion, one fp32 scale per block, and
stands for weight·scale; transformers' own FP8 dequantization does the arithmetic. The tensor keeps its stored
name, dtype and shape in the index; only its companion is hidden.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
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
    def of(cls, config_path: Path, q: dict) -> Fp8Blocks:
        block = q.get("weight_block_size")
        if block is not None and not (len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise WeightdiffError(f"{config_path}: weight_block_size {block!r} is not [rows, columns]")
        return cls(None if block is None else (block[0], block[1]))

    def parts(self, names: Collection[str], where: Path) -> dict[str, dict[str, str]]:
        """Every weight that has a `<weight>_scale_inv` companion: a float8 one without it is refused when read."""
        present = set(names)
        return {
            n.removesuffix(SCALE): {"weight": n.removesuffix(SCALE), "scale": n}
            for n in present
            if n.endswith(SCALE) and n.removesuffix(SCALE) in present
        }

    def header(
        self, name: str, parts: Mapping[str, tuple[str, tuple[int, ...]]], where: Path
    ) -> tuple[str, tuple[int, ...]]:
        """The stored weight's own dtype and shape: the index says what is on disk, as for any other dtype."""
        return parts["weight"]

    def dequantized(self, name: str, parts: Mapping[str, torch.Tensor], where: Path) -> torch.Tensor:
        """weight·scale in fp32, blockwise, checked against the block grid the config declares."""
        from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

        weight, scale = parts["weight"], parts["scale"]
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
