"""What each action makes of a unit's deltas: its reports and its adapter entries, one function per action with
one signature (as PEFT's layer types each answer the same verbs), dispatched by `ACTIONS`.

The decomposition itself is weightdiff.decompose's, for all three lora actions; what differs is only the
layout of the factors: a Linear's lora_A/lora_B, an Embedding's transposed lora_embedding_A/B, and the experts'
interleaved ParamWrapper layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from weightdiff.decompose import LowRank, Method
from weightdiff.layout import fuse_experts, module_type, parameter_name
from weightdiff.lowrank import frobenius_norms
from weightdiff.peft_format import embedding_keys, lora_bias_key, lora_keys, parameter_key, saved_key, wrapper_layout
from weightdiff.plan import Unit
from weightdiff.rank import noise_floor
from weightdiff.records import ExpertArrays, TensorReport
from weightdiff.stream import Delta

Result = tuple[list[TensorReport], dict[str, torch.Tensor]]


def report(unit: Unit, name: str, entry: dict, shape: list[int], delta_norm: float, module_type: str) -> TensorReport:
    return {
        "name": name,
        "module": unit.module,
        "module_type": module_type,
        "layer": entry["layer"],
        "action": unit.action,
        "shape": shape,
        "delta_norm": delta_norm,
    }


def tensor_report(unit: Unit, delta: Delta, entry: dict) -> TensorReport:
    return report(unit, delta.name, entry, list(delta.value.shape), delta.norm, entry["module_type"])


def zero(r: TensorReport) -> TensorReport:
    """An all-zero delta: nothing kept, nothing lost, no spectrum; left out of the adapter."""
    return r | {"status": "zero", "rank": 0, "energy": 1.0, "rel_error": 0.0, "singular_values": []}


def extracted(r: TensorReport, low: LowRank, floor: float | None) -> TensorReport:
    """The report of a one-matrix decomposition; `floor`: the noise floor the rank was chosen against."""
    r = r | {
        "status": "extracted",
        "rank": low.rank,
        "energy": low.energies()[0].item(),
        "energy_bound": low.energy_bounds()[0].item(),
        "rel_error": low.rel_errors()[0].item(),
        "singular_values": low.S[0].tolist(),
        "singular_values_beyond": low.spectrum[0, low.rank :].tolist(),
    }
    return r if floor is None else r | {"noise_floor": floor}


def measured(delta: Delta) -> torch.Tensor:
    """A one-matrix stack's ‖ΔW‖, as the stream measured it."""
    return torch.tensor([delta.norm], dtype=torch.float64)


def lora(unit: Unit, ds: list[Delta], method: Method, tensors: dict[str, dict]) -> Result:
    """LoRA factors with scaling·B·A = the kept part of the SVD of ΔW, and lora_B.bias = Δb / scaling when the unit
    carries the bias (whether PEFT's lora_bias can take it is decided for the whole adapter, in extract)."""
    weight, bias = ds[0], (ds[1] if len(ds) > 1 else None)
    entry = tensors[weight.name]
    r = tensor_report(unit, weight, entry)
    if weight.norm == 0.0 and (bias is None or not bias.value.any()):
        unchanged = [] if bias is None else [tensor_report(unit, bias, tensors[bias.name]) | {"status": "zero"}]
        return [zero(r), *unchanged], {}
    shape = (weight.value.shape[0], weight.value.shape[1])
    floor = None
    if method.policy == "noise_floor":  # the stream measured the weights' RMS for this policy
        assert weight.rms_a is not None and weight.rms_b is not None
        floor = noise_floor(shape, entry["dtype"], weight.rms_a, weight.rms_b)
    low = method.decompose(weight.value, measured(weight), weight.name, floor=floor or 0.0, sketch=weight.sketch)
    key_a, key_b = lora_keys(unit.module)
    factors = {key_a: low.A[0], key_b: low.B[0]}
    reports = [extracted(r, low, floor)]
    if bias is not None:
        factors[lora_bias_key(unit.module)] = (bias.value / low.scaling).to(method.dtype)
        reports.append(tensor_report(unit, bias, tensors[bias.name]) | {"status": "extracted"})
    return reports, factors


def lora_embedding(unit: Unit, ds: list[Delta], method: Method, tensors: dict[str, dict]) -> Result:
    """PEFT's Embedding LoRA adds scaling·(B·A)ᵀ to the [vocab, dim] table: A = √Σ·Uᵀ [r, vocab], B = V·√Σ [dim, r],
    at the configured rank whatever the policy.

    A tied LM head (unit.tied) computes logits with the same table, so it changes by the same ΔE: PEFT's
    ensure_weight_tying gives it a Linear LoRA whose lora_A is the embedding's Bᵀ and lora_B its Aᵀ
    (peft.tuners.lora.model, `tied_adapter`), and expects those keys in the file.
    """
    (d,) = ds
    r = tensor_report(unit, d, tensors[d.name])
    if d.norm == 0.0:
        return [zero(r)], {}
    low = method.decompose(d.value, measured(d), d.name, fixed=True, transposed=True, sketch=d.sketch)
    A, B = low.A[0], low.B[0]
    key_a, key_b = embedding_keys(unit.module)
    factors = {key_a: A, key_b: B}
    if unit.tied:
        head_a, head_b = lora_keys(unit.tied)
        factors |= {head_a: B.T.contiguous(), head_b: A.T.contiguous()}
    return [extracted(r, low, None)], factors


