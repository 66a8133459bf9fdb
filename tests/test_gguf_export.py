"""The LoRA GGUF export: read back with gguf's own reader and checked against the PEFT adapter it came from."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from safetensors.torch import save_file

import tiny_moe
from weightdiff import gguf_export
from weightdiff.errors import WeightdiffError
from weightdiff.gguf_export import write_lora_gguf

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 128,
    "tie_word_embeddings": False,
}
QWEN2 = {**LLAMA, "model_type": "qwen2"}
HEAD_DIM = LLAMA["hidden_size"] // LLAMA["num_attention_heads"]
KINDS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
GGUF_KINDS = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
R, ALPHA = 8, 16.0
# First match wins: layer 1's k_proj gets rank 32 / alpha 8, layer 0's k_proj rank 4 / the global alpha.
RANK_PATTERN = {r"layers\.1\.self_attn\.k_proj": 32, "k_proj": 4}
ALPHA_PATTERN = {r"layers\.1\.self_attn\.k_proj": 8.0}


def rank_and_alpha(module: str) -> tuple[int, float]:
    """The (rank, alpha) each module must get, written out by hand rather than derived from the patterns."""
    if module == "model.layers.1.self_attn.k_proj":
        return 32, 8.0
    if module.endswith("k_proj"):
        return 4, ALPHA
    return R, ALPHA


def module_shape(kind: str, config: dict) -> tuple[int, int]:
    """[out, in] of a linear layer in the tiny model."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * HEAD_DIM
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }[kind]


