"""The model card a published adapter carries: Hub metadata, then the run's own numbers, written for a reader who
meets the adapter on the Hub and has none of the run's files.

The metadata follows the Hub's conventions for PEFT adapters (`base_model`, `library_name: peft`), so the Hub
links the adapter from its base's page and offers PEFT's loading snippet; a base that is no Hub repo (a local
directory, the demo pair) gets no `base_model`, which the Hub would check against its repos. Every number comes
from the files the stages wrote (FORMATS.md); a part of the run that is missing leaves its section out, never a
guess in its place.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from huggingface_hub import ModelCardData

# An org/name Hub id, as adapter_config.json names a Hub base (a local base is named by its absolute path).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hub_base(adapter_config: dict) -> str | None:
    """The base's Hub id, or None for a base that is a local directory."""
    base = str(adapter_config.get("base_model_name_or_path") or "")
    return base if HUB_ID.fullmatch(base) else None


def model_card(repo_id: str, revision: str, adapter_config: dict, run: dict, files: Sequence[str]) -> str:
    """README.md for `repo_id`: front matter, then what the adapter is, the run's numbers and how to load it.

    `run` holds what the stages wrote, each key optional: manifest, extract (metrics/extract.json), validate
    (metrics/validate.json), gguf (metrics/gguf.json); `files` are the repo paths published beside the card.
    """
    base = hub_base(adapter_config)
    tags = ["lora", "peft", "weightdiff"] + (["gguf"] if any(f.endswith(".gguf") for f in files) else [])
    metadata = ModelCardData(base_model=base, library_name="peft", pipeline_tag="text-generation", tags=tags)
    sections = [
        intro(repo_id, base, run.get("manifest")),
        adapter_section(run["extract"]) if "extract" in run else "",
        fidelity_section(run["validate"]) if "validate" in run else "",
        usage_section(repo_id, revision, base, files),
        files_section(files, run.get("gguf")),
    ]
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(s for s in sections if s)


def source_row(role: str, entry: dict) -> str:
    revision = f"`{entry['revision']}`" if entry.get("revision") else "(local files)"
    return f"| {role} | `{entry['source']}` | {revision} |"


def intro(repo_id: str, base: str | None, manifest: dict | None) -> str:
    lines = [
        f"# {repo_id.rpartition('/')[2]}",
        "",
        "A LoRA adapter made without training or data by weightdiff: ΔW = W_B − W_A, the weight difference of a "
        "fine-tune B and its base A, tensor by tensor, compressed by truncated SVD into LoRA factors (scaling · B·A "
        "is the rank-r truncated SVD of ΔW), so that A + this adapter behaves like B.",
        "",
    ]
    if manifest:
        lines += [
            "| model | source | revision |",
            "|---|---|---|",
            source_row("A (base)", manifest["model_a"]),
            source_row("B (fine-tune)", manifest["model_b"]),
            "",
        ]
    if base is None:
        lines += ["The base is no Hub repo (a local checkpoint): load the adapter onto your copy of it.", ""]
    return "\n".join(lines)


def size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def tensors(n: int) -> str:
    return f"{n} tensor" + ("" if n == 1 else "s")


def evaluation_text(texts: str | None) -> str:
    """validate.json's `texts` in words: built-in, seeded ids, or the user's file."""
    named = {"built-in": "weightdiff's built-in evaluation text", "seeded ids": "seeded random token ids"}
    return named.get(texts or "built-in") or f"`{texts}`"


def adapter_section(extract: dict) -> str:
    rank = f"{extract['rank']}"
    if extract.get("rank_min") is not None and extract["rank_min"] != extract.get("rank_max"):
        rank += f" (per module {extract['rank_min']}–{extract['rank_max']}, in rank_pattern)"
    rows = [
        ("rank", f"{rank}, {extract.get('rank_policy', 'fixed')} policy"),
        ("energy kept (Σ kept σ² / ‖ΔW‖²)", f"{extract['energy']:.4f}"),
    ]
    if "adapter_bytes" in extract:
        stored = size(extract["adapter_bytes"])
        if extract.get("compression_ratio"):
            stored += f", {extract['compression_ratio']:.1f}× smaller than B's weights"
        rows.append(("adapter size", stored))
    if "tensors_extracted" in extract:
        rows.append(("tensors with factors", f"{extract['tensors_extracted']} of {extract.get('tensors_total', '?')}"))
    for group in extract.get("left_out") or []:
        rows.append(
            (
                f"left out: {group['module_type']}",
                f"{tensors(group['tensors'])}, {group['share']:.2%} of ‖ΔW‖² ({group['reason']})",
            )
        )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## The adapter\n\n| | |\n|---|---|\n{table}\n"


def fidelity_section(validate: dict) -> str:
    gap = validate.get("gap_closed")
    gap_text = "n/a (A and B agree)" if gap is None else f"{gap:.5f}"
    lines = [
        "## Fidelity",
        "",
        f"Next-token distributions on {validate['tokens']} tokens of {evaluation_text(validate.get('texts'))}, "
        "teacher-forced, the adapter applied by PEFT:",
        "",
        "| | A + adapter | A alone |",
        "|---|---|---|",
        f"| KL(B ‖ ·) per token | {validate['kl_adapted']:.3g} | {validate['kl_base']:.3g} |",
        f"| top-1 agreement with B | {validate['top1_adapted']:.1%} | {validate['top1_base']:.1%} |",
        "",
        f"Gap closed, 1 − KL(B ‖ A+adapter) / KL(B ‖ A): {gap_text}. Verdict: **{validate['verdict']}**.",
    ]
    if validate.get("verdict_summary"):
        lines += ["", validate["verdict_summary"] + "."]
    return "\n".join(lines) + "\n"


def usage_section(repo_id: str, revision: str, base: str | None, files: Sequence[str]) -> str:
    at = "" if revision == "main" else f', revision="{revision}"'
    lines = [
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base or "path/to/the/base"}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}"{at})',
        "```",
    ]
    ggufs = [f for f in files if f.endswith(".gguf")]
    if ggufs:
        lines += [
            "",
            f"With llama.cpp, on the base converted by its `convert_hf_to_gguf.py`: `llama-cli -m base.gguf --lora "
            f"{ggufs[0]}`.",
        ]
    return "\n".join(lines) + "\n"


def files_section(files: Sequence[str], gguf: dict | None) -> str:
    described = {
        "adapter_config.json": "the PEFT adapter's configuration (r, lora_alpha, target_modules, rank_pattern)",
        "adapter_model.safetensors": "its LoRA factors",
        "paper/paper.pdf": "the run's report: method, numbers, figures",
        "paper/paper.typ": "its Typst source (the figures it reads are under figures/)",
    }
    lines = ["## Files", ""]
    for name in files:
        text = described.get(name)
        if name.endswith(".gguf"):
            text = "the adapter as a llama.cpp LoRA GGUF"
            if gguf and gguf.get("written"):
                text += f" ({gguf['arch']}, {gguf['dtype']}, {gguf['tensors']} tensors)"
            if gguf and gguf.get("left_out"):
                first = gguf["left_out"][0]
                text += f"; {tensors(len(gguf['left_out']))} left out (e.g. {first['tensor']}: {first['reason']})"
        if text:
            lines.append(f"- `{name}`: {text}")
    return "\n".join(lines) + "\n"
