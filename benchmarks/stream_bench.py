"""Extraction from a fetched copy against extraction streamed from a Hub, on the defaults.

    python benchmarks/stream_bench.py                 # 2 layers of Llama 3 8B, extract.rank=16
    python benchmarks/stream_bench.py --layers 1 --repeat 3

Writes benchmarks/extract_bench.py's synthetic pair (bf16, a rank-16 delta), serves it from tests/hub_standin.py
(the Hub stand-in the tests use: stdlib HTTP on 127.0.0.1, a redirect to a second "CDN" port for the weights,
Range honoured), resolves both models with download.mode=fetch and download.mode=stream, and runs the extract
stage's function on each: the wall time, the bytes the streamed run asked the CDN for, its throughput, and
whether the two adapters are the same bytes. The stand-in is one Python process serving both models: the
figure is a lower bound on what a streamed run costs over loopback, not a property of the Hub.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from huggingface_hub import constants as hf_constants
from omegaconf import OmegaConf

from extract_bench import write_pair  # benchmarks/, on sys.path as the script's own directory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hub_standin import commit, serve  # noqa: E402
from weightdiff.config import run_config  # noqa: E402
from weightdiff.download import manifest  # noqa: E402
from weightdiff.extract import extract  # noqa: E402
from weightdiff.index import build_index  # noqa: E402


def ranged_bytes(request) -> int:
    first, _, last = request.headers["range"].removeprefix("bytes=").partition("-")
    return int(last) - int(first) + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dir_a, dir_b, _ = write_pair(root / "pair", "llama3-8b", args.layers, "lora")
        repos: dict = {}
        for side, d in (("a", dir_a), ("b", dir_b)):
            commit(repos, f"bench/{side}", {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()})
        pair_bytes = sum(f.stat().st_size for d in (dir_a, dir_b) for f in d.glob("*.safetensors"))
        with serve(repos) as hub:
            hf_constants.ENDPOINT = hub.url
            hf_constants.HUGGINGFACE_CO_URL_TEMPLATE = hub.url + "/{repo_id}/resolve/{revision}/{filename}"
            hf_constants.HF_HUB_OFFLINE = False
            base = run_config(params=ROOT / "params.yaml")
            results = {}
            for mode in ("fetch", "stream"):
                cfg = OmegaConf.merge(
                    OmegaConf.structured(base),
                    {
                        "model_a": "bench/a",
                        "model_b": "bench/b",
                        "download": {"mode": mode, "cache_dir": str(root / f"cache-{mode}")},
                        "extract": {"rank": 16},
                    },
                )
                pinned = manifest(cfg)
                index = build_index(pinned)
                seconds, sent = [], 0
                for i in range(args.repeat):
                    before = len(hub.requests)
                    start = time.perf_counter()
                    extract(index, pinned, cfg.extract, root / f"out-{mode}-{i}", root / f"resume-{mode}")
                    seconds.append(time.perf_counter() - start)
                    sent = sum(ranged_bytes(r) for r in hub.requests[before:] if r.cdn and "range" in r.headers)
                adapter = (root / f"out-{mode}-0" / "adapter_model.safetensors").read_bytes()
                results[mode] = (statistics.median(seconds), sent, adapter)
    (fetch_s, _, fetch_adapter), (stream_s, sent, stream_adapter) = results["fetch"], results["stream"]
    print(f"pair: {args.layers} layers of Llama 3 8B, {pair_bytes / 1e9:.2f} GB (both models)")
    print(f"extract, fetched copy (warm page cache): {fetch_s:.2f} s")
    print(
        f"extract, streamed:                       {stream_s:.2f} s, {sent / 1e9:.2f} GB ranged reads, "
        f"{sent / stream_s / 1e6:.0f} MB/s"
    )
    print(f"adapters identical: {fetch_adapter == stream_adapter}")


if __name__ == "__main__":
    main()
