"""The built-in demo pair: two LoRA fine-tunes of one tiny random Llama, merged, saved in bf16.

It is what real users' pairs often are (LoRA-trained, merged siblings of one base), so ΔW = W_B − W_A has
rank ≤ 2·lora_rank per module, and a rank-2·lora_rank adapter must reproduce B almost exactly.
The base is first trained on one synthetic "language" (a random bigram chain) so that its predictions
are peaked, as a real LM's are; each variant then learns a different chain, so B is measurably
different from A.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

RECIPE_VERSION = 2  # part of the demo cache key: bump whenever the recipe below changes its output
LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(settings: DictConfig) -> LlamaForCausalLM:
    torch.manual_seed(settings.seed)
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
    train(model, model.parameters(), bigram_batches(settings.vocab_size, settings.seed, settings.base_steps),
          settings.learning_rate)
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


def lora_finetune(base: LlamaForCausalLM, settings: DictConfig, seed: int) -> LlamaForCausalLM:
    """A merged LoRA fine-tune of a copy of base: W + (α/r)·B·A with B, A trained a few steps."""
    torch.manual_seed(seed)
    lora = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, target_modules=LINEAR_MODULES,
                      lora_dropout=0.0, init_lora_weights="gaussian")
    model = get_peft_model(copy.deepcopy(base), lora)
    train(model, model.parameters(), bigram_batches(base.config.vocab_size, seed, settings.train_steps),
          settings.learning_rate)
    return model.merge_and_unload().eval()


def make_pair(out_dir: Path, settings: DictConfig) -> tuple[Path, Path]:
    """Writes out_dir/a and out_dir/b (bf16 safetensors + config.json); atomic, so a crash leaves nothing."""
    if (out_dir / "a").is_dir() and (out_dir / "b").is_dir():
        return out_dir / "a", out_dir / "b"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    base = base_model(settings)
    for name, seed in (("a", settings.seed + 1), ("b", settings.seed + 2)):
        lora_finetune(base, settings, seed).to(torch.bfloat16).save_pretrained(tmp / name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir / "a", out_dir / "b"
