
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from weightdiff.config import composed_conf, params_yaml, run_config
from weightdiff.errors import WeightdiffError


def test_committed_params_yaml_equals_the_composition_of_conf():
    """Plain `dvc repro` reads params.yaml; it must say what conf/ says (regenerate: python -m weightdiff.config)."""
    assert yaml.safe_load((REPO / "params.yaml").read_text()) == yaml.safe_load(params_yaml(composed_conf(conf_dir=REPO / "conf")))


def test_required_keys_have_the_documented_types():
    cfg = composed_conf(conf_dir=REPO / "conf")
    assert isinstance(cfg.model_a, str) and isinstance(cfg.model_b, str)
    assert cfg.extract.rank == "auto" and cfg.extract.alpha is None  # rank: an int, or auto (seeds' decision tree)
    assert cfg.extract.target_modules == "auto" and cfg.extract.dtype in ("bf16", "fp16", "fp32")


def test_overrides_in_hydra_syntax(tmp_path):
    cfg = run_config(["extract.rank=8", "model_a=/data/m", "+extract.note=x", "~gguf"], params=REPO / "params.yaml")
    assert cfg.extract.rank == 8 and cfg.model_a == "/data/m" and cfg.extract.note == "x" and "gguf" not in cfg


def test_pair_group_sets_both_models():
    cfg = composed_conf(["pair=qwen2.5-0.5b-instruct"], conf_dir=REPO / "conf")
    assert cfg.model_a == "Qwen/Qwen2.5-0.5B" and cfg.model_b == "Qwen/Qwen2.5-0.5B-Instruct"


def test_bad_override_is_a_user_error():
    with pytest.raises(WeightdiffError, match="extract.rnak"):
        run_config(["extract.rnak=8"], params=REPO / "params.yaml")


def test_extract_checkpoints_survive_dvc_rerunning_the_stage():
    """DVC deletes a stage's outs before running it: checkpoints inside one could never resume a killed run."""
    from weightdiff.figures import dvc_stages

    checkpoints = Path(composed_conf(conf_dir=REPO / "conf").paths.checkpoints)
    outs = [Path(o) for stage in dvc_stages(REPO / "dvc.yaml").values() for o in stage["outs"]]
    assert outs and not any(checkpoints == o or o in checkpoints.parents for o in outs)
