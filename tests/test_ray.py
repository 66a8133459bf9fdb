"""extract.executor=ray on a Ray cluster of this machine (`ray start --head` on 127.0.0.1, 2 worker processes): the
adapter is the local executor's, byte for byte, also when a worker is killed mid-task and its unit rerun, and a run
interrupted under one executor resumes under the other.

Needs Ray (pip install -e '.[ray]'; `make check` installs it). Without it the cluster tests are skipped, unless
WEIGHTDIFF_REQUIRE_RAY=1 (as in CI), where they fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import edited_copy, run_extract
from test_download import hf_isolated  # noqa: F401 - a fixture of the hub fixture
from test_stream_mode import hub, settings, wide_pair  # noqa: F401 - hub and wide_pair are fixtures
from weightdiff import executor
from weightdiff.decompose import Method
from weightdiff.download import manifest
from weightdiff.errors import WeightdiffError
from weightdiff.executor import Job, Task
from weightdiff.extract import extract
from weightdiff.index import build_index
from weightdiff.plan import Unit
from weightdiff.resume import ResumeStore
from weightdiff.settings import ExtractSettings, typed

# Set before Ray is imported, for this process and the cluster's: Ray's single-machine mode, which puts every
# process on 127.0.0.1 (otherwise Ray turns 127.0.0.1 into the machine's own address); no usage reports; no
# cluster token, for a cluster that only loopback processes of this test reach.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
os.environ.update(LOOPBACK)

try:
    import ray
except ImportError as error:
    ray = None
    missing = f"Ray is not installed ({error}): pip install -e '.[ray]' (make check does)"

HOOKS = Path(__file__).parent / "ray_worker_hooks"
STALLED = "model.layers.1.mlp.down_proj"  # the unit whose worker the kill tests kill


def require_ray() -> None:
    if ray is not None:
        return
    if os.environ.get("WEIGHTDIFF_REQUIRE_RAY") == "1":
        pytest.fail(f"WEIGHTDIFF_REQUIRE_RAY=1 but {missing}", pytrace=False)
    pytest.skip(missing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A Ray head on 127.0.0.1 with 2 CPUs (so 2 worker processes), in its own session and temp dir, stopped by
    SIGTERM to the `ray start --block` that owns it (then its whole session killed, if anything is left)."""
    require_ray()
    temp = Path(tempfile.mkdtemp(prefix="wd-ray-"))  # short: Ray's unix sockets live under it (108 bytes at most)
    port = free_port()
    argv = [
        str(Path(sys.executable).with_name("ray")),
        *("start", "--head", "--block", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp}"),
        *("--include-dashboard=false", "--disable-usage-stats"),
        f"--dashboard-agent-listen-port={free_port()}",  # fixed by default: a second cluster would collide on it
    ]
    log = temp / "ray-start.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            argv, env=os.environ | LOOPBACK, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.time() + 90
        while not (temp / "ray_current_cluster").is_file():  # written once every process of the head is up
            assert head.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_run(tiny_pair, tmp_path_factory, cfg) -> tuple[Path, dict, list]:
    """The local executor's adapter directory, metrics and reports: what every Ray run must equal."""
    out = tmp_path_factory.mktemp("local") / "adapter"
    _, metrics, reports = run_extract(*tiny_pair, out, cfg)
    return out, metrics, reports


