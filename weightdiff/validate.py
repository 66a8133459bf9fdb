"""Does A + adapter behave like B? Next-token distributions of A, A + adapter and B, teacher-forced on real text.

Both models run a decoder layer at a time (weightdiff.layerwise), so a 35B pair validates in the memory of one
layer. The adapter goes through PEFT, as users will load it: PEFT wraps A's layers and its LoRA layers compute
the A + adapter stream. Any key PEFT expects but the file lacks (the adapter silently stays zero there) or any
key in the file PEFT does not use (dropped silently) is an error, not a warning.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from weightdiff.errors import WeightdiffError
from weightdiff.evalset import evaluation_batch
from weightdiff.fidelity import NextTokenComparison, relative_error
from weightdiff.layerwise import CheckpointWeights, LayerwiseModel, assign, base_parameters, skeleton, tied_aliases
from weightdiff.settings import ValidateSettings

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ADAPTER_FILE = "adapter_model.safetensors"


def key_mismatches(model: PeftModel, adapter_dir: Path) -> tuple[list[str], list[str]]:
    """(keys PEFT expects that the file lacks, keys in the file PEFT has no place for)."""
    # save_embedding_layers=False: PEFT would otherwise expect the base embedding/lm_head weights of a
    # LoRA-targeted embedding, which it saves for resized vocabularies but never needs to load.
    # Only the keys are used here: PEFT's check for unsharded ZeRO-3 tensors, run on every state dict it builds,
    # takes the 1-D lora_B.bias of lora_bias for one and warns about a file it is not saving.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        expected = set(get_peft_model_state_dict(model, save_embedding_layers=False).keys())
    with safe_open(str(adapter_dir / ADAPTER_FILE), framework="pt") as f:
        present = set(f.keys())
    return sorted(expected - present), sorted(present - expected)


def adapted(config: dict, adapter_dir: Path, dtype: torch.dtype, device: str) -> PeftModel:
    """A's skeleton wrapped by PEFT from the adapter's own config, refused if PEFT would not load the adapter as
    written, then loaded by PEFT's own loader in `dtype` on `device` (as PEFT holds it on a model there).

    PEFT moves adapter weights to the device of the weights they wrap, the meta device here: while it loads, the
    base weights are stood in for by tensors on `device` that cost no memory (one zero, expanded to the shape).
    """
    model = PeftModel(skeleton(config, dtype), PeftConfig.from_pretrained(str(adapter_dir)), low_cpu_mem_usage=True)
    missing, unexpected = key_mismatches(model, adapter_dir)
    if missing or unexpected:
        raise WeightdiffError(
            f"{adapter_dir}: PEFT does not load this adapter as written: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    state = {k: v.to(device, dtype) for k, v in load_file(str(adapter_dir / ADAPTER_FILE)).items()}
    skeleton_weights = base_parameters(model)
    assign(
        model, {n: torch.zeros((), dtype=p.dtype, device=device).expand(p.shape) for n, p in skeleton_weights.items()}
    )
    try:
        set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    finally:
        assign(model, skeleton_weights)
    return model.eval()


@contextmanager
def adapters_enabled(module: torch.nn.Module, enabled: bool):
    """The PEFT layers inside `module` on or off, for one stream's run of it (PEFT's own switch, per layer:
    PeftModel.disable_adapter would walk the whole model, and find nothing where stand-ins are)."""
    switches = [m for m in module.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    for m in switches:
        m.enable_adapters(enabled)
    try:
        yield
    finally:
        for m in switches:
            m.enable_adapters(True)


def layerwise(
    entry: dict, model: torch.nn.Module, settings: ValidateSettings, dtype: torch.dtype, streams
) -> LayerwiseModel:
    weights = CheckpointWeights(
        Path(entry["path"]), entry["tensors"], dtype, settings.device, tied_aliases(model, entry["tensors"])
    )
    return LayerwiseModel(model, weights, streams)


@torch.no_grad()
def validate(index: dict, adapter_dir: Path, settings: ValidateSettings) -> tuple[dict, list[dict]]:
    """(metrics, per-layer relative error of the A + adapter and the A hidden states against B's)."""
    dtype = DTYPES[settings.dtype]
    peft_model = adapted(index["model_a"]["config"], adapter_dir, dtype, settings.device)
    a = layerwise(
        index["model_a"],
        peft_model.get_base_model(),
        settings,
        dtype,
        {"base": lambda m: adapters_enabled(m, False), "adapted": lambda m: nullcontext()},
    )
    b = layerwise(
        index["model_b"], skeleton(index["model_b"]["config"], dtype), settings, dtype, {"b": lambda m: nullcontext()}
    )
    tokens, texts = evaluation_batch(Path(index["model_a"]["path"]), min(a.vocab_size, b.vocab_size), settings)
    log.info(
        "validating on %d tokens (%s) in %s on %s, both models a decoder layer at a time",
        tokens.numel(),
        texts,
        settings.dtype,
        settings.device,
    )
    hidden_a, hidden_b = a.start(a.embed(tokens)), b.start(b.embed(tokens))
    layers = []
    for i in tqdm(range(len(a.layers)), desc="validate", unit="layer", leave=False):
        hidden_a, hidden_b = a.layer(i, hidden_a), b.layer(i, hidden_b)
        layers.append(
            {
                "layer": i,
                "rel_error_adapted": relative_error(hidden_a["adapted"], hidden_b["b"]),
                "rel_error_base": relative_error(hidden_a["base"], hidden_b["b"]),
            }
        )
    comparison = NextTokenComparison(tokens.numel(), ("adapted", "base"))
    for (offset, logits), (_, logits_b) in zip(a.logits(a.finish(hidden_a)), b.logits(b.finish(hidden_b)), strict=True):
        comparison.add(offset, logits_b["b"], logits)
    return fidelity_metrics(comparison, texts, settings), layers


def fidelity_metrics(comparison: NextTokenComparison, texts: str, settings: ValidateSettings) -> dict:
    with_adapter, base = comparison.result("adapted"), comparison.result("base")
    confident = comparison.confident()
    kl_adapted, kl_base = with_adapter.kl.mean().item(), base.kl.mean().item()
    return {
        "kl_adapted": kl_adapted,
        "kl_base": kl_base,
        "gap_closed": 1.0 - kl_adapted / kl_base if kl_base > 0 else None,
        "top1_adapted": with_adapter.top1.float().mean().item(),
        "top1_base": base.top1.float().mean().item(),
        "top1_adapted_confident": with_adapter.top1[confident].float().mean().item() if confident.any() else None,
        "confident_tokens": int(confident.sum()),
        "tokens": int(with_adapter.kl.numel()),
        "texts": texts,
        "dtype": settings.dtype,
    }
