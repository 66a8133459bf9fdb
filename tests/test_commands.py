"""The console script `weightdiff`: the pipeline's steps as single commands, with the pipeline's defaults, giving
the pipeline's adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from helpers import REPO, full_model_log_probs, kl_per_token, run_extract
from weightdiff.commands import settings
from weightdiff.evalset import evaluation_batch
from weightdiff.settings import Settings, plain

SCRIPT = Path(sys.executable).parent / "weightdiff"  # what `pip install -e .` put beside the interpreter


def weightdiff(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_the_package_defaults_are_the_committed_params():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = OmegaConf.to_container(OmegaConf.structured(Settings))
    assert {k: v for k, v in defaults.items() if k not in ("model_a", "model_b", "paths")} == {
        k: v for k, v in committed.items() if k not in ("model_a", "model_b")
    }


def test_overrides_are_hydras_and_are_checked():
    cfg = settings("org/a", "org/b", ["extract.rank=8", "extract.target_modules=[q_proj,v_proj]"])
    assert cfg.extract.rank == 8 and plain(cfg.extract)["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(Exception, match="rank_policy"):
        settings("org/a", "org/b", ["extract.rank_policy=enrgy"])


def test_extract_gives_the_pipelines_adapter_and_it_reproduces_b(tiny_pair, cfg, tmp_path):
    dir_a, dir_b = tiny_pair
    done = weightdiff("extract", str(dir_a), str(dir_b), "-o", str(tmp_path / "cli"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "energy kept" in done.stdout
    run_extract(dir_a, dir_b, tmp_path / "stage" / "adapter", cfg)
    adapter = "adapter_model.safetensors"
    assert (tmp_path / "cli" / adapter).read_bytes() == (tmp_path / "stage" / "adapter" / adapter).read_bytes()
    assert not list(tmp_path.glob(".cli.resume*"))  # the resume store goes once the adapter is written

    tokens, _ = evaluation_batch(dir_a, json.loads((dir_a / "config.json").read_text())["vocab_size"], cfg.validate)
    target = full_model_log_probs(dir_b, tokens)
    assert kl_per_token(target, full_model_log_probs(dir_a, tokens, tmp_path / "cli")) <= 1e-4

    validated = weightdiff(
        "validate", str(tmp_path / "cli"), str(dir_a), str(dir_b), "-o", str(tmp_path / "v.json"), cwd=tmp_path
    )
    assert validated.returncode == 0, validated.stderr
    metrics = json.loads((tmp_path / "v.json").read_text())
    assert metrics["kl_adapted"] <= 1e-4 and metrics["verdict"] == "reproduces"
    assert "reproduces B" in validated.stdout  # the verdict's sentence, from the extraction's metrics

    gguf = weightdiff("gguf", str(tmp_path / "cli"), "-o", str(tmp_path / "a.gguf"), cwd=tmp_path)
    assert gguf.returncode == 0, gguf.stderr
    assert json.loads(gguf.stdout)["written"] and (tmp_path / "a.gguf").stat().st_size > 0


def test_bad_input_is_one_line_and_status_1(tmp_path):
    done = weightdiff("extract", str(tmp_path / "missing"), str(tmp_path), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "missing" in done.stderr
    bad_key = weightdiff("extract", str(tmp_path), str(tmp_path), "-o", "x", "extract.rnk=3", cwd=tmp_path)
    assert bad_key.returncode == 1 and "rnk" in bad_key.stderr
