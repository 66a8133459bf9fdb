"""The PEFT LoRA adapter format: key names, target selection and adapter_config.json."""
from __future__ import annotations

import json
import re

PREFIX = "base_model.model."


def lora_keys(module: str) -> tuple[str, str]:
    """(A key, B key) as PEFT saves them: with `.weight` and without the adapter name, which PEFT inserts on load."""
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def is_target(module: str, target_modules: list[str]) -> bool:
    """PEFT's rule for a list of target names: the module path equals one or ends with '.' + one."""
    return any(module == t or module.endswith("." + t) for t in target_modules)


def exact_pattern(module: str) -> str:
    """A rank_pattern/alpha_pattern key that PEFT's `(.*\\.)?(key)$` match applies to this module path only."""
    return re.escape(module)


def target_modules_field(extracted: list[str], names: list[str], modules: list[str]) -> list[str] | str:
    """The readable list of names when it matches exactly the modules that got factors, else a regex of those.

    PEFT wraps every module the field matches; one without factors in the file (a zero delta we skipped,
    a layer the names also hit) would load with "Found missing adapter keys".
    """
    used = sorted({t for t in names if any(is_target(m, [t]) for m in extracted)})
    if {m for m in modules if is_target(m, used)} == set(extracted):
        return used
    return "(" + "|".join(re.escape(m) for m in sorted(extracted)) + ")"


def adapter_config(*, base_model: str, rank: int, alpha: float, target_modules: list[str] | str,
                   rank_pattern: dict[str, int], alpha_pattern: dict[str, float]) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def adapter_config_json(config: dict) -> bytes:
    return (json.dumps(config, indent=2) + "\n").encode()
