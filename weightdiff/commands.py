"""`weightdiff extract|validate|gguf|compose`: the pipeline's steps, and adapter arithmetic, as one command each.

The same library calls as the stages, with the same defaults: the settings are weightdiff.settings' (which
tests/test_commands.py holds equal to the committed params.yaml), changed by Hydra overrides (`key=value`,
`'extract.target_modules=[q_proj,v_proj]'`). Sources are the pipeline's: a Hub id with @revision, or a local
directory. Nothing is kept between commands but their outputs: the manifest and the index are rebuilt from
the headers (seconds).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from weightdiff.errors import WeightdiffError
from weightdiff.settings import Settings

METRICS_FILE = "weightdiff_metrics.json"  # beside the adapter: what `extract` measured, for `validate`'s verdict
EPILOG = (
    "Any other setting as a Hydra override, key=value (see conf/config.yaml or weightdiff/settings.py): "
    "download.mode=stream, extract.rank_policy=energy, 'extract.target_modules=[q_proj,v_proj]', validate.seq_len=256"
)


def settings(model_a: str, model_b: str, overrides: Sequence[str]) -> Settings:
    """The package's defaults with the two sources and the overrides, composed and checked as a stage's are."""
    from weightdiff.config import run_config

    with tempfile.TemporaryDirectory() as tmp:
        defaults = OmegaConf.structured(Settings)
        defaults.model_a, defaults.model_b = model_a, model_b
        (Path(tmp) / "params.yaml").write_text(OmegaConf.to_yaml(defaults))
        return run_config(list(overrides), params=Path(tmp) / "params.yaml")


def indexed(cfg: Settings) -> tuple[dict, dict]:
    """(manifest, index) of the pair, checked as the verify stage checks it."""
    from weightdiff.download import manifest
    from weightdiff.index import build_index
    from weightdiff.verify import verify

    pinned = manifest(cfg)
    verify(pinned, list(cfg.verify.ignore_config_keys), cfg.verify.resized_embeddings)
    return pinned, build_index(pinned)


def extract_command(args: argparse.Namespace) -> None:
    from weightdiff.extract import extract
    from weightdiff.files import write_json

    overrides = ([f"extract.rank={args.rank}"] if args.rank is not None else []) + args.overrides
    cfg = settings(args.model_a, args.model_b, overrides)
    out = Path(args.output)
    pinned, index = indexed(cfg)
    resume = out.parent / f".{out.name}.resume"  # beside the adapter: an interrupted run resumes from it
    metrics, reports, _ = extract(index, pinned, cfg.extract, out, resume)
    shutil.rmtree(resume, ignore_errors=True)
    write_json(out / METRICS_FILE, metrics | {"tensors": reports})
    print(
        f"{out}: {metrics['adapter_bytes'] / 1e6:.1f} MB adapter, rank {metrics['rank']}, energy kept "
        f"{metrics['energy']:.4f}, in {metrics['seconds']:.1f} s"
    )


def validate_command(args: argparse.Namespace) -> None:
    from weightdiff.validate import validate
    from weightdiff.verdict import judged, verdict_of

    cfg = settings(args.model_a, args.model_b, args.overrides)
    adapter = Path(args.adapter)
    _, index = indexed(cfg)
    metrics, _ = validate(index, adapter, cfg.validate)
    extracted = adapter / METRICS_FILE
    if extracted.is_file():
        metrics |= judged(metrics, json.loads(extracted.read_text()), cfg.validate.gap_closed_target)
    else:
        metrics["verdict"] = verdict_of(metrics["gap_closed"], cfg.validate.gap_closed_target)
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=1) + "\n")
    gap = "n/a" if metrics["gap_closed"] is None else f"{metrics['gap_closed']:.4f}"
    print(
        f"KL(B ‖ A + adapter) {metrics['kl_adapted']:.3e} per token, KL(B ‖ A) {metrics['kl_base']:.3e}, gap closed "
        f"{gap}, top-1 agreement {metrics['top1_adapted']:.3f}, on {metrics['tokens']} tokens: {metrics['verdict']}"
    )
    if "verdict_summary" in metrics:
        print(metrics["verdict_summary"])


def gguf_command(args: argparse.Namespace) -> None:
    from weightdiff.download import parse_source, resolve
    from weightdiff.gguf_export import write_lora_gguf
    from weightdiff.index import model_index
    from weightdiff.peft_format import read_adapter_config

    adapter = Path(args.adapter)
    base = args.base or read_adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise WeightdiffError(f"{adapter}/adapter_config.json names no base model: give it with --base")
    # Only the base's config and tensor names are needed: a Hub base is streamed (headers only), never fetched.
    cfg = settings(base, base, ["download.mode=stream", *args.overrides])
    index = model_index(Path(resolve(parse_source(base), cfg)["path"]))
    summary = write_lora_gguf(
        adapter,
        index["config"],
        Path(args.output),
        str(cfg.gguf.dtype),
        strict=cfg.gguf.strict,
        base_tensors=index["tensors"],
    )
    print(json.dumps(summary, indent=1))


def publish_command(args: argparse.Namespace) -> None:
    from weightdiff.publish import publish
    from weightdiff.settings import updated

    cfg = settings("demo:a", "demo:b", args.overrides)  # no models are read: the card takes them from the manifest
    chosen = {"repo": args.repo_id, "revision": args.revision, "private": args.private or None}
    given = {"adapter": args.adapter, "gguf": args.gguf, "paper": args.paper, "validate_metrics": args.validation}
    record = publish(
        updated(cfg.publish, **{k: v for k, v in chosen.items() if v is not None}),
        updated(cfg.paths, **{k: v for k, v in given.items() if v is not None}),
    )
    print(f"{record['url']}: {len(record['files'])} files on {record['repo']}@{record['revision']}")


def compose_command(args: argparse.Namespace) -> None:
    from weightdiff.compose import compose

    if args.overrides:
        args.parser.error(f"compose takes no settings: {' '.join(args.overrides)}")
    weights = args.weights or [1.0] * len(args.adapters)
    summary = compose([Path(a) for a in args.adapters], weights, Path(args.output), args.rank, args.unchecked)
    ends = f"{summary['model_a']} → {summary['model_b'] or '(a sum or a scaled delta)'}"
    print(
        f"{args.output}: {ends}, {summary['adapter_bytes'] / 1e6:.1f} MB, {summary['modules']} modules, energy kept "
        f"{summary['energy']:.6f} of the exact composition (least: {summary['worst_energy']:.6f}, "
        f"{summary['worst_module']})"
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="weightdiff",
        description="Turn the weight difference of two language models into a LoRA adapter (truncated SVD).",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, epilog: str | None = EPILOG) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=epilog)
        sub.set_defaults(parser=sub)
        return sub

    ex = command("extract", "ΔW = W_B − W_A of every target module, compressed by truncated SVD into a PEFT adapter")
    ex.add_argument("model_a", help="the base: a Hub id (org/name[@revision]) or a local directory")
    ex.add_argument("model_b", help="the fine-tune of the same architecture")
    ex.add_argument("-o", "--output", required=True, help="the adapter directory to write (replaced when done)")
    ex.add_argument("--rank", type=int, help="LoRA rank (default: extract.rank, auto by model size)")
    ex.set_defaults(run=extract_command)

    va = command("validate", "KL(B ‖ A + adapter) and KL(B ‖ A) per token on real text, the adapter applied by PEFT")
    va.add_argument("adapter", help="a PEFT LoRA adapter directory")
    va.add_argument("model_a")
    va.add_argument("model_b")
    va.add_argument("-o", "--output", help="also write the metrics as JSON here")
    va.set_defaults(run=validate_command)

    gg = command("gguf", "the adapter as a llama.cpp LoRA GGUF (what GGUF cannot hold is left out and listed)")
    gg.add_argument("adapter", help="a PEFT LoRA adapter directory")
    gg.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    gg.add_argument("--base", help="the base model (default: adapter_config.json's base_model_name_or_path)")
    gg.set_defaults(run=gguf_command)

    pu = command(
        "publish",
        "the adapter, a model card with the run's numbers, the GGUF and the paper as one commit to a Hub model repo "
        "(made when missing; HF_TOKEN or `hf auth login`)",
        epilog="Run from the pipeline's directory, it publishes the last run's outputs; a missing GGUF or paper is "
        "left out and said. The repo loads as it is: PeftModel.from_pretrained(base, REPO_ID).",
    )
    pu.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repo, org/name")
    pu.add_argument("--adapter", help="the PEFT adapter directory (default: artifacts/adapter)")
    pu.add_argument("--gguf", help="a .gguf file, or a directory of them (default: artifacts/gguf; none: left out)")
    pu.add_argument("--paper", help="the paper's directory (default: reports/paper; none: left out)")
    pu.add_argument("--validation", help="validate's metrics for the card (default: metrics/validate.json)")
    pu.add_argument("--revision", help="the branch to commit to, made from main when missing (default: main)")
    pu.add_argument("--private", action="store_true", help="make the repo private if it is new")
    pu.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="publish.commit_message=..., or paths.<key>=... for any other input (paths.figures, paths.manifest)",
    )
    pu.set_defaults(run=publish_command)

    co = command(
        "compose",
        "adapters added up from their factors alone: A→B then B→C gives A→C, weight -1 turns A→B into B→A, any other "
        "weight scales; each module recompressed exactly (QR of the stacked factors, an SVD of their small core)",
        epilog="Writes the adapter and weightdiff_compose.json (energy kept per module) into the output directory.",
    )
    co.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT LoRA adapter directories, in chain order")
    co.add_argument("-o", "--output", required=True, help="the adapter directory to write (replaced when done)")
    co.add_argument("--rank", type=int, help="rank of every module (default: the largest the inputs give it)")
    co.add_argument(
        "--weights", type=float, nargs="+", metavar="W", help="one per adapter (default 1 each): -1 negates, 0.5 halves"
    )
    co.add_argument(
        "--unchecked",
        action="store_true",
        help="compose even where an adapter does not start where the one before ends",
    )
    co.set_defaults(run=compose_command, overrides=[])

    for sub in (ex, va, gg):
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides of any other setting")
    return top


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: a WeightdiffError (bad input: a missing file, a mismatched pair...) is one line on
    stderr and exit status 1; a usage error is argparse's (status 2)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("weightdiff").setLevel(logging.INFO)
    top = parser()
    try:
        # overrides may also follow options (`-o OUT key=value`), where argparse leaves them unparsed
        args, rest = top.parse_known_args(argv)
        flags = [r for r in rest if r.startswith("-") or "=" not in r]
        if flags:
            args.parser.error(f"unrecognized arguments: {' '.join(flags)}")
        args.overrides += rest
        args.run(args)
    except WeightdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
