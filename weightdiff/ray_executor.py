"""extract.executor=ray: the units still to do as Ray tasks, each sized from its tensors' shapes, rerun when its
worker dies.

Each task reads its own tensors (through TensorReaders of the checkpoints' absolute paths, so the checkpoints, or a
streamed checkpoint's folder of headers, must be where every node sees them), forms the deltas, decomposes them and
writes its finished unit to the resume store (which must be shared too), exactly as the local executor does:
weightdiff.executor's run_unit. The driver only waits, and weightdiff.extract then assembles the adapter from the
store. Workers run the driver's own weightdiff (shipped as a runtime_env py_module), so a cluster's nodes need
weightdiff's dependencies, not this checkout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import weightdiff
from weightdiff.errors import WeightdiffError
from weightdiff.executor import Job, Progress, Task, run_unit, unit_threads
from weightdiff.settings import RaySettings
from weightdiff.stream import SKETCHED, Workspace

try:
    import ray
    import ray.exceptions
except ImportError as error:
    raise WeightdiffError(f"extract.executor=ray needs Ray ({error}): pip install -e '.[ray]'") from None

# How a task's worker is lost: what max_retries reruns.
LOST = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError)

READ_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # as read; FP8 weights are dequantized to fp32 on read


def runtime_env() -> dict:
    """The job's runtime_env: the weightdiff the driver imported, for every worker (a worker's own install, if any,
    could be another version). A new dict each time: ray.init replaces the paths in it by what it uploaded."""
    return {"py_modules": [str(Path(weightdiff.__file__).parent)], "excludes": ["__pycache__"]}


def footprint(task: Task) -> int:
    """Bytes a unit holds at its peak: each tensor's fp32 delta and both weights as read, the decomposed weight's
    bf16 sketch, experts fused from per-expert tensors into one more fp32 stack, and a saved module's weights."""
    total = 0
    for i, name in enumerate(task.unit.tensors):
        entry = task.entries[name]
        elements, read = math.prod(entry["shape"]), READ_BYTES.get(entry["dtype"], 4)
        total += elements * (4 + 2 * read)
        if i == 0 and task.unit.action in SKETCHED:
            total += elements * 2
        if task.unit.action == "lora_experts" and len(task.unit.tensors) > 1:
            total += elements * 4
        if task.unit.action == "save":
            total += elements * read
    return total


def resources(job: Job, task: Task, nodes: list[dict[str, float]]) -> tuple[int, int]:
    """(num_cpus, memory) for the unit's task: a CPU per thread it runs on (as it would locally: the same bytes),
    and its footprint. A unit no node can hold is an error now rather than a task Ray waits forever to place."""
    cpus, memory = unit_threads(job, task), footprint(task)
    if not any(n.get("CPU", 0) >= cpus and n.get("memory", 0) >= memory for n in nodes):
        raise WeightdiffError(
            f"unit {task.unit.id} runs on {cpus} threads (at most the driver's torch threads, {job.threads}; "
            f"OMP_NUM_THREADS sets them) and needs {memory / 2**30:.2f} GiB, but no node of the Ray cluster has "
            f"that many CPUs and that much memory: {', '.join(node_size(n) for n in nodes)}"
        )
    return cpus, memory


def node_size(resources: dict[str, float]) -> str:
    return f"{resources.get('CPU', 0):g} CPUs and {resources.get('memory', 0) / 2**30:.1f} GiB"


def unit_task(job: Job, task: Task) -> None:
    """A unit in a Ray worker, through fresh readers and a fresh workspace (freed when it ends, as Ray's memory
    accounting assumes)."""
    run_unit(job, task, job.readers(), Workspace())


@contextmanager
def connected(settings: RaySettings) -> Iterator[None]:
    """Ray for the run: a new local Ray on this machine (address null) or the cluster at the address, as a job whose
    workers import the driver's weightdiff (runtime_env), disconnected afterwards. A process already connected (a
    Ray job's driver, which ray.init'ed with runtime_env() or its own) keeps its connection and its job's env."""
    if ray.is_initialized():
        yield
        return
    options = {"runtime_env": runtime_env(), "logging_level": logging.WARNING}
    if settings.address is None:
        ray.init(address="local", include_dashboard=False, **options)
    else:
        ray.init(address=settings.address, **options)
    try:
        yield
    finally:
        ray.shutdown()


def run_ray(job: Job, tasks: Sequence[Task], settings: RaySettings, progress: Progress) -> None:
    """Every unit as a task at once (Ray places them as resources free up); the first failure cancels the rest.

    `max_retries` covers worker deaths only (retry_exceptions off): a WeightdiffError is the user's to fix, and is
    raised at once with its own message, as the local executor would raise it.
    """
    with connected(settings):
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        sized = [(task, *resources(job, task, nodes)) for task in tasks]  # every unit fits, before any runs
        remote, shared = ray.remote(unit_task), ray.put(job)
        pending = {}
        for task, cpus, memory in sized:
            ref = remote.options(
                num_cpus=cpus,
                num_gpus=1 if job.method.device.type == "cuda" else 0,
                memory=memory,
                max_retries=settings.max_retries,
                retry_exceptions=False,
                name=f"weightdiff unit {task.unit.module}",
            ).remote(shared, task)
            pending[ref] = task
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                finished(ref, pending.pop(ref), settings.max_retries)
                progress()
        finally:
            for ref in pending:
                ray.cancel(ref)


def finished(ref: ray.ObjectRef, task: Task, max_retries: int) -> None:
    """A task's outcome: nothing when its unit is in the store; its WeightdiffError as raised in the worker; a
    WeightdiffError naming the unit when its worker died at every attempt, or Ray could not run it at all (its
    runtime_env could not be set up, say)."""
    try:
        ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, WeightdiffError):
            raise e.cause from None
        raise
    except ray.exceptions.RayError as e:
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if isinstance(e, LOST):
            raise WeightdiffError(
                f"unit {task.unit.id}: its Ray worker died, also after {max_retries} reruns "
                f"(extract.ray.max_retries): {reason}"
            ) from e
        raise WeightdiffError(f"unit {task.unit.id}: Ray could not run it: {reason}") from e
