"""Weight deltas of both checkpoints, one unit of work at a time, read ahead on a background thread.

Reading (page cache or disk) and converting bf16 to fp32 overlap with the decomposition of the previous
unit; the queue holds at most `prefetch` finished units, so memory stays a small multiple of the largest
unit whatever the size of the model.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from weightdiff.checkpoint import TensorReader
from weightdiff.errors import WeightdiffError
from weightdiff.lowrank import frobenius_norm
from weightdiff.plan import Unit


@dataclass
class Delta:
    name: str
    value: torch.Tensor  # W_B − W_A in fp32
    rms_a: float | None = None  # root mean square of the weights, when asked for (noise floor estimates)
    rms_b: float | None = None
    b: torch.Tensor | None = None  # W_B itself, for modules saved whole


def pair_delta(name: str, reader_a: TensorReader, reader_b: TensorReader, rms: bool = False,
               keep_b: bool = False) -> Delta:
    """W_B − W_A in fp32; non-finite weights are an error naming the model and the tensor, not a NaN adapter."""
    wa, wb = reader_a.get(name), reader_b.get(name)
    delta = wb.to(torch.float32, copy=True)  # never a view of the mapped file, even for fp32 weights
    delta.sub_(wa)  # in place, upcasting wa on the fly: one fp32 buffer instead of three
    if not math.isfinite(delta.sum().item()):  # NaN/Inf in either weight reaches the sum: one pass, no mask
        for reader, w in ((reader_a, wa), (reader_b, wb)):
            bad = (~torch.isfinite(w)).sum().item()
            if bad:
                raise WeightdiffError(f"{reader.model_dir / reader.shards[name]}: tensor {name} has {bad} NaN/Inf values")
    rms_a, rms_b = (frobenius_norm(w.float()) / max(w.numel(), 1) ** 0.5 for w in (wa, wb)) if rms else (None, None)
    return Delta(name, delta, rms_a, rms_b, wb.clone() if keep_b else None)


def read_unit(unit: Unit, reader_a: TensorReader, reader_b: TensorReader, rms: bool) -> list[Delta]:
    try:
        return [pair_delta(name, reader_a, reader_b, rms, keep_b=unit.kind == "whole") for name in unit.tensors]
    finally:
        reader_a.unmap()
        reader_b.unmap()


def deltas(units: Sequence[Unit], reader_a: TensorReader, reader_b: TensorReader,
           prefetch: int = 1, rms: bool = False) -> Iterator[list[Delta]]:
    """For each unit, the deltas of its tensors, in order; errors surface in the caller's thread."""
    if prefetch < 1:
        for unit in units:
            yield read_unit(unit, reader_a, reader_b, rms)
        return
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item) -> bool:
        """Blocks until there is room, unless the consumer has gone away (then False)."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for unit in units:
                if not put(read_unit(unit, reader_a, reader_b, rms)):
                    return
            put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    worker = threading.Thread(target=produce, name="weightdiff-prefetch", daemon=True)
    worker.start()
    try:
        while (item := out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
