"""Three real-weight pairs built from SmolLM2-135M-Instruct, offline and seeded, each as HF folders a/ and b/ (bf16
safetensors with the tokenizer): the kinds of fine-tune users extract adapters from, each stressing another part.

- merged_lora: the default demo pair (weightdiff.demo): B = A + a merged LoRA r=16 trained on Python's docs.
  ΔW has rank ≤ 16 per linear layer, plus B's bf16 rounding.
- ablation: refusal-direction ablation ("abliteration"): one unit direction d of the hidden space projected out
  of every o_proj and down_proj output (W ← (I − d dᵀ) W) and out of the tied embedding (E ← E (I − d dᵀ)),
  which also changes the LM head. d is the difference of the mean residual activations at a middle layer, at
  the last prompt token, between chat-templated instructions and the same requests as plain statements, as
  abliteration takes it between two prompt sets (it keeps the model coherent: KL(B‖A) ≈ 0.55 per token).
  Rank-1 deltas on o_proj/down_proj, and a rank-1 change of a tied tensor that both ends of the model use.
- full_finetune: a few AdamW steps on every parameter (embedding and norms included), saved in bf16: a delta
  that is not low-rank at all.

Texts: the ablation's prompts (about pydoc_data.topics' entries) and the fine-tune's training windows (Python's
documentation, pydoc_data.topics) never come from validate's built-in evaluation texts, so that validation
measures the pairs on held-out text.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from weightdiff import demo
from weightdiff.errors import WeightdiffError
from weightdiff.files import fresh_directory
from weightdiff.settings import DemoSettings, updated

KINDS = ("merged_lora", "ablation", "full_finetune")


@dataclass(frozen=True)
class AblationRecipe:
    """Where the direction is measured and on how much text."""

    prompts: int = 64  # per prompt set
    layer: int | None = None  # residual stream after this decoder layer; None: the middle one
    seed: int = 0


@dataclass(frozen=True)
class FullFineTuneRecipe:
    """A short full fine-tune: few enough steps to stay a fine-tune, enough to move B measurably off A."""

    steps: int = 6
    batch_size: int = 4
    seq_len: int = 128
    learning_rate: float = 5e-5
    seed: int = 1


def make_pair(kind: str, out_dir: Path, base: Path, demo_settings: DemoSettings) -> tuple[Path, Path]:
    """out_dir/a (a copy of base, the converted SmolLM2 folder) and out_dir/b for one of KINDS; built once,
    atomically. demo_settings: the pipeline's demo.* settings, which the merged LoRA pair is built from."""
    out_dir = Path(out_dir)
    if kind == "merged_lora":
        return demo.make_pair(out_dir, updated(demo_settings, pair="smollm2"), base=base)
    builders: dict[str, Callable[[Path, Path], None]] = {"ablation": ablated, "full_finetune": fully_finetuned}
    if kind not in builders:
        raise WeightdiffError(f"real pair {kind!r}: use one of {', '.join(KINDS)}")
    if not ((out_dir / "a").is_dir() and (out_dir / "b").is_dir()):
        with fresh_directory(out_dir) as tmp:
            shutil.copytree(base, tmp / "a")
            builders[kind](tmp / "a", tmp / "b")
    return out_dir / "a", out_dir / "b"


def loaded(model_dir: Path):
    """(tokenizer, fp32 model) of an HF folder, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def save_bf16(model, tokenizer, out: Path) -> None:
    model.eval().bfloat16().save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- ablation ------------------------------------------------------------------------------------------------


def ablated(dir_a: Path, out: Path, recipe: AblationRecipe = AblationRecipe()) -> None:
    tokenizer, model = loaded(dir_a)
    direction = instruction_direction(model, tokenizer, recipe)
    project_out(model, direction)
    save_bf16(model, tokenizer, out)


def instruction_direction(model, tokenizer, recipe: AblationRecipe) -> torch.Tensor:
    """Unit vector along mean(residual | chat-templated instructions) − mean(residual | plain statements) at the
    last token, after the recipe's decoder layer: how abliteration finds its direction between two prompt sets."""
    layer = model.config.num_hidden_layers // 2 if recipe.layer is None else recipe.layer
    topics = topic_names(recipe)
    instructions = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Explain the Python topic '{topic}'."}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
        for topic in topics
    ]
    statements = [
        tokenizer(f"The Python topic '{topic}' is explained below.", add_special_tokens=False)["input_ids"]
        for topic in topics
    ]
    difference = last_token_mean(model, instructions, layer) - last_token_mean(model, statements, layer)
    return difference / difference.norm()


def topic_names(recipe: AblationRecipe) -> list[str]:
    """recipe.prompts names of pydoc_data.topics' entries, in a seeded order."""
    import pydoc_data.topics

    names = sorted(pydoc_data.topics.topics)
    if len(names) < recipe.prompts:
        raise WeightdiffError(f"ablation: {recipe.prompts} prompts asked, pydoc_data.topics has {len(names)} topics")
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    return [names[i] for i in order[: recipe.prompts]]


@torch.no_grad()
def last_token_mean(model, prompts: list[list[int]], layer: int) -> torch.Tensor:
    """Mean over prompts of the hidden state after decoder layer `layer` at each prompt's last token."""
    states = [
        model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0, -1]
        for ids in prompts
    ]
    return torch.stack(states).double().mean(dim=0).float()


@torch.no_grad()
def project_out(model, direction: torch.Tensor) -> None:
    """d removed from what every o_proj and down_proj writes into the residual stream and from the (tied)
    embedding rows: W ← (I − d dᵀ) W, E ← E (I − d dᵀ)."""
    d = direction.to(torch.float32)
    for layer in model.model.layers:
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            linear.weight -= torch.outer(d, d @ linear.weight)
    embedding = model.get_input_embeddings().weight
    embedding -= torch.outer(embedding @ d, d)


# --- full fine-tune ------------------------------------------------------------------------------------------


def fully_finetuned(dir_a: Path, out: Path, recipe: FullFineTuneRecipe = FullFineTuneRecipe()) -> None:
    tokenizer, model = loaded(dir_a)
    torch.manual_seed(recipe.seed)
    batches = demo.text_batches(tokenizer, recipe.seed, recipe.steps, recipe.batch_size, recipe.seq_len)
    demo.train(model, model.parameters(), batches, recipe.learning_rate)
    save_bf16(model, tokenizer, out)
