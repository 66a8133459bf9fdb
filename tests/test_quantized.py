"""FP8 e4m3 checkpoints with block scales (DeepSeek-V3's layout) read as the weights they stand for, and other
quantizations refused by name rather than read as weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import edited_copy, run_extract, validated
from weightdiff.errors import WeightdiffError
from weightdiff.safetensors_io import TensorReader

BLOCK = [48, 48]  # does not tile the tiny model's 64- and 128-wide matrices: the ragged last blocks are exercised
FP8_MAX = 448.0


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


def quantized_pair(src: Path, root: Path) -> tuple[Path, Path]:
    """(the FP8 checkpoint, its dequantized fp32 copy): the layers' matrices quantized, the rest as they were."""
    tensors = load_file(src / "model.safetensors")
    fp8, plain = {}, {}
    for name, w in tensors.items():
        if w.ndim == 2 and ".layers." in name:
            q, scale = fp8_blocks(w)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            full = scale.repeat_interleave(BLOCK[0], 0)[: w.shape[0]].repeat_interleave(BLOCK[1], 1)[:, : w.shape[1]]
            plain[name] = q.float() * full
        else:
            fp8[name] = plain[name] = w
    dirs = edited_copy(src, root / "fp8", lambda t: None), edited_copy(src, root / "plain", lambda t: None)
    save_file(fp8, dirs[0] / "model.safetensors", metadata={"format": "pt"})
    save_file(plain, dirs[1] / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dirs[0] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": BLOCK, "activation_scheme": "dynamic"}
    (dirs[0] / "config.json").write_text(json.dumps(config))
    return dirs


@pytest.fixture(scope="module")
def fp8_pairs(tiny_pair, tmp_path_factory):
    """For A and B of the tiny pair: (fp8 dir, dequantized dir)."""
    root = tmp_path_factory.mktemp("fp8")
    return {side: quantized_pair(d, root / side) for side, d in zip("ab", tiny_pair, strict=True)}


def test_fp8_weights_read_as_their_dequantized_values_and_scales_are_not_tensors(fp8_pairs):
    fp8, plain = fp8_pairs["a"]
    reader, reference = TensorReader(fp8), TensorReader(plain)
    name = "model.layers.0.mlp.down_proj.weight"
    assert reader.get(name).dtype == torch.float32 and torch.equal(reader.get(name), reference.get(name))
    assert torch.equal(reader.rows(name, 10, 20), reference.get(name)[10:20])
    from weightdiff.index import model_index

    assert not any(n.endswith("_scale_inv") for n in model_index(fp8)["tensors"])


def test_extraction_from_fp8_equals_extraction_from_the_dequantized_copies(fp8_pairs, tmp_path, cfg):
    (fp8_a, plain_a), (fp8_b, plain_b) = fp8_pairs["a"], fp8_pairs["b"]
    manifest, _, quantized = run_extract(fp8_a, fp8_b, tmp_path / "fp8", cfg)
    _, _, reference = run_extract(plain_a, plain_b, tmp_path / "plain", cfg)
    assert [r["name"] for r in quantized] == [r["name"] for r in reference]
    for got, want in zip(quantized, reference, strict=True):
        assert got["delta_norm"] == pytest.approx(want["delta_norm"], rel=1e-6, abs=0), got["name"]
    factors, expected = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fp8", "plain"))
    assert factors.keys() == expected.keys()
    for key in factors:
        assert torch.equal(factors[key], expected[key]), key
    # A + adapter on the FP8 A (read dequantized) reproduces the FP8 B as closely as from the dequantized copies
    kl = validated(manifest, tmp_path / "fp8", cfg.validate)["kl_adapted"]
    plain_manifest, _, _ = run_extract(plain_a, plain_b, tmp_path / "plain2", cfg)
    assert kl == pytest.approx(validated(plain_manifest, tmp_path / "plain2", cfg.validate)["kl_adapted"], rel=1e-4)


@pytest.mark.parametrize("method", ["compressed-tensors", "mxfp4", "awq"])
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
