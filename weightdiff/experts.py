"""All experts of one MoE layer and projection, decomposed together into PEFT's `target_parameters` layout.

transformers 5 holds a layer's routed experts as one fused parameter, `mlp.experts.gate_up_proj` [E, 2I, H]
(per expert, rows [:I] gate and [I:] up) and `mlp.experts.down_proj` [E, H, I], and PEFT adapts such a
parameter with one ParamWrapper (peft/tuners/lora/layer.py), whose factors are
`lora_A` [r·E, in] with expert e's rows at e·r:(e+1)·r and `lora_B` [out, r·E] with its columns at e::E, so that
ΔW[e] = scaling · lora_B[:, e::E] @ lora_A[e·r:(e+1)·r]. PEFT has one r per parameter: experts whose own rank
is lower (adaptive policies) are padded with zero singular values.

The truncated SVD of every expert is one batched call over the stack [E, out, in] (weightdiff.lowrank), not
E calls. Per-expert checkpoints are stacked (and gate/up concatenated) into the fused layout first, so the
adapter is the same whichever form the checkpoint has on disk.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch

from weightdiff.adapter import PREFIX
from weightdiff.errors import WeightdiffError
from weightdiff.lowrank import ZERO_DELTA, Truncated, lora_factors
from weightdiff.plan import Unit, fuse_experts, parameter_name
from weightdiff.rank import chosen_rank, noise_floor, sketch_rank
from weightdiff.stream import Delta

if TYPE_CHECKING:
    from weightdiff.extract import Options

LAYER_PREFIX = re.compile(r"^.*?\.(?:layers|h|blocks|block)\.\d+\.")
# The names PEFT (0.21) takes, in target_modules of a qwen2_moe- or mixtral-family model (Qwen3-MoE, Qwen3-Next),
# for the per-expert modules of transformers 4: it moves them to target_parameters and doubles gate_up_proj's
# rank (peft.utils.transformers_weight_conversion), so a shared expert's or a dense layer's gate_proj,
# up_proj or down_proj named there would not be adapted, and the experts would load with the wrong rank.
PEFT_REMAPPED = frozenset({"gate", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"})


def stacked_delta(unit: Unit, ds: list[Delta], tensors: dict[str, dict]) -> torch.Tensor:
    """ΔW of all experts as the model holds them, [E, out, in]: a fused checkpoint tensor is that already,
    per-expert ones (in the unit's order: by expert, then part) are fused as transformers does on load."""
    if len(ds) == 1 and ds[0].value.ndim == 3:
        return ds[0].value
    return fuse_experts(unit.module, [d.value for d in ds], [tensors[n]["expert"] for n in unit.tensors])


def expert_ranks(S: torch.Tensor, norms: torch.Tensor, opts: Options, floor: float) -> torch.Tensor:
    """Each expert's rank under the policy (0 for an expert whose delta is zero), from its spectrum."""
    return torch.tensor([chosen_rank(opts.policy, S[e], norms[e].item() ** 2, energy=opts.energy, floor=floor)
                         if norms[e] > 0 else 0 for e in range(len(S))])


def frobenius_norms(dw: torch.Tensor) -> torch.Tensor:
    """‖ΔW[e]‖_F of every expert in fp64: row norms in fp32, summed in fp64 (as lowrank.frobenius_norm)."""
    return dw.norm(dim=-1).double().square().sum(-1).sqrt()


def residual_norms(dw: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float, rows: int = 1024) -> torch.Tensor:
    """‖ΔW[e] − scaling·B[e]·A[e]‖_F of every expert in fp64, by blocks of rows across all experts: never a
    second [E, out, in] tensor (2 GiB in fp32 for 256 experts of 1024×2048)."""
    step = max(1, rows // dw.shape[0])
    total = torch.zeros(dw.shape[0], dtype=torch.float64)
    for i in range(0, dw.shape[1], step):
        block = torch.baddbmm(dw[:, i:i + step], B[:, i:i + step], A, alpha=-scaling)
        total += block.norm(dim=-1).double().square().sum(-1)
    return total.sqrt()


def peft_layout(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A [r·E, in], lora_B [out, r·E]) from per-expert B [E, out, r] and A [E, r, in], as ParamWrapper reads them."""
    E, out, r = B.shape
    return A.reshape(E * r, A.shape[-1]).contiguous(), B.permute(1, 2, 0).reshape(out, r * E).contiguous()


def parameter_key(param: str, part: str) -> str:
    """The key decomposition writes for a fused parameter's factors (part: lora_A or lora_B); `peft_keys`
    turns it into PEFT's, which depends on the other parameters of the module that end up with factors."""
    return f"{PREFIX}{param}.{part}.weight"


def decompose_experts(unit: Unit, ds: list[Delta], opts: Options, tensors: dict[str, dict],
                      seed: int) -> tuple[list[dict], dict]:
    """One report for the layer's parameter with per-expert arrays, and its factors in PEFT's layout.

    The report's `singular_values` are, per index k, the root sum of squares over experts of each expert's
    k-th kept singular value: summed up to k they give the energy all experts keep at rank k, which is what
    energy curves pool. `experts` holds each expert's own rank, ‖ΔW‖, energy, error and singular values.
    """
    dw = stacked_delta(unit, ds, tensors)
    E, m, n = dw.shape
    expert_norms = frobenius_norms(dw)
    norm = expert_norms.norm().item()
    container, _, leaf = unit.module.rpartition(".")
    report = {"name": unit.module, "shape": [E, m, n], "delta_norm": norm, "kind": f"{container.rpartition('.')[2]}.{leaf}"}
    if norm == 0.0:
        zeros = {"rank": [0] * E, "delta_norm": [0.0] * E, "energy": [1.0] * E, "rel_error": [0.0] * E,
                 "singular_values": [[] for _ in range(E)]}
        return [report | ZERO_DELTA | {"experts": zeros}], {}
    cap = min(sketch_rank(opts.policy, opts.rank, opts.max_rank), m, n)
    full = opts.svd_of(dw, cap, seed)
    S = full.S.cpu()
    floor = 0.0
    if opts.policy == "noise_floor":
        rms_a, rms_b = (math.sqrt(sum(x * x for x in xs) / len(xs)) for xs in zip(*((d.rms_a, d.rms_b) for d in ds)))
        floor = noise_floor((m, n), tensors[unit.tensors[0]]["dtype"], rms_a, rms_b)
    ranks = expert_ranks(S, expert_norms, opts, floor)
    r = max(int(ranks.max()), 1)
    kept = S[:, :r] * (torch.arange(r) < ranks[:, None])
    t = Truncated(full.U[..., :r].cpu(), kept, full.Vh[..., :r, :].cpu())
    scaling = opts.scaling(r)
    B, A = (f.to(opts.dtype) for f in lora_factors(t, scaling))
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise WeightdiffError(f"{unit.module}: LoRA factors (largest singular value {S.max().item():.4g}) overflow "
                              f"{opts.dtype}; use extract.dtype=bf16 or fp32")
    errors = residual_norms(dw, B.float(), A.float(), scaling)
    kept_sq = kept.double().square().sum(1)
    nonzero = expert_norms > 0
    safe = torch.where(nonzero, expert_norms, 1.0)
    energies = torch.where(nonzero, kept_sq / safe.square(), 1.0)
    rel_errors = torch.where(nonzero, errors / safe, 0.0)
    per_expert = {"rank": ranks.tolist(), "delta_norm": expert_norms.tolist(), "energy": energies.tolist(),
                  "rel_error": rel_errors.tolist(), "singular_values": [kept[e, :ranks[e]].tolist() for e in range(E)]}
    report |= {"status": "extracted", "rank": r, "energy": kept_sq.sum().item() / norm**2,
               "rel_error": errors.norm().item() / norm, "singular_values": kept.square().sum(0).sqrt().tolist(),
               "experts": per_expert}
    if opts.policy == "noise_floor":
        report["noise_floor"] = floor
    lora_A, lora_B = peft_layout(B, A)
    return [report], {parameter_key(unit.module, "lora_A"): lora_A, parameter_key(unit.module, "lora_B"): lora_B}


def peft_keys(factors: dict[str, torch.Tensor], order: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The factors under the keys PEFT saves and loads for wrapped parameters.

    PEFT wraps each targeted parameter of a module in a ParamWrapper, nested in registration order: the
    last one is the module itself, each earlier one a `base_layer` further in. With gate_up_proj and
    down_proj both adapted, gate_up_proj's factors are `...mlp.experts.base_layer.lora_A.weight` and
    down_proj's `...mlp.experts.lora_A.weight`; with only one of them (the other's delta is zero) it is
    `...mlp.experts.lora_A.weight`.
    """
    adapted = [p for p in order if parameter_key(p, "lora_A") in factors]
    renamed = {}
    for p in adapted:
        module = p.rpartition(".")[0]
        siblings = [q for q in adapted if q.rpartition(".")[0] == module]
        wrapper = module + ".base_layer" * (len(siblings) - 1 - siblings.index(p))
        for part in ("lora_A", "lora_B"):
            renamed[parameter_key(p, part)] = f"{PREFIX}{wrapper}.{part}.weight"
    return {renamed.get(k, k): v for k, v in factors.items()}


def target_parameters_field(adapted: list[str], params: list[str]) -> list[str]:
    """adapter_config's `target_parameters`: per-layer names (mlp.experts.gate_up_proj) when they cover exactly
    the adapted parameters, else their full paths. PEFT wraps every parameter the field matches (path equal,
    or ending with '.' + entry), and one without factors in the file would load as missing keys."""
    names = sorted({LAYER_PREFIX.sub("", p) for p in adapted})
    if {p for p in params if any(p == t or p.endswith("." + t) for t in names)} == set(adapted):
        return names
    return sorted(adapted)


def adapted_ranks(reports: list[dict]) -> dict[str, int]:
    """Fused parameter path → its (padded) rank, for the parameters that got factors."""
    return {r["name"]: r["rank"] for r in reports if r.get("unit") == "experts" and r["status"] == "extracted"}


def linears_as_parameters(extracted: list[str], tensors: dict[str, dict]) -> list[str]:
    """The adapted linear layers that a model with fused experts must have named by their weight in
    target_parameters (see PEFT_REMAPPED): PEFT adapts a Linear's weight as a parameter the same way,
    under the same keys and shapes."""
    if not any("param" in t for t in tensors.values()):
        return []
    return [m for m in extracted if m.rpartition(".")[2] in PEFT_REMAPPED]


def exact_target_modules(field: list[str] | str, modules: list[str], tensors: dict[str, dict]) -> list[str] | str:
    """target_modules as written (`target_modules_field`), except a regex on a model with fused experts: there
    the full paths of the modules with factors. PEFT (0.21) resolves a regex on qwen2_moe/mixtral-family models
    to the leaf names it matches (to re-target the experts' old names), which would wrap every module of that
    name, those left out for a zero delta included; a list of full paths stays exact."""
    if isinstance(field, str) and any("param" in t for t in tensors.values()):
        return sorted(modules)
    return field


def parameter_paths(tensors: dict[str, dict]) -> list[str]:
    """Every parameter of the model as held in memory (fused experts once), which target_parameters entries
    are matched against."""
    return sorted({parameter_name(name, t) for name, t in tensors.items()})
