"""The whole pipeline with its defaults on three real-weight pairs built from SmolLM2-135M-Instruct (issue 12).

The pairs (tests/real_pairs.py): a merged LoRA (the demo pair), a refusal-direction ablation of the tied-embedding
model, and a short full fine-tune. Each runs as a user would run it, `dvc exp run -S model_a=<A> -S model_b=<B>`,
in a clone of this repository (never in the working tree itself: experiments rewrite params.yaml and the
outputs). Printed and written to <out>/results.json per pair: whether all eight stages completed, validate's
gap_closed and KLs, extract's energy, rank and adapter size, gguf.json's written / left_out. For the merged
LoRA also llama.cpp's own verdict: A converted by llama.cpp's convert_hf_to_gguf.py plus our adapter GGUF
against B converted the same way, KL per token on the validation text.

    python benchmarks/real_pairs_bench.py --out /tmp/real_pairs [--clone /work/realpairs] [--kinds ablation]
        [--set extract.extras.norms=skip ...]

The llama.cpp check needs llama-cpp-python and the converter cached by the llamacpp test lane (run
`pytest tests/test_llamacpp.py` once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import real_pairs  # noqa: E402

METRICS = ("metrics/extract.json", "metrics/validate.json", "metrics/gguf.json")
STAGES = ("download", "verify", "index", "extract", "validate", "gguf-convert", "figures", "paper")
LLAMA_CPP_KL_MAX = 1e-3


@dataclass
class PairResult:
    kind: str
    all_stages_done: bool
    stages_locked: list[str]
    gap_closed: float | None
    kl_adapted: float | None
    kl_base: float | None
    energy: float | None
    rank: int | None
    adapter_bytes: int | None
    gguf_written: bool | None
    gguf_left_out: list | None
    llama_cpp: dict | None = None
    error: str | None = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the pairs and results.json go")
    parser.add_argument("--clone", type=Path, help="the repository clone dvc runs in; default <out>/clone")
    parser.add_argument("--kinds", nargs="+", default=list(real_pairs.KINDS), choices=real_pairs.KINDS)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="more `-S` overrides (default: none)"
    )
    args = parser.parse_args()
    clone = cloned(args.clone or args.out / "clone")
    base, demo_settings = base_model(args.out)
    results = []
    for kind in args.kinds:
        dir_a, dir_b = real_pairs.make_pair(kind, args.out / "pairs" / kind, base, demo_settings)
        result = pipeline_result(kind, clone, dir_a, dir_b, args.set)
        if kind == "merged_lora" and result.gguf_written:
            result.llama_cpp = llama_cpp_result(dir_a, dir_b, gguf_adapter(clone))
        print(summary_line(result), flush=True)
        results.append(result)
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    print(f"written {args.out / 'results.json'}")


def cloned(clone: Path) -> Path:
    """clone, a git clone of this repository (made from its last commit when absent)."""
    if not (clone / ".git").is_dir():
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    return clone


def base_model(out: Path):
    """(the converted SmolLM2 folder, the committed demo settings) every pair is built from."""
    from weightdiff import pretrained
    from weightdiff.config import run_config

    return pretrained.smollm2(out / "SmolLM2-135M-Instruct"), run_config(params=REPO / "params.yaml").demo


def pipeline_result(kind: str, clone: Path, dir_a: Path, dir_b: Path, overrides: list[str]) -> PairResult:
    """`dvc exp run` on the pair in clone (with the overrides, if any), and what its metrics say. The earlier
    pair's metrics are removed first, so that a stage that fails leaves none that look like this pair's."""
    for name in METRICS:
        (clone / name).unlink(missing_ok=True)
    sets = [arg for override in [f"model_a={dir_a}", f"model_b={dir_b}", *overrides] for arg in ("-S", override)]
    run = dvc(clone, "exp", "run", *sets)
    locked = locked_stages(clone)
    up_to_date = run.returncode == 0 and dvc(clone, "status", "--json").stdout.strip() in ("{}", "")
    extract, validate, gguf = (metrics(clone, name) for name in METRICS)
    return PairResult(
        kind=kind,
        all_stages_done=up_to_date and set(STAGES) <= set(locked),
        stages_locked=locked,
        gap_closed=validate.get("gap_closed"),
        kl_adapted=validate.get("kl_adapted"),
        kl_base=validate.get("kl_base"),
        energy=extract.get("energy"),
        rank=extract.get("rank"),
        adapter_bytes=extract.get("adapter_bytes"),
        gguf_written=gguf.get("written", bool(gguf)),
        gguf_left_out=gguf.get("left_out"),
        error=None if run.returncode == 0 else run.stderr[-2000:],
    )


def dvc(clone: Path, *args: str) -> subprocess.CompletedProcess:
    """dvc in the clone, with this interpreter's environment first on PATH (the stages run `python -m ...`)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([str(bin_dir / "dvc"), *args], cwd=clone, env=env, capture_output=True, text=True)


