"""Adapter arithmetic: A→B and B→C compose to A→C, an adapter negates (B→A) or scales, from the factors alone.

A weighted sum of LoRA deltas Σ wᵢ·sᵢ·Bᵢ·Aᵢ is L·R with L = [w₁s₁B₁ | w₂s₂B₂ | …] and R = [A₁; A₂; …], of rank at
most Σ rᵢ. With the thin QRs L = Q_L·R_L and Rᵀ = Q_R·R_R, L·R = Q_L·(R_L·R_Rᵀ)·Q_Rᵀ: the SVD of the small core
R_L·R_Rᵀ [Σr × Σr] is the SVD of the sum, so cutting it is the best approximation at the new rank (Eckart–Young),
its singular values give the energy kept exactly, and ΔW [out × in] is never formed. Experts are stacks of such
sums, composed in the same batched calls.

Modules an adapter replaces whole (modules_to_save) hold B's own weights: a later adapter's LoRA on them is added
to those weights, a later save replaces them, and an adapter holding any cannot be negated or scaled (that would
need A's weights, which it does not carry).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from weightdiff.errors import WeightdiffError
from weightdiff.files import write_json
from weightdiff.lowrank import Truncated, lora_factors
from weightdiff.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PREFIX,
    PROVENANCE_FILE,
    embedding_keys,
    exact_pattern,
    is_target,
    lora_bias_key,
    lora_keys,
    peft_keys,
    per_expert,
    rank_and_scaling,
    read_adapter_config,
    wrapper_layout,
    wrapper_paths,
    write_adapter,
)

log = logging.getLogger(__name__)
STATS_FILE = "weightdiff_compose.json"  # beside the adapter: what the recompression kept, per module
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# Singular values of the core below this share of Σ‖Bᵢ‖‖Aᵢ‖ (what bounds the sum) are rounding of an exact
# cancellation (A→B then B→A): they are not kept, and a module whose sum cancels entirely leaves the adapter.
CANCELLED = 1e-9


@dataclass(frozen=True)
class Site:
    """Where an adapter holds LoRA factors: a Linear, an Embedding, or one expert parameter (a stack of E)."""

    kind: str  # linear | embedding | experts
    path: str  # the module's path; an expert parameter's own path
    parameter: str | None  # its target_parameters path (experts; a Linear PEFT adapts as a parameter), else None
    shape: tuple[int, int, int]  # [E, m, n] of the product B·A the factors make (an embedding's is ΔWᵀ)


@dataclass
class Adapter:
    """One PEFT LoRA adapter directory, read a module at a time."""

    path: Path
    config: dict
    provenance: dict
    keys: dict[str, tuple[int, ...]]  # tensor name → shape
    dtypes: dict[str, str]  # tensor name → safetensors dtype (F16, BF16...)
    sites: dict[str, Site] = field(default_factory=dict)
    saved: dict[str, list[str]] = field(default_factory=dict)  # module path → its modules_to_save tensor names

    @classmethod
    def open(cls, path: Path) -> Adapter:
        config, tensors_file = read_adapter_config(path), path / ADAPTER_WEIGHTS
        with safe_open(tensors_file, "pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
            keys = {k: tuple(s.get_shape()) for k, s in slices.items()}
            dtypes = {k: s.get_dtype() for k, s in slices.items()}
        recorded = path / PROVENANCE_FILE  # absent from adapters weightdiff did not write
        provenance = json.loads(recorded.read_text()) if recorded.is_file() else {}
        adapter = cls(path, config, provenance, keys, dtypes)
        adapter.sites, adapter.saved = adapter.layout()
        return adapter

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def target(self) -> str | None:
        """The model the adapter turns its base into, where the file records it (weightdiff's adapters do)."""
        return self.provenance.get("model_b")

    def factor_dtype(self) -> torch.dtype:
        """What the factors are stored in: the composition is written in the widest of its inputs'."""
        stored = {self.dtypes[k] for k in self.keys if k.endswith((".lora_A.weight", ".lora_embedding_A"))}
        return max((SAFETENSORS_DTYPES[d] for d in stored), key=lambda d: torch.finfo(d).bits, default=torch.float32)

    def layout(self) -> tuple[dict[str, Site], dict[str, list[str]]]:
        """The sites with factors and the modules saved whole, from the keys and (for experts) the provenance."""
        wrappers = {e["wrapper"]: (p, e["experts"]) for p, e in self.provenance.get("experts", {}).items()}
        parameters = list(self.config.get("target_parameters") or [])
        leaves = {t.rpartition(".")[2] for t in parameters} - {"weight"}
        sites: dict[str, Site] = {}
        saved: dict[str, list[str]] = {}
        for key, shape in self.keys.items():
            path = key.removeprefix(PREFIX)
            if path.endswith(".lora_A.weight"):
                module = path.removesuffix(".lora_A.weight")
                out = self.keys[f"{PREFIX}{module}.lora_B.weight"][0]
                if module in wrappers:
                    parameter, experts = wrappers[module]
                    sites[parameter] = Site("experts", parameter, parameter, (experts, out, shape[1]))
                elif ".base_layer" in module or any(is_target(f"{module}.{leaf}", parameters) for leaf in leaves):
                    raise WeightdiffError(
                        f"{self.path}: {key} is an expert parameter's factors, but the adapter does not record its "
                        "layout (only adapters weightdiff wrote do): re-extract it with weightdiff"
                    )
                else:
                    parameter = f"{module}.weight" if is_target(f"{module}.weight", parameters) else None
                    sites[module] = Site("linear", module, parameter, (1, out, shape[1]))
            elif path.endswith(".lora_embedding_A"):
                module = path.removesuffix(".lora_embedding_A")
                dim = self.keys[f"{PREFIX}{module}.lora_embedding_B"][0]
                sites[module] = Site("embedding", module, None, (1, dim, shape[1]))
            elif not any(path.endswith(s) for s in (".lora_B.weight", ".lora_embedding_B", ".lora_B.bias")):
                saved.setdefault(path.rpartition(".")[0], []).append(key)
        if self.config.get("ensure_weight_tying") and any(s.kind == "embedding" for s in sites.values()):
            if not self.provenance.get("tied"):
                raise WeightdiffError(
                    f"{self.path}: a tied embedding's LoRA without a record of its LM head (only adapters weightdiff "
                    "wrote have one): re-extract it with weightdiff"
                )
        return sites, saved

    def scaling(self, site: Site, rank: int) -> float:
        """PEFT's alpha/r of the site, r as the config gives it and checked against the factors' shape."""
        lookup = site.parameter or site.path
        configured, scaling = rank_and_scaling(lookup, self.config)
        if configured != rank:
            raise WeightdiffError(
                f"{self.path}: {ADAPTER_CONFIG} gives {lookup} rank {configured}, its factors have rank {rank}"
            )
        return scaling

    def term(self, site: Site, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(weight·scaling·B [E, m, r], A [E, r, n], weight·Δb [m] or None) of the site, in fp64."""
        E = site.shape[0]
        with safe_open(self.path / ADAPTER_WEIGHTS, "pt") as f:
            if site.kind == "embedding":
                a_key, b_key = embedding_keys(site.path)
                A, B = f.get_tensor(a_key).double()[None], f.get_tensor(b_key).double()[None]
            else:
                module = self.provenance["experts"][site.path]["wrapper"] if site.kind == "experts" else site.path
                a_key, b_key = lora_keys(module)
                B, A = per_expert(f.get_tensor(a_key).double(), f.get_tensor(b_key).double(), E)
            bias_key = lora_bias_key(site.path)
            bias = f.get_tensor(bias_key).double() if bias_key in self.keys else None
        s = weight * self.scaling(site, A.shape[1])
        return B * s, A, None if bias is None else bias * s

    def saved_tensors(self, module: str) -> dict[str, torch.Tensor]:
        with safe_open(self.path / ADAPTER_WEIGHTS, "pt") as f:
            return {k: f.get_tensor(k) for k in self.saved[module]}


@dataclass
class Sum:
    """One module's composition so far: weighted LoRA terms, or (after a save) B's weights with terms added."""

    terms: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    bias: torch.Tensor | None = None
    ranks: list[int] = field(default_factory=list)
    saved: dict[str, torch.Tensor] | None = None

    def add(self, site: Site, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.ranks.append(A.shape[-2])
        if self.saved is not None:
            self.add_to_saved(site, B, A, bias)
            return
        self.terms.append((B, A))
        if bias is not None:
            self.bias = bias if self.bias is None else self.bias + bias

    def add_to_saved(self, site: Site, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> None:
        """A LoRA on a module an earlier adapter saved whole: its delta goes into the saved weights."""
        assert self.saved is not None
        if site.kind == "experts":
            raise WeightdiffError(f"{site.path}: an expert LoRA on a module saved whole does not compose")
        delta = (B[0] @ A[0]).T if site.kind == "embedding" else B[0] @ A[0]
        added = {"weight": delta} | ({} if bias is None else {"bias": bias})
        for key, value in list(self.saved.items()):
            if (part := key.rpartition(".")[2]) in added:
                self.saved[key] = (value.double() + added[part]).to(value.dtype)


@dataclass(frozen=True)
class Chain:
    """What the composition goes between: its base, and the model it ends at (None: a sum or a scaled delta)."""

    start: str | None
    end: str | None


def chained(adapters: list[Adapter], weights: list[float], unchecked: bool) -> Chain:
    """The composition's ends, refusing adapters that do not chain.

    Each adapter must start where the composition so far ends (A→B then B→C) or at its start (A→B plus A→C: a sum
    of deltas from one base). A weight of −1 turns an adapter around (B→A); any other weight leaves its end unnamed.
    """
    chain: Chain | None = None
    for adapter, w in zip(adapters, weights, strict=True):
        base, target = (adapter.target, adapter.base) if w == -1 else (adapter.base, adapter.target)
        end = target if abs(w) == 1 else None
        if chain is None:
            chain = Chain(base, end)
        elif chain.end is not None and base == chain.end:
            chain = Chain(chain.start, end)
        elif base is not None and base == chain.start:
            chain = Chain(chain.start, None)
        elif not unchecked:
            raise WeightdiffError(
                f"{adapter.path} (weight {w:g}) starts at {base or 'an unrecorded model'}, but the composition so far "
                f"goes from {chain.start} to {chain.end or 'no named model'}: each adapter must start where the one "
                "before ends, or at the first one's base (--unchecked composes anyway)"
            )
        else:
            chain = Chain(chain.start, None)
    assert chain is not None
    if chain.start is None:
        raise WeightdiffError(
            f"{adapters[0].path}: the composition's base is not recorded (a negated adapter starts at the model it "
            "ended at, which only adapters weightdiff wrote record)"
        )
    return chain


def recompressed(
    terms: list[tuple[torch.Tensor, torch.Tensor]], rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B [E, m, k], A [E, k, n], kept σ [E, k], every σ [E, Σr]) of Σ Bᵢ·Aᵢ cut at rank k ≤ `rank`, with B·A the cut
    sum (scaling 1): from the QRs of the stacked factors and the SVD of their small core (the module docstring)."""
    left = torch.cat([B for B, _ in terms], -1)
    right = torch.cat([A for _, A in terms], -2)
    Q_left, R_left = torch.linalg.qr(left)
    Q_right, R_right = torch.linalg.qr(right.mT)
    U, S, Vh = torch.linalg.svd(R_left @ R_right.mT)
    # measured against the terms' own size, which an exact cancellation does not shrink as it shrinks S
    size = sum(torch.linalg.matrix_norm(B) * torch.linalg.matrix_norm(A) for B, A in terms)
    significant = int((S > CANCELLED * size[..., None]).sum(-1).max())
    k = min(rank, significant)
    B, A = lora_factors(Truncated(Q_left @ U[..., :k], S[..., :k], Vh[..., :k, :] @ Q_right.mT), scaling=1.0)
    return B, A, S[..., :k], S


def compose(
    paths: list[Path], weights: list[float], out: Path, rank: int | None = None, unchecked: bool = False
) -> dict:
    """Writes the composition of the adapters (each times its weight) to `out`; returns its stats.

    rank: of every module (None: the largest rank the inputs give it). The composition is exact up to the sum of
    the inputs' ranks; below it, each module keeps its top singular triplets and the stats say what that leaves out.
    """
    if len(paths) != len(weights):
        raise WeightdiffError(f"{len(paths)} adapters and {len(weights)} weights: give one weight per adapter")
    if rank is not None and rank < 1:
        raise WeightdiffError(f"--rank {rank}: a rank must be a positive integer")
    adapters = [Adapter.open(p) for p in paths]
    for adapter, w in zip(adapters, weights, strict=True):
        if adapter.saved and w != 1:
            raise WeightdiffError(
                f"{adapter.path} saves {', '.join(sorted(adapter.saved))} whole (B's own weights): with weight {w:g} "
                "it would need A's weights, which it does not carry; extract it with extract.extras.norms=skip "
                "(and embeddings, lm_head not save)"
            )
    chain = chained(adapters, weights, unchecked)
    sites = checked_sites(adapters)
    tied = next((a.provenance["tied"] for a in adapters if a.provenance.get("tied")), None)
    # a tied head's factors are its embedding's, written with them
    modules = list(dict.fromkeys(m for a in adapters for m in [*a.saved, *a.sites] if not (tied and m == tied[1])))
    factors: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    saved_modules: list[str] = []
    ranks: dict[str, int] = {}
    stats: dict[str, dict] = {}
    dtype = max((a.factor_dtype() for a in adapters), key=lambda d: torch.finfo(d).bits)
    for path in tqdm(modules, desc="compose", unit="module"):  # one module's factors in memory at a time
        total = Sum()
        for adapter, w in zip(adapters, weights, strict=True):
            if path in adapter.saved:
                total = Sum(saved=adapter.saved_tensors(path))
            if path in adapter.sites:
                total.add(adapter.sites[path], *adapter.term(adapter.sites[path], w))
        if total.saved is not None:
            saved |= total.saved
            saved_modules.append(path)
            continue
        site = sites[path]
        B, A, kept, spectrum = recompressed(total.terms, rank or max(total.ranks))
        energy_all = spectrum.square().sum().item()
        energy = kept.square().sum().item() / energy_all if energy_all else 1.0
        stats[path] = {
            "delta_norm": math.sqrt(energy_all),
            "ranks_in": total.ranks,
            "rank": A.shape[-2],
            "energy": energy,
            "rel_error": math.sqrt(max(0.0, 1 - energy)),
        }
        if A.shape[-2] == 0:
            continue
        ranks[path] = A.shape[-2]
        factors |= site_factors(site, B.to(dtype), A.to(dtype))
        if tied and path == tied[0]:  # PEFT's ensure_weight_tying: the head's LoRA is the embedding's, transposed
            head_a, head_b = lora_keys(tied[1])
            factors[head_a], factors[head_b] = B[0].T.to(dtype).contiguous(), A[0].T.to(dtype).contiguous()
        if total.bias is not None:
            factors[lora_bias_key(path)] = total.bias.to(dtype)
    if not factors and not saved:
        raise WeightdiffError("the adapters cancel: their composition is zero on every module")
    order = expert_order(adapters)
    factors = peft_keys(factors, order)
    wrappers = wrapper_paths([p for p in ranks if sites[p].kind == "experts"], order)
    config = composed_config(adapters, chain, sites, ranks, saved_modules, tied[1] if tied else None)
    if any(k.endswith(".lora_B.bias") for k in factors):
        config["lora_bias"] = True
        for path in ranks:
            factors.setdefault(lora_bias_key(path), torch.zeros(sites[path].shape[1], dtype=dtype))
    if tied and tied[0] in ranks and ranks[tied[0]] != config["r"]:
        config["rank_pattern"][exact_pattern(tied[1])] = ranks[tied[0]]
        config["alpha_pattern"][exact_pattern(tied[1])] = float(ranks[tied[0]])
    provenance = {
        "model_a": chain.start,
        "model_b": chain.end,
        "experts": {p: {"wrapper": w, "experts": sites[p].shape[0]} for p, w in wrappers.items()},
        "tied": tied if tied and tied[0] in ranks else None,
    }
    write_adapter(out, factors | saved, config, provenance)
    summary = composition_summary(paths, weights, chain, stats, out)
    write_json(out / STATS_FILE, summary | {"modules": stats})
    return summary


def checked_sites(adapters: list[Adapter]) -> dict[str, Site]:
    """Every site of every adapter, refusing one that two adapters give different shapes or kinds."""
    sites: dict[str, Site] = {}
    for adapter in adapters:
        for path, site in adapter.sites.items():
            first = sites.setdefault(path, site)
            if (first.kind, first.shape) != (site.kind, site.shape):
                raise WeightdiffError(
                    f"{adapter.path}: {path} is a {site.kind} of shape {list(site.shape)}, but {first.kind} of shape "
                    f"{list(first.shape)} in an adapter before it: the adapters are not of one architecture"
                )
    return sites


def site_factors(site: Site, B: torch.Tensor, A: torch.Tensor) -> dict[str, torch.Tensor]:
    """The site's tensors as PEFT names and lays them out; an expert parameter's under its parameter path, which
    peft_keys renames to its wrapper's once the adapter's expert parameters are known."""
    if site.kind == "embedding":
        keys, tensors = embedding_keys(site.path), (A[0].contiguous(), B[0].contiguous())
    else:
        keys, tensors = lora_keys(site.path), wrapper_layout(B, A)
    return dict(zip(keys, tensors, strict=True))


def expert_order(adapters: list[Adapter]) -> tuple[str, ...]:
    """The expert parameters in PEFT's wrapping order, as the adapters' wrappers show it: within a module, the
    more `base_layer`s a wrapper has, the earlier its parameter was registered."""
    depth: dict[str, int] = {}
    for adapter in adapters:
        for parameter, e in adapter.provenance.get("experts", {}).items():
            depth[parameter] = max(depth.get(parameter, 0), e["wrapper"].count(".base_layer"))
    return tuple(sorted(depth, key=lambda p: (p.rpartition(".")[0], -depth[p])))


def composed_config(
    adapters: list[Adapter],
    chain: Chain,
    sites: dict[str, Site],
    ranks: dict[str, int],
    saved: list[str],
    tied_head: str | None,
) -> dict:
    """adapter_config.json of the composition: the first adapter's, with the targets, ranks and saves it now has.

    The target fields are kept where every adapter has the same fields and modules; otherwise they list the paths
    with factors, which PEFT's suffix rule matches exactly. A tied LM head is the embedding's: not a target.
    """
    first = adapters[0].config
    fields = ("target_modules", "target_parameters")
    same = all(
        tuple(a.config.get(f) for f in fields) == tuple(first.get(f) for f in fields)
        and set(a.sites) - {tied_head} == set(ranks)
        for a in adapters
    )
    r = max(ranks.values(), default=first["r"])
    config = {k: v for k, v in first.items() if k not in ("lora_bias", "modules_to_save", "target_parameters")}
    parameters = sorted(sites[p].parameter or "" for p in ranks if sites[p].parameter)
    if same:
        config["target_modules"] = first["target_modules"]
        parameters = list(first.get("target_parameters") or [])
    else:
        config["target_modules"] = sorted(p for p in ranks if not sites[p].parameter)
    config |= {
        "base_model_name_or_path": chain.start,
        "r": r,
        "lora_alpha": float(r),
        "use_rslora": False,
        "rank_pattern": {exact_pattern(sites[p].parameter or p): k for p, k in ranks.items() if k != r},
        "alpha_pattern": {exact_pattern(sites[p].parameter or p): float(k) for p, k in ranks.items() if k != r},
    }
    if parameters:
        config["target_parameters"] = parameters
    if saved:
        config["modules_to_save"] = sorted(
            {
                t
                for a in adapters
                for t in a.config.get("modules_to_save") or []
                if any(is_target(m, [t]) for m in saved)
            }
        )
    return config


def composition_summary(paths: list[Path], weights: list[float], chain: Chain, stats: dict, out: Path) -> dict:
    """Energy kept of the exact composition over all modules (weighted by their ‖ΔW‖²), and the worst module."""
    worst = min(stats, key=lambda p: stats[p]["energy"], default=None)
    total = sum(s["delta_norm"] ** 2 for s in stats.values())
    return {
        "inputs": [{"adapter": str(p), "weight": w} for p, w in zip(paths, weights, strict=True)],
        "model_a": chain.start,
        "model_b": chain.end,
        "modules": len(stats),
        "energy": sum(s["energy"] * s["delta_norm"] ** 2 for s in stats.values()) / total if total else 1.0,
        "cancelled": sorted(p for p, s in stats.items() if s["rank"] == 0),
        "worst_module": worst,
        "worst_energy": stats[worst]["energy"] if worst else 1.0,
        "adapter_bytes": (out / ADAPTER_WEIGHTS).stat().st_size,
    }
