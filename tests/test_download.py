"""The download stage's source resolution: Hub sources against a local stand-in of the Hub, local directories, errors.

Nothing here reaches the network: `standin` points huggingface_hub at tests/hub_standin.py on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from omegaconf import OmegaConf
from safetensors.torch import load, save, save_file

import stages.download
from helpers import REPO
from hub_standin import commit, serve
from weightdiff.config import run_config
from weightdiff.download import Source, manifest, parse_source, resolve
from weightdiff.errors import WeightdiffError

CONFIG = json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1}).encode()
PATTERNS = list(run_config(params=REPO / "params.yaml").download.allow_patterns)  # what the pipeline fetches


def weights(seed: int, rows: int = 4) -> bytes:
    """A tiny safetensors file; different seeds give different bytes."""
    generator = torch.Generator().manual_seed(seed)
    return save({"model.layers.0.self_attn.q_proj.weight": torch.randn(rows, 8, generator=generator)})


def model_files(seed: int, **extra: bytes) -> dict[str, bytes]:
    """config.json + model.safetensors, plus the files a Hub repo usually also has, which must not be fetched."""
    return {
        "config.json": CONFIG,
        "model.safetensors": weights(seed),
        "README.md": b"# a model card\n",
        "pytorch_model.bin": b"\x80\x04 a pickle that must never be downloaded",
        **extra,
    }


def config(cache: Path, model_a: str, model_b: str, mode: str = "fetch"):
    return OmegaConf.create(
        {
            "model_a": model_a,
            "model_b": model_b,
            "download": {"mode": mode, "cache_dir": str(cache), "allow_patterns": PATTERNS},
        }
    )


def snapshot(cache: Path, repo_id: str, sha: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha


def expected_files(files: dict[str, bytes], *names: str) -> list[dict]:
    return [{"name": n, "size": len(files[n])} for n in names]


@pytest.fixture
def hf_isolated(monkeypatch, tmp_path):
    """No user token, no offline mode (CI sets HF_HUB_OFFLINE=1), no telemetry, no default cache in $HOME."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)  # else the user agent asks the Hub for a list
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))  # get_token() reads it
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)


def point_hub_at(monkeypatch, url: str) -> None:
    """huggingface_hub reads HF_ENDPOINT once, at import: HfApi() takes constants.ENDPOINT, hf_hub_url the template."""
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def repos() -> dict:
    return {}


@pytest.fixture
def standin(repos, monkeypatch, hf_isolated):
    """The Hub stand-in serving `repos` (live: tests add commits and move branches through it)."""
    with serve(repos) as hub:
        point_hub_at(monkeypatch, hub.url)
        yield hub


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# -- Hub sources -------------------------------------------------------------------------------------------


def test_tag_and_main_resolve_to_their_commits_and_fetch_only_used_files(standin, repos, cache):
    v1 = model_files(1, **{"tokenizer.json": b"{}", "trainer_state.json": b"{}"})
    v2 = model_files(2, **{"tokenizer.json": b"{}", "trainer_state.json": b"{}"})
    sha_v1 = commit(repos, "org/name", v1, refs=["v1.0"])
    sha_main = commit(repos, "org/name", v2, refs=["main"])
    assert sha_v1 != sha_main

    result = manifest(config(cache, "org/name@v1.0", "org/name"))

    for side, sha, files in (("model_a", sha_v1, v1), ("model_b", sha_main, v2)):
        entry = result[side]
        assert entry["kind"] == "hub"
        assert entry["revision"] == sha
        assert Path(entry["path"]) == snapshot(cache, "org/name", sha)
        assert entry["files"] == expected_files(files, "config.json", "model.safetensors")
        # the snapshot holds exactly the allowed files, with the bytes the Hub served at that commit
        assert sorted(p.name for p in Path(entry["path"]).iterdir()) == [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
        ]
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (Path(entry["path"]) / name).read_bytes() == files[name]
    assert result["model_a"]["source"] == "org/name@v1.0" and result["model_b"]["source"] == "org/name"
    assert not torch.equal(
        *(
            load((Path(result[s]["path"]) / "model.safetensors").read_bytes())["model.layers.0.self_attn.q_proj.weight"]
            for s in ("model_a", "model_b")
        )
    )
    fetched = {r.path.rsplit("/", 1)[-1] for r in standin.requests if "/resolve/" in r.path}
    assert fetched == {"config.json", "model.safetensors", "tokenizer.json"}  # not README, trainer state, pickle


