"""A header-only index of every tensor of both models, independent of the targets chosen later.

Tensors are placed in the model as transformers holds it in memory (module paths, fused expert parameters),
which is what PEFT matches; the module layout is recorded too, so later stages need no model code.
"""

from __future__ import annotations

import re
from pathlib import Path

from weightdiff.layout import in_memory, layer_of, model_modules, module_type
from weightdiff.safetensors_io import model_config, tensor_infos

EXPERT = re.compile(r"\.experts\.(\d+)\.")
# Where a tensor sits in a block, first match wins. Routed experts come on disk per expert
# (mlp.experts.<e>.gate_proj.weight) or fused (mlp.experts.gate_up_proj [E, 2I, H]); the router is
# mlp.gate (Mixtral: block_sparse_moe.gate), Qwen's shared expert has its own sigmoid gate.
GROUPS = (
    ("experts", re.compile(r"\.experts\.")),
    ("shared_expert_gate", re.compile(r"\.shared_expert_gate\.")),
    ("shared_expert", re.compile(r"\.shared_experts?\.")),
    ("router", re.compile(r"\.(?:mlp|block_sparse_moe)\.(?:gate|router)\.")),
    ("linear_attention", re.compile(r"\.linear_attn\.")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("mlp", re.compile(r"\.(?:mlp|block_sparse_moe)\.")),
)


def tensor_group(name: str) -> str | None:
    """attention, linear_attention, mlp, experts, shared_expert, shared_expert_gate, router; None outside blocks."""
    return next((group for group, pattern in GROUPS if pattern.search(name)), None)


def tensor_entry(name: str, shard: str, dtype: str, shape: tuple[int, ...]) -> dict:
    module = name.rpartition(".")[0]
    expert, group = EXPERT.search(name), tensor_group(name)
    fused_experts = group == "experts" and not expert  # a parameter, not a module of its own
    return {
        "shard": shard,
        "dtype": dtype,
        "shape": list(shape),
        "layer": layer_of(name),
        "module": module,
        "module_type": module_type(name if fused_experts else module),
        "group": group,
        "expert": int(expert.group(1)) if expert else None,
    }


def model_index(model_dir: Path) -> dict:
    config = model_config(model_dir)
    tensors = {n: tensor_entry(n, i.shard, i.dtype, i.shape) for n, i in sorted(tensor_infos(model_dir).items())}
    modules = model_modules(config, tensors)
    return {
        "path": str(model_dir),
        "config": config,
        "modules": modules.to_json(),
        "tensors": in_memory(tensors, modules),
    }


def build_index(manifest: dict) -> dict:
    return {side: model_index(Path(manifest[side]["path"])) for side in ("model_a", "model_b")}
