"""download.mode=stream: extract and validate read each tensor's bytes from the Hub stand-in, with only config and
safetensors headers on disk, and give the adapter and the numbers a fetched run gives."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from helpers import REPO, edited_copy
from hub_standin import commit, serve
from test_download import hf_isolated, point_hub_at  # noqa: F401 - hf_isolated is a fixture
from weightdiff.config import run_config
from weightdiff.download import manifest
from weightdiff.errors import WeightdiffError
from weightdiff.extract import extract
from weightdiff.index import build_index
from weightdiff.remote import REMOTE_FILE
from weightdiff.safetensors_io import TensorReader
from weightdiff.validate import validate
from weightdiff.verify import verify

SHARD = "model-00001-of-00002.safetensors"


def files_of(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}


def sharded(files: dict[str, bytes], tmp: Path) -> dict[str, bytes]:
    """The model's one safetensors file split into two shards with an index, as large checkpoints come."""
    (tmp / "model.safetensors").write_bytes(files.pop("model.safetensors"))
    tensors = load_file(tmp / "model.safetensors")
    names = sorted(tensors)
    halves = {SHARD: names[::2], SHARD.replace("00001", "00002"): names[1::2]}
    weight_map = {}
    for shard, part in halves.items():
        save_file({n: tensors[n] for n in part}, tmp / shard, metadata={"format": "pt"})
        files[shard] = (tmp / shard).read_bytes()
        weight_map |= dict.fromkeys(part, shard)
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A random Llama wide enough that its weights dwarf its config (32 MB a pair), and B = A plus a rank-4 change
    of every attention and MLP projection: what a merged LoRA fine-tune looks like."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide")
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "a")
    generator = torch.Generator().manual_seed(1)

    def fine_tune(tensors: dict[str, torch.Tensor]) -> None:
        for name, w in tensors.items():
            if name.endswith("proj.weight"):
                change = torch.randn(w.shape[0], 4, generator=generator) @ torch.randn(
                    4, w.shape[1], generator=generator
                )
                tensors[name] = (w.float() + 0.01 * change).to(w.dtype)

    return root / "a", edited_copy(root / "a", root / "b", fine_tune)


@pytest.fixture
def hub(wide_pair, monkeypatch, hf_isolated, tmp_path):  # noqa: F811 - hf_isolated is the fixture
    """The stand-in serving the pair as org/a and org/b, each in two shards."""
    repos: dict = {}
    for side, model_dir in zip("ab", wide_pair, strict=True):
        (tmp_path / side).mkdir()
        commit(repos, f"org/{side}", sharded(files_of(model_dir), tmp_path / side))
    with serve(repos) as standin:
        point_hub_at(monkeypatch, standin.url)
        yield standin


def settings(cache: Path, mode: str):
    cfg = run_config(params=REPO / "params.yaml")
    return OmegaConf.merge(
        OmegaConf.structured(cfg),
        {"model_a": "org/a", "model_b": "org/b", "download": {"mode": mode, "cache_dir": str(cache)}},
    )


def pipeline(cache: Path, out: Path, mode: str) -> tuple[dict, dict, dict, bytes]:
    """download → verify → index → extract → validate, in process; (manifest, extract and validate metrics,
    adapter bytes)."""
    cfg = settings(cache, mode)
    pinned = manifest(cfg)
    verify(pinned, list(cfg.verify.ignore_config_keys))
    index = build_index(pinned)
    extracted, _, _ = extract(index, pinned, cfg.extract, out / "adapter", out / ".resume")
    validated, _ = validate(index, out / "adapter", cfg.validate)
    return pinned, extracted, validated, (out / "adapter" / "adapter_model.safetensors").read_bytes()


def ranged_bytes(request) -> int:
    first, _, last = request.headers["range"].removeprefix("bytes=").partition("-")
    return int(last) - int(first) + 1


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def without_time(metrics: dict) -> dict:
    """The metrics that must not depend on how the inputs were read."""
    return {k: v for k, v in metrics.items() if k not in ("seconds", "inputs")}