def test_sharded_weights_list_shards_and_index(standin, repos, cache):
    files = {
        "config.json": CONFIG,
        "model-00001-of-00002.safetensors": weights(3),
        "model-00002-of-00002.safetensors": weights(4, rows=2),
        "model.safetensors.index.json": json.dumps({"weight_map": {}}).encode(),
    }
    sha = commit(repos, "org/sharded", files)

    entry = resolve(parse_source("org/sharded"), config(cache, "org/sharded", "org/sharded"))

    assert entry["revision"] == sha
    assert entry["files"] == expected_files(
        files,
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    )


def test_pinned_sha_keeps_old_bytes_after_main_moves(standin, repos, cache):
    old_files, new_files = model_files(1), model_files(2)
    old = commit(repos, "org/name", old_files)
    first = resolve(parse_source("org/name"), config(cache, "org/name", "org/name"))
    assert first["revision"] == old

    new = commit(repos, "org/name", new_files)  # main moves on
    assert repos["org/name"][old]["refs"] == [] and repos["org/name"][new]["refs"] == ["main"]

    result = manifest(config(cache, f"org/name@{old}", "org/name"))

    pinned, latest = result["model_a"], result["model_b"]
    assert pinned["revision"] == old
    assert (Path(pinned["path"]) / "model.safetensors").read_bytes() == old_files["model.safetensors"]
    # the cache's refs/main still says `old`, yet the unpinned source follows the Hub to the new commit
    assert latest["revision"] == new
    assert (Path(latest["path"]) / "model.safetensors").read_bytes() == new_files["model.safetensors"]


def test_pickle_only_repo_is_refused_before_any_download(standin, repos, cache):
    commit(repos, "org/pickled", {"config.json": CONFIG, "pytorch_model.bin": b"\x80\x04 pickle"})

    with pytest.raises(WeightdiffError, match="pickle") as excinfo:
        resolve(parse_source("org/pickled"), config(cache, "org/pickled", "org/pickled"))

    assert "org/pickled" in str(excinfo.value) and "pytorch_model.bin" in str(excinfo.value)
    assert not [r for r in standin.requests if "/resolve/" in r.path]
    assert not (cache / "models--org--pickled").exists()


def test_unknown_repo_names_it_and_suggests_a_local_directory(standin, repos, cache):
    commit(repos, "org/name", model_files(1))

    with pytest.raises(WeightdiffError) as excinfo:
        resolve(parse_source("org/missing"), config(cache, "org/missing", "org/missing"))

    message = str(excinfo.value)
    assert "org/missing" in message and "local directory" in message
    assert isinstance(excinfo.value.__cause__, RepositoryNotFoundError)


def test_unknown_revision_names_repo_and_revision(standin, repos, cache):
    commit(repos, "org/name", model_files(1), refs=["main", "v1.0"])

    with pytest.raises(WeightdiffError) as excinfo:
        resolve(parse_source("org/name@v9.9"), config(cache, "org/name@v9.9", "org/name"))

    assert "org/name@v9.9" in str(excinfo.value)
    assert isinstance(excinfo.value.__cause__, RevisionNotFoundError)
    assert not (cache / "models--org--name").exists()


