"""Experts per second: one batched randomized SVD over a MoE layer's experts against one call per expert.

    python benchmarks/moe_bench.py --shape qwen3.6-35b-a3b --experts 64
    python benchmarks/moe_bench.py --shape qwen3-30b-a3b --device cuda

For each fused projection of one layer (gate_up_proj [E, 2I, H], down_proj [E, H, I]) a synthetic delta
(per expert a rank-8 LoRA-like part plus 1% noise), decomposed at --rank by weightdiff.lowrank.truncated_svd
with params.yaml's extract.svd settings
on the stack [E, m, n] (what extraction does) and on each expert's matrix in a Python loop; then the whole
unit as extraction runs it (weightdiff.actions.lora_experts: SVD, factors in PEFT's layout, per-expert
errors). Prints experts/s for each and the largest relative gap between the two ways' singular values.
--experts takes the first E' experts of the shape (memory: E'·m·n·4 bytes per projection).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from weightdiff.actions import lora_experts
from weightdiff.config import run_config
from weightdiff.decompose import Method
from weightdiff.lowrank import truncated_svd
from weightdiff.plan import Unit
from weightdiff.settings import updated
from weightdiff.stream import Delta

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {  # (experts, hidden_size, moe_intermediate_size)
    "qwen3-30b-a3b": (128, 2048, 768),
    "qwen3.6-35b-a3b": (256, 2048, 512),
    "tiny": (64, 256, 128),
}


def synthetic_delta(experts: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(experts, m, 8, generator=g) @ torch.randn(experts, 8, n, generator=g) / 8
    return low + 0.01 * torch.randn(experts, m, n, generator=g)


def best_times(runs: dict[str, Callable[[], object]], device: torch.device, repeat: int) -> tuple[dict, dict]:
    """(best wall time of each run, its last result), the runs interleaved `repeat` times: on a shared machine
    each then meets the same background load, and the best of each is the least disturbed."""
    best, results = dict.fromkeys(runs, float("inf")), {}
    for _ in range(repeat):
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def bench_projection(name: str, stack: torch.Tensor, rank: int, device: torch.device, settings, repeat: int) -> dict:
    E = stack.shape[0]
    on_device = stack.to(device)
    svd = settings.svd
    param = f"model.layers.0.mlp.experts.{name}"
    method = Method.resolve(settings, 10**10)
    entry = {"dtype": "BF16", "layer": 0, "expert": None}
    truncated_svd(
        on_device[:2], rank, "randomized", svd.oversample, svd.power_iters, 0, svd.tol
    )  # warm-up (kernels, allocator)
    seconds, out = best_times(
        {
            "batched": lambda: truncated_svd(
                on_device, rank, "randomized", svd.oversample, svd.power_iters, 0, svd.tol
            ),
            "one_by_one": lambda: [
                truncated_svd(on_device[e], rank, "randomized", svd.oversample, svd.power_iters, e, svd.tol)
                for e in range(E)
            ],
            "unit": lambda: lora_experts(
                Unit("lora_experts", param, (param,)),
                [Delta(param, stack, stack.norm().item())],
                method,
                {param: entry},
            ),
        },
        device,
        repeat,
    )
    gap = max(((out["batched"].S[e] - a.S).abs().max() / a.S[0]).item() for e, a in enumerate(out["one_by_one"]))
    return {
        "projection": name,
        "shape": list(stack.shape),
        "batched_experts_per_s": E / seconds["batched"],
        "one_by_one_experts_per_s": E / seconds["one_by_one"],
        "speedup": seconds["one_by_one"] / seconds["batched"],
        "unit_experts_per_s": E / seconds["unit"],
        "max_singular_value_gap": gap,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="qwen3.6-35b-a3b")
    p.add_argument("--experts", type=int, default=None, help="first E' experts only (default: all of the shape)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs of each timing; the best counts")
    args = p.parse_args()
    experts, hidden, inter = SHAPES[args.shape]
    experts = min(args.experts or experts, experts)
    device = torch.device(args.device)
    settings = updated(  # the pipeline's SVD settings
        run_config(params=ROOT / "params.yaml").extract, rank=args.rank, rank_policy="fixed", device=args.device
    )
    print(
        f"{args.shape}: {experts} experts, rank {args.rank}, {settings.svd.power_iters} power iterations, "
        f"{args.device}, {torch.get_num_threads()} threads, best of {args.repeat}"
    )
    for name, (m, n) in (("gate_up_proj", (2 * inter, hidden)), ("down_proj", (hidden, inter))):
        r = bench_projection(name, synthetic_delta(experts, m, n), args.rank, device, settings, args.repeat)
        print(
            f"  {name} {r['shape']}: batched {r['batched_experts_per_s']:.1f} experts/s, one by one "
            f"{r['one_by_one_experts_per_s']:.1f} experts/s ({r['speedup']:.2f}x); whole unit (SVD, PEFT layout, "
            f"errors) {r['unit_experts_per_s']:.1f} experts/s; "
            f"singular values agree to {r['max_singular_value_gap']:.1e}"
        )


if __name__ == "__main__":
    main()
