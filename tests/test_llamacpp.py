"""llama.cpp itself applies our LoRA GGUFs: base.gguf + adapter.gguf gives tuned.gguf's next-token logits.

Both models are converted with llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python
sdist of the installed version, cached under ~/.cache/weightdiff) and run by llama-cpp-python, so
names, shapes, q/k row order, per-tensor scaling and the expert layout are all checked by the code
our users run, not by our reading of it.

Needs llama-cpp-python (``make test`` installs it). Without it the lane is skipped, unless
WEIGHTDIFF_REQUIRE_LLAMACPP=1 (as in CI), where it fails.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import sentencepiece
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import tiny_moe
from helpers import kl_per_token, local_manifest, run_extract, top1_agreement, validated
from test_moe import EDITED, low_rank_edit, qwen3_5_moe
from weightdiff.errors import WeightdiffError
from weightdiff.evalset import seeded_batch
from weightdiff.gguf_export import write_lora_gguf
from weightdiff.llamacpp import load_with_adapter

pytestmark = pytest.mark.llamacpp

try:
    import llama_cpp
except ImportError as error:
    if os.environ.get("WEIGHTDIFF_REQUIRE_LLAMACPP") == "1":
        pytest.fail(
            f"WEIGHTDIFF_REQUIRE_LLAMACPP=1 but llama_cpp does not import ({error}): "
            "pip install -e '.[llamacpp]' (make test does)",
            pytrace=False,
        )
    pytest.skip(
        "llama-cpp-python is not installed (pip install -e '.[llamacpp]'; make test does)", allow_module_level=True
    )

# What llama.cpp's converter needs from the sdist's vendored llama.cpp.
CONVERTER_PATHS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
# convert_hf_to_gguf.py for each (model dir, out file) pair, in one process: its imports (torch, transformers)
# take ~8 s, the conversion of a tiny model well under one.
# llama.cpp's converter reads a Qwen3-MoE vocabulary only as BPE with a pre-tokenizer it recognises by hash (a
# real Qwen tokenizer, which needs the Hub). Our tiny SentencePiece tokenizer goes through the SentencePiece
# path that its dense Qwen2/Qwen3 converters already try first; the tensors are converted untouched.
CONVERT = """
import json, runpy, sys
source, *jobs = sys.argv[1:]
sys.path.insert(0, source)
from conversion.qwen import Qwen2Model, Qwen3MoeModel, Qwen3_5MoeTextModel
Qwen3MoeModel.set_vocab = Qwen3_5MoeTextModel.set_vocab = Qwen2Model.set_vocab
for model_dir, out in zip(jobs[::2], jobs[1::2]):
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outtype", "f32", "--outfile", out]
    # the tiny Qwen3.5 has no multi-token-prediction layers, which its converter otherwise expects
    if json.load(open(f"{model_dir}/config.json"))["model_type"].startswith("qwen3_5"):
        sys.argv.append("--no-mtp")
    runpy.run_path(f"{source}/convert_hf_to_gguf.py", run_name="__main__")
"""
KL_MAX, TOP1_MIN = 1e-3, 0.99


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "weightdiff"


@pytest.fixture(scope="module")
def llama_cpp_source() -> Path:
    """llama.cpp's converter (script, ``conversion``, ``gguf-py``) from the sdist of the installed version, cached.

    The same release as the library, so the converter writes what that loader reads.
    """
    version = llama_cpp.__version__
    target = cache_dir() / f"llama-cpp-python-{version}"
    if (target / CONVERTER_PATHS[0]).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                tmp,
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        extract_converter(sdist, Path(tmp) / "llama.cpp")
        (Path(tmp) / "llama.cpp").rename(target)
    return target


def extract_converter(sdist: Path, out: Path) -> None:
    """The converter's files from the sdist's ``vendor/llama.cpp/``, without the rest (sources, models, docs)."""
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/vendor/llama.cpp/")
            if inner.startswith(CONVERTER_PATHS):
                member.name = inner
                members.append(member)
        tar.extractall(out, members=members, filter="data")


def converted(source: Path, model_dirs: list[Path]) -> None:
    """Each model directory converted to an f32 GGUF by llama.cpp's converter, beside it as ``<dir>.gguf``."""
    jobs = [str(path) for model_dir in model_dirs for path in (model_dir, gguf_of(model_dir))]
    result = subprocess.run(
        [sys.executable, "-c", CONVERT, str(source), *jobs],
        env={**os.environ, "PYTHONPATH": str(source / "gguf-py")},
        capture_output=True,
        text=True,
    )
    if result.returncode:
        problems = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("INFO:"))
        raise AssertionError(f"convert_hf_to_gguf.py failed:\n{problems[-3000:]}")