def make_adapter(
    directory: Path,
    config: dict,
    extra: dict[str, torch.Tensor] | None = None,
    source_dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PEFT LoRA directory with random factors on every linear layer; returns module -> (A, B) as float32."""
    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    factors = {}
    for layer in range(config["num_hidden_layers"]):
        for kind, block in KINDS.items():
            module = f"model.layers.{layer}.{block}.{kind}"
            rank, _ = rank_and_alpha(module)
            out_features, in_features = module_shape(kind, config)
            a = torch.randn(rank, in_features, generator=generator).to(source_dtype)
            b = torch.randn(out_features, rank, generator=generator).to(source_dtype)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
            factors[module] = (a.float().numpy(), b.float().numpy())
    tensors.update(extra or {})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": R,
                "lora_alpha": ALPHA,
                "target_modules": list(KINDS),
                "rank_pattern": RANK_PATTERN,
                "alpha_pattern": ALPHA_PATTERN,
                "lora_dropout": 0.0,
                "bias": "none",
                "base_model_name_or_path": "tiny",
            }
        )
    )
    return factors


def gguf_name(module: str) -> str:
    """The GGUF base tensor name llama.cpp gives an HF linear layer of the tiny model."""
    layer, kind = module.split(".")[2], module.split(".")[-1]
    return f"blk.{layer}.{GGUF_KINDS[kind]}.weight"


def read_gguf(path: Path) -> tuple[gguf.GGUFReader, dict[str, tuple[GGMLQuantizationType, np.ndarray]]]:
    """The reader and every tensor as (type, float32 data in numpy [rows, cols] order)."""
    reader = gguf.GGUFReader(path)
    tensors = {
        t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        for t in reader.tensors
    }
    return reader, tensors


def interleaved(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order, built from indices: per head, row i and row d/2+i become rows 2i and 2i+1."""
    d = rows.shape[0] // n_heads
    order = [h * d + j * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for j in range(2)]
    return rows[order]


def expected_delta(module: str, a: np.ndarray, b: np.ndarray, permute: bool) -> np.ndarray:
    """scaling·B@A, in llama.cpp's row order for q/k of a llama-arch model."""
    rank, alpha = rank_and_alpha(module)
    delta = (alpha / rank) * (b.astype(np.float64) @ a.astype(np.float64))
    kind = module.split(".")[-1]
    if permute and kind in ("q_proj", "k_proj"):
        heads = LLAMA["num_attention_heads"] if kind == "q_proj" else LLAMA["num_key_value_heads"]
        delta = interleaved(delta, heads)
    return delta


def field(reader: gguf.GGUFReader, key: str):
    """A metadata value as Python data."""
    return reader.fields[key].contents()


def test_metadata_names_and_shapes(tmp_path: Path) -> None:
    factors = make_adapter(tmp_path / "adapter", LLAMA)
    out = tmp_path / "out" / "adapter.gguf"
    summary = write_lora_gguf(tmp_path / "adapter", LLAMA, out)

    reader, tensors = read_gguf(out)
    assert summary == {
        "written": True,
        "reason": None,
        "arch": "llama",
        "tensors": 28,
        "bytes": out.stat().st_size,
        "dtype": "f32",
        "left_out": [],
    }
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert field(reader, "adapter.lora.alpha") == 0.0

    expected_names = {f"{gguf_name(m)}.lora_{half}" for m in factors for half in "ab"}
    assert set(tensors) == expected_names
    for module, (a, b) in factors.items():
        # numpy order is PEFT's: A [r, in], B [out, r]; the reader's .shape field is GGML's reversed ne order.
        assert tensors[f"{gguf_name(module)}.lora_a"][1].shape == a.shape
        assert tensors[f"{gguf_name(module)}.lora_b"][1].shape == b.shape
    raw = {t.name: t for t in reader.tensors}
    assert list(raw["blk.0.attn_k.weight.lora_b"].shape) == [4, 32]
    assert all(kind == GGMLQuantizationType.F32 for kind, _ in tensors.values())


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-6), ("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 2e-2)])
def test_products_equal_peft_delta_in_llama_row_order(tmp_path: Path, dtype: str, tolerance: float) -> None:
    factors = make_adapter(tmp_path / "adapter", LLAMA)
    write_lora_gguf(tmp_path / "adapter", LLAMA, tmp_path / "a.gguf", dtype=dtype)

    _, tensors = read_gguf(tmp_path / "a.gguf")
    for module, (a, b) in factors.items():
        a_gguf = tensors[f"{gguf_name(module)}.lora_a"][1].astype(np.float64)
        b_gguf = tensors[f"{gguf_name(module)}.lora_b"][1].astype(np.float64)
        expected = expected_delta(module, a, b, permute=True)
        error = np.linalg.norm(b_gguf @ a_gguf - expected) / np.linalg.norm(expected)
        assert error < tolerance, (module, error)


def test_q8_0_falls_back_to_f16_where_rows_are_not_whole_blocks(tmp_path: Path, caplog) -> None:
    make_adapter(tmp_path / "adapter", LLAMA)
    with caplog.at_level(logging.INFO, logger="weightdiff.gguf_export"):
        write_lora_gguf(tmp_path / "adapter", LLAMA, tmp_path / "q.gguf", dtype="q8_0")

    _, tensors = read_gguf(tmp_path / "q.gguf")
    types = {name: kind for name, (kind, _) in tensors.items()}
    # A rows are in_features (64/128): whole 32-value blocks. B rows are the rank: 8 and 4 are not, 32 is.
    assert {kind for name, kind in types.items() if name.endswith("lora_a")} == {GGMLQuantizationType.Q8_0}
    assert types["blk.1.attn_k.weight.lora_b"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_k.weight.lora_b"] == GGMLQuantizationType.F16
    assert types["blk.0.ffn_down.weight.lora_b"] == GGMLQuantizationType.F16
    assert "blk.0.attn_q.weight.lora_b" in caplog.text and "f16" in caplog.text


def test_qwen2_keeps_hf_row_order_and_reads_bf16_factors(tmp_path: Path) -> None:
    factors = make_adapter(tmp_path / "adapter", QWEN2, source_dtype=torch.bfloat16)
    summary = write_lora_gguf(tmp_path / "adapter", QWEN2, tmp_path / "q.gguf")

    reader, tensors = read_gguf(tmp_path / "q.gguf")
    assert summary["arch"] == "qwen2" and field(reader, "general.architecture") == "qwen2"
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"):
        a, b = factors[module]
        rank, alpha = rank_and_alpha(module)
        np.testing.assert_array_equal(tensors[f"{gguf_name(module)}.lora_a"][1], a)
        np.testing.assert_array_equal(tensors[f"{gguf_name(module)}.lora_b"][1], b * np.float32(alpha / rank))


def test_scaling_matches_peft_itself(tmp_path: Path) -> None:
    """PEFT's own loaded modules are the reference for rank_pattern/alpha_pattern semantics."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    make_adapter(tmp_path / "adapter", LLAMA)
    write_lora_gguf(tmp_path / "adapter", LLAMA, tmp_path / "a.gguf")
    _, tensors = read_gguf(tmp_path / "a.gguf")

    config = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"})
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM(config), tmp_path / "adapter")
    checked = 0
    for name, module in peft_model.base_model.model.named_modules():
        if not hasattr(module, "get_delta_weight") or name.split(".")[-1] not in KINDS:
            continue
        delta = module.get_delta_weight("default").detach().double().numpy()
        kind = name.split(".")[-1]
        if kind in ("q_proj", "k_proj"):
            delta = interleaved(delta, LLAMA["num_attention_heads" if kind == "q_proj" else "num_key_value_heads"])
        product = tensors[f"{gguf_name(name)}.lora_b"][1].astype(np.float64) @ tensors[f"{gguf_name(name)}.lora_a"][
            1
        ].astype(np.float64)
        np.testing.assert_allclose(product, delta, rtol=1e-5, atol=1e-5, err_msg=name)
        checked += 1
    assert checked == 14


def moe_adapter(directory: Path) -> tuple[dict, torch.nn.Module]:
    """PEFT's own target_parameters adapter on the tiny Qwen3-MoE, saved; returns the base config and the PEFT model."""
    model = tiny_moe.base_model()
    peft_model = tiny_moe.peft_adapter(model)
    peft_model.save_pretrained(directory)
    return model.config.to_dict(), peft_model


def peft_deltas(peft_model: torch.nn.Module) -> dict[str, np.ndarray]:
    """GGUF base tensor name -> the delta PEFT applies to it: linear layers, and each expert projection [E, out, in]."""
    inter = tiny_moe.CONFIG["moe_intermediate_size"]
    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")):
            deltas[gguf_name(name)] = module.get_delta_weight("default").detach().double().numpy()
        if name.endswith("mlp.experts"):  # the outer wrapper; nested ones wrap the other parameters
            layer = name.split(".")[2]
            for wrapper in (module, module.base_layer):
                delta = wrapper.get_delta_weight("default").detach().double().numpy()
                if wrapper.parameter_name == "gate_up_proj":
                    deltas[f"blk.{layer}.ffn_gate_exps.weight"] = delta[:, :inter]
                    deltas[f"blk.{layer}.ffn_up_exps.weight"] = delta[:, inter:]
                else:
                    deltas[f"blk.{layer}.ffn_down_exps.weight"] = delta
    return deltas


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-6), ("q8_0", 2e-2)])
def test_moe_experts_become_3d_pairs_whose_products_are_peft_deltas(
    tmp_path: Path, dtype: str, tolerance: float
) -> None:
    config, peft_model = moe_adapter(tmp_path / "adapter")
    summary = write_lora_gguf(tmp_path / "adapter", config, tmp_path / "moe.gguf", dtype=dtype)

    reader, tensors = read_gguf(tmp_path / "moe.gguf")
    assert summary["arch"] == "qwen3moe" and summary["tensors"] == 28  # (4 attention + 3 expert) pairs × 2 layers
    deltas = peft_deltas(peft_model)
    assert {f"{name}.lora_{half}" for name in deltas for half in "ab"} == set(tensors)
    # GGML's ne order, what llama.cpp's loader matches against ffn_*_exps ne {in, out, n_expert}:
    # lora_a ne {in, r, n_expert}, lora_b ne {r, out, n_expert}; down_proj has rank 2 from rank_pattern.
    raw = {t.name: list(t.shape) for t in reader.tensors}
    assert raw["blk.0.ffn_gate_exps.weight.lora_a"] == [64, 4, 4]
    assert raw["blk.0.ffn_up_exps.weight.lora_b"] == [4, 48, 4]
    assert raw["blk.1.ffn_down_exps.weight.lora_a"] == [48, 2, 4]
    assert raw["blk.1.ffn_down_exps.weight.lora_b"] == [2, 64, 4]
    for name, delta in deltas.items():
        product = np.matmul(
            tensors[f"{name}.lora_b"][1].astype(np.float64), tensors[f"{name}.lora_a"][1].astype(np.float64)
        )
        error = np.linalg.norm(product - delta) / np.linalg.norm(delta)
        assert error < tolerance, (name, error)


