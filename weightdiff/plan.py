"""What extraction does with each tensor: the units of work, chosen from the index by the targets and extras.

A unit is the set of tensors read together and turned into adapter entries together, and its `action` is the
word the config, the plan and the reports share:
  lora            a Linear's weight (and bias, as lora_B.bias) → LoRA factors
  lora_embedding  an embedding table → lora_embedding_A/B
  lora_experts    the experts of one MoE layer and projection (one fused parameter in memory, whatever their
                  form on disk) → one `target_parameters` entry
  save            a module kept whole (a norm, or an embedding/LM head by choice) → modules_to_save
  skip            left out, but measured: the reports say how big a delta the adapter leaves out

Targets are named as transformers 5 holds the model in memory, which is what PEFT matches and keys: experts
fused into `mlp.experts.gate_up_proj` / `down_proj`, and without a checkpoint's `model.language_model.` prefix.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from weightdiff.errors import WeightdiffError
from weightdiff.layout import ModelModules
from weightdiff.peft_format import is_target
from weightdiff.records import Action
from weightdiff.settings import ExtractSettings


@dataclass(frozen=True)
class Unit:
    action: Action
    module: str  # for lora_experts, the fused parameter (model.layers.0.mlp.experts.gate_up_proj)
    tensors: tuple[str, ...]  # the weight first, then a bias; for experts by expert, then part (gate, up)

    @property
    def id(self) -> str:
        """What names the unit in the resume store."""
        return self.module + ":" + ",".join(self.tensors)


def selects(path: str, target_modules: list[str]) -> bool:
    """Whether a named target covers a module or parameter path: it names the path or one of its containers
    (PEFT's suffix rule on each), so `experts`, `self_attn` or `linear_attn` select what they hold."""
    while path:
        if is_target(path, target_modules):
            return True
        path = path.rpartition(".")[0]
    return False


def expert_units(experts: dict[str, dict], target_modules: str | list[str], order: tuple[str, ...]) -> list[Unit]:
    """One unit per fused expert parameter that the targets select (auto/all-linear: all of them)."""
    by_param = defaultdict(list)
    for name, entry in experts.items():
        by_param[entry["param"]].append(name)
    chosen = [p for p in order if p in by_param and (isinstance(target_modules, str) or selects(p, target_modules))]
    return [
        Unit(
            "lora_experts", p, tuple(sorted(by_param[p], key=lambda n: (experts[n]["expert"] or 0, experts[n]["part"])))
        )
        for p in chosen
    ]


def linear_targets(
    tensors: dict[str, dict],
    target_modules: str | list[str],
    modules: ModelModules,
    expert_params: tuple[str, ...] = (),
) -> list[str]:
    """Module paths of the Linear layers to decompose; `auto`/`all-linear` is every one but the LM head.

    A named target selects the linear layers it names or contains; one that names a module that is not a
    linear layer is an error. A list that selects only expert parameters selects no linear layer.
    """
    weights = {t["module"]: t for n, t in tensors.items() if n.endswith(".weight")}
    if isinstance(target_modules, str):
        return [m for m in weights if m in modules.linear and m != modules.output and not m.endswith(".lm_head")]
    named = [m for m in weights if is_target(m, target_modules)]
    chosen = [m for m in weights if m in named or (m in modules.linear and selects(m, target_modules))]
    if not chosen and not any(selects(p, target_modules) for p in expert_params):
        types = sorted(
            {t["module_type"] for t in weights.values() if len(t["shape"]) == 2}
            | {p.rpartition(".")[2] for p in expert_params}
        )
        raise WeightdiffError(
            f"extract.target_modules={target_modules} matches no weight of the model; "
            f"modules with 2D weights and expert parameters are: {', '.join(types)}"
        )
    not_linear = [m for m in named if m not in modules.linear]
    if not_linear:
        raise WeightdiffError(
            f"extract.target_modules={target_modules} selects modules that are not linear "
            f"layers, which LoRA factors cannot express: {', '.join(not_linear[:5])} "
            "(see extract.extras for embeddings and norms)"
        )
    return chosen


def extra_of(name: str, entry: dict, modules: ModelModules) -> str | None:
    """Which extract.extras key governs a tensor that no target covers (None: an untargeted linear layer)."""
    module = entry["module"]
    if module == modules.output or module.rpartition(".")[2] == "lm_head":
        return "lm_head"
    if module in modules.embedding:
        return "embeddings"
    if len(entry["shape"]) == 1:
        return "biases" if name.endswith(".bias") else "norms"
    return None


def plan_units(tensors: dict[str, dict], settings: ExtractSettings, modules: ModelModules) -> list[Unit]:
    """The work, in checkpoint order: targets to decompose, extras to save, decompose or measure; experts last."""
    extras = settings.extras
    lora_bias = extras.biases == "lora"
    experts = {n: t for n, t in tensors.items() if "param" in t}
    tensors = {n: t for n, t in tensors.items() if "param" not in t}
    targets = set(
        linear_targets(tensors, settings.target_modules, modules, tuple(t["param"] for t in experts.values()))
    )
    if extras.lm_head == "lora":
        targets |= {
            t["module"] for n, t in tensors.items() if extra_of(n, t, modules) == "lm_head" and n.endswith(".weight")
        }
    plan = []
    for name, entry in tensors.items():
        module, is_weight = entry["module"], name.endswith(".weight")
        bias = f"{module}.bias"
        with_bias = (name, bias) if bias in tensors else (name,)
        if module in targets:
            if is_weight:
                plan.append(Unit("lora", module, with_bias if lora_bias else (name,)))
            elif not lora_bias:
                plan.append(Unit("skip", module, (name,)))
            continue
        extra = extra_of(name, entry, modules)
        choice = getattr(extras, extra) if extra else None
        if choice == "lora" and is_weight:
            plan.append(Unit("lora_embedding", module, (name,)))
        elif choice == "save" and is_weight:
            plan.append(Unit("save", module, with_bias))
        elif choice == "skip":
            plan.append(Unit("skip", module, (name,)))
    return plan + expert_units(experts, settings.target_modules, modules.experts)
