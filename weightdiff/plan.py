"""What extraction decomposes: the units of work chosen from the index by targets and options.

A unit is the set of tensors read together and turned into adapter entries together: a Linear's weight
(and bias) become LoRA factors, an embedding becomes lora_embedding_A/B, and a module saved whole (a norm,
or an embedding/lm_head by choice) goes into PEFT's modules_to_save.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from weightdiff.adapter import is_target
from weightdiff.errors import WeightdiffError

log = logging.getLogger(__name__)
EXTRA_CHOICES = {"norms": ("skip", "save"), "biases": ("skip", "lora"), "embeddings": ("skip", "save", "lora"),
                 "lm_head": ("skip", "save", "lora")}
NAMED_TARGETS = ("auto", "all-linear")


@dataclass(frozen=True)
class Unit:
    kind: str  # linear | embedding | whole
    module: str
    tensors: tuple[str, ...]  # the weight first, then a bias when the unit carries one


@dataclass(frozen=True)
class ModelModules:
    """Module paths by type, as transformers builds the model (on the meta device: no memory)."""
    linear: frozenset[str]
    embedding: frozenset[str]
    output: str | None  # the LM head's path


def model_modules(config: dict) -> ModelModules | None:
    """None when transformers cannot build the architecture; then 2D weights are taken as linear layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # unknown model_type, remote code...: fall back to the checkpoint's shapes
        log.warning("transformers cannot build %s (%s): taking every 2D .weight as a linear layer",
                    config.get("model_type"), e)
        return None
    names = {m: n for n, m in model.named_modules()}
    output = model.get_output_embeddings()
    return ModelModules(frozenset(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)),
                        frozenset(n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)),
                        names.get(output) if output is not None else None)


def linear_targets(tensors: dict[str, dict], target_modules, modules: ModelModules | None) -> list[str]:
    """Module paths of the Linear layers to decompose; `auto`/`all-linear` is every one but the LM head."""
    weights = {t["module"]: t for n, t in tensors.items() if n.endswith(".weight")}
    is_linear = (lambda m: m in modules.linear) if modules else (lambda m: len(weights[m]["shape"]) == 2)
    if isinstance(target_modules, str):
        if target_modules not in NAMED_TARGETS:
            raise WeightdiffError(f"extract.target_modules must be a list of module names or one of "
                                  f"{', '.join(NAMED_TARGETS)}, not {target_modules!r}")
        head = modules.output if modules else "lm_head"
        return [m for m in weights if is_linear(m) and m != head and not m.endswith(".lm_head")]
    chosen = [m for m in weights if is_target(m, list(target_modules))]
    if not chosen:
        kinds = sorted({t["kind"] for t in weights.values() if len(t["shape"]) == 2})
        raise WeightdiffError(f"extract.target_modules={list(target_modules)} matches no weight of the model; "
                              f"modules with 2D weights are: {', '.join(kinds)}")
    not_linear = [m for m in chosen if not is_linear(m)]
    if not_linear:
        raise WeightdiffError(f"extract.target_modules={list(target_modules)} selects modules that are not linear "
                              f"layers, which LoRA factors cannot express: {', '.join(not_linear[:5])} "
                              "(see extract.extras for embeddings and norms)")
    return chosen


def extra_kind(name: str, entry: dict, modules: ModelModules | None) -> str | None:
    """Which extras option governs a tensor that no target covers (None: an untargeted linear layer)."""
    module = entry["module"]
    if (modules and module == modules.output) or module.rpartition(".")[2] == "lm_head":
        return "lm_head"
    if (module in modules.embedding) if modules else ("embed" in module):
        return "embeddings"
    if len(entry["shape"]) == 1:
        return "biases" if name.endswith(".bias") else "norms"
    return None


def units(tensors: dict[str, dict], settings, modules: ModelModules | None) -> list[Unit]:
    """The work, in checkpoint order: targets to decompose, extras to save or decompose, extras to measure.

    Skipped extras still get a `measure` unit: the stats say how big a delta the adapter leaves out.
    """
    extras = {k: settings.get("extras", {}).get(k, "skip") for k in EXTRA_CHOICES}
    for k, v in extras.items():
        if v not in EXTRA_CHOICES[k]:
            raise WeightdiffError(f"extract.extras.{k} must be one of {', '.join(EXTRA_CHOICES[k])}, not {v!r}")
    if extras["biases"] == "lora" and extras["embeddings"] == "lora":
        raise WeightdiffError("extract.extras: PEFT's lora_bias (biases=lora) does not support Embedding layers; "
                              "with biases=lora use embeddings=save or skip")
    targets = set(linear_targets(tensors, settings.target_modules, modules))
    if extras["lm_head"] == "lora":
        targets |= {t["module"] for n, t in tensors.items() if extra_kind(n, t, modules) == "lm_head" and n.endswith(".weight")}
    plan = []
    for name, entry in tensors.items():
        module, is_weight = entry["module"], name.endswith(".weight")
        bias = f"{module}.bias"
        if module in targets:
            if is_weight:
                plan.append(Unit("linear", module, (name, bias) if extras["biases"] == "lora" and bias in tensors else (name,)))
            elif extras["biases"] != "lora":
                plan.append(Unit("measure", module, (name,)))
            continue
        kind = extra_kind(name, entry, modules)
        choice = extras[kind] if kind else None
        if choice == "lora" and is_weight:
            plan.append(Unit("embedding", module, (name,)))
        elif choice == "save" and is_weight:
            plan.append(Unit("whole", module, (name, bias) if bias in tensors else (name,)))
        elif choice == "skip":
            plan.append(Unit("measure", module, (name,)))
    return plan
