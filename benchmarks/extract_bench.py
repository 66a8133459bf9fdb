"""Extraction against the cost of reading: a synthetic pair at real shapes, timed on this machine.

    python benchmarks/extract_bench.py --shape llama3-8b --layers 2 --cold
    python benchmarks/extract_bench.py --shape llama3-8b --layers 4 --delta decaying --power-iters 1 2 auto

B = A + a rank-16 delta (`--delta lora`: what merged LoRA fine-tunes give), a dense one with a slowly
decaying spectrum (`--delta decaying`: a full fine-tune) or white noise (`--delta full`), both saved in bf16
and sharded one layer per shard with an index file. Prints the extraction wall time, the read floor
(reading the same target tensors of both models through safetensors, warm page cache; with --cold also
from disk, the shards dropped from the page cache first), their ratio, the peak RSS of the extracting
process against the largest target tensor pair in fp32, and per sampled tensor the energy kept against the
exact SVD's.
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
SHAPES = {  # Llama 3 8B and Qwen3-30B-A3B's attention (its experts are in benchmarks/moe_bench.py)
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
    """Seconds to bring every target tensor of both models into memory through safetensors (warm cache)."""
    start = time.perf_counter()
    for d in dirs:
        for name in names:
            with safe_open(str(d / weight_map[name]), framework="pt") as f:
                f.get_tensor(name).clone()  # get_tensor maps; clone is the read
    return time.perf_counter() - start


CHILD = """
import json, re, sys, time
from pathlib import Path
from weightdiff.extract import extract
from weightdiff.settings import ExtractSettings, typed

def peak_rss():  # VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited at fork)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

manifest, index, settings = (json.loads(Path(p).read_text()) for p in sys.argv[1:4])
rss_start = peak_rss()
t = time.perf_counter()
metrics, reports, _ = extract(index, manifest, typed(ExtractSettings, settings), Path(sys.argv[4]), Path(sys.argv[5]))
print(json.dumps({"seconds": time.perf_counter() - t, "rss_start": rss_start, "rss_peak": peak_rss(),
                  "energies": {r["name"]: r["energy"] for r in reports if r["action"] == "lora" and "energy" in r}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--delta", choices=("lora", "decaying", "full"), default="lora")
    p.add_argument("--power-iters", type=lambda v: v if v == "auto" else int(v), nargs="+", default=["auto"])
    p.add_argument("--cold", action="store_true", help="also time the read and the extraction from disk")
    p.add_argument("--oversample", type=int, default=10)
    p.add_argument("--sample", type=int, default=3, help="tensors compared with the exact SVD")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weightdiff-bench-"))

    from weightdiff.config import run_config
    from weightdiff.download import file_list
    from weightdiff.index import build_index
    from weightdiff.settings import plain

    t = time.perf_counter()
    dir_a, dir_b, config = write_pair(work, args.shape, args.layers, args.delta)
    print(
        f"pair: {args.shape}, {args.layers} layers, {args.delta} delta, bf16, in {work} "
        f"({time.perf_counter() - t:.1f} s to write)"
    )
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
    tensors = index["model_a"]["tensors"]
    weight_map = json.loads((dir_a / "model.safetensors.index.json").read_text())["weight_map"]
    targets = [n for n, e in tensors.items() if len(e["shape"]) == 2 and "layers" in n]
    largest_pair = max(2 * 4 * math.prod(tensors[n]["shape"]) for n in targets)
    read_floor((dir_a, dir_b), targets, weight_map)  # warm the page cache
    floor = min(read_floor((dir_a, dir_b), targets, weight_map) for _ in range(2))
    read_bytes = sum(2 * 2 * math.prod(tensors[n]["shape"]) for n in targets)
    print(
        f"read floor: {floor:.2f} s for {read_bytes / 2**30:.2f} GiB of target tensors "
        f"({read_bytes / floor / 2**30:.1f} GiB/s)"
    )
    if args.cold:
        drop_from_page_cache((dir_a, dir_b))
        cold_floor = read_floor((dir_a, dir_b), targets, weight_map)
        print(f"cold read floor: {cold_floor:.2f} s ({read_bytes / cold_floor / 2**30:.2f} GiB/s)")

    base = plain(run_config(params=ROOT / "params.yaml").extract)
    files = {}
    for name, obj in (("manifest", manifest), ("index", index)):
        files[name] = work / f"{name}.json"
        files[name].write_text(json.dumps(obj))
    exact = exact_energies(targets[: args.sample * 3 : 3] if args.sample else [], dir_a, dir_b, weight_map, args.rank)
    for iters in args.power_iters:
        settings = base | {
            "rank": args.rank,
            "rank_policy": "fixed",
            "dtype": "fp16",
            "svd": base["svd"] | {"power_iters": iters, "oversample": args.oversample, "check_samples": 0},
        }
        files["settings"] = work / "settings.json"
        files["settings"].write_text(json.dumps(settings))
        for cache in ("warm", "cold") if args.cold else ("warm",):
            if cache == "cold":
                drop_from_page_cache((dir_a, dir_b))
            else:
                read_floor((dir_a, dir_b), targets, weight_map)
            r = run_extraction(files, work)
            against = floor if cache == "warm" else cold_floor
            print(f"\nrank {args.rank}, oversample {args.oversample}, power iterations {iters}, {cache} cache:")
            print(f"  extract: {r['seconds']:.2f} s = {r['seconds'] / against:.2f} x the {cache} read floor")
            print(
                f"  peak RSS: {r['rss_peak'] / 2**30:.2f} GiB "
                f"({(r['rss_peak'] - r['rss_start']) / 2**30:.2f} GiB above the "
                f"{r['rss_start'] / 2**30:.2f} GiB of the started process) = {r['rss_peak'] / largest_pair:.2f} x "
                f"(above start: {(r['rss_peak'] - r['rss_start']) / largest_pair:.2f} x) "
                f"the largest target pair in fp32 "
                f"({largest_pair / 2**30:.2f} GiB)"
            )
        for name, e in exact.items():
            print(f"  {name}: energy {r['energies'][name]:.6f}, exact {e:.6f}, gap {e - r['energies'][name]:+.2e}")


def run_extraction(files: dict[str, Path], work: Path) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            *(str(files[n]) for n in ("manifest", "index", "settings")),
            str(work / "adapter"),
            str(work / "ckpt"),
        ],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    if out.returncode:
        sys.exit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def exact_energies(names: list[str], dir_a: Path, dir_b: Path, weight_map: dict, rank: int) -> dict[str, float]:
    """The exact SVD's energy at `rank` for the sampled tensors (slow: minutes for MLP shapes)."""
    out = {}
    for name in names:
        with safe_open(str(dir_a / weight_map[name]), "pt") as fa, safe_open(str(dir_b / weight_map[name]), "pt") as fb:
            dw = fb.get_tensor(name).float() - fa.get_tensor(name).float()
        S = torch.linalg.svdvals(dw)
        out[name] = (S[:rank].square().sum() / S.square().sum()).item()
    return out


if __name__ == "__main__":
    main()