def gguf_of(model_dir: Path) -> Path:
    return model_dir.with_suffix(".gguf")


def pair_files(pair_dir: Path) -> dict[str, Path]:
    """A pair's HF directories ``a``, ``b`` and the GGUFs llama.cpp's converter made of them, ``a.gguf``, ``b.gguf``."""
    return {
        key: path
        for side in "ab"
        for key, path in ((side, pair_dir / side), (f"{side}.gguf", gguf_of(pair_dir / side)))
    }


@pytest.fixture(scope="module")
def tokenizer_model(cfg: DictConfig) -> bytes:
    """A SentencePiece model with exactly the tiny models' vocabulary size: llama.cpp's converter needs one."""
    assert tiny_moe.CONFIG["vocab_size"] == cfg.demo.tiny.vocab_size
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(syllables), (3000, 12, 3), generator=generator).tolist()
    lines = [" ".join("".join(syllables[i] for i in word) for word in line) for line in picks]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=cfg.demo.tiny.vocab_size,
        model_type="bpe",
        minloglevel=2,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def models(tiny_pair, tmp_path_factory, tokenizer_model, llama_cpp_source) -> dict[str, dict[str, Path]]:
    """Two pairs as HF directories ``a``, ``b`` and their f32 GGUFs ``a.gguf``, ``b.gguf``:

    ``llama``: the demo pair, two merged LoRA fine-tunes of a tiny Llama;
    ``moe``: a tiny Qwen3-MoE A and B = A + PEFT's target_parameters LoRA merged, that LoRA as ``adapter``.
    """
    root = tmp_path_factory.mktemp("models")
    for name, src in zip("ab", tiny_pair, strict=True):
        shutil.copytree(src, root / "llama" / name)
    model_a = tiny_moe.base_model()
    peft_model = tiny_moe.peft_adapter(model_a)
    peft_model.save_pretrained(root / "moe" / "adapter")
    model_a.save_pretrained(root / "moe" / "a")
    copy.deepcopy(peft_model).merge_and_unload().save_pretrained(root / "moe" / "b")

    dirs = [root / pair / name for pair in ("llama", "moe") for name in "ab"]
    for model_dir in dirs:
        (model_dir / "tokenizer.model").write_bytes(tokenizer_model)
    converted(llama_cpp_source, dirs)
    pairs = {pair: pair_files(root / pair) for pair in ("llama", "moe")}
    pairs["moe"]["adapter"] = root / "moe" / "adapter"
    return pairs


# Hybrid Qwen3.5-MoE (Gated DeltaNet + gated attention, fused experts) and Gemma 3 (tied embeddings): tiny A, and
# B = A + a random rank-2 edit of every matrix of the listed modules, as merging a LoRA leaves.
# llama.cpp applies Qwen3.5's M-RoPE in sections that must fit the rotary dimensions: 16 × 0.25 = 4 (2 pairs).
QWEN3_5_ROPE = {
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.25,
    "rope_type": "default",
    "mrope_section": [1, 1, 0],
}
GEMMA3 = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=16,
)
ARCHITECTURES = {
    "qwen3_5_moe": (lambda: qwen3_5_moe(rope_parameters=QWEN3_5_ROPE), EDITED),
    "gemma3": (lambda: Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA3)).eval(), ("self_attn.", "mlp.")),
}


