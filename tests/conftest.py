"""Shared fixtures (helpers.py has the shared functions): one tiny real model pair per test session, built the
way the demo stage builds it, and the real SmolLM2-135M-Instruct (converted once per session) with the default
demo pair built from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import REPO
from weightdiff import demo
from weightdiff.config import run_config
from weightdiff.settings import Settings, updated

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session")
def cfg() -> Settings:
    """The committed pipeline configuration (params.yaml)."""
    return run_config(params=REPO / "params.yaml")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, cfg) -> tuple[Path, Path]:
    """Two real LoRA r=8 fine-tunes of one tiny Llama, merged, saved in bf16 (demo.pair=tiny)."""
    return demo.make_pair(tmp_path_factory.mktemp("pair") / "demo", updated(cfg.demo, pair="tiny"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (bf16), converted once per session (~25 s)."""
    from weightdiff import pretrained

    return pretrained.smollm2(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """A session-wide HF_HUB_CACHE: the DVC tests run the pipeline with it, and find the demo pair built there."""
    return tmp_path_factory.mktemp("hub_cache")


@pytest.fixture(scope="session")
def smollm2_pair(hub_cache, cfg, smollm2_dir) -> tuple[Path, Path]:
    """The default demo pair with the committed settings (demo.pair=smollm2): A = SmolLM2-135M-Instruct,
    B = A after the demo's LoRA fine-tune, merged. Built where the download stage looks for it in hub_cache,
    with A copied from smollm2_dir rather than converted again."""
    from weightdiff.download import demo_key

    assert cfg.demo.pair == "smollm2", "the committed demo pair is the real one"
    return demo.make_pair(hub_cache / "weightdiff-demo" / demo_key(cfg.demo), cfg.demo, base=smollm2_dir)
