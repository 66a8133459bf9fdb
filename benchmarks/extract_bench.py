"""Extraction against the cost of reading, on the defaults users run: `python -m stages.extract` as a process.

    python benchmarks/extract_bench.py                          # params.yaml's defaults, warm page cache
    python benchmarks/extract_bench.py --cold --delta decaying  # also from disk; a full fine-tune's spectrum
    python benchmarks/extract_bench.py --exact all -- extract.svd.power_iters=2   # Hydra overrides after --
    python benchmarks/extract_bench.py --mergekit /path/to/venv/bin/mergekit-extract-lora

A synthetic pair at real shapes (default: 2 layers of Llama 3 8B), B = A + a rank-16 delta (`--delta lora`:
what merged LoRA fine-tunes give), a dense one with a slowly decaying spectrum (`--delta decaying`: a full
fine-tune) or white noise (`--delta full`), both saved in bf16, one layer per shard with an index file.

Prints the read floor (every target tensor of both models read through safetensors and their fp32 delta
formed: what any extraction must do), the extraction's own time (metrics/extract.json's `seconds`) and the
process's wall time against it, the process's peak RSS, and per compared tensor the energy kept against the
exact SVD's at the same rank. With --mergekit, mergekit's extract-lora on the same pair at --max-rank 16
against ours at extract.rank=16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # Llama 3 8B, Qwen3-30B-A3B's attention (its experts are in benchmarks/moe_bench.py), a small Llama
    "llama3-8b": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
    "qwen3-moe-attn": dict(
        model_type="qwen3",
        architectures=["Qwen3ForCausalLM"],
        hidden_size=2048,
        intermediate_size=6144,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
    ),
    "small": dict(  # units of well under a million elements each: what a task's overhead is measured on
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=512,
        intermediate_size=1376,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
    ),
}


def layer_shapes(c: dict) -> dict[str, tuple[int, int]]:
    h, i, q, kv = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_attention_heads"] * c["head_dim"],
        c["num_key_value_heads"] * c["head_dim"],
    )
    return {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def write_pair(
    root: Path, shape: str, layers: int, delta: str, seed: int = 0, vocab: int = 1024
) -> tuple[Path, Path, dict]:
    """Both models, one shard per layer plus one for the rest; returns (dir_a, dir_b, config)."""
    config = SHAPES[shape] | {
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
    }
    g = torch.Generator().manual_seed(seed)
    dirs = root / "a", root / "b"
    weight_map: dict[str, str] = {}
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config))
    for layer in range(layers + 1):
        shard = f"model-{layer + 1:05d}-of-{layers + 1:05d}.safetensors"
        if layer < layers:
            names = {f"model.layers.{layer}.{m}.weight": s for m, s in layer_shapes(config).items()}
            names |= {
                f"model.layers.{layer}.{n}.weight": (config["hidden_size"],)
                for n in ("input_layernorm", "post_attention_layernorm")
            }
        else:
            names = {
                "model.embed_tokens.weight": (vocab, config["hidden_size"]),
                "lm_head.weight": (vocab, config["hidden_size"]),
                "model.norm.weight": (config["hidden_size"],),
            }
        a, b = {}, {}
        for name, s in names.items():
            w = torch.randn(s, generator=g) * 0.02
            a[name] = w.bfloat16()
            if len(s) == 2 and "layers" in name:
                w = w + synthetic_delta(s, delta, g)
            b[name] = w.bfloat16()
        save_file(a, dirs[0] / shard, metadata={"format": "pt"})
        save_file(b, dirs[1] / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, shard)
    for d in dirs:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return *dirs, config


def synthetic_delta(shape: tuple[int, int], kind: str, g: torch.Generator) -> torch.Tensor:
    """lora: rank 16; full: white noise (flat spectrum); decaying: noise scaled by i^-1/4 along rows and
    columns, whose spectrum decays slowly, as a full fine-tune's does (rank 16 keeps ~10% of its energy)."""
    m, n = shape
    if kind == "lora":
        return torch.randn(m, 16, generator=g) @ torch.randn(16, n, generator=g) * 1e-3
    noise = torch.randn(shape, generator=g) * 2e-3
    if kind == "full":
        return noise
    rows, cols = (torch.arange(1, k + 1.0) ** -0.25 for k in (m, n))
    return noise * (rows / rows.square().mean().sqrt())[:, None] * (cols / cols.square().mean().sqrt())