def test_gated_repo_needs_a_granted_token(standin, repos, cache, monkeypatch):
    files = model_files(5)
    sha = commit(repos, "org/gated", files)
    standin.gated["org/gated"] = {"hf_granted"}
    cfg = config(cache, "org/gated", "org/gated")

    with pytest.raises(WeightdiffError, match="org/gated") as excinfo:
        resolve(parse_source("org/gated"), cfg)
    assert isinstance(excinfo.value.__cause__, GatedRepoError)
    assert excinfo.value.__cause__.response.status_code == 401

    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    with pytest.raises(WeightdiffError, match="org/gated") as excinfo:
        resolve(parse_source("org/gated"), cfg)
    assert excinfo.value.__cause__.response.status_code == 403
    assert not snapshot(cache, "org/gated", sha).joinpath("model.safetensors").exists()

    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    entry = resolve(parse_source("org/gated"), cfg)
    assert entry["revision"] == sha
    assert (Path(entry["path"]) / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert any(r.headers.get("authorization") == "Bearer hf_granted" for r in standin.requests)


def test_unreachable_hub_is_a_weightdiff_error(hf_isolated, monkeypatch, cache):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    point_hub_at(monkeypatch, f"http://127.0.0.1:{port}")

    with pytest.raises(WeightdiffError, match="org/name"):
        resolve(parse_source("org/name"), config(cache, "org/name", "org/name"))


def test_offline_mode_works_from_the_cache_alone(standin, repos, cache, monkeypatch):
    sha = commit(repos, "org/name", model_files(1))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightdiffError, match="HF_HUB_OFFLINE is set and the cache has no snapshot of org/name"):
        resolve(parse_source("org/name"), config(cache, "org/name", "org/name"))
    assert not standin.requests

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    online = resolve(parse_source("org/name"), config(cache, "org/name", "org/name"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    served = len(standin.requests)
    for text in ("org/name", f"org/name@{sha}"):
        assert resolve(parse_source(text), config(cache, text, text)) == online
    assert online["revision"] == sha and len(standin.requests) == served


def large_weights(seed: int) -> bytes:
    """24 MiB: more than two of the 10 MiB chunks huggingface_hub writes to disk at a time."""
    return weights(seed, rows=3 * 2**18)


def test_dropped_connection_mid_file_resumes_from_the_byte_reached(standin, repos, cache):
    files = model_files(1, **{"model.safetensors": large_weights(1)})
    commit(repos, "org/name", files)
    cut = 2 * hf_constants.DOWNLOAD_CHUNK_SIZE  # what reached the disk; a drop loses a partly received chunk
    standin.drop_after["model.safetensors"] = cut

    entry = resolve(parse_source("org/name"), config(cache, "org/name", "org/name"))

    assert (Path(entry["path"]) / "model.safetensors").read_bytes() == files["model.safetensors"]
    ranges = [r.headers.get("range") for r in standin.requests if r.cdn and r.method == "GET"]
    assert ranges == [None, f"bytes={cut}-"]  # one cut transfer, then only the rest of the file


def no_disk_beyond(free: int):
    """A stand-in for shutil.disk_usage that reports `free` bytes free on any path."""
    return lambda path: SimpleNamespace(total=10**13, used=10**13 - free, free=free)


def test_too_little_disk_space_stops_before_any_download_and_counts_only_missing_files(
    standin, repos, cache, monkeypatch
):
    a, b = model_files(1), model_files(2)
    commit(repos, "org/a", a)
    commit(repos, "org/b", b)
    need_a, need_b = (len(f["config.json"]) + len(f["model.safetensors"]) for f in (a, b))
    monkeypatch.setattr(shutil, "disk_usage", no_disk_beyond(need_a + need_b - 1))

    with pytest.raises(WeightdiffError) as excinfo:
        manifest(config(cache, "org/a", "org/b"))

    assert f"4 files still to download need {need_a + need_b:,} bytes" in str(
        excinfo.value
    ) and f"{cache.parent} has {need_a + need_b - 1:,} bytes" in str(excinfo.value)
    assert not [r for r in standin.requests if r.method == "GET" and ("/resolve/" in r.path or r.cdn)]
    assert not cache.exists()

    # with A in the cache, only B's files count
    resolve(parse_source("org/a"), config(cache, "org/a", "org/a"))
    monkeypatch.setattr(shutil, "disk_usage", no_disk_beyond(need_b))
    result = manifest(config(cache, "org/a", "org/b"))
    assert (Path(result["model_b"]["path"]) / "model.safetensors").read_bytes() == b["model.safetensors"]


def stage_env(hub_url: str, hf_home: Path) -> dict[str, str]:
    """A stage subprocess's environment: the stand-in as the Hub, HF_HOME as its only cache, no user token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    return env | {
        "PYTHONPATH": str(REPO),
        "HF_ENDPOINT": hub_url,
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def wait_for(found, proc: subprocess.Popen, timeout: float = 60.0):
    """found()'s first truthy value, polled while proc runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if value := found():
            return value
        time.sleep(0.01)
    raise AssertionError(f"not reached before the process ended (status {proc.poll()})")


def relative_paths(result: dict, cache: Path) -> dict:
    return {side: entry | {"path": str(Path(entry["path"]).relative_to(cache))} for side, entry in result.items()}


def test_kill_9_mid_file_then_rerun_equals_an_uninterrupted_run(standin, repos, tmp_path, monkeypatch):
    """`python -m stages.download` SIGKILLed while the weights stream in, rerun: same manifest, same bytes."""
    files = model_files(1, **{"model.safetensors": large_weights(1)})
    commit(repos, "org/name", files)
    uninterrupted = manifest(config(tmp_path / "reference", "org/name", "org/name"))
    hf_home = tmp_path / "hf-home-of-the-stage"
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    overrides = ["model_a=org/name", "model_b=org/name"]
    standin.bytes_per_second = 16 * 2**20  # 1.5 s for the weights

    with (tmp_path / "stderr.txt").open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages.download", *overrides],
            cwd=tmp_path,
            env=stage_env(standin.url, hf_home),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        blobs = hf_home / "hub" / "models--org--name" / "blobs"
        wait_for(lambda: [p for p in blobs.glob("*.incomplete") if p.stat().st_size > 0], proc)  # 10 of 24 MiB
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    assert not (tmp_path / "artifacts" / "manifest.json").exists()

    standin.bytes_per_second = None
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))  # what HF_HOME gave the stage
    stages.download.main(run_config(overrides, params=tmp_path / "params.yaml"))

    rerun = json.loads((tmp_path / "artifacts" / "manifest.json").read_text())
    assert relative_paths(rerun, hf_home / "hub") == relative_paths(uninterrupted, tmp_path / "reference")
    for name in ("config.json", "model.safetensors"):
        assert (Path(rerun["model_a"]["path"]) / name).read_bytes() == files[name]


