"""Mixture-of-experts and hybrid models: every expert extracted, in the layout PEFT applies, loaded by PEFT.

Two tiny pairs, built here with transformers itself: a Qwen3-MoE saved per expert (`save_pretrained`'s
default) and a Qwen3.5-MoE text model (Gated DeltaNet layers, then a full-attention layer with its gated
q_proj) saved fused (`save_original_format=False`) under `model.language_model.`, as the Hub has Qwen3.5.
B is A plus rank-2 deltas on attention, linear attention, the shared expert and every routed expert.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

import tiny_moe
from helpers import REPO, assert_streamed_equals_in_memory, edited_copy, local_manifest, run_extract, validated
from weightdiff.actions import lora_experts
from weightdiff.config import composed_conf
from weightdiff.decompose import Method
from weightdiff.errors import WeightdiffError
from weightdiff.index import build_index
from weightdiff.layout import ModelModules
from weightdiff.lowrank import truncated_svd
from weightdiff.peft_format import parameter_key, peft_keys
from weightdiff.plan import INSIDE_MODULE, NO_FORM, Unit, plan_units
from weightdiff.settings import ExtractSettings, ExtrasSettings, updated
from weightdiff.stream import Delta

# 3 Gated DeltaNet layers, then full attention (q_proj 2×4×16 rows: query and output gate); 4 experts of 48.
QWEN3_5 = dict(
    vocab_size=256,
    hidden_size=64,
    moe_intermediate_size=48,
    shared_expert_intermediate_size=40,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=4,
    num_experts_per_tok=2,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    tie_word_embeddings=False,
)
EDITED = ("self_attn.", "linear_attn.in_proj", "linear_attn.out_proj", "shared_expert.", "mlp.experts.")
EXPERT_PARAMETERS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


def low_rank_edit(
    model: torch.nn.Module, rank: int = 2, size: float = 0.3, seed: int = 1, edited: tuple[str, ...] = EDITED
) -> torch.nn.Module:
    """Adds to every matrix under EDITED (each expert of a fused [E, out, in] parameter alike) a random
    rank-`rank` delta of `size` times its Frobenius norm: what merging a LoRA fine-tune leaves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and any(e in name for e in edited):
                delta = torch.randn(*p.shape[:-1], rank, generator=g) @ torch.randn(
                    *p.shape[:-2], rank, p.shape[-1], generator=g
                )
                p.add_(delta * size * p.norm(dim=(-2, -1), keepdim=True) / delta.norm(dim=(-2, -1), keepdim=True))
    return model


def qwen3_5_moe(**overrides: Any) -> Qwen3_5MoeForCausalLM:
    """Random init, LM head scaled up for peaked predictions (as tiny_moe.base_model does for Qwen3-MoE)."""
    torch.manual_seed(0)
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**QWEN3_5 | overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def under_language_model(model_dir: Path) -> None:
    """Renames `model.*` tensors to `model.language_model.*`, the Hub's Qwen3.5 layout (transformers drops it on
    load)."""
    tensors = load_file(model_dir / "model.safetensors")
    save_file(
        {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()},
        model_dir / "model.safetensors",
        metadata={"format": "pt"},
    )


def save_pair(model: torch.nn.Module, root: Path, fused: bool) -> tuple[Path, Path]:
    dirs = root / "a", root / "b"
    model.save_pretrained(dirs[0], save_original_format=not fused)
    low_rank_edit(model).save_pretrained(dirs[1], save_original_format=not fused)
    if fused:
        for d in dirs:
            under_language_model(d)
    return dirs


@pytest.fixture(scope="module")
def qwen3_moe_pair(tmp_path_factory) -> tuple[Path, Path]:
    return save_pair(tiny_moe.base_model(), tmp_path_factory.mktemp("qwen3_moe"), fused=False)


@pytest.fixture(scope="module")
def qwen3_5_moe_pair(tmp_path_factory) -> tuple[Path, Path]:
    return save_pair(qwen3_5_moe(), tmp_path_factory.mktemp("qwen3_5_moe"), fused=True)


def index_of(pair: tuple[Path, Path]) -> dict:
    return build_index(local_manifest(*pair))["model_a"]