def drop_from_page_cache(dirs: tuple[Path, Path]) -> None:
    """The shards' pages leave the page cache (POSIX_FADV_DONTNEED), so the next read comes from the disk."""
    for d in dirs:
        for shard in d.glob("*.safetensors"):
            fd = os.open(shard, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_floor(dirs: tuple[Path, Path], names: list[str], weight_map: dict[str, str]) -> float:
    """Seconds to read every target tensor of both models through safetensors and form their fp32 delta."""
    from weightdiff.stream import difference_into

    start = time.perf_counter()
    out = torch.empty(0)
    for name in names:
        with (
            safe_open(str(dirs[0] / weight_map[name]), "pt") as fa,
            safe_open(str(dirs[1] / weight_map[name]), "pt") as fb,
        ):
            a, b = fa.get_tensor(name), fb.get_tensor(name)
            if out.numel() < b.numel():
                out = torch.empty(b.numel())
            difference_into(out[: b.numel()].view(b.shape), a, b)
    return time.perf_counter() - start


def run_stage(work: Path, overrides: list[str]) -> dict:
    """`python -m stages.extract` on the pair in `work`: its wall time, peak RSS (its own, from wait4), and what
    it wrote."""
    out = work / "out"
    paths = {
        "manifest": work / "manifest.json",
        "index": work / "index.json",
        "adapter": out / "adapter",
        "resume": out / "resume",
        "tensors": out / "tensors.json",
        "extract_metrics": out / "extract.json",
        "energy_curve": out / "energy.csv",
    }
    argv = [sys.executable, "-m", "stages.extract", *(f"paths.{k}={v}" for k, v in paths.items()), *overrides]
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    stderr = child.stderr.read() if child.stderr else ""
    if status:
        sys.exit(f"stages.extract failed:\n{stderr}")
    reports = json.loads(paths["tensors"].read_text())
    return {
        "wall": wall,
        "rss_peak": usage.ru_maxrss * 1024,
        "metrics": json.loads(paths["extract_metrics"].read_text()),
        "energies": {r["name"]: (r["energy"], r["rank"]) for r in reports if r["action"] == "lora" and "energy" in r},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--delta", choices=("lora", "decaying", "full"), default="lora")
    p.add_argument("--cold", action="store_true", help="also run from disk, the shards dropped from the page cache")
    p.add_argument("--exact", default="one", help="tensors compared with the exact SVD: one (of each shape), all, none")
    p.add_argument("--mergekit", type=Path, default=None, help="a mergekit-extract-lora executable to compare with")
    p.add_argument("--repeat", type=int, default=3, help="runs of the stage per cache state (the median is shown)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for stages.extract (after --)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weightdiff-bench-"))

    from weightdiff.download import file_list
    from weightdiff.index import build_index

    pair = {"shape": args.shape, "layers": args.layers, "delta": args.delta}
    dir_a, dir_b = work / "a", work / "b"
    if not (work / "pair.json").is_file() or json.loads((work / "pair.json").read_text()) != pair:
        t = time.perf_counter()
        write_pair(work, args.shape, args.layers, args.delta)
        os.sync()  # written back now, not while the extraction is timed
        (work / "pair.json").write_text(json.dumps(pair))
        print(f"wrote the pair in {time.perf_counter() - t:.1f} s")
    print(f"pair: {args.shape}, {args.layers} layers, {args.delta} delta, bf16, in {work}")
    manifest = {
        side: {
            "source": str(d),
            "kind": "local",
            "path": str(d),
            "revision": None,
            "files": file_list(d, with_mtime=False),
        }
        for side, d in (("model_a", dir_a), ("model_b", dir_b))
    }
    index = build_index(manifest)
    (work / "manifest.json").write_text(json.dumps(manifest))
    (work / "index.json").write_text(json.dumps(index))
    tensors = index["model_a"]["tensors"]
    weight_map = json.loads((dir_a / "model.safetensors.index.json").read_text())["weight_map"]
    targets = [n for n, e in tensors.items() if len(e["shape"]) == 2 and "layers" in n]
    largest_pair = max(2 * 4 * math.prod(tensors[n]["shape"]) for n in targets)
    read_bytes = sum(2 * 2 * math.prod(tensors[n]["shape"]) for n in targets)
    dirs = (dir_a, dir_b)
    read_floor(dirs, targets, weight_map)  # warm the page cache
    floor = min(read_floor(dirs, targets, weight_map) for _ in range(3))
    print(
        f"warm read floor: {floor:.2f} s for {read_bytes / 2**30:.2f} GiB of target tensors "
        f"({read_bytes / floor / 2**30:.1f} GiB/s), fp32 deltas formed"
    )
    runs = [("warm", floor)]
    if args.cold:
        drop_from_page_cache(dirs)
        cold_floor = read_floor(dirs, targets, weight_map)
        print(f"cold read floor: {cold_floor:.2f} s ({read_bytes / cold_floor / 2**30:.2f} GiB/s)")
        runs.append(("cold", cold_floor))
    print(f"overrides: {' '.join(args.overrides) or '(none: the defaults)'}")
    for cache, against in runs:
        rs = []
        for _ in range(args.repeat):
            if cache == "cold":
                drop_from_page_cache(dirs)
            else:
                read_floor(dirs, targets, weight_map)
            rs.append(run_stage(work, args.overrides))
        r = sorted(rs, key=lambda x: x["metrics"]["seconds"])[len(rs) // 2]  # the median run
        seconds = r["metrics"]["seconds"]
        each = ", ".join(f"{x['metrics']['seconds']:.2f}" for x in rs)
        print(f"\n{cache} cache, rank {r['metrics']['rank']}, median of {args.repeat}:")
        print(
            f"  extract: {seconds:.2f} s = {seconds / against:.2f} x the {cache} read floor "
            f"(runs: {each} s; process wall {r['wall']:.2f} s: "
            f"{r['wall'] - seconds:.2f} s of start-up, planning and writing)"
        )
        print(f"  per layer: {seconds / args.layers:.3f} s; 32 layers: {32 * seconds / args.layers:.1f} s")
        print(
            f"  peak RSS: {r['rss_peak'] / 2**30:.2f} GiB = {r['rss_peak'] / largest_pair:.2f} x the largest target "
            f"pair in fp32 ({largest_pair / 2**30:.2f} GiB)"
        )
    one_of_each_shape = list({tuple(tensors[n]["shape"]): n for n in reversed(targets)}.values())
    compared = {"none": [], "all": targets, "one": one_of_each_shape}[args.exact]
    for name, exact in exact_energies(
        compared, dir_a, dir_b, weight_map, {n: r["energies"][n][1] for n in compared}
    ).items():
        got = r["energies"][name][0]
        print(f"  {name}: energy {got:.6f}, exact {exact:.6f}, gap {exact - got:+.2e}")
    if args.mergekit:
        compare_mergekit(args.mergekit, work, dirs)


def compare_mergekit(executable: Path, work: Path, dirs: tuple[Path, Path]) -> None:
    """mergekit-extract-lora --max-rank 16 on the pair against our extraction at rank 16, both as processes."""
    ours = run_stage(work, ["extract.rank=16"])["wall"]
    start = time.perf_counter()
    subprocess.run(
        [
            str(executable),
            "--model",
            str(dirs[1]),
            "--base-model",
            str(dirs[0]),
            "--out-path",
            str(work / "mergekit"),
            "--max-rank",
            "16",
        ],
        check=True,
        capture_output=True,
    )
    theirs = time.perf_counter() - start
    print(
        f"\nrank 16, process wall: weightdiff {ours:.1f} s, mergekit-extract-lora {theirs:.1f} s "
        f"({theirs / ours:.1f} x)"
    )


def exact_energies(
    names: list[str], dir_a: Path, dir_b: Path, weight_map: dict, ranks: dict[str, int]
) -> dict[str, float]:
    """The exact SVD's energy at each tensor's rank (slow: tens of seconds for MLP shapes)."""
    out = {}
    for name in names:
        with safe_open(str(dir_a / weight_map[name]), "pt") as fa, safe_open(str(dir_b / weight_map[name]), "pt") as fb:
            dw = fb.get_tensor(name).float() - fa.get_tensor(name).float()
        S = torch.linalg.svdvals(dw.double() if min(dw.shape) <= 1024 else dw)
        out[name] = (S[: ranks[name]].square().sum() / S.square().sum()).item()
    return out


if __name__ == "__main__":
    main()
