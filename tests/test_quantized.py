"""Quantized checkpoints read as the weights they stand for: FP8 e4m3 with block scales (DeepSeek-V3's layout),
compressed-tensors pack-quantized INT4 (Kimi K2 Thinking's), MXFP4 (gpt-oss's experts); other quantizations refused
by name rather than read as weights. Each tiny pair is written in its layout here (INT4 by compressed-tensors' own
compression, the others by their specs), beside its dequantized fp32 copies."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import edited_copy, run_extract, validated
from weightdiff.errors import WeightdiffError
from weightdiff.index import model_index
from weightdiff.safetensors_io import TensorReader

BLOCK = [48, 48]  # does not tile the tiny model's 64- and 128-wide matrices: the ragged last blocks are exercised
FP8_MAX = 448.0
GROUP = 32  # INT4 columns per scale, as Kimi K2 Thinking's

# name, weight → (the tensors stored in its place, the fp32 weight they stand for); None: stored as it is
Quantizer = Callable[[str, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor] | None]


def fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, weight_scale_inv) as DeepSeek-V3 stores them: per 48×48 block, scale = amax / 448."""
    rows, cols = w.shape
    grid = (-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    scale = torch.empty(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = w[i * BLOCK[0] : (i + 1) * BLOCK[0], j * BLOCK[1] : (j + 1) * BLOCK[1]]
            scale[i, j] = block.abs().max().clamp(min=1e-12) / FP8_MAX
    full = scale.repeat_interleave(BLOCK[0], 0)[:rows].repeat_interleave(BLOCK[1], 1)[:, :cols]
    return (w.float() / full).to(torch.float8_e4m3fn), scale


def fp8(name: str, w: torch.Tensor):
    if not (w.ndim == 2 and ".layers." in name):
        return None
    q, scale = fp8_blocks(w)
    full = scale.repeat_interleave(BLOCK[0], 0)[: w.shape[0]].repeat_interleave(BLOCK[1], 1)[:, : w.shape[1]]
    return {name: q, name + "_scale_inv": scale}, q.float() * full


def int4_config(symmetric: bool = True, **weights) -> dict:
    """Kimi K2 Thinking's quantization_config (its ignore list aside): INT4 in groups of 32 columns."""
    args = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": GROUP}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args | weights}},
        "ignore": ["lm_head"],
    }


def int4(symmetric: bool) -> Quantizer:
    """The layers' linear weights quantized (min-max scales, bf16 as Kimi's) and compressed by compressed-tensors'
    own code; the fp32 weight is (q − zero point)·scale computed here from the integers it packed."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = QuantizationConfig.model_validate(int4_config(symmetric)).config_groups["group_0"]

    def quantized(name: str, w: torch.Tensor):
        if not (w.ndim == 2 and ".layers." in name):
            return None
        groups = w.float().unflatten(-1, (-1, GROUP))
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
        scale = scale.to(torch.bfloat16)
        q = quantize(x=w, scale=scale, zero_point=zero, args=scheme.weights, dtype=torch.int8)
        stored = PackedQuantizationCompressor.compress(
            {"weight": w, "weight_scale": scale, "weight_zero_point": zero}, scheme
        )
        module = name.removesuffix("weight")
        plain = (q.float() - zero.float().repeat_interleave(GROUP, 1)) * scale.float().repeat_interleave(GROUP, 1)
        return {module + key: t for key, t in stored.items()}, plain

    return quantized


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4(name: str, w: torch.Tensor):
    """gpt-oss's experts per the OCP MX spec: blocks of 32 input values share the exponent floor(log2 amax) − 2
    (e2m1's largest is 6 = 1.5·2²), each value rounded to the nearest e2m1, two a byte (low nibble first)."""
    if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return None
    blocks = w.float().transpose(1, 2).unflatten(-1, (-1, 32))  # [E, out, G, 32]
    exponent = torch.floor(torch.log2(blocks.abs().amax(-1).clamp(min=2.0**-126))) - 2
    scaled = blocks / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - FP4_VALUES).abs().argmin(-1).to(torch.uint8)
    plain = (FP4_VALUES[codes.long()] * torch.exp2(exponent)[..., None]).flatten(-2).transpose(1, 2).contiguous()
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return {name + "_blocks": packed, name + "_scales": (exponent + 127).to(torch.uint8)}, plain


MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}
FP8_CONFIG = {"quant_method": "fp8", "weight_block_size": BLOCK, "activation_scheme": "dynamic"}
# format → (the tiny pair it quantizes, quantizer, quantization_config, the index's dtype of a quantized tensor)
FORMATS: dict[str, tuple[str, Quantizer, dict, str]] = {
    "fp8": ("tiny_pair", fp8, FP8_CONFIG, "F8_E4M3"),
    "int4": ("tiny_pair", int4(True), int4_config(True), "I4"),
    "int4_asymmetric": ("tiny_pair", int4(False), int4_config(False), "I4"),
    "mxfp4": ("gptoss_pair", mxfp4, MXFP4_CONFIG, "MXFP4"),
}


