"""Bad input fails early, with a message that names the file, the tensor and the values, and leaves nothing
that looks finished."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import stages.download
import stages.extract
from helpers import REPO, edited_copy, local_manifest, run_extract
from weightdiff.config import run_config
from weightdiff.download import parse_source
from weightdiff.errors import WeightdiffError
from weightdiff.files import atomic_path, write_json
from weightdiff.index import build_index
from weightdiff.verify import verify

IGNORE = ["_name_or_path", "dtype", "torch_dtype", "transformers_version"]


def sharded_copy(src: Path, dst: Path) -> Path:
    """src's weights split over two shards with a model.safetensors.index.json, as large checkpoints come."""
    dst.mkdir(parents=True)
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, dst / shard, metadata={"format": "pt"})
    weight_map = {n: shard for shard, part in shards.items() for n in part}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_checkpoints_verify_and_extract_like_single_files(tiny_pair, tmp_path, cfg):
    a = sharded_copy(tiny_pair[0], tmp_path / "a")
    _, sharded, _ = run_extract(a, tiny_pair[1], tmp_path / "x", cfg)
    _, single, _ = run_extract(*tiny_pair, tmp_path / "y", cfg)
    assert verify(local_manifest(a, tiny_pair[1]), IGNORE)["tensors"] == 21
    assert (tmp_path / "x/adapter_model.safetensors").read_bytes() == (
        tmp_path / "y/adapter_model.safetensors"
    ).read_bytes()


def with_config(model_dir: Path, **changes) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | changes))
    return model_dir


@pytest.mark.parametrize(
    ("changes", "shown"),
    [
        ({"num_hidden_layers": 3, "intermediate_size": 96}, r"intermediate_size: 128 vs 96.*num_hidden_layers: 2 vs 3"),
        ({"hidden_size": 96}, r"hidden_size: 64 vs 96"),
        ({"hidden_size": 96, "vocab_size": 260}, r"hidden_size: 64 vs 96; vocab_size: 256 vs 260"),
    ],
)
def test_different_architectures(tiny_pair, tmp_path, changes, shown):
    b = with_config(edited_copy(tiny_pair[1], tmp_path / "b", lambda t: None), **changes)
    with pytest.raises(WeightdiffError, match=rf"different architectures: .*/config.json differ in {shown}"):
        verify(local_manifest(tiny_pair[0], b), IGNORE, "skip")


def resized_copy(src: Path, dst: Path, added_tokens: int) -> Path:
    """src with its vocabulary grown by added_tokens (new rows in the embeddings and the LM head), as a fine-tune
    that adds tokens saves it."""

    def grow(t):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            t[name] = torch.cat([t[name], t[name][:added_tokens]])

    b = edited_copy(src, dst, grow)
    return with_config(b, vocab_size=json.loads((src / "config.json").read_text())["vocab_size"] + added_tokens)


def test_resized_embeddings_are_named_as_such_and_refused_by_default(tiny_pair, tmp_path):
    b = resized_copy(tiny_pair[1], tmp_path / "b", added_tokens=4)
    with pytest.raises(
        WeightdiffError,
        match=r"^vocab_size differs: resized embeddings \(.*/a/config.json has 256 "
        r"tokens, .*/b/config.json 260; .*verify.resized_embeddings=skip",
    ):
        verify(local_manifest(tiny_pair[0], b), IGNORE)