def assert_same_adapter(adapter: Path, reference: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (adapter / name).read_bytes() == (reference / name).read_bytes(), name


def untimed(metrics: dict) -> dict:
    """The metrics that must not depend on the executor."""
    return {k: v for k, v in metrics.items() if k not in ("seconds", "inputs")}


@pytest.fixture
def stalling_job(cluster, tmp_path) -> Iterator[Path]:
    """This process connected to the cluster as a job whose workers stall the first attempt at STALLED (the
    executor keeps a connection it finds); yields the file where the stalled worker writes its pid."""
    from weightdiff.ray_executor import runtime_env

    marker = tmp_path / "stalled.pid"
    ray.init(
        address=cluster,
        logging_level="WARNING",
        runtime_env={
            **(env := runtime_env()),
            "py_modules": [*env["py_modules"], str(HOOKS)],
            "worker_process_setup_hook": "ray_worker_hooks.stall_once",
            "env_vars": {"WEIGHTDIFF_TEST_STALL_UNIT": STALLED, "WEIGHTDIFF_TEST_STALL_FILE": str(marker)},
        },
    )
    try:
        yield marker
    finally:
        ray.shutdown()


def kill_when_stalled(marker: Path) -> list[int]:
    """In the background: SIGKILL to the worker whose pid appears in `marker`; the list gets the pid once done."""
    killed: list[int] = []

    def kill() -> None:
        deadline = time.time() + 120
        while not marker.is_file() and time.time() < deadline:
            time.sleep(0.05)
        if marker.is_file():
            pid = int(marker.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    threading.Thread(target=kill, daemon=True).start()
    return killed


@pytest.mark.ray
def test_ray_cluster_writes_the_local_executors_bytes(tiny_pair, cluster, tmp_path, cfg, local_run):
    reference, metrics, reports = local_run
    _, ray_metrics, ray_reports = run_extract(
        *tiny_pair, tmp_path / "adapter", cfg, executor="ray", ray={"address": cluster}
    )
    assert_same_adapter(tmp_path / "adapter", reference)
    assert untimed(ray_metrics) == untimed(metrics) and ray_reports == reports
    assert ray_metrics["inputs"]["executor"] == "ray" and metrics["inputs"]["executor"] == "local"
    assert any("energy_reference" in r for r in reports)  # the second opinions are in both, on the same units


@pytest.mark.ray
def test_address_null_starts_a_local_ray_for_the_run(tiny_pair, tmp_path, cfg, local_run):
    run_extract(*tiny_pair, tmp_path / "adapter", cfg, executor="ray")
    assert_same_adapter(tmp_path / "adapter", local_run[0])
    assert not ray.is_initialized()  # the Ray it started is gone with the run


@pytest.mark.ray
def test_a_worker_killed_mid_task_is_rerun_and_the_adapter_is_the_same(
    tiny_pair, stalling_job, tmp_path, cfg, local_run
):
    killed = kill_when_stalled(stalling_job)
    run_extract(*tiny_pair, tmp_path / "adapter", cfg, executor="ray", ray={"max_retries": 1})
    assert killed, "no worker reached the stalled unit"
    assert_same_adapter(tmp_path / "adapter", local_run[0])


@pytest.mark.ray
def test_a_unit_out_of_retries_fails_naming_it_and_the_local_executor_resumes(
    tiny_pair, stalling_job, tmp_path, cfg, local_run, caplog
):
    killed = kill_when_stalled(stalling_job)
    died = rf"unit {STALLED}:.*: its Ray worker died, also after 0 reruns \(extract.ray.max_retries\)"
    with pytest.raises(WeightdiffError, match=died):
        run_extract(*tiny_pair, tmp_path / "adapter", cfg, executor="ray", ray={"max_retries": 0})
    assert killed and not (tmp_path / "adapter").exists()
    caplog.set_level("INFO", logger="weightdiff")
    run_extract(*tiny_pair, tmp_path / "adapter", cfg)  # the resume store is shared by both executors
    assert "resuming:" in caplog.text
    assert_same_adapter(tmp_path / "adapter", local_run[0])


class Interrupted(Exception):
    pass


@pytest.mark.ray
def test_a_local_run_interrupted_resumes_on_ray(tiny_pair, cluster, tmp_path, cfg, local_run, monkeypatch, caplog):
    done = []

    def five_then_stop(*args):
        if len(done) == 5:
            raise Interrupted
        executor_run_unit(*args)
        done.append(args[1].unit.id)

    executor_run_unit = executor.run_unit
    with monkeypatch.context() as m:
        m.setattr(executor, "run_unit", five_then_stop)
        with pytest.raises(Interrupted):
            run_extract(*tiny_pair, tmp_path / "adapter", cfg)
    caplog.set_level("INFO", logger="weightdiff")
    run_extract(*tiny_pair, tmp_path / "adapter", cfg, executor="ray", ray={"address": cluster})
    assert "resuming: 5 of 21 units already done" in caplog.text
    assert_same_adapter(tmp_path / "adapter", local_run[0])


@pytest.mark.ray
def test_tasks_read_a_streamed_checkpoint_from_the_hub_themselves(hub, cluster, tmp_path):  # noqa: F811
    """download.mode=stream: each task reads its tensors' bytes from the Hub stand-in (by HTTP Range, at the
    pinned commit), the folder of headers being all the nodes share; the adapter is the local run's."""
    from weightdiff.ray_executor import runtime_env

    cfg = settings(tmp_path / "cache", "stream")
    pinned = manifest(cfg)
    index = build_index(pinned)
    extract(index, pinned, cfg.extract, tmp_path / "local", tmp_path / ".resume")
    # the workers' Hub client: online (CI sets HF_HUB_OFFLINE=1 for everything else), without telemetry
    hub_env = {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    ray.init(address=cluster, logging_level="WARNING", runtime_env=runtime_env() | {"env_vars": hub_env})
    try:
        before = len(hub.requests)
        on_ray = typed(ExtractSettings, cfg.extract, {"executor": "ray"})
        extract(index, pinned, on_ray, tmp_path / "ray", tmp_path / ".resume")
    finally:
        ray.shutdown()
    assert sum(r.cdn for r in hub.requests[before:]) >= 21  # at least one ranged read per unit, from the workers
    assert_same_adapter(tmp_path / "ray", tmp_path / "local")


@pytest.mark.ray
def test_a_weightdiff_error_in_a_worker_is_raised_as_itself(tiny_pair, cluster, tmp_path, cfg):
    def nan(tensors):
        tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")

    b = edited_copy(tiny_pair[1], tmp_path / "b", nan)
    with pytest.raises(WeightdiffError, match=r"tensor model.layers.0.self_attn.q_proj.weight has 1 NaN/Inf") as e:
        run_extract(tiny_pair[0], b, tmp_path / "adapter", cfg, executor="ray", ray={"address": cluster})
    assert type(e.value) is WeightdiffError  # the worker's own error and message, not Ray's wrapping of it


def test_a_unit_is_sized_from_its_tensors_and_one_no_node_holds_fails_at_once(tmp_path, cfg):
    require_ray()
    from weightdiff.ray_executor import resources

    job = Job(tmp_path, tmp_path, Method.resolve(cfg.extract, 10**9), ResumeStore(tmp_path, "k"), threads=2)
    big = Task(Unit("lora", "big", ("big.weight",)), {"big.weight": {"shape": [4096, 4096], "dtype": "BF16"}})
    small = Task(Unit("save", "norm", ("norm.weight",)), {"norm.weight": {"shape": [64], "dtype": "F32"}})
    # fp32 delta, bf16 sketch, both bf16 weights read: 10 bytes an element; a thread per 2^21 elements, at most 2
    assert resources(job, big, [{"CPU": 4.0, "memory": 2.0**30}]) == (2, 4096 * 4096 * 10)
    assert resources(job, small, [{"CPU": 4.0, "memory": 2.0**30}]) == (1, 64 * (4 + 8 + 4))  # W_B kept
    with pytest.raises(WeightdiffError, match=r"unit big:big.weight runs on 2 threads .* needs 0.16 GiB"):
        resources(job, big, [{"CPU": 4.0, "memory": 2.0**27}, {"CPU": 1.0, "memory": 2.0**30}])


def test_without_ray_the_error_says_how_to_install_it(tiny_pair, tmp_path, cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "weightdiff.ray_executor", raising=False)
    with pytest.raises(WeightdiffError, match=r"extract.executor=ray needs Ray .*pip install -e '\.\[ray\]'"):
        run_extract(*tiny_pair, tmp_path / "adapter", cfg, executor="ray")
