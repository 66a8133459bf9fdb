"""Load a base GGUF with a LoRA GGUF in llama.cpp itself (through llama-cpp-python), refusals included.

llama.cpp states why it refuses an adapter (architecture mismatch, a tensor the base model lacks, a
shape that does not fit) only in its log; llama-cpp-python then raises a bare "Failed to initialize
LoRA adapter". We capture the log while loading so the user sees llama.cpp's own reason.

llama-cpp-python is optional (a test dependency, ``make test`` installs it): imported on use.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from weightdiff.errors import WeightdiffError

GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum ggml_log_level (llama-cpp-python's own _logger still numbers it 3)


def load_with_adapter(model_path: Path, adapter_path: Path | None = None, **settings: Any) -> Any:
    """A ``llama_cpp.Llama`` for the base GGUF with the LoRA GGUF applied (none when ``adapter_path`` is None).

    ``settings`` go to ``Llama`` (``n_ctx``, ``logits_all``...). Raises WeightdiffError carrying
    llama.cpp's own error lines when it refuses the model or the adapter.
    """
    llama_cpp = llama_cpp_module()
    with llama_errors() as errors:
        try:
            llm = llama_cpp.Llama(
                model_path=str(model_path),
                lora_path=None if adapter_path is None else str(adapter_path),
                verbose=False,
                **settings,
            )
        except (RuntimeError, ValueError) as error:
            raise refusal(model_path, adapter_path, errors or [str(error)]) from None
    if errors:
        # llama-cpp-python 0.3.36 misses a refused adapter (it tests the NULL pointer llama.cpp returns
        # against None) and goes on with the base model alone: the error log is the only sign.
        llm.close()
        raise refusal(model_path, adapter_path, errors)
    return llm


def refusal(model_path: Path, adapter_path: Path | None, reasons: list[str]) -> WeightdiffError:
    """The error for a load llama.cpp refused, in its own words."""
    what = f"adapter {adapter_path} on {model_path}" if adapter_path else f"model {model_path}"
    return WeightdiffError(f"llama.cpp refused the {what}: {'; '.join(reasons)}")


def llama_cpp_module() -> Any:
    """The ``llama_cpp`` package, or a WeightdiffError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise WeightdiffError(
            "llama-cpp-python is not installed: pip install -e '.[llamacpp]' (builds llama.cpp, minutes)"
        ) from None
    return llama_cpp


@contextmanager
def llama_errors() -> Iterator[list[str]]:
    """llama.cpp's error log lines emitted while the block runs; its default logger is restored afterwards."""
    llama_cpp = llama_cpp_module()
    from llama_cpp._logger import llama_log_callback as default_callback

    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if level == GGML_LOG_LEVEL_ERROR:
            errors.append(text.decode("utf-8", errors="replace").strip())

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(default_callback, ctypes.c_void_p(0))