@pytest.fixture(scope="module")
def architecture_pairs(tmp_path_factory, tokenizer_model, llama_cpp_source) -> dict[str, dict[str, Path]]:
    """Per architecture: HF directories ``a``, ``b`` and llama.cpp's f32 GGUFs of them, in one converter run."""
    root = tmp_path_factory.mktemp("architectures")
    for name, (build, edited) in ARCHITECTURES.items():
        torch.manual_seed(0)
        model_a = build()
        model_a.save_pretrained(root / name / "a")
        low_rank_edit(copy.deepcopy(model_a), edited=edited).save_pretrained(root / name / "b")
    dirs = [root / name / side for name in ARCHITECTURES for side in "ab"]
    for model_dir in dirs:
        (model_dir / "tokenizer.model").write_bytes(tokenizer_model)
    converted(llama_cpp_source, dirs)
    return {name: pair_files(root / name) for name in ARCHITECTURES}


@pytest.fixture(scope="module")
def llama_models(models) -> dict[str, Path]:
    return models["llama"]


@pytest.fixture(scope="module")
def moe_models(models) -> dict[str, Path]:
    return models["moe"]


def llama_log_probs(model: Path, tokens: torch.Tensor, adapter: Path | None = None) -> torch.Tensor:
    """llama.cpp's next-token log-probabilities at every position of every prompt."""
    llm = load_with_adapter(model, adapter, logits_all=True, n_ctx=tokens.shape[1])
    rows = []
    for prompt in tokens.tolist():
        llm.reset()
        llm.eval(prompt)
        rows.append(torch.from_numpy(llm.scores[: len(prompt)].copy()))
    llm.close()
    return torch.log_softmax(torch.stack(rows).double(), dim=-1)


def llama_cpp_agreement(models: dict[str, Path], adapter_gguf: Path, tokens: torch.Tensor) -> dict[str, float]:
    """KL(tuned ‖ base+adapter) and top-1 agreement in llama.cpp, and the same for base alone."""
    tuned = llama_log_probs(models["b.gguf"], tokens)
    adapted = llama_log_probs(models["a.gguf"], tokens, adapter_gguf)
    base = llama_log_probs(models["a.gguf"], tokens)
    result = {
        "kl_adapted": kl_per_token(tuned, adapted),
        "top1_adapted": top1_agreement(tuned, adapted),
        "kl_base": kl_per_token(tuned, base),
        "top1_base": top1_agreement(tuned, base),
    }
    print(f"\n{adapter_gguf.name}: {result}")
    return result


def assert_reproduces_tuned(result: dict[str, float]) -> None:
    assert result["kl_adapted"] <= KL_MAX and result["top1_adapted"] >= TOP1_MIN, result
    assert result["kl_base"] > 100 * result["kl_adapted"], result  # base alone is measurably off


def validation_ids(cfg: DictConfig) -> torch.Tensor:
    """The token ids validate measures the tokenizer-less tiny models on."""
    v = cfg.validate
    return seeded_batch(cfg.demo.tiny.vocab_size, v.batch_size, v.seq_len, v.seed)


def base_config(models: dict[str, Path]) -> dict:
    return json.loads((models["a"] / "config.json").read_text())


def test_extracted_llama_adapter_reproduces_tuned_in_llama_cpp(llama_models, tmp_path, cfg) -> None:
    run_extract(llama_models["a"], llama_models["b"], tmp_path / "adapter", cfg, rank=16)
    write_lora_gguf(tmp_path / "adapter", base_config(llama_models), tmp_path / "adapter.gguf")
    tokens = validation_ids(cfg)

    assert_reproduces_tuned(llama_cpp_agreement(llama_models, tmp_path / "adapter.gguf", tokens))


# alpha_pattern written by hand with the modules each entry selects: every q_proj, and one down_proj.
ALPHA_PATTERN = {"q_proj": 4.0, r"model\.layers\.1\.mlp\.down_proj": 64.0}


def pattern_alpha(module: str) -> float | None:
    if module.endswith(".q_proj"):
        return 4.0
    return 64.0 if module == "model.layers.1.mlp.down_proj" else None


