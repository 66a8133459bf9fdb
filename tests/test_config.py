"""The configuration: conf/ composes into params.yaml as DVC does it, weightdiff.settings types and checks it, and
paths are wiring outside the params."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from helpers import REPO
from weightdiff.config import composed_conf, run_config
from weightdiff.errors import WeightdiffError
from weightdiff.settings import ExtractSettings, Settings, plain, typed, updated


def test_committed_params_yaml_equals_the_composition_of_conf():
    """Plain `dvc repro` reads params.yaml; it must say what conf/ says (regenerate: python -m weightdiff.config)."""
    composed = OmegaConf.to_yaml(composed_conf(conf_dir=REPO / "conf"), resolve=True)
    assert yaml.safe_load((REPO / "params.yaml").read_text()) == yaml.safe_load(composed)


def test_the_schema_defaults_are_conf_values():
    """One set of defaults: conf/config.yaml (what DVC composes) says what weightdiff.settings says."""
    conf = OmegaConf.to_container(composed_conf(conf_dir=REPO / "conf"), resolve=True)
    defaults = plain(Settings(model_a=conf["model_a"], model_b=conf["model_b"]))
    defaults.pop("paths")
    assert conf == defaults


def test_paths_are_not_params():
    """dvc exp show lists params: paths are wiring, in settings.Paths and dvc.yaml, overridable per stage run."""
    assert "paths" not in yaml.safe_load((REPO / "params.yaml").read_text())
    assert "vars" not in yaml.safe_load((REPO / "dvc.yaml").read_text())  # DVC would track vars files as params
    cfg = run_config(["paths.index=/tmp/x/index.json"], params=REPO / "params.yaml")
    assert cfg.paths.index == "/tmp/x/index.json" and cfg.paths.manifest == "artifacts/manifest.json"


def test_overrides_in_hydra_syntax():
    cfg = run_config(["extract.rank=8", "model_a=/data/m", "extract.extras.norms=save"], params=REPO / "params.yaml")
    assert cfg.extract.rank == 8 and cfg.model_a == "/data/m" and cfg.extract.extras.norms == "save"
    assert isinstance(cfg.extract, ExtractSettings)


def test_pair_group_sets_both_models():
    cfg = composed_conf(["pair=qwen2.5-0.5b-instruct"], conf_dir=REPO / "conf")
    assert cfg.model_a == "Qwen/Qwen2.5-0.5B" and cfg.model_b == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("extract.rnak=8", r"extract\.rnak"),
        ("+extract.note=x", r"extract\.note: Key 'note' not in 'ExtractSettings'"),
        (
            "extract.rank_policy=enrgy",
            r"extract\.rank_policy: Invalid value 'enrgy', expected one of \[fixed, energy, noise_floor\]",
        ),
        ("extract.extras.norms=lora", r"extract\.extras\.norms: Invalid value 'lora', expected one of \[skip, save\]"),
        ("extract.svd.method=full", r"extract\.svd\.method: .*expected one of \[randomized, exact\]"),
        ("gguf.dtype=q4", r"gguf\.dtype: .*expected one of \[f32, f16, bf16, q8_0\]"),
        ("verify.resized_embeddings=drop", r"verify\.resized_embeddings: .*expected one of \[error, skip\]"),
        ("extract.rank=0", r"extract\.rank must be a positive integer or auto, not 0"),
        ("extract.svd.power_iters=many", r"extract\.svd\.power_iters must be auto or a count >= 0, not 'many'"),
        ("extract.svd.tol=2", r"extract\.svd\.tol must be a number in \(0, 1\)"),
        ("extract.target_modules=everything", r"extract\.target_modules must be a list of module names or one of auto"),
    ],
)
def test_a_wrong_value_fails_at_start_naming_the_key_and_the_choices(override, message):
    with pytest.raises(WeightdiffError, match=message):
        run_config([override], params=REPO / "params.yaml")


def test_the_defaults_leave_nothing_out_and_serving_is_a_choice():
    """Every extra in its most faithful form by default (biases and embedding LoRA together: extraction decides
    what PEFT can take, tests/test_extras.py); the serving profile is one key away."""
    extract = typed(ExtractSettings, {})
    assert plain(extract.extras) == {"norms": "save", "biases": "lora", "embeddings": "lora", "lm_head": "lora"}
    assert extract.profile == "faithful" and updated(extract, profile="serving").profile == "serving"
    with pytest.raises(WeightdiffError, match=r"extract\.profile: Invalid value 'vllm'"):
        run_config(["extract.profile=vllm"], params=REPO / "params.yaml")


def test_the_resume_store_survives_dvc_rerunning_the_stage():
    """DVC deletes a stage's outs before running it: a resume store inside one could never resume a killed run."""
    from dvc.repo import Repo

    store = Path(run_config(params=REPO / "params.yaml").paths.resume)
    with Repo(str(REPO)) as repo:
        outs = [Path(str(o.def_path)) for stage in repo.index.stages for o in stage.outs]
    assert outs and not any(store == o or o in store.parents for o in outs)