# -- parsing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/name", Source("hub", "org/name", None)),
        ("org/name@v1.0", Source("hub", "org/name", "v1.0")),
        ("org/name@refs/pr/1", Source("hub", "org/name", "refs/pr/1")),
        ("demo:a", Source("demo", "a")),
        ("demo:b", Source("demo", "b")),
    ],
)
def test_parse_source(text, expected):
    assert parse_source(text) == expected


@pytest.mark.parametrize(
    "text", ["/nonexistent/model", "./missing", "../missing/model", "~/missing-model", "not-a-hub-id", "org/name/extra"]
)
def test_missing_local_directory_is_refused(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(WeightdiffError, match="no such local directory"):
        parse_source(text)


def test_unknown_demo_variant_is_refused():
    with pytest.raises(WeightdiffError, match="demo:c"):
        parse_source("demo:c")


# -- local directories -------------------------------------------------------------------------------------


def make_local_model(directory: Path, seed: int) -> Path:
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=generator)}, directory / "model.safetensors"
    )
    (directory / "config.json").write_bytes(CONFIG)
    (directory / "README.md").write_text("not used\n")
    return directory


def test_local_directories_are_recorded_with_sizes_and_mtimes(tmp_path, monkeypatch, cache):
    a = make_local_model(tmp_path / "models" / "a", seed=0)
    b = make_local_model(tmp_path / "home" / "b", seed=1)
    monkeypatch.chdir(tmp_path / "models")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    result = manifest(config(cache, "./a", "~/b"))

    for side, directory, source in (("model_a", a, "./a"), ("model_b", b, "~/b")):
        entry = result[side]
        assert entry["source"] == source
        assert entry["kind"] == "local" and entry["revision"] is None
        assert entry["path"] == str(directory.resolve()) and Path(entry["path"]).is_absolute()
        assert entry["files"] == [
            {"name": name, "size": (directory / name).stat().st_size, "mtime_ns": (directory / name).stat().st_mtime_ns}
            for name in ("config.json", "model.safetensors")
        ]
    assert not cache.exists()  # nothing was copied or downloaded

    # weights changed in place: same path, same size, but the manifest must differ
    stat = (a / "model.safetensors").stat()
    os.utime(a / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = resolve(parse_source(str(a)), config(cache, str(a), str(b)))
    assert again["files"] != result["model_a"]["files"]
    assert again["files"][1]["mtime_ns"] == stat.st_mtime_ns + 1_000_000_000


def test_local_directory_without_config_is_refused(tmp_path, cache):
    directory = make_local_model(tmp_path / "m", seed=0)
    (directory / "config.json").unlink()

    with pytest.raises(WeightdiffError, match="config.json"):
        resolve(parse_source(str(directory)), config(cache, str(directory), str(directory)))