def test_streamed_run_writes_no_weights_and_the_same_adapter_as_a_fetched_one(hub, wide_pair, tmp_path):
    pair_bytes = sum(
        len(d)
        for c in hub.repos.values()
        for f in c.values()
        for n, d in f["files"].items()
        if n.endswith(".safetensors")
    )
    start = time.perf_counter()
    fetched = pipeline(tmp_path / "fetch-cache", tmp_path / "fetch", "fetch")
    fetch_seconds = time.perf_counter() - start
    start, before = time.perf_counter(), len(hub.requests)
    streamed = pipeline(tmp_path / "stream-cache", tmp_path / "stream", "stream")
    stream_seconds = time.perf_counter() - start
    transferred = sum(ranged_bytes(r) for r in hub.requests[before:] if r.cdn)

    assert streamed[3] == fetched[3]  # the adapter, byte for byte
    assert without_time(streamed[1]) == without_time(fetched[1])
    assert streamed[2] == fetched[2]
    for side in ("model_a", "model_b"):
        assert streamed[0][side]["mode"] == "stream" and fetched[0][side]["mode"] == "fetch"
        assert streamed[1]["inputs"][side]["read"] == "stream" and fetched[1]["inputs"][side]["read"] == "fetch"
        assert streamed[0][side]["files"] == fetched[0][side]["files"]
        assert streamed[0][side]["revision"] == fetched[0][side]["revision"]
    written = disk_bytes(tmp_path / "stream-cache") + disk_bytes(tmp_path / "stream")
    adapter = disk_bytes(tmp_path / "stream" / "adapter")
    assert written - adapter <= 0.01 * pair_bytes, (written, adapter, pair_bytes)
    assert not list((tmp_path / "stream-cache").rglob("*.safetensors"))
    print(
        f"pair {pair_bytes / 1e6:.1f} MB; written besides the adapter {(written - adapter) / 1e3:.1f} kB; "
        f"pipeline fetch {fetch_seconds:.2f} s, stream {stream_seconds:.2f} s, {transferred / 1e6:.1f} MB streamed"
    )
    assert pair_bytes <= transferred <= 2.05 * pair_bytes  # extract reads the pair once, validate once more


def test_a_connection_dropped_mid_tensor_resumes_from_the_byte_reached(hub, tmp_path):
    cfg = settings(tmp_path / "cache", "stream")
    pinned = manifest(cfg)
    path = Path(pinned["model_b"]["path"])
    expected = load_file(hub_file(hub, "org/b", SHARD, tmp_path))
    name = max(expected, key=lambda n: expected[n].numel())
    before = len(hub.requests)
    hub.drop_after[SHARD] = 100_000  # the next response with bytes of the shard stops there
    got = TensorReader(path).get(name)
    assert torch.equal(got, expected[name])
    ranges = [r.headers.get("range") for r in hub.requests[before:] if r.cdn]
    assert len(ranges) == 2 and ranges[1] != ranges[0]  # the second asks for the rest, not the whole again
    assert SHARD not in hub.drop_after


def hub_file(hub, repo_id: str, name: str, tmp: Path) -> Path:
    (data,) = [c["files"][name] for c in hub.repos[repo_id].values()]
    (tmp / name).write_bytes(data)
    return tmp / name


def test_a_shard_gone_from_the_hub_is_one_error_naming_repo_file_and_revision(hub, tmp_path):
    cfg = settings(tmp_path / "cache", "stream")
    pinned = manifest(cfg)
    (files,) = [c["files"] for c in hub.repos["org/a"].values()]
    del files[SHARD]
    reader = TensorReader(Path(pinned["model_a"]["path"]))
    name = next(n for n, s in reader.shards.items() if s == SHARD)
    with pytest.raises(WeightdiffError) as e:
        reader.get(name)
    message = str(e.value)
    assert f"org/a@{pinned['model_a']['revision']}/{SHARD}" in message and "404" in message


def test_headers_and_small_files_are_all_that_is_kept(hub, tmp_path):
    pinned = manifest(settings(tmp_path / "cache", "stream"))
    path = Path(pinned["model_a"]["path"])
    assert sorted(p.name for p in path.iterdir() if p.is_file()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors.index.json", REMOTE_FILE]
    )
    described = json.loads((path / REMOTE_FILE).read_text())
    assert described["repo"]["revision"] == pinned["model_a"]["revision"] == path.name
    assert set(described["shards"]) == {SHARD, SHARD.replace("00001", "00002")}


def test_stream_mode_refuses_offline_mode(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightdiffError, match="HF_HUB_OFFLINE"):
        manifest(settings(tmp_path / "cache", "stream"))