def test_resized_embeddings_skip_accepts_only_vocabulary_sized_differences(tiny_pair, tmp_path, monkeypatch):
    b = resized_copy(tiny_pair[1], tmp_path / "b", added_tokens=4)
    manifest = local_manifest(tiny_pair[0], b)
    report = verify(manifest, IGNORE, "skip")
    assert report["resized_embeddings"] == ["lm_head.weight", "model.embed_tokens.weight"]

    monkeypatch.chdir(tmp_path)  # the extract stage on this pair leaves them out
    write_json(Path("artifacts/manifest.json"), manifest)
    write_json(Path("artifacts/index.json"), build_index(manifest))
    stages.extract.main(run_config(params=REPO / "params.yaml"))
    keys = load_file(tmp_path / "artifacts" / "adapter" / "adapter_model.safetensors").keys()
    assert keys and not [k for k in keys if "embed_tokens" in k or "lm_head" in k]
    reports = json.loads((tmp_path / "artifacts" / "extract" / "tensors.json").read_text())
    assert not [r for r in reports if r["name"] in report["resized_embeddings"]]

    other = edited_copy(
        b,
        tmp_path / "other",
        lambda t: t.__setitem__(  # one more tensor differs: still refused
            "model.layers.0.mlp.up_proj.weight", t["model.layers.0.mlp.up_proj.weight"][:100]
        ),
    )
    with pytest.raises(WeightdiffError, match=r"up_proj.weight: shape \(128, 64\) in A .* vs \(100, 64\) in B") as e:
        verify(local_manifest(tiny_pair[0], other), IGNORE, "skip")
    assert "embed_tokens" not in str(e.value)


def test_tensor_shape_dtype_and_presence_mismatches_name_tensor_and_both_values(tiny_pair, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:100]
        t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"].float()
        t["model.layers.2.mlp.up_proj.weight"] = t.pop("model.norm.weight")

    b = edited_copy(tiny_pair[1], tmp_path / "b", edit)
    with pytest.raises(WeightdiffError) as e:
        verify(local_manifest(tiny_pair[0], b), IGNORE)
    assert "model.layers.0.mlp.up_proj.weight: shape (128, 64) in A (model.safetensors) vs (100, 64) in B" in str(
        e.value
    )
    assert (
        "model.layers.1.self_attn.k_proj.weight: dtype BF16 in A (model.safetensors) vs F32 in B (model.safetensors)"
    ) in str(e.value)
    assert "model.norm.weight: only in A (model.safetensors)" in str(e.value)
    assert "model.layers.2.mlp.up_proj.weight: only in B (model.safetensors)" in str(e.value)


def test_missing_shard(tiny_pair, tmp_path):
    a = sharded_copy(tiny_pair[0], tmp_path / "a")
    manifest = local_manifest(a, tiny_pair[1])
    (a / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        WeightdiffError, match=r"model-00002-of-00002.safetensors is missing .*rerun the download stage"
    ):
        verify(manifest, IGNORE)
    # listed by the index but never there: found from the index itself
    with pytest.raises(
        WeightdiffError, match=r"index.json lists shard model-00002-of-00002.safetensors, which is missing"
    ):
        verify(local_manifest(a, tiny_pair[1]), IGNORE)


@pytest.mark.parametrize("damage", ["truncated header", "header past the end", "not json", "data cut short"])
def test_broken_safetensors_header(tiny_pair, tmp_path, damage):
    b = edited_copy(tiny_pair[1], tmp_path / "b", lambda t: None)
    f = b / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    f.write_bytes(
        {
            "truncated header": data[: 8 + n // 2],
            "header past the end": (len(data) * 2).to_bytes(8, "little") + data[8:],
            "not json": data[:8] + b"\xff" * n + data[8 + n :],
            "data cut short": data[:-100],
        }[damage]
    )
    with pytest.raises(WeightdiffError, match=rf"{f}: not a readable safetensors file") as e:
        verify(local_manifest(tiny_pair[0], b), IGNORE)
    if damage == "data cut short":  # the last tensor in the file, model.norm.weight (64 bf16), lost its bytes
        data_len = len(data) - 8 - n
        assert str(e.value).endswith(
            f"; tensor model.norm.weight ends at byte {data_len} of the data, which has "
            f"{data_len - 100}: the file is truncated"
        )


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_in_a_delta_names_the_tensor_and_leaves_no_adapter(tiny_pair, tmp_path, cfg, value):
    name = "model.layers.1.mlp.gate_proj.weight"
    b = edited_copy(tiny_pair[1], tmp_path / "b", lambda t: t[name].__setitem__((3, 5), value))
    with pytest.raises(WeightdiffError, match=rf"{b}/model.safetensors: tensor {name} has 1 NaN/Inf values"):
        run_extract(tiny_pair[0], b, tmp_path / "adapter", cfg)
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.glob(".adapter*"))