def quantized_pair(src: Path, root: Path, quantize: Quantizer, config: dict) -> tuple[Path, Path, list[str]]:
    """(the quantized checkpoint, its dequantized fp32 copy, the names quantized)."""
    stored, plain, names = {}, {}, []
    for name, w in load_file(src / "model.safetensors").items():
        q = quantize(name, w)
        stored.update({name: w} if q is None else q[0])
        plain[name] = w if q is None else q[1]
        names += [] if q is None else [name]
    dirs = edited_copy(src, root / "quantized", lambda t: None), edited_copy(src, root / "plain", lambda t: None)
    save_file(stored, dirs[0] / "model.safetensors", metadata={"format": "pt"})
    save_file(plain, dirs[1] / "model.safetensors", metadata={"format": "pt"})
    model_config = json.loads((dirs[0] / "config.json").read_text())
    (dirs[0] / "config.json").write_text(json.dumps(model_config | {"quantization_config": config}))
    return *dirs, names


def gptoss_model(seed: int):
    """A tiny random gpt-oss in bf16, lm_head scaled up for peaked predictions (as a trained LM's are)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        tie_word_embeddings=False,
    )
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def gptoss_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny gpt-oss and a copy whose experts and attention moved by rank-2 deltas, both in bf16."""
    root = tmp_path_factory.mktemp("gptoss")
    model = gptoss_model(0)
    model.bfloat16().save_pretrained(root / "a")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj", "q_proj.weight")):
                p += (0.05 * torch.randn(*p.shape[:-1], 2) @ torch.randn(2, p.shape[-1])).to(p.dtype)
    model.save_pretrained(root / "b")
    return root / "a", root / "b"


@pytest.fixture(scope="module", params=list(FORMATS))
def quantized_pairs(request, tmp_path_factory):
    """(format, the names quantized, {side: (quantized dir, dequantized dir)}) for A and B of its tiny pair."""
    source, quantize, config, _ = FORMATS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    pairs = {
        side: quantized_pair(d, root / side, quantize, config)
        for side, d in zip("ab", request.getfixturevalue(source), strict=True)
    }
    return request.param, pairs["a"][2], {side: pair[:2] for side, pair in pairs.items()}


def test_quantized_weights_read_as_their_dequantized_values_and_companions_are_not_tensors(quantized_pairs):
    fmt, names, pairs = quantized_pairs
    quantized, plain = pairs["a"]
    reader, reference = TensorReader(quantized), TensorReader(plain)
    assert names
    for name in names:
        want = reference.get(name).float()
        got = reader.get(name)
        assert got.dtype == torch.float32 and torch.equal(got, want), name
        assert reader.shape(name) == tuple(want.shape)
        assert torch.equal(reader.rows(name, 1, 3), want[1:3])
    index, reference_index = model_index(quantized)["tensors"], model_index(plain)["tensors"]
    assert index.keys() == reference_index.keys()  # no scale, block or packed tensor among them
    for name in names:
        assert index[name]["dtype"] == FORMATS[fmt][3] and index[name]["shape"] == reference_index[name]["shape"]


