"""What extraction decomposes: the units of work chosen from the index by targets and options.

A unit is the set of tensors read together and turned into adapter entries together: a Linear's weight
(and bias) become LoRA factors, an embedding becomes lora_embedding_A/B, a module saved whole (a norm,
or an embedding/lm_head by choice) goes into PEFT's modules_to_save, and the experts of one MoE layer and
projection (one fused parameter in memory, whatever their form on disk) become one `target_parameters` entry.

Targets are named as transformers 5 holds the model in memory, which is what PEFT matches and keys: experts
fused into `mlp.experts.gate_up_proj` / `down_proj`, and without a checkpoint's `model.language_model.` prefix.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from weightdiff.adapter import is_target
from weightdiff.errors import WeightdiffError

log = logging.getLogger(__name__)
EXTRA_CHOICES = {"norms": ("skip", "save"), "biases": ("skip", "lora"), "embeddings": ("skip", "save", "lora"),
                 "lm_head": ("skip", "save", "lora")}
NAMED_TARGETS = ("auto", "all-linear")


@dataclass(frozen=True)
class Unit:
    kind: str  # linear | embedding | whole | measure | experts
    module: str  # for experts, the fused parameter (model.layers.0.mlp.experts.gate_up_proj)
    tensors: tuple[str, ...]  # the weight first, then a bias; for experts by expert, then part (gate, up)


@dataclass(frozen=True)
class ModelModules:
    """Module paths by type, as transformers builds the model (on the meta device: no memory)."""
    linear: frozenset[str]
    embedding: frozenset[str]
    output: str | None  # the LM head's path
    experts: tuple[str, ...] = ()  # fused expert parameters [E, out, in], in registration order
    rename: Callable[[str], tuple[str, int | None]] | None = None  # see checkpoint_renaming; not kept in the index

    def to_json(self) -> dict:
        return {"linear": sorted(self.linear), "embedding": sorted(self.embedding), "output": self.output,
                "experts": list(self.experts)}

    @classmethod
    def from_json(cls, data: dict) -> "ModelModules":
        return cls(frozenset(data["linear"]), frozenset(data["embedding"]), data["output"], tuple(data["experts"]))


def indexed_modules(entry: dict) -> ModelModules | None:
    """The module layout the index stage recorded, so that extraction (rerun for every rank of a sweep) never
    imports transformers' model code nor builds the model: ~3 s of start-up."""
    if "modules" not in entry:
        raise WeightdiffError(f"the index of {entry.get('path')} has no module layout (written by an older "
                              "weightdiff): rerun the index stage")
    return None if entry["modules"] is None else ModelModules.from_json(entry["modules"])


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
                        names.get(output) if output is not None else None,
                        expert_parameters(model), checkpoint_renaming(model))


def expert_parameters(model: torch.nn.Module) -> tuple[str, ...]:
    """Paths of the 3D parameters holding all experts of a layer, [E, out, in], in the order PEFT wraps them.

    PEFT nests one ParamWrapper per targeted parameter of a module in registration order, which decides the
    adapter keys. Layouts stored [E, in, out] (`is_transposed`) are left out: nothing targets them.
    """
    found = []
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.ndim == 3 and not isinstance(module, torch.nn.modules.conv._ConvNd):
                if getattr(module, "is_transposed", False):
                    log.warning("%s.%s stores experts as [E, in, out]: not supported, left out", path, name)
                else:
                    found.append(f"{path}.{name}")
    return tuple(found)


def checkpoint_renaming(model: torch.nn.Module) -> Callable[[str], tuple[str, int | None]]:
    """Checkpoint tensor name → (the parameter it loads into, its part there), by transformers' own rules.

    Per-expert tensors (mlp.experts.3.gate_proj.weight) load into the fused parameter (mlp.experts.gate_up_proj),
    part 0 for gate and 1 for up: the order transformers concatenates them in (MergeModulelist over experts,
    then Concatenate along the rows); plain renamings give part 0. Part is None for fusions of any other kind
    (a transpose, an interleave), which LoRA factors of the checkpoint's tensors cannot follow.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta = model.state_dict()

    def stacks_rows(c: WeightConverter) -> bool:
        ops = [(type(o), getattr(o, "dim", None)) for o in c.operations]
        return ops[:1] == [(MergeModulelist, 0)] and ops[1:] in ([], [(Concatenate, 1)])

    def rename(name: str) -> tuple[str, int | None]:
        renamed, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        if pattern is None:
            return renamed, 0
        converter = next(c for c in converters if pattern in c.source_patterns)
        return renamed, converter.source_patterns.index(pattern) if stacks_rows(converter) else None

    return rename


def in_memory(tensors: dict[str, dict], modules: ModelModules | None) -> dict[str, dict]:
    """The index entries with `module` named as in memory; expert tensors also get `param` and `part`.

    `param` is the fused expert parameter a tensor loads into, `part` its place there (0 gate, 1 up).
    Unknown architectures keep the checkpoint's names, and their experts stay out of reach.
    """
    if modules is None:
        return tensors
    out = {}
    for name, entry in tensors.items():
        renamed, part = modules.rename(name)
        if part is not None:  # else a fusion LoRA factors cannot follow: the checkpoint's name stands
            entry = entry | {"module": renamed.rpartition(".")[0]}
            if renamed in modules.experts:
                entry |= {"param": renamed, "part": part}
        out[name] = entry
    return out


def parameter_name(name: str, entry: dict) -> str:
    """The in-memory parameter a checkpoint tensor loads into: a layer's experts all load into one fused one."""
    return entry.get("param") or f"{entry['module']}.{name.rpartition('.')[2]}"


