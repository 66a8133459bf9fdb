"""What extraction does with each tensor: the units of work, chosen from the index by the targets and extras.

A unit is the set of tensors read together and turned into adapter entries together, and its `action` is the
word the config, the plan and the reports share:
  lora            a Linear's weight (and bias, as lora_B.bias) → LoRA factors
  lora_embedding  an embedding table → lora_embedding_A/B
  lora_experts    the experts of one MoE layer and projection (one fused parameter in memory, whatever their
                  form on disk) → one `target_parameters` entry
  save            a module kept whole (a norm, or an embedding/LM head by choice) → modules_to_save
  skip            left out, but measured, with the reason: the reports say how big a delta the adapter leaves out

Every tensor of the checkpoint is in one unit, so that what the adapter leaves out is measured against the whole
model's ‖ΔW‖². A tied LM head has no unit of its own: it is the embedding's table, and the embedding's unit writes
the head's entries too (`tied`).

Targets are named as transformers 5 holds the model in memory, which is what PEFT matches and keys: experts
fused into `mlp.experts.gate_up_proj` / `down_proj`, and without a checkpoint's `model.language_model.` prefix.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from weightdiff.errors import WeightdiffError
from weightdiff.layout import ModelModules
from weightdiff.peft_format import TIEABLE_EMBEDDINGS, is_target
from weightdiff.records import Action
from weightdiff.settings import ExtractSettings

# Why the serving profile leaves each kind of extra out: what LoRA servers (vLLM) refuse or no longer apply.
SERVING_DROPS = {
    "norms": "extract.profile=serving: LoRA servers (vLLM) refuse modules_to_save",
    "biases": "extract.profile=serving: LoRA servers do not apply lora_bias",
    "embeddings": "extract.profile=serving: current vLLM applies no embedding LoRA",
    "lm_head": "extract.profile=serving: vLLM refuses lm_head weights",
}
NOT_TARGETED = "not in extract.target_modules"
INSIDE_MODULE = "a parameter beside submodules: PEFT saves only whole modules (modules_to_save), submodules included"
NO_FORM = "not a linear layer, embedding or norm: no form PEFT loads (a router, a convolution...)"
UNTIEABLE = "tied to the LM head, and PEFT ties an adapter only to an embedding named embed_tokens"
BESIDE_EXPERTS = (
    "a parameter beside the fused experts (gpt-oss's expert biases): PEFT's target_parameters LoRA takes no "
    "lora_bias, and modules_to_save would save every expert whole"
)


@dataclass(frozen=True)
class Unit:
    action: Action
    module: str  # for lora_experts, the fused parameter (model.layers.0.mlp.experts.gate_up_proj)
    tensors: tuple[str, ...]  # the weight first, then a bias; for experts by expert, then part (gate, up)
    tied: str | None = None  # a tied embedding's lora_embedding or save: the LM head that shares its table
    reason: str | None = None  # skip: why the adapter leaves the tensors out
    transposed: bool = False  # lora_experts: the parameter is stored [E, in, out] (gpt-oss), not [E, out, in]

    @property
    def id(self) -> str:
        """What names the unit in the resume store (a tied unit's result holds the head's entries too)."""
        own = self.module + ":" + ",".join(self.tensors)
        return f"{own}>{self.tied}" if self.tied else own


def selects(path: str, target_modules: list[str]) -> bool:
    """Whether a named target covers a module or parameter path: it names the path or one of its containers
    (PEFT's suffix rule on each), so `experts`, `self_attn` or `linear_attn` select what they hold."""
    while path:
        if is_target(path, target_modules):
            return True
        path = path.rpartition(".")[0]
    return False


def extra_choice(settings: ExtractSettings, kind: str) -> tuple[str, str]:
    """(what becomes of an extract.extras kind, why it is left out when that is skip): the configured choice, or
    skip under profile=serving."""
    if settings.profile == "serving":
        return "skip", SERVING_DROPS[kind]
    return str(getattr(settings.extras, kind)), f"extract.extras.{kind}=skip"


def expert_units(experts: dict[str, dict], target_modules: str | list[str], modules: ModelModules) -> list[Unit]:
    """One unit per fused expert parameter, with its orientation: decomposed when the targets select it
    (auto/all-linear: all), else measured and left out."""
    by_param = defaultdict(list)
    for name, entry in experts.items():
        by_param[entry["param"]].append(name)
    units = []
    for p in (p for p in modules.experts if p in by_param):
        names = tuple(sorted(by_param[p], key=lambda n: (experts[n]["expert"] or 0, experts[n]["part"])))
        if isinstance(target_modules, str) or selects(p, target_modules):
            units.append(Unit("lora_experts", p, names, transposed=p in modules.transposed))
        else:
            units.append(Unit("skip", p, names, reason=NOT_TARGETED))
    return units


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
        return [m for m in weights if m in modules.linear and not is_head(m, modules)]
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


def is_head(module: str, modules: ModelModules) -> bool:
    """The LM head, as transformers names it, or by its usual name where the layout was guessed from shapes."""
    return module == modules.output or module.rpartition(".")[2] == "lm_head"


def lora_targets(
    tensors: dict[str, dict], settings: ExtractSettings, modules: ModelModules, expert_params: tuple[str, ...]
) -> set[str]:
    """The linear layers to decompose: the targets, and an untied LM head under extras.lm_head=lora; never the
    head under profile=serving, nor a tied head (the embedding's unit carries it)."""
    targets = set(linear_targets(tensors, settings.target_modules, modules, expert_params))
    heads = {t["module"] for t in tensors.values() if is_head(t["module"], modules)}
    if modules.tied or extra_choice(settings, "lm_head")[0] != "lora":
        return targets - heads
    return targets | heads


def module_units(
    module: str, names: list[str], tensors: dict[str, dict], settings: ExtractSettings, modules: ModelModules
) -> list[Unit]:
    """The units of one module's tensors (weight and bias, or a norm's): what its kind and the extras make of it."""
    if module in modules.embedding:
        return embedding_units(module, names, settings, modules)
    if is_head(module, modules):  # not a LoRA target here
        # a tied head is the embedding's own table (a copy on disk, if any): the embedding's unit covers it
        return [] if modules.tied else extra_units("lm_head", module, names, settings)
    if module not in modules.linear and all(len(tensors[n]["shape"]) == 1 for n in names):
        return extra_units("norms", module, names, settings)
    return [Unit("skip", module, tuple(names), reason=NOT_TARGETED if module in modules.linear else NO_FORM)]


def target_units(module: str, names: list[str], settings: ExtractSettings) -> list[Unit]:
    """A LoRA target's weight, with its bias under extras.biases=lora (lora_B.bias, if PEFT can take it: see
    extract), else the bias measured and left out."""
    (weight,) = (n for n in names if n.endswith(".weight"))
    bias = tuple(n for n in names if n != weight)  # a Linear holds a weight and at most a bias
    choice, reason = extra_choice(settings, "biases")
    if choice == "lora" or not bias:
        return [Unit("lora", module, (weight, *bias))]
    return [Unit("lora", module, (weight,)), Unit("skip", module, bias, reason=reason)]


def embedding_units(module: str, names: list[str], settings: ExtractSettings, modules: ModelModules) -> list[Unit]:
    """An embedding table by extras.embeddings; a tied one carries the LM head along (PEFT's ensure_weight_tying),
    which PEFT can only do for an embedding named embed_tokens: any other tied one is left out whole rather than
    changed on the input side alone."""
    head = modules.output if modules.tied == module else None
    if head is not None and module.rpartition(".")[2] not in TIEABLE_EMBEDDINGS:
        return [Unit("skip", module, tuple(names), reason=UNTIEABLE)]
    return extra_units("embeddings", module, names, settings, tied=head)


def extra_units(
    kind: str, module: str, names: list[str], settings: ExtractSettings, tied: str | None = None
) -> list[Unit]:
    """A module that is not a LoRA target, by its extract.extras choice: decomposed (an embedding), saved, or
    measured and left out."""
    choice, reason = extra_choice(settings, kind)
    if choice == "lora":
        return [Unit("lora_embedding", module, tuple(names), tied=tied)]
    if choice == "save":
        return [Unit("save", module, tuple(names), tied=tied)]
    return [Unit("skip", module, tuple(names), reason=reason)]


def plan_units(tensors: dict[str, dict], settings: ExtractSettings, modules: ModelModules) -> list[Unit]:
    """The work, module by module in checkpoint order: targets to decompose, extras to decompose, save or measure,
    and everything else measured and left out; experts last."""
    experts = {n: t for n, t in tensors.items() if "param" in t}
    tensors = {n: t for n, t in tensors.items() if "param" not in t}
    targets = lora_targets(tensors, settings, modules, tuple(t["param"] for t in experts.values()))
    by_module: dict[str, list[str]] = defaultdict(list)
    for name, entry in tensors.items():
        by_module[entry["module"]].append(name)
    containers = {m.rsplit(".", k)[0] for m in by_module for k in range(1, m.count(".") + 1)}
    owners = {p.rpartition(".")[0] for p in modules.experts}
    plan = []
    for module, names in by_module.items():
        if module in targets:
            plan += target_units(module, names, settings)
        elif module in owners:
            plan.append(Unit("skip", module, tuple(names), reason=BESIDE_EXPERTS))
        elif module in containers:  # its own parameters (A_log, dt_bias) sit beside submodules with tensors
            plan.append(Unit("skip", module, tuple(names), reason=INSIDE_MODULE))
        else:
            plan += module_units(module, names, tensors, settings, modules)
    return plan + expert_units(experts, settings.target_modules, modules)