def test_extraction_from_quantized_pairs_equals_extraction_from_the_dequantized_copies(quantized_pairs, tmp_path, cfg):
    fmt, names, pairs = quantized_pairs
    (quantized_a, plain_a), (quantized_b, plain_b) = pairs["a"], pairs["b"]
    manifest, metrics, quantized = run_extract(quantized_a, quantized_b, tmp_path / "quantized", cfg)
    plain_manifest, plain_metrics, reference = run_extract(plain_a, plain_b, tmp_path / "plain", cfg)
    method, dtype = FORMATS[fmt][2]["quant_method"], FORMATS[fmt][3]
    for side in ("model_a", "model_b"):  # the metrics say what the checkpoints store and how they were read
        read = metrics["inputs"][side]
        assert read["quantization"] == method and read["dtypes"][dtype] == len(names) and read["read"] == "local"
        assert (
            plain_metrics["inputs"][side]["quantization"] is None
            and dtype not in plain_metrics["inputs"][side]["dtypes"]
        )
    assert [(r["name"], r["action"]) for r in quantized] == [(r["name"], r["action"]) for r in reference]
    assert any(r["delta_norm"] > 0 for r in reference)
    for got, want in zip(quantized, reference, strict=True):
        assert got["delta_norm"] == pytest.approx(want["delta_norm"], rel=1e-6, abs=0), got["name"]
    factors, expected = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("quantized", "plain"))
    assert factors.keys() == expected.keys()
    for key in factors:
        assert torch.equal(factors[key], expected[key]), key
    if fmt == "mxfp4":  # the MXFP4 tensors are gpt-oss's [E, in, out] experts: they get factors like any other
        assert any(".mlp.experts.lora_A." in key for key in factors)
    # A + adapter on the quantized A (read dequantized) reproduces the quantized B as closely as from the copies.
    kl = validated(manifest, tmp_path / "quantized", cfg.validate)["kl_adapted"]
    assert kl == pytest.approx(validated(plain_manifest, tmp_path / "plain", cfg.validate)["kl_adapted"], rel=1e-4)


def quantized_copy(fmt: str, src: Path, root: Path) -> Path:
    _, quantize, config, _ = FORMATS[fmt]
    return quantized_pair(src, root, quantize, config)[0]


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")  # as documented
def test_transformers_loads_the_int4_checkpoint_as_the_reader_reads_it_rounded_to_its_scales_dtype(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    d = quantized_copy("int4", tiny_pair[0], tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    loaded, reader = model.state_dict(), TensorReader(d)
    assert len(reader.quantized) == 14  # 7 linears a layer
    for name in reader.quantized:
        exact = reader.get(name)
        assert torch.equal(loaded[name], exact.bfloat16().float()), name  # transformers multiplies in the scales' bf16
    assert not torch.equal(loaded[name], exact)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")  # as documented
def test_transformers_loads_the_mxfp4_checkpoint_as_the_reader_reads_it(gptoss_pair, tmp_path):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    d = quantized_copy("mxfp4", gptoss_pair[0], tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)
    )
    loaded, reader = model.state_dict(), TensorReader(d)
    assert len(reader.quantized) == 4  # gate_up_proj and down_proj of 2 layers
    for name in reader.quantized:
        assert torch.equal(loaded[name], reader.get(name)), name


@pytest.fixture(scope="module")
def int4_a(tiny_pair, tmp_path_factory) -> Path:
    return quantized_copy("int4", tiny_pair[0], tmp_path_factory.mktemp("int4_a"))


def with_config(src: Path, dst: Path, quantization_config: dict) -> Path:
    d = edited_copy(src, dst, lambda t: None)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | {"quantization_config": quantization_config}))
    return d


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda q: q.update(format="float-quantized"), r"group 'group_0' is format 'float-quantized', weights"),
        (
            lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=8),
            r"\('int', 8, 'group'\): weightdiff reads",
        ),
        (
            lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="channel", group_size=None),
            r"\('int', 4, 'channel'\): weightdiff reads format 'pack-quantized' with \('int', 4, 'group'\) only",
        ),
        (
            lambda q: q.update(transform_config={"config_groups": {}}),
            r"transform_config is set: weightdiff reads dense, untransformed",
        ),
        (lambda q: q.pop("config_groups"), r"not a compressed-tensors config: config_groups: Field required"),
    ],
    ids=["format", "num_bits", "strategy", "transform", "no_groups"],
)
def test_int4_configs_it_would_misread_are_refused_by_name(int4_a, tmp_path, edit, message):
    config = json.loads((int4_a / "config.json").read_text())["quantization_config"]
    edit(config)
    d = with_config(int4_a, tmp_path / "q", config)
    with pytest.raises(WeightdiffError, match=rf"config.json: quantization_config.*{message}"):
        TensorReader(d)


