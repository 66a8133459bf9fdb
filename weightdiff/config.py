"""The run's configuration: params.yaml (what DVC tracks) plus Hydra overrides from the command line.

Stages read params.yaml rather than composing conf/ because `dvc exp run -S` writes its composition
there; reading conf/ again would silently drop the experiment's overrides. `python -m weightdiff.config
[overrides]` composes conf/ into params.yaml, as DVC does, for plain `dvc repro` runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from weightdiff.errors import WeightdiffError

ROOT = Path.cwd()


def composed_conf(overrides: list[str] = (), conf_dir: Path | None = None) -> DictConfig:
    """conf/config.yaml composed with overrides, exactly as `dvc exp run -S` does it."""
    return _compose(conf_dir or ROOT / "conf", "config", overrides)


def run_config(overrides: list[str] = (), params: Path | None = None) -> DictConfig:
    """params.yaml with Hydra overrides (key=v, +key=v, ~key) applied: the configuration a stage runs with."""
    params = params or ROOT / "params.yaml"
    if not params.is_file():
        raise WeightdiffError(f"{params} not found: run stages from the repository root")
    return _compose(params.parent, params.stem, overrides)


def _compose(config_dir: Path, name: str, overrides: list[str]) -> DictConfig:
    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base="1.3"):
            cfg = compose(name, overrides=list(overrides))
    except HydraException as e:
        raise WeightdiffError(f"configuration {config_dir / name}.yaml with overrides {list(overrides)}: {e}") from e
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise WeightdiffError(f"configuration leaves {', '.join(missing)} unset: give them, e.g. model_a=org/name")
    return cfg


def params_yaml(cfg: DictConfig) -> str:
    """The YAML text of params.yaml for a composed configuration."""
    return OmegaConf.to_yaml(cfg, resolve=True)


if __name__ == "__main__":
    (ROOT / "params.yaml").write_text(params_yaml(composed_conf(sys.argv[1:])))
    print(f"wrote {ROOT / 'params.yaml'}")