def fuse_experts(param: str, values: list[torch.Tensor], experts: list[int]) -> torch.Tensor:
    """Per-expert tensors as transformers fuses them on load: stacked by expert, each expert's parts (gate, up)
    concatenated along the rows. `values` come by expert, then part; a hole is an error naming the parameter."""
    count = max(experts) + 1
    parts = len(values) // count
    if experts != [e for e in range(count) for _ in range(parts)]:
        missing = sorted(set(range(count)) - set(experts))
        raise WeightdiffError(f"{param}: the checkpoint has {len(values)} expert tensors for {count} experts × "
                              f"{parts} parts; experts {missing[:5]} or some of their parts are missing")
    return torch.stack([torch.cat(values[e * parts:(e + 1) * parts]) for e in range(count)])


def selects(path: str, target_modules: list[str]) -> bool:
    """Whether a named target covers a module or parameter path: it names the path or one of its containers
    (PEFT's suffix rule on each), so `experts`, `self_attn` or `linear_attn` select what they hold."""
    while path:
        if is_target(path, target_modules):
            return True
        path = path.rpartition(".")[0]
    return False


def expert_units(experts: dict[str, dict], target_modules, order: tuple[str, ...]) -> list[Unit]:
    """One unit per fused expert parameter that the targets select (auto/all-linear: all of them)."""
    by_param = defaultdict(list)
    for name, entry in experts.items():
        by_param[entry["param"]].append(name)
    chosen = [p for p in order if p in by_param and (isinstance(target_modules, str) or selects(p, list(target_modules)))]
    return [Unit("experts", p, tuple(sorted(by_param[p], key=lambda n: (experts[n]["expert"] or 0, experts[n]["part"]))))
            for p in chosen]


def linear_targets(tensors: dict[str, dict], target_modules, modules: ModelModules | None,
                   expert_params: tuple[str, ...] = ()) -> list[str]:
    """Module paths of the Linear layers to decompose; `auto`/`all-linear` is every one but the LM head.

    A named target selects the linear layers it names or contains; one that names a module that is not a
    linear layer is an error. A list that selects only expert parameters selects no linear layer.
    """
    weights = {t["module"]: t for n, t in tensors.items() if n.endswith(".weight")}
    is_linear = (lambda m: m in modules.linear) if modules else (lambda m: len(weights[m]["shape"]) == 2)
    if isinstance(target_modules, str):
        if target_modules not in NAMED_TARGETS:
            raise WeightdiffError(f"extract.target_modules must be a list of module names or one of "
                                  f"{', '.join(NAMED_TARGETS)}, not {target_modules!r}")
        head = modules.output if modules else "lm_head"
        return [m for m in weights if is_linear(m) and m != head and not m.endswith(".lm_head")]
    named = [m for m in weights if is_target(m, list(target_modules))]
    chosen = [m for m in weights if m in named or (is_linear(m) and selects(m, list(target_modules)))]
    if not chosen and not any(selects(p, list(target_modules)) for p in expert_params):
        kinds = sorted({t["kind"] for t in weights.values() if len(t["shape"]) == 2} | {p.rpartition(".")[2] for p in expert_params})
        raise WeightdiffError(f"extract.target_modules={list(target_modules)} matches no weight of the model; "
                              f"modules with 2D weights and expert parameters are: {', '.join(kinds)}")
    not_linear = [m for m in named if not is_linear(m)]
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
    experts = {n: t for n, t in tensors.items() if "param" in t}
    tensors = {n: t for n, t in tensors.items() if "param" not in t}
    targets = set(linear_targets(tensors, settings.target_modules, modules, tuple(t["param"] for t in experts.values())))
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
    return plan + expert_units(experts, settings.target_modules, modules.experts if modules else ())
