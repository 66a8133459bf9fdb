"""Functions the tests share (fixtures are in conftest.py): building manifests and adapters the way the stages
do, and the whole-model references that layer-streamed validation is checked against."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


def local_manifest(dir_a: Path, dir_b: Path) -> dict:
    from weightdiff.download import manifest

    return manifest(OmegaConf.create({"model_a": str(dir_a), "model_b": str(dir_b)}))


def validated(manifest: dict, adapter_dir: Path, settings) -> dict:
    """validate()'s metrics for a pair given by its manifest, with the index built from it as the index stage does."""
    from weightdiff.index import build_index
    from weightdiff.validate import validate

    return validate(build_index(manifest), adapter_dir, settings)[0]


def peft_loaded(model, adapter_dir: Path, ignore: str | None = None):
    """`model` with the adapter through PEFT's own loader, failing on any warning PEFT gives about the adapter
    ("Found missing adapter keys", a tied layer not tied...) but the one `ignore` names."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # peft 0.21 itself reads transformers 5's deprecated property (pyproject's filterwarnings says so too)
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        if ignore:
            warnings.filterwarnings("ignore", message=ignore)
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)


def full_model_log_probs(model_dir: Path, tokens, adapter_dir: Path | None = None, ignore: str | None = None):
    """fp64 next-token log-probabilities of the whole model loaded in memory in fp32 (with the adapter through
    PEFT's own loader, which must not warn): the reference the layer-streamed validation must equal."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = peft_loaded(model, adapter_dir, ignore)
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


def run_extract(dir_a: Path, dir_b: Path, out: Path, cfg, **overrides):
    """(manifest, metrics, reports) of extracting the pair with the committed settings changed by `overrides`,
    resume store beside the adapter (.resume)."""
    from weightdiff.extract import extract
    from weightdiff.index import build_index
    from weightdiff.settings import updated

    manifest = local_manifest(dir_a, dir_b)
    metrics, reports, _ = extract(
        build_index(manifest), manifest, updated(cfg.extract, **overrides), out, out.parent / ".resume"
    )
    return manifest, metrics, reports


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a model directory whose weights went through edit(dict of tensors)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
