"""Layer-streamed validation: the same numbers as the whole models in memory, in the memory of one layer, on
real text when there is a tokenizer; bad evaluation input is one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import assert_streamed_equals_in_memory, run_extract, validated
from weightdiff import layerwise
from weightdiff.errors import WeightdiffError


def test_streamed_kl_equals_in_memory_on_the_tiny_llama(tiny_pair, tmp_path, cfg):
    manifest, _, _ = run_extract(*tiny_pair, tmp_path / "adapter", cfg, rank=16)
    metrics = assert_streamed_equals_in_memory(manifest, tmp_path / "adapter", cfg.validate)
    assert metrics["texts"] == "seeded ids" and metrics["kl_base"] > 1000 * metrics["kl_adapted"]
    low = assert_streamed_equals_in_memory(
        *run_extract(*tiny_pair, tmp_path / "low", cfg, rank=2)[:1], tmp_path / "low", cfg.validate
    )
    assert low["kl_adapted"] > 10 * metrics["kl_adapted"]  # a worse adapter measures worse, streamed too


def test_per_layer_divergence_follows_the_depth(tiny_pair, tmp_path, cfg):
    manifest, _, _ = run_extract(*tiny_pair, tmp_path / "adapter", cfg, rank=16)
    from weightdiff.index import build_index
    from weightdiff.validate import validate

    _, layers = validate(build_index(manifest), tmp_path / "adapter", cfg.validate)
    assert [row["layer"] for row in layers] == [0, 1]
    assert all(row["rel_error_adapted"] < 0.01 * row["rel_error_base"] for row in layers)


def test_at_most_one_layer_is_materialised_at_a_time(tiny_pair, tmp_path, cfg, monkeypatch):
    """Whatever the depth, the real (non-meta) base weights of both models together never exceed one decoder
    layer, the small globals (final norms) and one slice of the vocabulary."""
    manifest, _, _ = run_extract(*tiny_pair, tmp_path / "adapter", cfg, rank=8)
    models: list = []
    seen: list[int] = []
    init, materialize = layerwise.LayerwiseModel.__init__, layerwise.materialize

    def remember(self, model, *args, **kwargs):
        models.append(model)
        init(self, model, *args, **kwargs)

    def counting(module, path, rows):
        materialize(module, path, rows)
        seen.append(
            sum(
                p.numel()
                for m in models
                for n, p in m.named_parameters()
                if not p.is_meta and not layerwise.is_adapter(n)
            )
        )

    monkeypatch.setattr(layerwise.LayerwiseModel, "__init__", remember)
    monkeypatch.setattr(layerwise, "materialize", counting)
    validated(manifest, tmp_path / "adapter", cfg.validate)
    config = json.loads((tiny_pair[0] / "config.json").read_text())
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    one_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    assert len(seen) >= 2 * config["num_hidden_layers"] + 4  # every layer of both models, embeddings, heads
    assert max(seen) <= one_layer + 2 * h + v * h, (max(seen), one_layer)


def test_bf16_arithmetic_is_close_to_fp32(tiny_pair, tmp_path, cfg):
    manifest, _, _ = run_extract(*tiny_pair, tmp_path / "adapter", cfg, rank=16)
    fp32 = validated(manifest, tmp_path / "adapter", cfg.validate)
    bf16 = validated(manifest, tmp_path / "adapter", OmegaConf.merge(cfg.validate, {"dtype": "bf16"}))
    assert bf16["dtype"] == "bf16" and bf16["kl_base"] == pytest.approx(fp32["kl_base"], rel=0.05)
    assert bf16["gap_closed"] > 0.99


# ---------------------------------------------------------------- real text and bad input


def word_tokenizer(model_dir: Path, words: int) -> None:
    """A word-level tokenizer of `words` entries (a chat template included) saved into a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1} | {f"w{k}": k + 2 for k in range(words - 2)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(model_dir)


@pytest.fixture()
def pair_with_tokenizer(tiny_pair, tmp_path, cfg):
    """The tiny pair with a 200-word tokenizer in both directories, and its rank-16 adapter."""
    dirs = []
    for side, src in zip("ab", tiny_pair, strict=True):
        shutil.copytree(src, tmp_path / side)
        word_tokenizer(tmp_path / side, 200)
        dirs.append(tmp_path / side)
    manifest, _, _ = run_extract(*dirs, tmp_path / "adapter", cfg, rank=16)
    return manifest, tmp_path / "adapter"


def texts_file(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_tokenizer_selects_real_text_and_texts_files_are_read(pair_with_tokenizer, tmp_path, cfg):
    manifest, adapter = pair_with_tokenizer
    builtin = assert_streamed_equals_in_memory(manifest, adapter, cfg.validate)
    assert builtin["texts"] == "built-in" and builtin["tokens"] == cfg.validate.batch_size * cfg.validate.seq_len
    records = [
        {"text": " ".join(f"w{(7 * k) % 150}" for k in range(300))},
        {"messages": [{"role": "user", "content": " ".join(f"w{k % 90}" for k in range(400))}]},
    ]
    own = OmegaConf.merge(cfg.validate, {"texts": str(texts_file(tmp_path / "own.jsonl", records)), "seq_len": 128})
    metrics = assert_streamed_equals_in_memory(manifest, adapter, own)
    assert metrics["texts"] == own.texts and metrics["tokens"] == own.batch_size * 128


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny_pair, tmp_path, cfg):
    dirs = []
    for side, src in zip("ab", tiny_pair, strict=True):
        shutil.copytree(src, tmp_path / side)
        word_tokenizer(tmp_path / side, 300)  # the model has 256 embeddings
        dirs.append(tmp_path / side)
    manifest, _, _ = run_extract(*dirs, tmp_path / "adapter", cfg, rank=4)
    with pytest.raises(
        WeightdiffError, match=r"tokenizer of .*/a does not fit the model: it has 300 tokens .*vocab_size is 256"
    ):
        validated(manifest, tmp_path / "adapter", cfg.validate)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"validate\.texts: .*nowhere\.jsonl does not exist"),
        ("empty", r"validate\.texts: .*empty\.jsonl holds no text"),
        (
            "short",
            r"short\.jsonl: 150 tokens with the tokenizer of .*, "
            r"fewer than validate\.batch_size × validate\.seq_len = 4 × 128 = 512",
        ),
        ("malformed", r"malformed\.jsonl:2: expected"),
    ],
)
def test_bad_texts_are_one_clear_error(pair_with_tokenizer, tmp_path, cfg, case, message):
    manifest, adapter = pair_with_tokenizer
    path = {
        "missing": tmp_path / "nowhere.jsonl",
        "empty": texts_file(tmp_path / "empty.jsonl", []),
        "short": texts_file(tmp_path / "short.jsonl", [{"text": "w1 w2 w3 " * 50}]),
        "malformed": texts_file(tmp_path / "malformed.jsonl", [{"text": "w1"}, {"prompt": "w2"}]),
    }[case]
    with pytest.raises(WeightdiffError, match=message):
        validated(manifest, adapter, OmegaConf.merge(cfg.validate, {"texts": str(path)}))


def test_smollm2_merged_lora_is_reproduced_on_held_out_real_text(smollm2_pair, tmp_path, cfg):
    """The real pretrained model (tied embeddings, BPE tokenizer, chat template) with a merged LoRA of its own,
    validated on the built-in text: streamed equals in memory, and the adapter closes the gap."""
    manifest, _, _ = run_extract(*smollm2_pair, tmp_path / "adapter", cfg)
    metrics = assert_streamed_equals_in_memory(manifest, tmp_path / "adapter", cfg.validate, rel=1e-5)
    print(f"\nSmolLM2 merged LoRA: {metrics}")
    assert metrics["texts"] == "built-in"
    assert metrics["kl_adapted"] <= 1e-4 and metrics["gap_closed"] >= 0.999