def disk_full_after(monkeypatch, n: int) -> None:
    """Path.write_bytes (what write_atomic and write_json use) writes n bytes, then fails as a full disk does."""

    def write_bytes(self: Path, data: bytes) -> None:
        with open(self, "wb") as f:
            f.write(data[:n])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_disk_full_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    target = tmp_path / "metrics" / "extract.json"
    write_json(target, {"run": 1})
    disk_full_after(monkeypatch, 3)
    with pytest.raises(WeightdiffError, match=rf"^cannot write {target}: No space left on device$"):
        write_json(target, {"run": 2})
    assert json.loads(target.read_text()) == {"run": 1} and os.listdir(target.parent) == ["extract.json"]


def test_safetensors_write_failure_is_a_weightdiff_error_and_leaves_nothing(tmp_path):
    """safetensors' save_file reports I/O errors as SafetensorError, not OSError."""
    target = tmp_path / "unit.safetensors"
    with pytest.raises(WeightdiffError, match=rf"^cannot write {target}: Error while serializing: I/O error: No space"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert not list(tmp_path.iterdir())


def test_disk_full_while_writing_the_adapter_leaves_no_adapter(tiny_pair, tmp_path, cfg, monkeypatch):
    disk_full_after(monkeypatch, 1000)
    with pytest.raises(WeightdiffError, match=r"cannot write .*/adapter_model.safetensors: No space left on device"):
        run_extract(*tiny_pair, tmp_path / "out" / "adapter", cfg)
    assert not (tmp_path / "out" / "adapter").exists() and not list((tmp_path / "out").glob(".adapter*"))


def test_download_stage_refuses_an_unwritable_output_directory_before_downloading(tmp_path, monkeypatch):
    """/sys takes no new files, root's included (a chmod'ed directory would not stop root)."""
    monkeypatch.chdir(tmp_path)
    cfg = run_config(
        ["model_a=org/never-fetched", "model_b=org/never-fetched", "paths.manifest=/sys/weightdiff-test/manifest.json"],
        params=REPO / "params.yaml",
    )
    with pytest.raises(WeightdiffError, match=r"^output directory /sys/weightdiff-test is not writable: "):
        stages.download.main(cfg)


def test_extract_stage_cli_refuses_an_unwritable_adapter_directory_before_any_work(tmp_path):
    proc = stage_cli("extract", tmp_path, "paths.adapter=/sys/weightdiff-test/adapter")  # no index needed: first check
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: output directory /sys/weightdiff-test is not writable: ")
    )
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("source", ["/nonexistent/model", "./missing-model", "~/no/such/dir/x"])
def test_nonexistent_local_path(source):
    with pytest.raises(WeightdiffError, match="no such local directory"):
        parse_source(source)


def stage_cli(stage: str, cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m stages.<stage> [overrides]` run as a user runs it, from a directory holding params.yaml."""
    (cwd / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *overrides],
        cwd=cwd,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )


def test_stage_cli_reports_the_error_in_one_line_and_exits_nonzero(tiny_pair, tmp_path):
    """What a user sees from `python -m stages.download model_a=...`: no traceback, status 1."""
    proc = stage_cli("download", tmp_path, "model_a=/data/nope", f"model_b={tiny_pair[1]}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: model source '/data/nope': no such local directory, and not a Hub id (org/name[@revision])"
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "artifacts").exists()


def test_verify_stage_cli_names_the_broken_file_and_writes_no_report(tiny_pair, tmp_path):
    b = edited_copy(tiny_pair[1], tmp_path / "b", lambda t: None)
    data = (b / "model.safetensors").read_bytes()
    (b / "model.safetensors").write_bytes(data[:8] + b"\0" + data[9:])  # a header that is not JSON any more
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "manifest.json").write_text(json.dumps(local_manifest(tiny_pair[0], b)))

    proc = stage_cli("verify", tmp_path)

    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {b}/model.safetensors: not a readable safetensors")
    assert not (tmp_path / "artifacts" / "verify.json").exists()
