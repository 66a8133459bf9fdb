"""Bad input fails early, with a message that names the file, the tensor and the values, and leaves nothing
that looks finished."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import REPO, local_manifest
from test_roundtrip import edited_copy, run_extract
from weightdiff.download import parse_source
from weightdiff.errors import WeightdiffError
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
    assert (tmp_path / "x/adapter_model.safetensors").read_bytes() == (tmp_path / "y/adapter_model.safetensors").read_bytes()


def test_different_architectures(tiny_pair, tmp_path):
    b = edited_copy(tiny_pair[1], tmp_path / "b", lambda t: None)
    config = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3, "intermediate_size": 96}))
    with pytest.raises(WeightdiffError, match=r"different architectures.*intermediate_size: 128 vs 96.*num_hidden_layers: 2 vs 3"):
        verify(local_manifest(tiny_pair[0], b), IGNORE)


def test_tensor_shape_and_presence_mismatches_name_tensor_and_both_values(tiny_pair, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:100]
        del t["model.norm.weight"]
    b = edited_copy(tiny_pair[1], tmp_path / "b", edit)
    with pytest.raises(WeightdiffError) as e:
        verify(local_manifest(tiny_pair[0], b), IGNORE)
    assert "model.layers.0.mlp.up_proj.weight: shape (128, 64) in A (model.safetensors) vs (100, 64) in B" in str(e.value)
    assert "model.norm.weight: only in A" in str(e.value)


def test_missing_shard(tiny_pair, tmp_path):
    a = sharded_copy(tiny_pair[0], tmp_path / "a")
    manifest = local_manifest(a, tiny_pair[1])
    (a / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightdiffError, match=r"model-00002-of-00002.safetensors is missing .*rerun the download stage"):
        verify(manifest, IGNORE)
    # listed by the index but never there: found from the index itself
    with pytest.raises(WeightdiffError, match=r"index.json lists shard model-00002-of-00002.safetensors, which is missing"):
        verify(local_manifest(a, tiny_pair[1]), IGNORE)


@pytest.mark.parametrize("damage", ["truncated header", "header past the end", "not json"])
def test_broken_safetensors_header(tiny_pair, tmp_path, damage):
    b = edited_copy(tiny_pair[1], tmp_path / "b", lambda t: None)
    f = b / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    f.write_bytes({"truncated header": data[: 8 + n // 2],
                   "header past the end": (len(data) * 2).to_bytes(8, "little") + data[8:],
                   "not json": data[:8] + b"\xff" * n + data[8 + n:]}[damage])
    with pytest.raises(WeightdiffError, match=rf"{f}: not a readable safetensors file"):
        verify(local_manifest(tiny_pair[0], b), IGNORE)


def test_nan_in_a_delta_names_the_tensor_and_leaves_no_adapter(tiny_pair, tmp_path, cfg):
    name = "model.layers.1.mlp.gate_proj.weight"
    b = edited_copy(tiny_pair[1], tmp_path / "b", lambda t: t[name].__setitem__((3, 5), math.nan))
    with pytest.raises(WeightdiffError, match=rf"{b}/model.safetensors: tensor {name} has 1 NaN/Inf values"):
        run_extract(tiny_pair[0], b, tmp_path / "adapter", cfg)
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.glob(".adapter*"))


@pytest.mark.parametrize("source", ["/nonexistent/model", "./missing-model", "~/no/such/dir/x"])
def test_nonexistent_local_path(source):
    with pytest.raises(WeightdiffError, match="no such local directory"):
        parse_source(source)


def test_stage_cli_reports_the_error_in_one_line_and_exits_nonzero(tiny_pair, tmp_path):
    """What a user sees from `python -m stages.download model_a=...`: no traceback, status 1."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "stages.download", "model_a=/data/nope", f"model_b={tiny_pair[1]}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: model source '/data/nope': no such local directory, and not a Hub id (org/name[@revision])")
    assert "Traceback" not in proc.stderr and not (tmp_path / "artifacts").exists()
