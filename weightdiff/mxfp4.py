"""MXFP4 (gpt-oss: `quantization_config.quant_method: mxfp4`), one of the quantizations weightdiff.quantization
reads.

The experts' `<param>` (gate_up_proj, down_proj) is stored as `<param>_blocks` (uint8 [E, out, G, 16]: 32 e2m1
values per block of the input axis, two a byte) and `<param>_scales` (uint8 [E, out, G]: one power-of-two
exponent per block, biased by 127); there is no `<param>`. The index shows `<param>` with dtype `MXFP4` and the
shape transformers gives it in memory, [E, in = G·32, out], and reading it dequantizes with transformers' own
`convert_moe_packed_tensors`, in fp32 (exact: each value is a small float times a power of two), one expert at
a time so that its temporaries stay the size of one expert.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from weightdiff.errors import WeightdiffError

BLOCKS, SCALES = "_blocks", "_scales"  # `<param><suffix>`
ROLES = {"blocks": BLOCKS, "scales": SCALES}
BLOCK_BYTES = 16  # 32 four-bit values
DTYPE = "MXFP4"  # the index's dtype of a virtual `<param>`


@dataclass(frozen=True)
class Mxfp4:
    """gpt-oss's MXFP4 experts; the config has nothing that changes how they are read."""

    @classmethod
    def of(cls, config_path: Path, q: dict) -> Mxfp4:
        return cls()

    def parts(self, names: Collection[str], where: Path) -> dict[str, dict[str, str]]:
        """`<param>` → its blocks and scales, for every `<param>_blocks`; either without the other is an error."""
        present = set(names)
        params = {n.removesuffix(suffix) for n in present for suffix in ROLES.values() if n.endswith(suffix)}
        quantized = {}
        for param in sorted(params):
            missing = [param + suffix for suffix in ROLES.values() if param + suffix not in present]
            if missing or param in present:
                found = f"no {missing[0]}" if missing else f"a plain {param} beside them"
                raise WeightdiffError(f"{where}: MXFP4 {param} has {found}")
            quantized[param] = {role: param + suffix for role, suffix in ROLES.items()}
        return quantized

    def header(
        self, name: str, parts: Mapping[str, tuple[str, tuple[int, ...]]], where: Path
    ) -> tuple[str, tuple[int, ...]]:
        """`MXFP4` and [E, in, out], from the headers: both parts uint8, of matching shapes."""
        for role, (dtype, _) in parts.items():
            if dtype != "U8":
                raise WeightdiffError(f"{where}: {name + ROLES[role]} has dtype {dtype}, expected U8")
        return DTYPE, self._shape(name, {role: shape for role, (_, shape) in parts.items()}, where)

    def dequantized(self, name: str, parts: Mapping[str, torch.Tensor], where: Path) -> torch.Tensor:
        """The experts' parameter in fp32 as transformers holds it, [E, in, out]."""
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        out = torch.empty(self._shape(name, {role: tuple(t.shape) for role, t in parts.items()}, where))
        blocks, scales = parts["blocks"], parts["scales"]
        for e in range(len(out)):
            out[e] = convert_moe_packed_tensors(blocks[e : e + 1], scales[e : e + 1], dtype=torch.float32)[0]
        return out

    def _shape(self, name: str, shapes: Mapping[str, tuple[int, ...]], where: Path) -> tuple[int, ...]:
        blocks, scales = tuple(shapes["blocks"]), tuple(shapes["scales"])
        if len(blocks) != 4 or blocks[-1] != BLOCK_BYTES or scales != blocks[:-1]:
            raise WeightdiffError(
                f"{where}: {name + BLOCKS} has shape {list(blocks)} and {name + SCALES} {list(scales)}, expected "
                f"[experts, out, blocks, {BLOCK_BYTES}] and [experts, out, blocks]"
            )
        experts, rows, groups, _ = blocks
        return experts, groups * 2 * BLOCK_BYTES, rows