def test_int4_config_groups_are_told_apart_by_module_name(int4_a, tmp_path):
    config = json.loads((int4_a / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    config["config_groups"] = {"attention": group | {"targets": ["re:.*self_attn.*"]}, "linear": group}
    attention = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(
        TensorReader(with_config(int4_a, tmp_path / "named", config)).get(attention),
        TensorReader(int4_a).get(attention),
    )
    config["config_groups"] = {"linear": group, "also_linear": group}
    with pytest.raises(
        WeightdiffError, match=r"2 quantization_config groups \(linear, also_linear\) may quantize model"
    ):
        TensorReader(with_config(int4_a, tmp_path / "ambiguous", config))


MODULE = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.pop(MODULE + ".weight_scale"),
            rf"{MODULE}.weight_packed is a pack-quantized weight with no {MODULE}.weight_scale",
        ),
        (lambda t: t.pop(MODULE + ".weight_packed"), rf"{MODULE}.weight_scale has no {MODULE}.weight_packed"),
        (
            lambda t: t.update({MODULE + ".weight": torch.zeros(1)}),
            rf"{MODULE}.weight_packed is a pack-quantized weight with a plain {MODULE}.weight beside it",
        ),
        (
            lambda t: t.update({MODULE + ".weight_scale": t[MODULE + ".weight_scale"][:, :-1].contiguous()}),
            rf"{MODULE}.weight_packed has shape \[64, 16\], expected \[64, 12\] for a weight of shape \[64, 96\]",
        ),
    ],
    ids=["no_scale", "no_packed", "plain_beside", "scale_shape"],
)
def test_int4_tensors_with_a_missing_or_wrong_companion_are_refused(int4_a, tmp_path, edit, message):
    d = edited_copy(int4_a, tmp_path / "q", edit)
    with pytest.raises(WeightdiffError, match=message):
        model_index(d)


def test_an_int4_weight_shape_that_its_scales_do_not_give_is_refused_when_read(int4_a, tmp_path):
    name = MODULE + ".weight"
    d = edited_copy(int4_a, tmp_path / "q", lambda t: t.update({name + "_shape": torch.tensor([64, 100])}))
    assert model_index(d)["tensors"][name]["shape"] == [64, 128]  # the headers alone cannot tell
    with pytest.raises(WeightdiffError, match=rf"{name}_shape is \[64, 100\], expected \[64, 128\] from {name}_packed"):
        TensorReader(d).get(name)


def test_mxfp4_blocks_without_their_scales_are_refused(gptoss_pair, tmp_path):
    name = "model.layers.1.mlp.experts.down_proj"
    d = edited_copy(
        quantized_copy("mxfp4", gptoss_pair[0], tmp_path / "mx"), tmp_path / "q", lambda t: t.pop(name + "_scales")
    )
    with pytest.raises(WeightdiffError, match=rf"q: MXFP4 {name} has no {name}_scales"):
        TensorReader(d)


@pytest.mark.parametrize("method", ["awq", "gptq", "bitsandbytes"])
def test_other_quantizations_are_refused_by_name(tiny_pair, tmp_path, method):
    d = edited_copy(tiny_pair[0], tmp_path / "q", lambda t: None)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": method}}))
    with pytest.raises(WeightdiffError, match=rf"config.json: quantization_config.quant_method '{method}' is not read"):
        TensorReader(d)


def test_float8_weights_without_scales_are_refused(tiny_pair, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    d = edited_copy(tiny_pair[0], tmp_path / "raw", lambda t: t.update({name: t[name].to(torch.float8_e4m3fn)}))
    with pytest.raises(WeightdiffError, match=rf"tensor {name} is float8 without a _scale_inv"):
        TensorReader(d).get(name)