def locked_stages(clone: Path) -> list[str]:
    lock = clone / "dvc.lock"
    return list(yaml.safe_load(lock.read_text()).get("stages", {})) if lock.is_file() else []


def metrics(clone: Path, name: str) -> dict:
    path = clone / name
    return json.loads(path.read_text()) if path.is_file() else {}


def gguf_adapter(clone: Path) -> Path:
    """The adapter GGUF gguf-convert wrote: its out in the clone's dvc.yaml, a file or a directory holding one."""
    out = clone / yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]["gguf-convert"]["outs"][0]
    return out / "adapter.gguf" if out.is_dir() else out


def llama_cpp_result(dir_a: Path, dir_b: Path, adapter: Path) -> dict:
    """KL(B ‖ A + adapter) and KL(B ‖ A) per token in llama.cpp, on the tokens validate measures: A and B are
    converted to f32 GGUFs by llama.cpp's own converter (beside their folders), the adapter is ours."""
    import test_llamacpp as lane
    from weightdiff.config import run_config
    from weightdiff.evalset import evaluation_batch

    source = lane.cache_dir() / f"llama-cpp-python-{lane.llama_cpp.__version__}"
    if not (source / lane.CONVERTER_PATHS[0]).is_file():
        return {"error": f"{source}: llama.cpp's converter is not cached; run `pytest tests/test_llamacpp.py` once"}
    if not all(lane.gguf_of(d).is_file() for d in (dir_a, dir_b)):
        lane.converted(source, [dir_a, dir_b])
    settings = run_config(params=REPO / "params.yaml").validate
    vocab = json.loads((dir_a / "config.json").read_text())["vocab_size"]
    tokens, _ = evaluation_batch(dir_a, vocab, settings)
    tuned = lane.llama_log_probs(lane.gguf_of(dir_b), tokens)
    adapted = lane.llama_log_probs(lane.gguf_of(dir_a), tokens, adapter)
    base = lane.llama_log_probs(lane.gguf_of(dir_a), tokens)
    kl_adapted = lane.kl_per_token(tuned, adapted)
    return {
        "kl_adapted": kl_adapted,
        "kl_base": lane.kl_per_token(tuned, base),
        "top1_adapted": lane.top1_agreement(tuned, adapted),
        "within_target": kl_adapted <= LLAMA_CPP_KL_MAX,
        "tokens": tokens.numel(),
    }


def left_out(entries: list | None) -> str:
    """gguf.json's left_out in a line: how many tensors, the first few named (results.json has them all)."""
    if not entries:
        return "nothing"
    names = [entry["tensor"] if isinstance(entry, dict) else str(entry) for entry in entries]
    return f"{len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def summary_line(r: PairResult) -> str:
    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    line = (
        f"{r.kind}: all 8 stages {'done' if r.all_stages_done else 'NOT done'}; gap_closed "
        f"{number(r.gap_closed, '.5f')}, KL {number(r.kl_adapted, '.3g')} (A alone {number(r.kl_base, '.3g')}), "
        f"energy {number(r.energy, '.3f')}, rank {r.rank}, adapter {number(r.adapter_bytes, ',')} bytes; "
        f"gguf written {r.gguf_written}, left out {left_out(r.gguf_left_out)}"
    )
    if r.llama_cpp:
        line += f"; llama.cpp {r.llama_cpp}"
    return line + (f"\n  error: {r.error}" if r.error else "")


if __name__ == "__main__":
    main()