def test_index_recognises_experts_on_disk_both_ways_and_hybrid_layers(qwen3_moe_pair, qwen3_5_moe_pair):
    per_expert, fused = index_of(qwen3_moe_pair)["tensors"], index_of(qwen3_5_moe_pair)["tensors"]
    gate = per_expert["model.layers.1.mlp.experts.3.gate_proj.weight"]
    assert (gate["group"], gate["expert"], gate["module_type"], gate["layer"]) == ("experts", 3, "gate_proj", 1)
    stacked = fused["model.language_model.layers.3.mlp.experts.gate_up_proj"]
    assert (stacked["group"], stacked["expert"], stacked["module_type"], stacked["shape"]) == (
        "experts",
        None,
        "experts.gate_up_proj",
        [4, 96, 64],
    )
    groups = {n.removeprefix("model.language_model.layers."): t["group"] for n, t in fused.items()}
    assert groups["0.linear_attn.in_proj_qkv.weight"] == "linear_attention"
    assert groups["3.self_attn.q_proj.weight"] == "attention" and fused[
        "model.language_model.layers.3.self_attn.q_proj.weight"
    ]["shape"] == [128, 64]
    assert groups["0.mlp.shared_expert.down_proj.weight"] == "shared_expert"
    assert groups["0.mlp.shared_expert_gate.weight"] == "shared_expert_gate"
    assert groups["0.mlp.gate.weight"] == "router"
    assert per_expert["model.layers.0.mlp.gate.weight"]["group"] == "router"


