"""The run's configuration: params.yaml (what DVC tracks) with Hydra overrides, checked against
weightdiff.settings.

Stages read params.yaml rather than composing conf/ because `dvc exp run -S` writes its composition
there; reading conf/ again would silently drop the experiment's overrides. `python -m weightdiff.config
[overrides]` composes conf/ into params.yaml, as DVC does, for plain `dvc repro` runs. Paths are not params
(settings.Paths): `paths.<key>=...` overrides one for a stage run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from weightdiff.errors import WeightdiffError
from weightdiff.settings import Settings, typed

ROOT = Path.cwd()


def composed_conf(overrides: Sequence[str] = (), conf_dir: Path | None = None) -> DictConfig:
    """conf/config.yaml composed with overrides, exactly as `dvc exp run -S` does it."""
    return _compose(conf_dir or ROOT / "conf", "config", overrides)


def run_config(overrides: Sequence[str] = (), params: Path | None = None) -> Settings:
    """params.yaml with Hydra overrides (key=v, +key=v, ~key) applied, and the paths: what a stage runs with."""
    params = params or ROOT / "params.yaml"
    if not params.is_file():
        raise WeightdiffError(f"{params} not found: run stages from the repository root")
    path_overrides = [o for o in overrides if _key(o).startswith("paths.")]
    cfg = _compose(params.parent, params.stem, [o for o in overrides if o not in path_overrides])
    paths = OmegaConf.from_dotlist([o.lstrip("+") for o in path_overrides])
    return typed(Settings, cfg, paths)


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def _compose(config_dir: Path, name: str, overrides: Sequence[str]) -> DictConfig:
    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base="1.3"):
            cfg = compose(name, overrides=list(overrides))
    except HydraException as e:
        raise WeightdiffError(f"configuration {config_dir / name}.yaml with overrides {list(overrides)}: {e}") from e
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise WeightdiffError(f"configuration leaves {', '.join(missing)} unset: give them, e.g. model_a=org/name")
    return cfg


if __name__ == "__main__":
    (ROOT / "params.yaml").write_text(OmegaConf.to_yaml(composed_conf(sys.argv[1:]), resolve=True))
    print(f"wrote {ROOT / 'params.yaml'}")
