"""Shared fixtures: one tiny real model pair per test session, built the way the demo stage builds it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from weightdiff import demo
from weightdiff.config import run_config

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session")
def cfg() -> DictConfig:
    """The committed pipeline configuration (params.yaml)."""
    return run_config(params=REPO / "params.yaml")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, cfg) -> tuple[Path, Path]:
    """Two real LoRA r=8 fine-tunes of one tiny Llama, merged, saved in bf16."""
    return demo.make_pair(tmp_path_factory.mktemp("pair") / "demo", cfg.demo)


def local_manifest(dir_a: Path, dir_b: Path) -> dict:
    from weightdiff.download import manifest
    from omegaconf import OmegaConf

    return manifest(OmegaConf.create({"model_a": str(dir_a), "model_b": str(dir_b)}))