def without_experts(adapter: Path, out: Path) -> Path:
    """The same adapter with the experts' factors and target_parameters entries taken out."""
    shutil.copytree(adapter, out)
    factors = load_file(out / "adapter_model.safetensors")
    save_file({k: v for k, v in factors.items() if ".experts." not in k}, out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    config["target_parameters"] = [p for p in config["target_parameters"] if "experts" not in p]
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("pair", ["qwen3_moe_pair", "qwen3_5_moe_pair"])
def test_every_expert_is_extracted_and_peft_on_a_reproduces_b(request, pair, tmp_path, cfg):
    dir_a, dir_b = request.getfixturevalue(pair)
    manifest, metrics, reports = run_extract(dir_a, dir_b, tmp_path / "adapter", cfg, rank=8)
    experts = [r for r in reports if r["action"] == "lora_experts"]
    layers = json.loads((dir_a / "config.json").read_text())["num_hidden_layers"]
    assert len(experts) == 2 * layers and all(r["status"] == "extracted" and r["rank"] == 8 for r in experts)
    assert all(len(r["experts"]["energy"]) == 4 and min(r["experts"]["energy"]) > 0.999 for r in experts)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(EXPERT_PARAMETERS) <= set(config["target_parameters"])
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    gate_up = factors["base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"]  # no language_model.
    down = factors["base_model.model.model.layers.1.mlp.experts.lora_B.weight"]
    assert gate_up.shape == (8 * 4, 64) and down.shape == (64, 8 * 4)
    if pair == "qwen3_5_moe_pair":
        assert "base_model.model.model.layers.0.linear_attn.in_proj_qkv.lora_A.weight" in factors
        assert factors["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"].shape == (128, 8)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        # raises on any key PEFT would not load; streamed through the layers, equal to the models in memory
        result = assert_streamed_equals_in_memory(manifest, tmp_path / "adapter", cfg.validate)
    assert result["kl_adapted"] <= 1e-4 and result["top1_adapted_confident"] == 1.0
    assert result["kl_base"] > 1000 * result["kl_adapted"]
    partial = assert_streamed_equals_in_memory(
        manifest, without_experts(tmp_path / "adapter", tmp_path / "no_experts"), cfg.validate
    )
    assert partial["kl_adapted"] > 100 * max(result["kl_adapted"], 1e-6)  # the experts' factors are applied


def test_a_zero_delta_module_stays_unwrapped_on_qwen3_moe(qwen3_moe_pair, tmp_path, cfg):
    """PEFT resolves a regex target_modules of Qwen3-MoE to leaf names (wrapping every v_proj): the exact
    selection that leaves out a module without factors has to be a list of paths there."""
    dir_a, dir_b = qwen3_moe_pair
    name = "model.layers.1.self_attn.v_proj.weight"
    same = load_file(dir_a / "model.safetensors")[name]
    manifest, metrics, _ = run_extract(
        dir_a,
        edited_copy(dir_b, tmp_path / "b", lambda t: t.__setitem__(name, same)),
        tmp_path / "adapter",
        cfg,
        rank=8,
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert metrics["tensors_zero"] == 3  # v_proj, and the untouched embedding and LM head (LoRA targets by default)
    assert "model.layers.0.self_attn.v_proj" in config["target_modules"]
    assert validated(manifest, tmp_path / "adapter", cfg.validate)["kl_adapted"] <= 1e-4  # raises on a missing key


def per_expert_keys(factors: dict[str, torch.Tensor], experts: int) -> dict[str, torch.Tensor]:
    """The same factors under per-expert 2D keys (experts.<e>.gate_proj/up_proj/down_proj), as transformers 4
    named them."""
    out = {}
    for key, value in factors.items():
        if ".experts." not in key:
            out[key] = value
            continue
        module, part = key.split(".experts.")[0] + ".experts", key.rsplit(".", 2)[1]
        projections = ("gate_proj", "up_proj") if ".base_layer." in key else ("down_proj",)
        per_expert = (
            value.view(experts, -1, value.shape[1])
            if part == "lora_A"
            else value.view(value.shape[0], -1, experts).permute(2, 0, 1)
        )
        for e in range(experts):
            rows = per_expert[e].chunk(len(projections)) if part == "lora_B" else [per_expert[e]] * len(projections)
            out |= {f"{module}.{e}.{p}.{part}.weight": r.clone() for p, r in zip(projections, rows, strict=True)}
    return out


def test_validate_fails_on_per_expert_keys_peft_ignores(qwen3_5_moe_pair, tmp_path, cfg):
    """Per-expert keys, as tools written for transformers 4 save them: PEFT loads such an adapter on Qwen3.5
    without complaint and without the experts. validate must refuse it."""
    manifest, _, _ = run_extract(*qwen3_5_moe_pair, tmp_path / "adapter", cfg, rank=2)
    path, config_path = tmp_path / "adapter" / "adapter_model.safetensors", tmp_path / "adapter" / "adapter_config.json"
    save_file(per_expert_keys(load_file(path), 4), path)
    config = json.loads(config_path.read_text())
    del config["target_parameters"]  # experts and the shared expert's projections: all named as modules
    config["target_modules"] += ["gate_proj", "up_proj", "down_proj"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightdiffError, match=r"0 missing keys .*96 unexpected keys .*experts\.0\.down_proj"):
        validated(manifest, tmp_path / "adapter", cfg.validate)


def test_experts_at_several_ranks_pad_to_one_r_in_the_layout_peft_applies(cfg):
    """Experts of ranks 1, 2, 3 and 0 (unchanged) under rank_policy=energy: one r = 3, and PEFT's own
    ParamWrapper, given the factors, adds back each expert's delta."""
    E, out, inp = 4, 96, 64
    g = torch.Generator().manual_seed(0)
    dw = torch.stack([torch.randn(out, k, generator=g) @ torch.randn(k, inp, generator=g) * 0.01 for k in (1, 2, 3, 0)])
    param = "model.layers.0.mlp.experts.gate_up_proj"
    settings = updated(
        cfg.extract, rank=8, rank_policy="energy", energy=0.99999, max_rank=8, alpha=6, dtype="fp32", device="cpu"
    )
    unit = Unit("lora_experts", param, (param,))
    entry = {"dtype": "F32", "layer": 0, "expert": None}
    (report,), factors = lora_experts(
        unit, [Delta(param, dw, dw.norm().item())], Method.resolve(settings, 10**6), {param: entry}
    )
    assert report["experts"]["rank"] == [1, 2, 3, 0] and report["rank"] == 3 and report["shape"] == [E, out, inp]
    assert report["experts"]["energy"][3] == 1.0 and max(report["experts"]["rel_error"]) < 1e-5
    lora_A, lora_B = factors[parameter_key(param, "lora_A")], factors[parameter_key(param, "lora_B")]
    assert lora_A.shape == (3 * E, inp) and lora_B.shape == (out, 3 * E)
    for e in range(E):  # ΔW[e] = scaling · B[:, e::E] @ A[e·r:(e+1)·r], scaling = alpha / r
        assert torch.allclose(2.0 * lora_B[:, e::E] @ lora_A[3 * e : 3 * e + 3], dw[e], atol=1e-6)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*target_modules.*")
        peft_model = get_peft_model(
            tiny_moe.base_model(),
            LoraConfig(r=3, lora_alpha=6, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]),
        )
    wrapper = peft_model.base_model.model.model.layers[0].mlp.experts
    with torch.no_grad():
        wrapper.lora_A["default"].weight.copy_(lora_A)
        wrapper.lora_B["default"].weight.copy_(lora_B)
    assert torch.allclose(wrapper.get_delta_weight("default"), dw, atol=1e-6)


@pytest.mark.parametrize("adapted", [EXPERT_PARAMETERS, ["mlp.experts.down_proj"], ["mlp.experts.gate_up_proj"]])
def test_keys_nest_as_peft_saves_them(adapted):
    """Both parameters of one module: gate_up_proj under .base_layer; one alone (the other's delta is zero): none."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*target_modules.*")
        peft_model = get_peft_model(
            tiny_moe.base_model(), LoraConfig(r=2, target_modules=[], target_parameters=adapted)
        )
    order = tuple(f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj"))
    ours = peft_keys(
        {
            parameter_key(p, part): torch.zeros(1)
            for p in order
            if any(p.endswith(a) for a in adapted)
            for part in ("lora_A", "lora_B")
        },
        order,
    )
    assert sorted(ours) == sorted(get_peft_model_state_dict(peft_model))


def test_batched_svd_of_all_experts_matches_each_expert_alone():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(6, 80, 5, generator=g) @ torch.randn(6, 5, 50, generator=g) + 1e-3 * torch.randn(
        6, 80, 50, generator=g
    )
    batched = truncated_svd(stack, 5, "randomized", 10, 2, 0, 1e-4)
    assert batched.U.shape == (6, 80, 5) and batched.Vh.shape == (6, 5, 50)
    for e in range(6):
        alone = truncated_svd(stack[e], 5, "exact", 10, 2, 0, 1e-4)
        assert torch.allclose(batched.S[e], alone.S, rtol=1e-4)
        assert torch.allclose(
            batched.U[e] @ torch.diag(batched.S[e]) @ batched.Vh[e], alone.U @ torch.diag(alone.S) @ alone.Vh, atol=1e-3
        )


def planned(pair: tuple[Path, Path], target_modules, **settings) -> tuple[set[str], set[str]]:
    """(types of the lora units, in-memory paths of the lora_experts units, without layer) the targets select; the LM
    head, which extras.lm_head=lora adds whatever the targets, left out unless `settings` say otherwise."""
    entry = index_of(pair)
    extract = ExtractSettings(target_modules=target_modules, **({"extras": ExtrasSettings(lm_head="skip")} | settings))
    plan = plan_units(entry["tensors"], extract, ModelModules.from_json(entry["modules"]))
    return (
        {u.module.rpartition(".")[2] for u in plan if u.action == "lora"},
        {u.module.split(".", 3)[3] for u in plan if u.action == "lora_experts"},
    )


def test_every_tensor_is_planned_with_what_becomes_of_it(qwen3_5_moe_pair):
    """The defaults on a hybrid MoE: norms saved if changed, the embedding and the LM head decomposed, and what has
    no PEFT form measured and left out with the reason (Gated DeltaNet's A_log beside its submodules, its
    convolution, the router)."""
    entry = index_of(qwen3_5_moe_pair)
    plan = plan_units(entry["tensors"], ExtractSettings(), ModelModules.from_json(entry["modules"]))
    assert sorted(n for u in plan for n in u.tensors) == sorted(entry["tensors"])  # each tensor exactly once
    by_tensor = {n.removeprefix("model.language_model."): u for u in plan for n in u.tensors}
    assert by_tensor["layers.0.linear_attn.A_log"].reason == INSIDE_MODULE
    assert by_tensor["layers.0.linear_attn.conv1d.weight"].reason == NO_FORM
    assert by_tensor["layers.0.mlp.gate.weight"].reason == NO_FORM
    assert by_tensor["layers.0.linear_attn.norm.weight"].action == "save"
    assert by_tensor["layers.3.self_attn.q_norm.weight"].action == "save"
    assert by_tensor["embed_tokens.weight"].action == "lora_embedding" and by_tensor["lm_head.weight"].action == "lora"
    serving = planned(qwen3_5_moe_pair, "auto", profile="serving", extras=ExtrasSettings())  # lm_head=lora, yet
    assert serving == planned(qwen3_5_moe_pair, "auto") and "lm_head" not in serving[0]


def test_target_selection_by_name_and_preset(qwen3_5_moe_pair, qwen3_moe_pair):
    everything = {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "in_proj_qkv",
        "in_proj_z",
        "in_proj_a",
        "in_proj_b",
        "out_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "shared_expert_gate",
    }
    experts = {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert planned(qwen3_5_moe_pair, "all-linear") == (everything, experts)  # no lm_head, no router
    assert planned(qwen3_5_moe_pair, ["q_proj", "experts"]) == ({"q_proj"}, experts)
    assert planned(qwen3_5_moe_pair, ["mlp.experts.gate_up_proj"]) == (set(), {"mlp.experts.gate_up_proj"})
    preset = composed_conf(["targets=qwen3_5_moe"], conf_dir=REPO / "conf").extract.target_modules
    assert planned(qwen3_5_moe_pair, preset) == (everything - {"shared_expert_gate"}, experts)
    preset = composed_conf(["targets=qwen3_moe"], conf_dir=REPO / "conf").extract.target_modules
    assert planned(qwen3_moe_pair, preset) == ({"q_proj", "k_proj", "v_proj", "o_proj"}, experts)
    with pytest.raises(WeightdiffError, match="not linear layers.*mlp.gate"):
        planned(qwen3_5_moe_pair, ["gate"])  # the router: a parameter, not an nn.Linear
