"""`weightdiff compose A→B B→C -o A→C` on two adapters of a whole model's shapes, with the command's defaults.

    python benchmarks/compose_bench.py                       # Llama 3 8B: 32 layers x 7 projections, rank 16, fp16
    python benchmarks/compose_bench.py --rank 64 --layers 8

The adapters are random factors of the given rank (as extraction writes them: fp16, alpha = r, with provenance
that chains them), so their sum has rank 2r: the default cut at r (the inputs' rank) keeps about half its energy,
which the command reports; a run at --rank 2r cuts nothing, and its products must equal the sum of the two deltas.
Prints the default command's seconds and peak memory (a whole process each run), the adapters' sizes, the energy
the default kept, and the largest relative error of the 2r composition's products against the sum, on one layer.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from weightdiff.compose import STATS_FILE, Adapter
from weightdiff.peft_format import Targets, adapter_config, lora_keys, write_adapter

PROJECTIONS = {  # Llama 3 8B: (out, in)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (1024, 4096),
    "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (14336, 4096),
    "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}


def write_random_adapter(out: Path, layers: int, rank: int, seed: int, model_a: str, model_b: str) -> None:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for layer in range(layers):
        for name, (rows, cols) in PROJECTIONS.items():
            a_key, b_key = lora_keys(f"model.layers.{layer}.{name}")
            factors[a_key] = (torch.randn(rank, cols, generator=g) / cols**0.5).half()
            factors[b_key] = (torch.randn(rows, rank, generator=g) * 1e-2).half()
    names = sorted({n.rpartition(".")[2] for n in PROJECTIONS})
    targets = Targets(names, [], {})
    config = adapter_config(
        base_model=model_a, rank=rank, alpha=None, targets=targets, saved=[], lora_bias=False, tied=False
    )
    write_adapter(out, factors, config, {"model_a": model_a, "model_b": model_b, "experts": {}, "tied": None})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weightdiff-compose-bench-"))
    write_random_adapter(work / "ab", args.layers, args.rank, 1, "org/a", "org/b")
    write_random_adapter(work / "bc", args.layers, args.rank, 2, "org/b", "org/c")
    command = [sys.executable, "-m", "weightdiff.commands", "compose", str(work / "ab"), str(work / "bc")]
    seconds = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        subprocess.run([*command, "-o", str(work / "ac")], check=True, capture_output=True)
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    energy = json.loads((work / "ac" / STATS_FILE).read_text())["energy"]
    subprocess.run([*command, "-o", str(work / "exact"), "--rank", str(2 * args.rank)], check=True, capture_output=True)
    sizes = {n: (work / n / "adapter_model.safetensors").stat().st_size / 1e6 for n in ("ab", "bc", "ac", "exact")}
    worst = 0.0
    ab, bc, ac = (Adapter.open(work / n) for n in ("ab", "bc", "exact"))
    for path, site in ac.sites.items():
        if path.startswith("model.layers.0."):
            total = sum(B @ A for B, A, _ in (x.term(x.sites[path], 1.0) for x in (ab, bc)))
            B, A, _ = ac.term(site, 1.0)
            worst = max(worst, ((B @ A - total).norm() / total.norm()).item())
    print(
        f"compose of 2 adapters ({args.layers} layers x {len(PROJECTIONS)} projections, rank {args.rank}, "
        f"{sizes['ab']:.1f} + {sizes['bc']:.1f} MB) -> {sizes['ac']:.1f} MB at rank {args.rank} (the default): "
        f"median {sorted(seconds)[len(seconds) // 2]:.2f} s (min {min(seconds):.2f}, max {max(seconds):.2f}), "
        f"peak RSS {peak:.0f} MiB, energy kept {energy:.4f}; at rank {2 * args.rank} ({sizes['exact']:.1f} MB) layer "
        f"0's products are within {worst:.1e} of the sum (relative, fp16 factors)"
    )


if __name__ == "__main__":
    main()