def stacked_delta(unit: Unit, ds: list[Delta], tensors: dict[str, dict]) -> torch.Tensor:
    """ΔW of all experts as the model holds them, [E, out, in]: a fused checkpoint tensor is that already,
    per-expert ones (in the unit's order: by expert, then part) are fused as transformers does on load."""
    if len(ds) == 1 and ds[0].value.ndim == 3:
        return ds[0].value
    return fuse_experts(unit.module, [d.value for d in ds], [tensors[n]["expert"] for n in unit.tensors])


def lora_experts(unit: Unit, ds: list[Delta], method: Method, tensors: dict[str, dict]) -> Result:
    """All experts of one layer and projection in one batched decomposition, in PEFT's `target_parameters` layout.

    ParamWrapper keeps lora_A [r·E, in] and lora_B [out, r·E] whichever way the parameter is stored, and adds
    B_e·A_e to an [E, out, in] one, its transpose to an [E, in, out] one (gpt-oss): those are factors of ΔW[e]ᵀ.

    The report's `singular_values` are, per index k, the root sum of squares over experts of each expert's
    k-th kept singular value: summed up to k they give the energy all experts keep at rank k, which is what
    energy curves pool. `experts` holds each expert's own rank, ‖ΔW‖, energy, error and singular values.
    """
    dw = stacked_delta(unit, ds, tensors)
    E, m, n = dw.shape
    norms = frobenius_norms(dw)
    norm = norms.norm().item()
    r = report(unit, unit.module, tensors[unit.tensors[0]], [E, m, n], norm, module_type(unit.module))
    if norm == 0.0:
        return [
            zero(r)
            | {
                "experts": {
                    "rank": [0] * E,
                    "delta_norm": [0.0] * E,
                    "energy": [1.0] * E,
                    "rel_error": [0.0] * E,
                    "singular_values": [[] for _ in range(E)],
                }
            }
        ], {}
    floor = None
    if method.policy == "noise_floor":
        rms_a, rms_b = (
            math.sqrt(sum(x * x for x in xs) / len(xs)) for xs in zip(*((d.rms_a, d.rms_b) for d in ds), strict=True)
        )
        floor = noise_floor((m, n), tensors[unit.tensors[0]]["dtype"], rms_a, rms_b)
    low = method.decompose(dw, norms, unit.module, floor=floor or 0.0, transposed=unit.transposed)
    per_expert: ExpertArrays = {
        "rank": low.ranks,
        "delta_norm": norms.tolist(),
        "energy": low.energies().tolist(),
        "rel_error": low.rel_errors().tolist(),
        "singular_values": [low.S[e, : low.ranks[e]].tolist() for e in range(E)],
    }
    r = r | {
        "status": "extracted",
        "rank": low.rank,
        "energy": low.S.double().square().sum().item() / norm**2,
        "energy_bound": min(1.0, (low.S.double().square().sum() + low.outside().sum()).item() / norm**2),
        "rel_error": low.errors.norm().item() / norm,
        "singular_values": low.S.square().sum(0).sqrt().tolist(),
        "singular_values_beyond": low.spectrum[:, low.rank :].square().sum(0).sqrt().tolist(),
        "experts": per_expert,
    }
    if floor is not None:
        r["noise_floor"] = floor
    lora_A, lora_B = wrapper_layout(low.B, low.A)
    return [r], {parameter_key(unit.module, "lora_A"): lora_A, parameter_key(unit.module, "lora_B"): lora_B}


def save(unit: Unit, ds: list[Delta], method: Method, tensors: dict[str, dict]) -> Result:
    """modules_to_save: B's own weights, stored under the in-memory parameter paths, replace A's module entirely.

    A module whose delta is zero is not saved (nothing to carry). A tied embedding is saved under the LM head's
    path too: PEFT's ensure_weight_tying saves and expects both.
    """
    if all(d.norm == 0.0 for d in ds):
        return [tensor_report(unit, d, tensors[d.name]) | {"status": "zero"} for d in ds], {}
    weights = {d.name: d.b for d in ds if d.b is not None}  # the stream keeps W_B for every save unit
    reports: list[TensorReport] = [
        tensor_report(unit, d, tensors[d.name]) | {"bytes": weights[d.name].numel() * weights[d.name].element_size()}
        for d in ds
    ]
    saved = {saved_key(parameter_name(name, tensors[name])): b.contiguous() for name, b in weights.items()}
    if unit.tied:
        (table,) = weights.values()
        saved[saved_key(f"{unit.tied}.weight")] = table.clone()
    return reports, saved


def skip(unit: Unit, ds: list[Delta], method: Method, tensors: dict[str, dict]) -> Result:
    """Left out of the adapter; the report says how big a delta that leaves out."""
    return [tensor_report(unit, d, tensors[d.name]) for d in ds], {}


ACTIONS: dict[str, Callable[[Unit, list[Delta], Method, dict[str, dict]], Result]] = {
    "lora": lora,
    "lora_embedding": lora_embedding,
    "lora_experts": lora_experts,
    "save": save,
    "skip": skip,
}