def with_alpha_pattern(adapter: Path, out: Path) -> Path:
    """A copy of ``adapter`` with ALPHA_PATTERN added and those modules' lora_B divided by the change of alpha,
    so that PEFT applies exactly the same deltas (checked with PEFT in the test)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    for key, tensor in tensors.items():
        alpha = pattern_alpha(key.removeprefix("base_model.model.").removesuffix(".lora_B.weight"))
        if key.endswith(".lora_B.weight") and alpha is not None:
            tensors[key] = (tensor.double() * config["lora_alpha"] / alpha).to(tensor.dtype)
    out.mkdir()
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": ALPHA_PATTERN}))
    return out


def test_rank_and_alpha_patterns_are_applied_per_module_in_llama_cpp(llama_models, tmp_path, cfg) -> None:
    # rank 48 is clamped to 32 on k/v (rank_pattern); alpha_pattern then gives q_proj and one down_proj their own
    # alphas, which a single file-wide alpha (what llama.cpp's own converter writes) would get wrong.
    run_extract(llama_models["a"], llama_models["b"], tmp_path / "extracted", cfg, rank=48, alpha=16)
    adapter = with_alpha_pattern(tmp_path / "extracted", tmp_path / "adapter")
    ranks = {t.shape[0] for key, t in load_file(adapter / "adapter_model.safetensors").items() if "lora_A" in key}
    assert ranks == {32, 48}
    assert validated(local_manifest(llama_models["a"], llama_models["b"]), adapter, cfg.validate)["kl_adapted"] <= 1e-4
    write_lora_gguf(adapter, base_config(llama_models), tmp_path / "adapter.gguf")
    tokens = validation_ids(cfg)

    assert_reproduces_tuned(llama_cpp_agreement(llama_models, tmp_path / "adapter.gguf", tokens))


def without_experts(adapter: Path, out: Path) -> Path:
    """A copy of ``adapter`` with its attention LoRA only."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    out.mkdir()
    save_file({key: t for key, t in tensors.items() if ".mlp.experts." not in key}, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({**config, "target_parameters": None}))
    return out


def test_peft_moe_expert_adapter_reproduces_tuned_in_llama_cpp(moe_models, tmp_path, cfg) -> None:
    write_lora_gguf(moe_models["adapter"], base_config(moe_models), tmp_path / "moe.gguf")
    attention_only = without_experts(moe_models["adapter"], tmp_path / "attention_only")
    write_lora_gguf(attention_only, base_config(moe_models), tmp_path / "attention_only.gguf")
    tokens = validation_ids(cfg)

    result = llama_cpp_agreement(moe_models, tmp_path / "moe.gguf", tokens)
    assert_reproduces_tuned(result)
    # The expert LoRA is applied, not just loaded: without it llama.cpp is measurably off.
    assert (
        llama_cpp_agreement(moe_models, tmp_path / "attention_only.gguf", tokens)["kl_adapted"]
        > 100 * result["kl_adapted"]
    )


def test_wrong_architecture_is_refused_by_llama_cpp_in_its_words(llama_models, tmp_path, cfg) -> None:
    run_extract(llama_models["a"], llama_models["b"], tmp_path / "adapter", cfg, rank=4)
    # llama.cpp's converter picks the GGUF architecture by the config's `architectures`, as the export does
    as_qwen2 = {**base_config(llama_models), "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    write_lora_gguf(tmp_path / "adapter", as_qwen2, tmp_path / "qwen2.gguf")
    with pytest.raises(
        WeightdiffError,
        match=r"llama\.cpp refused the adapter .*qwen2\.gguf.*"
        r"model arch and LoRA arch mismatch",
    ) as refused:
        load_with_adapter(llama_models["a.gguf"], tmp_path / "qwen2.gguf", n_ctx=64)
    print(f"\n{refused.value}")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_extracted_adapter_reproduces_tuned_in_llama_cpp_for_each_architecture(
    architecture, architecture_pairs, tmp_path, cfg
) -> None:
    """With the default extras: what GGUF cannot hold is listed, and llama.cpp still reproduces the tuned model."""
    pair = architecture_pairs[architecture]
    run_extract(pair["a"], pair["b"], tmp_path / "adapter", cfg, rank=16)
    summary = write_lora_gguf(tmp_path / "adapter", base_config(pair), tmp_path / "adapter.gguf")
    assert summary["written"] and summary["tensors"] > 0, summary

    assert_reproduces_tuned(llama_cpp_agreement(pair, tmp_path / "adapter.gguf", validation_ids(cfg)))
