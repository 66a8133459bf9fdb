"""PEFT's LoRA adapter format: key names, PEFT's matching rules, adapter_config.json, writing the adapter."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from weightdiff.errors import WeightdiffError
from weightdiff.files import fresh_directory, write_atomic
from weightdiff.layout import parameter_name, within_layer

PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROVENANCE_FILE = "weightdiff_provenance.json"  # beside adapter_config.json: see write_adapter


def is_target(path: str, names: list[str]) -> bool:
    """PEFT's rule for a list of names (target_modules, target_parameters): the path equals one or ends with
    '.' + one."""
    return any(path == t or path.endswith("." + t) for t in names)


def exact_pattern(module: str) -> str:
    """A rank_pattern/alpha_pattern key that PEFT's `(.*\\.)?(key)$` match (`pattern_value`) applies to this
    module path only."""
    return re.escape(module)


def rank_and_scaling(module: str, adapter_config: dict) -> tuple[int, float]:
    """The rank and the factor PEFT multiplies ``B @ A`` by for this module.

    ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha`` per module, keys tried in
    order as PEFT does; rsLoRA divides by ``sqrt(r)`` instead of ``r``.
    """
    rank = pattern_value(adapter_config.get("rank_pattern") or {}, module, adapter_config["r"])
    alpha = pattern_value(adapter_config.get("alpha_pattern") or {}, module, adapter_config["lora_alpha"])
    divisor = math.sqrt(rank) if adapter_config.get("use_rslora") else rank
    return int(rank), float(alpha) / divisor


def pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """The value of the first rank_pattern/alpha_pattern key that matches `module` as PEFT matches it, else
    `default`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


# PEFT's rules and quirks that decide adapter_config's target fields (read from peft 0.21's tuners/lora and
# utils/transformers_weight_conversion; tests/test_moe.py and test_roundtrip.py fail when a release changes them):
#   rule                                                   | what we write
#   every module a target_modules name matches is wrapped, | the names when they match exactly the modules with
#     one without factors loads as missing keys            |   factors, else a regex of those paths
#   on fused-experts models (qwen2_moe/mixtral family) a   | the full paths of the modules with factors
#     regex resolves to the leaf names it matches          |
#   on those models gate/gate_proj/up_proj/down_proj/w1-3  | linear layers of those names by weight path in
#     in target_modules are moved to target_parameters     |   target_parameters (PEFT adapts them the same way)
#   target_parameters entries match by the suffix rule     | per-layer names when exact, else full paths
#   a tied embedding (tie_word_embeddings) in the adapter  | ensure_weight_tying: PEFT then gives the LM head a
#     warns unless ensure_weight_tying, which ties only    |   LoRA (or a saved copy) tied to the embedding's; the
#     embeddings named embed_tokens, found in a regex      |   head's rank in rank_pattern, its keys in the file;
#     target_modules by its bare name                      |   in a regex, the embedding also by its bare name
PEFT_REMAPPED = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})
TIEABLE_EMBEDDINGS = frozenset({"embed_tokens"})  # peft.utils.constants.EMBEDDING_LAYER_NAMES less lm_head


def lora_keys(module: str) -> tuple[str, str]:
    """(A key, B key) as PEFT saves them: with `.weight` and without the adapter name, which PEFT inserts on load."""
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def lora_bias_key(module: str) -> str:
    """lora_B's bias (PEFT's lora_bias): where a target layer's Δb goes."""
    return f"{PREFIX}{module}.lora_B.bias"


def embedding_keys(module: str) -> tuple[str, str]:
    """(A key, B key) of an Embedding's LoRA: parameters, not modules, so no `.weight`."""
    return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"


def saved_key(parameter: str) -> str:
    """A modules_to_save tensor (B's own weight) under its in-memory parameter path."""
    return f"{PREFIX}{parameter}"


