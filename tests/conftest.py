"""Shared fixtures: one tiny real model pair per test session, built the way the demo stage builds it, and the
real SmolLM2-135M-Instruct (converted once per session) with the default demo pair built from it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

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
    """Two real LoRA r=8 fine-tunes of one tiny Llama, merged, saved in bf16 (demo.pair=tiny)."""
    settings = OmegaConf.merge(cfg.demo, {"pair": "tiny"})
    return demo.make_pair(tmp_path_factory.mktemp("pair") / "demo", settings)


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


def local_manifest(dir_a: Path, dir_b: Path) -> dict:
    from weightdiff.download import manifest

    return manifest(OmegaConf.create({"model_a": str(dir_a), "model_b": str(dir_b)}))


def validated(manifest: dict, adapter_dir: Path, settings) -> dict:
    """validate()'s metrics for a pair given by its manifest, with the index built from it as the index stage does."""
    from weightdiff.index import build_index
    from weightdiff.validate import validate

    return validate(build_index(manifest), adapter_dir, settings)[0]


def full_model_log_probs(model_dir: Path, tokens, adapter_dir: Path | None = None):
    """fp64 next-token log-probabilities of the whole model loaded in memory in fp32 (with the adapter through
    PEFT's own loader): the reference the layer-streamed validation must equal."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=tokens).logits.double(), dim=-1)


def kl_per_token(target, approx) -> float:
    """Mean over tokens of KL(target ‖ approx), both given as log-probabilities."""
    return (target.exp() * (target - approx)).sum(-1).mean().item()


def top1_agreement(target, approx) -> float:
    return (target.argmax(-1) == approx.argmax(-1)).float().mean().item()


def assert_streamed_equals_in_memory(manifest: dict, adapter_dir: Path, settings, rel: float = 1e-6) -> dict:
    """validate's layer-streamed KLs equal those of the whole models in memory on the same tokens; its metrics."""
    import json

    import pytest

    from weightdiff.evalset import evaluation_batch

    metrics = validated(manifest, adapter_dir, settings)
    dir_a, dir_b = (Path(manifest[side]["path"]) for side in ("model_a", "model_b"))
    tokens, _ = evaluation_batch(dir_a, json.loads((dir_a / "config.json").read_text())["vocab_size"], settings)
    target = full_model_log_probs(dir_b, tokens)
    adapted, base = full_model_log_probs(dir_a, tokens, adapter_dir), full_model_log_probs(dir_a, tokens)
    assert metrics["kl_adapted"] == pytest.approx(kl_per_token(target, adapted), rel=rel)
    assert metrics["kl_base"] == pytest.approx(kl_per_token(target, base), rel=rel)
    assert metrics["top1_adapted"] == pytest.approx(top1_agreement(target, adapted), abs=1e-9)
    assert metrics["tokens"] == tokens.numel()
    return metrics
