"""Validation of a pair bigger than the memory a whole-model comparison needs, as `dvc repro` runs it.

    python benchmarks/validate_bench.py --layers 8 --vocab 128256

Writes a synthetic pair at Llama 3 8B shapes (benchmarks/extract_bench.py's generator: bf16, a rank-16 delta
on every layer matrix, one shard per layer), runs the download, verify, index and extract stages on it with
the committed params (rank 16, the delta's rank), then `python -m stages.validate` under `/usr/bin/time -v`,
and prints its wall time, peak RSS and metrics against the pair's size in fp32 (what loading both models
whole in fp32 would take).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from extract_bench import write_pair  # benchmarks/, on sys.path as the script's own directory
from weightdiff.settings import Paths

ROOT = Path(__file__).resolve().parents[1]


def stage(name: str, overrides: list[str], timed: bool = False) -> str:
    cmd = [sys.executable, "-m", f"stages.{name}", *overrides]
    out = subprocess.run((["/usr/bin/time", "-v"] if timed else []) + cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    return out.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="more Hydra overrides for every stage, e.g. validate.dtype=bf16")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weightdiff-validate-bench-"))
    t = time.perf_counter()
    dir_a, dir_b, config = write_pair(work, "llama3-8b", args.layers, "lora", vocab=args.vocab)
    size = sum(f.stat().st_size for f in dir_a.glob("*.safetensors"))
    print(
        f"pair: llama3-8b shapes, {args.layers} layers, vocab {args.vocab}: "
        f"{size / 2 * 1e-9:.2f} B parameters per model, "
        f"{2 * size * 2 / 2**30:.1f} GiB for both in fp32; written in {time.perf_counter() - t:.0f} s to {work}"
    )
    overrides = [
        f"model_a={dir_a}",
        f"model_b={dir_b}",
        "extract.rank=16",
        *(f"paths.{k}={work / 'run' / k}" for k in asdict(Paths())),
        *args.overrides,
    ]
    for name in ("download", "verify", "index", "extract"):
        t = time.perf_counter()
        stage(name, overrides)
        print(f"{name}: {time.perf_counter() - t:.1f} s")
    report = stage("validate", overrides, timed=True)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", report).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1)) * 1024
    metrics = json.loads((work / "run" / "validate_metrics").read_text())
    print(
        f"validate: wall {wall}, peak RSS {rss / 2**30:.2f} GiB ({rss / 1e9:.2f} GB) against "
        f"{2 * size * 2 / 2**30:.1f} GiB for both models whole in fp32"
    )
    print(json.dumps(metrics, indent=1))
    print((work / "run" / "layer_divergence").read_text())


if __name__ == "__main__":
    main()
