"""Weight deltas of both checkpoints, one unit of work at a time.

Forming a unit's deltas and decomposing them run one after the other, each on all the unit's threads
(weightdiff.executor), in one workspace reused from unit to unit, so memory is the largest unit's whatever the
size of the model. Reading ahead on a second thread was measured and dropped: a thread forming the next deltas
competes with the maths for the cores (2.5–3.4 s instead of 1.5 s for a 2-layer Llama-3-8B-shape pair on 2 cores,
warm), and one that only pulls the next unit's bytes from disk (pread: POSIX_FADV_WILLNEED is ignored here) gained
nothing cold, asked while this unit is read (2.7 s instead of 2.0 s) or once it is (2.7 s instead of 2.5 s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from weightdiff.errors import WeightdiffError
from weightdiff.lowrank import frobenius_norm
from weightdiff.plan import Unit
from weightdiff.safetensors_io import TensorReader

BLOCK = 1 << 18  # elements formed at a time: both operands of a block are still in cache for the subtraction


@dataclass
class Delta:
    name: str
    value: torch.Tensor  # W_B − W_A in fp32
    norm: float  # ‖W_B − W_A‖_F, accumulated in fp64
    rms_a: float | None = None  # root mean square of the weights, when asked for (noise floor estimates)
    rms_b: float | None = None
    b: torch.Tensor | None = None  # W_B itself, for modules saved whole (action save)
    sketch: torch.Tensor | None = None  # `value` in bf16, for the SVD's range passes (units it decomposes)


class Workspace:
    """Memory for the deltas of one unit (fp32, and their bf16 sketches), kept from unit to unit.

    A fresh fp32 buffer for a large delta costs page faults worth about twice what forming the delta into memory
    that is already mapped costs; the workspace grows to the largest unit and stays.
    """

    def __init__(self) -> None:
        self.flat: dict[torch.dtype, torch.Tensor] = {}

    def views(self, shapes: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        sizes = [math.prod(s) for s in shapes]
        if self.flat.get(dtype, torch.empty(0)).numel() < sum(sizes):
            self.flat.pop(dtype, None)  # free the old buffer before mapping the larger one
            self.flat[dtype] = torch.empty(sum(sizes), dtype=dtype)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        return [self.flat[dtype][o : o + n].view(*s) for o, n, s in zip(offsets, sizes, shapes, strict=True)]


def difference_into(out: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, sketch: torch.Tensor | None = None) -> float:
    """out ← wb − wa in fp32 (and sketch ← out in bf16), a block of rows at a time; returns ‖out‖²_F (NaN or ±Inf
    if any weight is).

    Block by block, the upcast, the subtraction, the bf16 copy and the norm (lowrank.frobenius_norm, accurate to
    ~1e-7) find their operands in cache: one pass over memory instead of four.
    """
    rows_a, rows_b, rows_out = (w.reshape(-1, w.shape[-1]) if w.ndim else w.reshape(1, 1) for w in (wa, wb, out))
    rows_sketch = None if sketch is None else sketch.view(rows_out.shape)
    step = max(1, BLOCK // max(rows_out.shape[1], 1))
    scratch = torch.empty(min(step, len(rows_out)), rows_out.shape[1])
    total = 0.0
    for i in range(0, len(rows_out), step):
        block = rows_out[i : i + step]
        upcast = scratch[: len(block)]
        block.copy_(rows_b[i : i + step])
        upcast.copy_(rows_a[i : i + step])
        total += frobenius_norm(block.sub_(upcast)) ** 2
        if rows_sketch is not None:
            rows_sketch[i : i + step].copy_(block)
    return total


def pair_delta(
    name: str,
    reader_a: TensorReader,
    reader_b: TensorReader,
    rms: bool = False,
    keep_b: bool = False,
    out: torch.Tensor | None = None,
    sketch: torch.Tensor | None = None,
) -> Delta:
    """W_B − W_A in fp32 (into `out` if given, its bf16 copy into `sketch` if given); non-finite weights are an
    error naming the model and the tensor, not a NaN adapter."""
    wa, wb = reader_a.get(name), reader_b.get(name)
    delta = torch.empty(wb.shape) if out is None else out
    norm_sq = difference_into(delta, wa, wb, sketch)
    if not math.isfinite(norm_sq):
        for reader, w in ((reader_a, wa), (reader_b, wb)):
            bad = (~torch.isfinite(w)).sum().item()
            if bad:
                raise WeightdiffError(
                    f"{reader.model_dir / reader.shards[name]}: tensor {name} has {bad} NaN/Inf values"
                )
        norm_sq = torch.linalg.vector_norm(delta, dtype=torch.float64).item() ** 2  # fp32 squares overflowed
    rms_a, rms_b = (frobenius_norm(w.float()) / max(w.numel(), 1) ** 0.5 for w in (wa, wb)) if rms else (None, None)
    return Delta(name, delta, math.sqrt(norm_sq), rms_a, rms_b, wb.clone() if keep_b else None, sketch)


SKETCHED = ("lora", "lora_embedding")  # actions whose SVD takes its one matrix's bf16 sketch from the stream


def read_unit(unit: Unit, reader_a: TensorReader, reader_b: TensorReader, rms: bool, space: Workspace) -> list[Delta]:
    try:
        shapes = [reader_b.shape(name) for name in unit.tensors]
        outs = space.views(shapes)
        sketches: list[torch.Tensor | None] = [None] * len(shapes)
        if unit.action in SKETCHED:  # the weight's, not the bias's
            sketches[0] = space.views(shapes[:1], torch.bfloat16)[0]
        return [
            pair_delta(name, reader_a, reader_b, rms, keep_b=unit.action == "save", out=out, sketch=sketch)
            for name, out, sketch in zip(unit.tensors, outs, sketches, strict=True)
        ]
    finally:
        reader_a.unmap()
        reader_b.unmap()
