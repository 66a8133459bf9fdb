"""Units per second of `python -m stages.extract` under extract.executor=local and under ray, on the same pair, and
whether both write the same adapter bytes.

    python benchmarks/executor_bench.py                                 # 2 layers of Llama 3 8B's shapes
    python benchmarks/executor_bench.py --shape small --layers 16       # many small units: a task's overhead
    python benchmarks/executor_bench.py -- extract.ray.address=127.0.0.1:6379   # a running cluster (ray start)

The pair is extract_bench's (B = A + a rank-16 delta, bf16, a shard per layer). Each run is a whole stage process;
"extract" is metrics/extract.json's `seconds`, which for ray with extract.ray.address=null includes starting a local
Ray and its workers. The overrides after -- apply to the ray runs only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
from pathlib import Path

from extract_bench import ROOT, SHAPES, run_stage, write_pair
from weightdiff.config import run_config
from weightdiff.download import file_list
from weightdiff.extract import same_shapes
from weightdiff.index import build_index
from weightdiff.layout import ModelModules
from weightdiff.plan import plan_units


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="runs per executor (the median is shown)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the ray runs (after --)")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="weightdiff-executor-bench-"))
    pair = {"shape": args.shape, "layers": args.layers, "delta": "lora"}
    if not (work / "pair.json").is_file() or json.loads((work / "pair.json").read_text()) != pair:
        write_pair(work, args.shape, args.layers, "lora")
        os.sync()  # written back now, not while the first run is timed
        (work / "pair.json").write_text(json.dumps(pair))
    manifest = {
        side: {"source": str(d), "kind": "local", "path": str(d), "revision": None, "files": file_list(d, False)}
        for side, d in (("model_a", work / "a"), ("model_b", work / "b"))
    }
    index = build_index(manifest)
    (work / "manifest.json").write_text(json.dumps(manifest))
    (work / "index.json").write_text(json.dumps(index))
    settings = run_config(params=ROOT / "params.yaml").extract
    units = len(plan_units(same_shapes(index), settings, ModelModules.from_json(index["model_a"]["modules"])))
    print(f"pair: {args.shape}, {args.layers} layers, {units} units, in {work}")
    adapters = {}
    for name, overrides in (("local", []), ("ray", ["extract.executor=ray", *args.overrides])):
        runs = []
        for _ in range(args.repeat):
            runs.append(run_stage(work, overrides))
            adapter = (work / "out" / "adapter" / "adapter_model.safetensors").read_bytes()
            adapters.setdefault(name, set()).add(hashlib.sha256(adapter).hexdigest())
        seconds = statistics.median(r["metrics"]["seconds"] for r in runs)
        wall = statistics.median(r["wall"] for r in runs)
        each = ", ".join(f"{r['metrics']['seconds']:.2f}" for r in runs)
        print(
            f"{name:>5}: {units / seconds:6.1f} units/s (extract {seconds:.2f} s, median of {args.repeat}: {each}; "
            f"process wall {wall:.2f} s){'  ' + ' '.join(overrides) if overrides else ''}"
        )
    same = len(adapters["local"] | adapters["ray"]) == 1
    print(f"adapter_model.safetensors: {'identical' if same else 'DIFFERENT'} across every run of both executors")


if __name__ == "__main__":
    main()
