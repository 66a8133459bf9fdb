"""A causal LM run one decoder layer at a time, each layer's weights read from the checkpoint when it is reached.

The model is built without weights (parameters on the meta device; buffers such as rotary frequencies real) and
transformers' own modules do all the computing. The decoder's forward runs once with stand-ins in place of its
layers, to learn what each layer is called with (causal mask, rotary embeddings, the per-layer-type masks of
hybrid models); then each layer in turn is materialised from the checkpoint, runs on every stream, and goes
back to the meta device. Peak memory is about one layer's weights plus activations, whatever the depth. The
embedding and the LM head, which grow with the vocabulary, are materialised only in the rows the batch uses
and in chunks of the vocabulary.

A PEFT model is one such model with two streams, adapter disabled (A) and enabled (A + adapter), so that A's
weights are read once for both; its adapter weights are real from the start and stay so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch

from weightdiff.errors import WeightdiffError
from weightdiff.layout import fuse_experts, parameter_name
from weightdiff.safetensors_io import TensorReader

ROW_BUDGET = 1 << 24  # elements of embedding / LM-head rows materialised at a time (64 MB in fp32)
LOGITS_BUDGET = 1 << 22  # elements of one stream's chunk of logits
PEFT_WRAPPER = re.compile(r"\.(?:base_layer|original_module)(?=\.)")
# stream name → the context a module runs in for that stream (adapter on or off), given the module
Streams = dict[str, Callable[[torch.nn.Module], AbstractContextManager]]


def release_freed_memory() -> None:
    """Hands memory freed with a layer back to the system. glibc keeps freed blocks under its mmap threshold
    (which grows to 32 MB: most of a layer's tensors) in its heaps, so without this RSS creeps up layer by
    layer by fragments of the layers before. A no-op where the C library has no malloc_trim."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


def skeleton(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The model transformers builds from config.json, parameters on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=dtype)
    except Exception as e:  # unknown model_type, remote code: nothing to run the layers with
        raise WeightdiffError(
            f"transformers cannot build model_type {config.get('model_type')!r} ({e}): "
            "validation runs the model's own code"
        ) from e
    return model.eval()


def is_adapter(name: str) -> bool:
    """A parameter PEFT adds (LoRA factors, a module saved whole) rather than one of the base model's."""
    return bool(re.search(r"(?:^|\.)(?:lora_\w+|modules_to_save)(?:\.|$)", name))


def base_path(path: str) -> str:
    """The in-memory name of a base parameter that PEFT wrapped (`q_proj.base_layer.weight` → `q_proj.weight`)."""
    return PEFT_WRAPPER.sub("", path)


class CheckpointWeights:
    """A model's in-memory parameters, read from its checkpoint through the index (renamed, experts fused)."""

    def __init__(
        self, model_dir: Path, tensors: dict[str, dict], dtype: torch.dtype, device: str, aliases: dict[str, str]
    ):
        self.reader = TensorReader(model_dir)
        self.tensors, self.dtype, self.device, self.aliases = tensors, dtype, device, aliases
        self.sources: dict[str, list[str]] = defaultdict(list)
        for name, entry in tensors.items():
            self.sources[parameter_name(name, entry)].append(name)
        for names in self.sources.values():
            names.sort(key=lambda n: (tensors[n]["expert"] or 0, tensors[n].get("part") or 0))

    def _names(self, param: str) -> list[str]:
        names = self.sources.get(self.aliases.get(param, param))
        if not names:
            raise WeightdiffError(
                f"{self.reader.model_dir}: no checkpoint tensor loads into the model's parameter "
                f"{param} (see the index's `module`/`param` fields)"
            )
        return names

    def _cast(self, value: torch.Tensor) -> torch.Tensor:
        """To the evaluation's device and dtype, then the shard is unmapped: the pages just read would
        otherwise count in RSS beside their converted copy until the whole layer is done."""
        value = value.to(self.device, self.dtype if value.is_floating_point() else value.dtype)
        self.reader.unmap()
        return value

    def get(self, param: str) -> torch.Tensor:
        names = self._names(param)
        values = [self.reader.get(n) for n in names]
        if self.tensors[names[0]]["expert"] is None:
            return self._cast(values[0])
        return self._cast(fuse_experts(param, values, [self.tensors[n]["expert"] for n in names]))

    def rows(self, param: str, start: int, stop: int) -> torch.Tensor:
        return self._cast(self.reader.rows(self._names(param)[0], start, stop))

    def gather(self, param: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (sorted, unique) of a vocabulary-sized tensor, read a bounded block of rows at a time."""
        shape = self.tensors[self._names(param)[0]]["shape"]
        step = max(1, ROW_BUDGET // max(1, shape[-1] if len(shape) > 1 else 1))
        blocks = []
        for start in range(0, shape[0], step):
            wanted = ids[(ids >= start) & (ids < start + step)]
            if len(wanted):
                blocks.append(self.rows(param, start, min(start + step, shape[0]))[wanted - start])
        return torch.cat(blocks)


def assign(module: torch.nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """Puts each value in place of the parameter of that name, whatever its shape was (a slice of the vocabulary)."""
    for name, value in values.items():
        owner, _, leaf = name.rpartition(".")
        param = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value, requires_grad=False)
        module.get_submodule(owner)._parameters[leaf] = param


def materialize(module: torch.nn.Module, path: str, rows: Callable[[str], torch.Tensor]) -> None:
    """Gives every base parameter of `module` still on the meta device its value, `rows(in-memory name)`."""
    assign(
        module,
        {
            name: rows(base_path(f"{path}.{name}"))
            for name, p in module.named_parameters(remove_duplicate=False)
            if p.is_meta and not is_adapter(name)
        },
    )


def base_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters(remove_duplicate=False) if not is_adapter(n)}


class _StandIn(torch.nn.Module):
    """Takes a decoder layer's place: records what the decoder calls it with and returns `output` (default: its
    input). The layer's plain attributes (layer_idx, attention_type…) are copied, for decoders that read them."""

    def __init__(self, layer: torch.nn.Module, calls: list, output: torch.Tensor | None):
        super().__init__()
        for key, value in vars(layer).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        self.calls, self.output = calls, output

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states if self.output is None else self.output


class LayerwiseModel:
    """One model's streams, advanced a decoder layer at a time (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, weights: CheckpointWeights, streams: Streams):
        self.model, self.weights, self.streams = model, weights, streams
        hf: Any = model  # a transformers (or PEFT) model: what it adds to torch.nn.Module is not typed there
        self.decoder: torch.nn.Module = hf.base_model
        layers = getattr(self.decoder, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise WeightdiffError(
                f"{type(model).__name__}: no decoder layers at `{type(self.decoder).__name__}.layers`; "
                "validation cannot run this architecture a layer at a time"
            )
        self.layers = layers
        paths = {id(m): n for n, m in model.named_modules()}
        self.layer_paths = [paths[id(layer)] for layer in self.layers]
        self.input_path = paths[id(hf.get_input_embeddings())]
        self.output_path = paths[id(hf.get_output_embeddings())]
        self.vocab_size: int = hf.config.get_text_config().vocab_size
        self.softcap = getattr(hf.config.get_text_config(), "final_logit_softcapping", None)
        self.calls: list[tuple[tuple, dict]] = []
        for module in model.modules():  # rotary frequencies and other buffers are real: move them
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to(weights.device)
        apart = tuple(base_path(p) + "." for p in (*self.layer_paths, self.input_path, self.output_path))
        assign(
            model,
            {
                name: weights.get(base_path(name))
                for name, p in base_parameters(model).items()
                if p.is_meta and not base_path(name).startswith(apart)
            },
        )  # the final norm and other globals

    @contextmanager
    def _materialized(
        self,
        path: str,
        rows: Callable[[str], torch.Tensor],
        adapter_rows: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> Iterator[torch.nn.Module]:
        """The module at `path` with its base weights `rows(in-memory name)` (adapter factors of vocabulary size
        sliced by `adapter_rows`), its parameters as they were (base ones on the meta device) afterwards."""
        module = self.model.get_submodule(path)
        originals = dict(module.named_parameters(remove_duplicate=False))
        try:
            materialize(module, path, rows)
            if adapter_rows is not None:
                assign(
                    module,
                    {
                        name: adapter_rows(p, list(p.shape).index(self.vocab_size))
                        for name, p in originals.items()
                        if is_adapter(name) and self.vocab_size in p.shape
                    },
                )
            yield module
        finally:
            assign(module, originals)

    def _run(self, module: torch.nn.Module, stream: str, *args, **kwargs):
        with self.streams[stream](module):
            return module(*args, **kwargs)

    @contextmanager
    def _stand_ins(self, calls: list, output: torch.Tensor | None = None) -> Iterator[None]:
        layers = list(self.layers)
        try:
            for i, layer in enumerate(layers):
                self.layers[i] = _StandIn(layer, calls, output)
            yield
        finally:
            for i, layer in enumerate(layers):
                self.layers[i] = layer

    def embed(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each stream's input embeddings, from the embedding rows of the tokens in the batch only."""
        used, inverse = torch.unique(ids, return_inverse=True)
        with self._materialized(
            self.input_path, lambda p: self.weights.gather(p, used), lambda t, dim: t.index_select(dim, used)
        ) as module:
            embeddings = [m for m in module.modules() if isinstance(m, torch.nn.Embedding)]
            padding = [m.padding_idx for m in embeddings]
            for m in embeddings:  # padding_idx only shapes gradients, and it indexes rows no longer there
                m.padding_idx = None
            try:
                return {stream: self._run(module, stream, inverse.to(self.weights.device)) for stream in self.streams}
            finally:
                for m, p in zip(embeddings, padding, strict=True):
                    m.padding_idx = p

    def start(self, embeddings: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Runs the decoder with stand-ins: returns each stream's input to layer 0 and keeps each layer's call."""
        hidden = {}
        for stream, x in embeddings.items():
            calls: list = []
            with self._stand_ins(calls):
                out = self._run(self.decoder, stream, inputs_embeds=x, use_cache=False).last_hidden_state
            if out.shape != x.shape or len(calls) != len(self.layers):
                raise WeightdiffError(
                    f"{type(self.decoder).__name__} does not call its layers as one tensor in, one "
                    "out: validation cannot run it a layer at a time"
                )
            hidden[stream] = calls[0][0]
            self.calls = [(args, kwargs) for _, args, kwargs in calls]
        return hidden

    def layer(self, i: int, hidden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args, kwargs = self.calls[i]
        with self._materialized(self.layer_paths[i], self.weights.get) as layer:
            outputs = {stream: self._run(layer, stream, h, *args, **kwargs) for stream, h in hidden.items()}
        release_freed_memory()
        return {stream: y[0] if isinstance(y, tuple) else y for stream, y in outputs.items()}

    def finish(self, hidden: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the decoder does after its last layer (the final norm), on each stream's last hidden state."""
        out = {}
        for stream, h in hidden.items():
            with self._stand_ins([], output=h):
                out[stream] = self._run(self.decoder, stream, inputs_embeds=h, use_cache=False).last_hidden_state
        return out

    def logits(self, hidden: dict[str, torch.Tensor]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(first vocabulary id, each stream's fp32 logits [tokens, chunk] on the CPU) for bounded chunks of the
        vocabulary."""
        flat = {s: h.reshape(-1, h.shape[-1]) for s, h in hidden.items()}
        tokens, width = next(iter(flat.values())).shape
        step = max(1, min(ROW_BUDGET // width, LOGITS_BUDGET // tokens))
        for start in range(0, self.vocab_size, step):
            stop = min(start + step, self.vocab_size)
            with self._materialized(
                self.output_path,
                lambda p: self.weights.rows(p, start, stop),  # noqa: B023 - called within this iteration
                lambda t, dim: t.narrow(dim, start, stop - start),  # noqa: B023 - likewise
            ) as head:
                out = {stream: self._run(head, stream, h).float().cpu() for stream, h in flat.items()}
            if self.softcap is not None:
                out = {stream: torch.tanh(z / self.softcap) * self.softcap for stream, z in out.items()}
            yield start, out


def tied_aliases(model: torch.nn.Module, tensors: dict[str, dict]) -> dict[str, str]:
    """{LM head weight: input embedding weight} when the head has no tensor of its own on disk (tied)."""
    paths = {id(m): n for n, m in model.named_modules()}
    hf: Any = model  # a transformers (or PEFT) model
    head, embedding = (
        base_path(paths[id(m)]) + ".weight" for m in (hf.get_output_embeddings(), hf.get_input_embeddings())
    )
    on_disk = {parameter_name(n, e) for n, e in tensors.items()}
    return {head: embedding} if head not in on_disk and embedding in on_disk else {}