def parameter_key(param: str, part: str) -> str:
    """The key decomposition writes for a fused parameter's factors (part: lora_A or lora_B); `peft_keys`
    turns it into PEFT's, which depends on the other parameters of the module that end up with factors."""
    return f"{PREFIX}{param}.{part}.weight"


def wrapper_layout(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A [r·E, in], lora_B [out, r·E]) from per-expert B [E, out, r] and A [E, r, in], as ParamWrapper reads
    them: expert e's rows of lora_A at e·r:(e+1)·r, its columns of lora_B at e::E. A Linear's is the case E = 1."""
    E, out, r = B.shape
    return A.reshape(E * r, A.shape[-1]).contiguous(), B.permute(1, 2, 0).reshape(out, r * E).contiguous()


def per_expert(lora_A: torch.Tensor, lora_B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [E, out, r], A [E, r, in]) from ParamWrapper's lora_A and lora_B: wrapper_layout undone."""
    r = lora_A.shape[0] // experts
    return lora_B.reshape(lora_B.shape[0], r, experts).permute(2, 0, 1), lora_A.reshape(experts, r, -1)


def peft_keys(factors: dict[str, torch.Tensor], order: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The factors under the keys PEFT saves and loads for wrapped parameters (see wrapper_paths)."""
    wrappers = wrapper_paths([p for p in order if parameter_key(p, "lora_A") in factors], order)
    renamed = {
        parameter_key(p, part): f"{PREFIX}{wrapper}.{part}.weight"
        for p, wrapper in wrappers.items()
        for part in ("lora_A", "lora_B")
    }
    return {renamed.get(k, k): v for k, v in factors.items()}


def wrapper_paths(adapted: list[str], order: tuple[str, ...]) -> dict[str, str]:
    """Each adapted parameter's path → the path of the ParamWrapper whose lora_A/lora_B hold its factors.

    PEFT wraps each targeted parameter of a module in a ParamWrapper, nested in registration order (`order`): the
    last one is the module itself, each earlier one a `base_layer` further in. With gate_up_proj and down_proj
    both adapted, gate_up_proj's factors are `...mlp.experts.base_layer.lora_A.weight` and down_proj's
    `...mlp.experts.lora_A.weight`; with only one of them (the other's delta is zero) it is
    `...mlp.experts.lora_A.weight`.
    """
    ordered = [p for p in order if p in adapted]
    wrappers = {}
    for p in ordered:
        module = p.rpartition(".")[0]
        siblings = [q for q in ordered if q.rpartition(".")[0] == module]
        wrappers[p] = module + ".base_layer" * (len(siblings) - 1 - siblings.index(p))
    return wrappers


def target_modules_field(
    extracted: list[str], names: list[str], modules: list[str], tied: str | None = None
) -> list[str] | str:
    """The names that match exactly the modules with factors, else a regex of those modules' paths (`tied`, a tied
    embedding's path, also matching its bare name, which is where PEFT looks for it in a regex)."""
    used = sorted({t for t in names if any(is_target(m, [t]) for m in extracted)})
    if {m for m in modules if is_target(m, used)} == set(extracted):
        return used
    return "(" + "|".join(regex_term(m, bare=m == tied) for m in sorted(extracted)) + ")"


def regex_term(path: str, bare: bool) -> str:
    """A module path as an alternative of a target_modules regex; bare: its last name alone matches too."""
    parent, _, name = path.rpartition(".")
    return f"(?:{re.escape(parent)}\\.)?{re.escape(name)}" if bare and parent else re.escape(path)


def target_parameters_field(adapted: list[str], params: list[str]) -> list[str]:
    """Per-layer names (mlp.experts.gate_up_proj) when they match exactly the adapted parameters, else their paths."""
    names = sorted({within_layer(p) for p in adapted})
    if {p for p in params if is_target(p, names)} == set(adapted):
        return names
    return sorted(adapted)


@dataclass(frozen=True)
class Targets:
    """adapter_config's target fields and per-path ranks."""

    target_modules: list[str] | str
    target_parameters: list[str]  # empty: the field is left out
    ranks: dict[str, int]  # module or parameter path → rank, for rank_pattern/alpha_pattern


def target_fields(
    modules: dict[str, int],
    parameters: dict[str, int],
    names: list[str],
    tensors: dict[str, dict],
    tied: tuple[str, str] | None = None,
) -> Targets:
    """The target fields for modules and fused parameters with factors (path → rank), by the table above.

    names: the target names to write when they are exact (the configured ones, then leaf names of the rest).
    tied: (embedding, LM head) when a tied embedding has factors: the head gets the embedding's rank.
    """
    fused_experts = any("param" in t for t in tensors.values())
    as_parameters = [m for m in modules if fused_experts and m.rpartition(".")[2] in PEFT_REMAPPED]
    listed = [m for m in modules if m not in as_parameters]
    parameters = {f"{m}.weight": modules[m] for m in as_parameters} | parameters
    embedding, head = tied or (None, None)
    field = target_modules_field(listed, names, sorted({t["module"] for t in tensors.values()}), embedding)
    if isinstance(field, str) and fused_experts:
        field = sorted(listed)
    all_parameters = sorted({parameter_name(n, t) for n, t in tensors.items()})
    head_rank = {head: modules[embedding]} if embedding and head else {}
    return Targets(
        field,
        target_parameters_field(list(parameters), all_parameters) if parameters else [],
        {m: modules[m] for m in listed} | head_rank | parameters,
    )


def adapter_config(
    *,
    base_model: str,
    rank: int,
    alpha: float | None,
    targets: Targets,
    saved: list[str],
    lora_bias: bool,
    tied: bool,
) -> dict:
    """alpha None: each module's alpha equals its rank (scaling 1), written as alpha_pattern where r differs.
    tied: a tied embedding is in the adapter (factors or saved), which PEFT ties to the LM head."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": float(rank) if alpha is None else alpha,
        "target_modules": targets.target_modules,
        "rank_pattern": {exact_pattern(m): k for m, k in targets.ranks.items() if k != rank},
        "alpha_pattern": {exact_pattern(m): float(k) for m, k in targets.ranks.items() if k != rank and alpha is None},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    if targets.target_parameters:
        config["target_parameters"] = targets.target_parameters
    if saved:
        config["modules_to_save"] = saved
    if lora_bias:
        config["lora_bias"] = True
    if tied:
        config["ensure_weight_tying"] = True
    return config


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's adapter_config.json, checked to be a LoRA config (the only kind weightdiff reads) beside its
    weights."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise WeightdiffError(f"{adapter_dir / name} not found: expected a PEFT LoRA adapter directory")
    path = adapter_dir / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise WeightdiffError(f"{path}: peft_type is {config['peft_type']!r}, only LoRA adapters are read")
    return config


def adapter_config_json(config: dict) -> bytes:
    return (json.dumps(config, indent=2) + "\n").encode()


def write_adapter(out_dir: Path, factors: dict[str, torch.Tensor], config: dict, provenance: dict) -> None:
    """adapter_model.safetensors, adapter_config.json and the provenance, replacing out_dir only once all are complete.

    The provenance (PROVENANCE_FILE) says what the file's keys and shapes do not and weightdiff.compose needs: which
    models the adapter goes between, how its expert factors are laid out. It is a file of its own because PEFT warns
    on keys it does not know in adapter_config.json, and safetensors writes header metadata in a per-process
    order, which would make the adapter's bytes differ from run to run.
    """
    with fresh_directory(out_dir) as tmp:
        write_atomic(tmp / ADAPTER_WEIGHTS, safetensors_bytes(factors, metadata={"format": "pt"}))
        write_atomic(tmp / ADAPTER_CONFIG, adapter_config_json(config))
        write_atomic(tmp / PROVENANCE_FILE, (json.dumps(provenance, indent=1, sort_keys=True) + "\n").encode())
