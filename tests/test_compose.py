"""Adapter arithmetic on real tiny models: base → ftA → ftB, two fine-tunes of one base (a tiny Llama's merged LoRA
fine-tunes, and a Qwen3-MoE's low-rank edits of every expert), saved in fp32 so that each delta is exactly of low
rank and the composition can be held to the direct extraction."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import tiny_moe
from helpers import (
    assert_streamed_equals_in_memory,
    edited_copy,
    full_model_log_probs,
    kl_per_token,
    local_manifest,
    run_extract,
)
from test_moe import low_rank_edit
from weightdiff import demo
from weightdiff.compose import STATS_FILE, Adapter, compose
from weightdiff.errors import WeightdiffError
from weightdiff.peft_format import PROVENANCE_FILE
from weightdiff.settings import TinyDemo


def llama_chain(root: Path) -> tuple[Path, Path, Path]:
    settings = TinyDemo(train_steps=20)
    base = demo.base_model(settings, seed=0)
    base.save_pretrained(root / "base")
    for name, seed in (("ftA", 1), ("ftB", 2)):
        demo.lora_finetune(base, settings, seed).save_pretrained(root / name)
    return root / "base", root / "ftA", root / "ftB"


def moe_chain(root: Path) -> tuple[Path, Path, Path]:
    base = tiny_moe.base_model()
    base.save_pretrained(root / "base")
    for name, seed in (("ftA", 1), ("ftB", 2)):
        low_rank_edit(copy.deepcopy(base), rank=2, size=0.1, seed=seed).save_pretrained(root / name)
    return root / "base", root / "ftA", root / "ftB"


@pytest.fixture(scope="module", params=["llama", "qwen3_moe"])
def chain(request, tmp_path_factory, cfg) -> dict[str, Any]:
    """The models and the adapters base→ftA (rank r), ftA→ftB (2r: the difference of two rank-r deltas) and
    base→ftB (r), extracted with fp32 factors."""
    root = tmp_path_factory.mktemp(request.param)
    base, ft_a, ft_b = (llama_chain if request.param == "llama" else moe_chain)(root)
    r = 8 if request.param == "llama" else 2
    runs = {"ab": (base, ft_a, r), "bc": (ft_a, ft_b, 2 * r), "ac": (base, ft_b, r)}
    for name, (a, b, rank) in runs.items():
        run_extract(a, b, root / name, cfg, rank=rank, dtype="fp32")
    return {"base": base, "ftA": ft_a, "ftB": ft_b, "root": root, "rank": r, "model": request.param}


def products(adapter: Path) -> dict[str, torch.Tensor]:
    """Each module's scaling·B·A [E, m, n] in fp64, as the adapter's config scales it."""
    opened = Adapter.open(adapter)
    out = {}
    for path, site in opened.sites.items():
        B, A, _ = opened.term(site, 1.0)
        out[path] = B @ A
    return out


def test_a_composed_chain_reproduces_ftb_on_base_under_peft(chain, cfg, tmp_path):
    summary = compose([chain["root"] / "ab", chain["root"] / "bc"], [1.0, 1.0], tmp_path / "ac")
    assert summary["model_a"] == str(chain["base"]) and summary["model_b"] == str(chain["ftB"])
    assert summary["energy"] == pytest.approx(1.0, abs=1e-9)  # at 2r, the largest input rank, nothing is cut
    config = json.loads((tmp_path / "ac" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(chain["base"])
    # PEFT loads it on the base without a warning (missing keys fail), and it reproduces ftB
    metrics = assert_streamed_equals_in_memory(
        local_manifest(chain["base"], chain["ftB"]), tmp_path / "ac", cfg.validate
    )
    assert metrics["kl_adapted"] <= 1e-4 and metrics["kl_base"] > 1e3 * max(metrics["kl_adapted"], 1e-9)


def test_at_the_direct_rank_the_factors_match_the_direct_extraction(chain, tmp_path):
    rank = chain["rank"]
    summary = compose([chain["root"] / "ab", chain["root"] / "bc"], [1.0, 1.0], tmp_path / "ac", rank=rank)
    composed, direct = products(tmp_path / "ac"), products(chain["root"] / "ac")
    assert set(composed) == set(direct)
    for path, d in direct.items():
        difference = (composed[path] - d).square().sum() / d.square().sum()
        assert difference <= 1e-5, path
        assert composed[path].square().sum() == pytest.approx(d.square().sum().item(), rel=1e-5), path
    stats = json.loads((tmp_path / "ac" / STATS_FILE).read_text())["modules"]
    assert all(s["rank"] == rank and s["ranks_in"] == [rank, 2 * rank] for s in stats.values())
    assert summary["energy"] == pytest.approx(1.0, abs=1e-5)  # base→ftB is of rank r: the cut loses nothing


def test_negation_turns_a_to_b_into_b_to_a(chain, tmp_path):
    compose([chain["root"] / "ab"], [-1.0], tmp_path / "ba")
    config = json.loads((tmp_path / "ba" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(chain["ftA"])
    assert json.loads((tmp_path / "ba" / PROVENANCE_FILE).read_text())["model_b"] == str(chain["base"])
    forward, backward = products(chain["root"] / "ab"), products(tmp_path / "ba")
    for path, p in forward.items():
        torch.testing.assert_close(backward[path], -p, rtol=0, atol=1e-6 * p.abs().max().item())
    if chain["model"] == "llama":  # PEFT on ftA gives the base back
        tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
        target = full_model_log_probs(chain["base"], tokens)
        assert kl_per_token(target, full_model_log_probs(chain["ftA"], tokens, tmp_path / "ba")) <= 1e-4


def test_scaling_scales_and_an_adapter_and_its_negation_cancel(chain, tmp_path):
    summary = compose([chain["root"] / "ab"], [0.5], tmp_path / "half")
    assert summary["model_b"] is None  # half of ftA's delta is no named model
    half, whole = products(tmp_path / "half"), products(chain["root"] / "ab")
    for path, p in whole.items():
        torch.testing.assert_close(half[path], 0.5 * p, rtol=0, atol=1e-6 * p.abs().max().item())
    with pytest.raises(WeightdiffError, match="cancel"):
        compose([chain["root"] / "ab", chain["root"] / "ab"], [1.0, -1.0], tmp_path / "zero")  # base → ftA → base


def test_adapters_that_do_not_chain_are_refused(chain, tmp_path, cfg):
    run_extract(chain["ftB"], chain["ftA"], tmp_path / "ba_other", cfg, rank=4)
    with pytest.raises(WeightdiffError, match=r"starts at .*ftB.* each adapter must start where the one before ends"):
        compose([chain["root"] / "ab", tmp_path / "ba_other"], [1.0, 1.0], tmp_path / "out")
    # the command: exit status 1 and one line
    cli = [
        sys.executable,
        "-m",
        "weightdiff.commands",
        "compose",
        str(chain["root"] / "ab"),
        str(tmp_path / "ba_other"),
    ]
    done = subprocess.run([*cli, "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    # a sum of two deltas from one base (task arithmetic) is not a chain but is allowed
    compose([chain["root"] / "ab", chain["root"] / "ac"], [1.0, 1.0], tmp_path / "sum")


def test_the_command_writes_what_the_library_does(chain, tmp_path):
    cli = [sys.executable, "-m", "weightdiff.commands", "compose", str(chain["root"] / "ab"), str(chain["root"] / "bc")]
    done = subprocess.run([*cli, "-o", str(tmp_path / "cli"), "--rank", "4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "energy kept" in done.stdout
    compose([chain["root"] / "ab", chain["root"] / "bc"], [1.0, 1.0], tmp_path / "lib", rank=4)
    for name in ("adapter_model.safetensors", "adapter_config.json", PROVENANCE_FILE):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes()


def test_tied_embeddings_and_saved_norms_compose(tmp_path, cfg):
    """A tied Llama whose fine-tunes change the tied table, a q_proj and a norm: the table's LoRA composes (and the
    head's, tied to it, with it), the norm is saved whole, the later save replacing the earlier."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_tied import CONFIG, EMBEDDING, low_rank

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(6)
    model.save_pretrained(tmp_path / "base")
    q_proj, norm = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight"

    def fine_tune(seed: int):
        def edit(tensors: dict[str, torch.Tensor]) -> None:
            g = torch.Generator().manual_seed(seed)
            tensors[EMBEDDING] += low_rank(tensors[EMBEDDING].shape, 4, 1.0, g, tensors[EMBEDDING])
            tensors[q_proj] += low_rank(tensors[q_proj].shape, 4, 0.5, g, tensors[q_proj])
            tensors[norm] *= 1 + 0.1 * torch.randn(tensors[norm].shape, generator=g)

        return edit

    for name, seed in (("ftA", 1), ("ftB", 2)):
        edited_copy(tmp_path / "base", tmp_path / name, fine_tune(seed))
    run_extract(tmp_path / "base", tmp_path / "ftA", tmp_path / "ab", cfg, rank=4, dtype="fp32")
    run_extract(tmp_path / "ftA", tmp_path / "ftB", tmp_path / "bc", cfg, rank=8, dtype="fp32")
    compose([tmp_path / "ab", tmp_path / "bc"], [1.0, 1.0], tmp_path / "ac")
    config = json.loads((tmp_path / "ac" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True and config["modules_to_save"]
    factors = load_file(tmp_path / "ac" / "adapter_model.safetensors")
    head = factors["base_model.model.lm_head.lora_A.weight"]
    assert torch.equal(head, factors["base_model.model.model.embed_tokens.lora_embedding_B"].T)
    assert torch.equal(factors[f"base_model.model.{norm}"], load_file(tmp_path / "ftB" / "model.safetensors")[norm])
    metrics = assert_streamed_equals_in_memory(
        local_manifest(tmp_path / "base", tmp_path / "ftB"), tmp_path / "ac", cfg.validate
    )
    assert metrics["kl_adapted"] <= 1e-4 and metrics["kl_base"] > 0.1
    with pytest.raises(WeightdiffError, match="saves .*input_layernorm.* whole"):
        compose([tmp_path / "ab"], [-1.0], tmp_path / "ba")
