"""Who runs the units of an extraction: this process, one after another (extract.executor=local), or Ray tasks
(ray, weightdiff.ray_executor), as mergekit splits its planner from its executors.

Whichever runs them, every unit goes through `run_unit`, which leaves the unit's reports and adapter entries in the
resume store; weightdiff.extract assembles the adapter from the store alone. Executors differ in where and when a
unit runs, never in what it writes: each unit's randomness is seeded by its tensors' names, whether it gets a
second opinion (`Task.check`) is decided from the plan, not from the order units finish in, and the number of
threads it runs on (`unit_threads`) from its size, not from where it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from weightdiff.actions import ACTIONS
from weightdiff.decompose import Method
from weightdiff.plan import Unit
from weightdiff.records import TensorReport
from weightdiff.resume import ResumeStore
from weightdiff.safetensors_io import TensorReader
from weightdiff.settings import ExtractSettings
from weightdiff.stream import Delta, Workspace, read_unit

Progress = Callable[[], object]  # called once per finished unit
# Elements of a unit per torch thread it runs on. On this machine (2 cores) a second thread makes a unit no faster
# below 1024², 1.15× faster at 1024², 1.33× at 2048², 1.7× at 4096², 1.8× at 14336×4096: under 2²¹ elements a second
# thread would gain under 15%, and on Ray take a CPU another unit could use.
ELEMENTS_PER_THREAD = 1 << 21


@dataclass(frozen=True)
class Job:
    """What every unit of one extraction shares: absolute paths, so that a Ray worker, whatever its working
    directory, reads the same checkpoints and writes the same store."""

    model_a: Path
    model_b: Path
    method: Method
    store: ResumeStore
    threads: int  # the driver's torch thread count, which no unit exceeds

    def readers(self) -> tuple[TensorReader, TensorReader]:
        return TensorReader(self.model_a), TensorReader(self.model_b)


@dataclass(frozen=True)
class Task:
    """One unit to run, with the index entries of its tensors (all an action reads of the index) and whether its
    randomized SVD gets a second opinion."""

    unit: Unit
    entries: dict[str, dict]
    check: bool = False


def unit_threads(job: Job, task: Task) -> int:
    """The torch threads a unit runs on, wherever it runs: sums split across threads round differently, so the same
    unit on one thread and on two differs in its last bits (20 of the tiny demo pair's 28 factors do)."""
    elements = sum(math.prod(task.entries[name]["shape"]) for name in task.unit.tensors)
    return max(1, min(job.threads, math.ceil(elements / ELEMENTS_PER_THREAD)))


def run_unit(job: Job, task: Task, readers: tuple[TensorReader, TensorReader], space: Workspace) -> None:
    """A unit's whole work: its tensors read and their deltas formed in `space`, its action, the second opinion if
    due, the result saved to the resume store; on the unit's own number of threads."""
    torch.set_num_threads(unit_threads(job, task))
    ds = read_unit(task.unit, *readers, job.method.policy == "noise_floor", space)
    reports, factors = ACTIONS[task.unit.action](task.unit, ds, job.method, task.entries)
    if task.check:
        second_opinion(reports[0], factors, ds[0], job.method)
    job.store.save(task.unit.id, reports, factors)


def second_opinion(report: TensorReport, factors: dict[str, torch.Tensor], delta: Delta, method: Method) -> None:
    """What the randomized SVD gives up, from below: a checked lora unit's report gets `energy_reference`, the
    energy at the same rank of a deeper randomized SVD (Method.reference_energy). Every report's `energy_bound`
    bounds the optimum from above at no cost: it lies between.

    The exact SVD this replaces cost 90% of a default extraction; the second opinion costs two fp32 passes over
    one unit in `check_every`.
    """
    if report["status"] != "extracted":
        return
    A = next(f for key, f in factors.items() if key.endswith("lora_A.weight"))
    report["energy_reference"] = method.reference_energy(delta, A)


def run_local(job: Job, tasks: Sequence[Task], progress: Progress) -> None:
    """One unit after another, in one workspace reused from unit to unit (weightdiff.stream)."""
    readers, space = job.readers(), Workspace()
    try:
        for task in tasks:
            run_unit(job, task, readers, space)
            progress()
    finally:
        torch.set_num_threads(job.threads)


def execute(job: Job, tasks: Sequence[Task], settings: ExtractSettings, progress: Progress) -> None:
    """Runs every task by extract.executor; each finished unit is in the store when this returns."""
    if settings.executor == "ray":
        from weightdiff.ray_executor import run_ray  # Ray is an optional extra, imported only when asked for

        run_ray(job, tasks, settings.ray, progress)
    else:
        run_local(job, tasks, progress)