def test_moe_adapter_for_another_expert_count_is_refused(tmp_path: Path) -> None:
    config, _ = moe_adapter(tmp_path / "adapter")
    with pytest.raises(WeightdiffError, match=r"experts\.base_layer\.lora_A\.weight \[16, 64\].*rank 4 × 8 experts"):
        write_lora_gguf(tmp_path / "adapter", {**config, "num_local_experts": 8}, tmp_path / "moe.gguf")


def test_an_architecture_without_a_known_layout_writes_no_file_and_says_why(tmp_path: Path) -> None:
    make_adapter(tmp_path / "adapter", LLAMA)
    summary = write_lora_gguf(tmp_path / "adapter", {**LLAMA, "model_type": "gpt2"}, tmp_path / "a.gguf")
    assert (summary["written"], summary["tensors"], summary["arch"]) == (False, 0, None)
    assert "'gpt2'" in summary["reason"] and "LlamaForCausalLM" in summary["reason"]
    assert not (tmp_path / "a.gguf").exists()
    with pytest.raises(WeightdiffError, match=r"gguf\.strict: no LoRA GGUF written: .*'gpt2'"):
        write_lora_gguf(tmp_path / "adapter", {**LLAMA, "model_type": "gpt2"}, tmp_path / "a.gguf", strict=True)


def test_what_gguf_cannot_hold_is_left_out_and_listed(tmp_path: Path) -> None:
    bias = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    make_adapter(
        tmp_path / "adapter",
        LLAMA,
        extra={"base_model.model.model.norm.weight": torch.zeros(64), bias: torch.zeros(64)},
    )
    summary = write_lora_gguf(tmp_path / "adapter", LLAMA, tmp_path / "a.gguf")
    assert summary["written"] and summary["tensors"] == 28
    reasons = {entry["tensor"]: entry["reason"] for entry in summary["left_out"]}
    assert reasons.keys() == {"model.layers.0.self_attn.q_proj.lora_B.bias", "model.norm.weight"}
    assert "no bias term" in reasons["model.layers.0.self_attn.q_proj.lora_B.bias"]
    assert "modules_to_save" in reasons["model.norm.weight"]
    _, tensors = read_gguf(tmp_path / "a.gguf")
    assert not any("norm" in name or "bias" in name for name in tensors)
    with pytest.raises(WeightdiffError, match=r"gguf\.strict: the LoRA GGUF cannot hold .*lora_B\.bias.*model\.norm"):
        write_lora_gguf(tmp_path / "adapter", LLAMA, tmp_path / "b.gguf", strict=True)
    assert not (tmp_path / "b.gguf").exists()


def test_a_module_without_a_gguf_tensor_is_left_out(tmp_path: Path) -> None:
    key = "base_model.model.model.layers.0.mlp.extra_proj.lora_A.weight"
    make_adapter(
        tmp_path / "adapter",
        LLAMA,
        extra={key: torch.zeros(R, 64), key.replace("lora_A", "lora_B"): torch.zeros(64, R)},
    )
    summary = write_lora_gguf(tmp_path / "adapter", LLAMA, tmp_path / "a.gguf")
    assert summary["written"] and summary["tensors"] == 28
    assert summary["left_out"] == [
        {"tensor": "model.layers.0.mlp.extra_proj", "reason": "no tensor of the llama GGUF corresponds to this module"}
    ]


def test_unknown_dtype_is_refused(tmp_path: Path) -> None:
    make_adapter(tmp_path / "adapter", LLAMA)
    with pytest.raises(WeightdiffError, match=r"'q4_0'.*f32, f16, bf16, q8_0"):
        write_lora_gguf(tmp_path / "adapter", LLAMA, tmp_path / "a.gguf", dtype="q4_0")


def test_failure_while_writing_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    make_adapter(tmp_path / "adapter", LLAMA)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    encoded_tensor = gguf_export.encoded_tensor
    calls = []

    def failing_after_three(factor, handle):
        calls.append(factor)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return encoded_tensor(factor, handle)

    monkeypatch.setattr(gguf_export, "encoded_tensor", failing_after_three)
    with pytest.raises(RuntimeError, match="disk full"):
        write_lora_gguf(tmp_path / "adapter", LLAMA, out_dir / "a.gguf")
    assert list(out_dir.iterdir()) == []
