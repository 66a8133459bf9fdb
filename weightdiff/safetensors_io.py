"""Reading checkpoint directories: config.json, header-only views of safetensors shards, tensor-at-a-time reads.

Everything goes through `safetensors.safe_open`, which parses the header and memory-maps the data: a
tensor is read only when asked for, so a 47 GB shard costs no more memory than its largest tensor. A streamed
checkpoint (download.mode=stream) has no shards on disk: weightdiff.remote stands in for safe_open, reading each
tensor's bytes from the Hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open

from weightdiff.errors import WeightdiffError
from weightdiff.fp8 import FP8, SCALE
from weightdiff.quantization import Scheme, scheme_of
from weightdiff.remote import RemoteShards, is_remote

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    shard: str
    dtype: str
    shape: tuple[int, ...]


def model_config(model_dir: Path) -> dict:
    """config.json of a checkpoint directory."""
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightdiffError(f"{path}: cannot read the model config ({e})") from e


def shard_map(model_dir: Path) -> dict[str, str]:
    """Tensor name → shard file name, from the index file of a sharded checkpoint or the lone shards."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = index_weight_map(index)
        present = shard_files(model_dir)
        for shard in sorted(set(weight_map.values())):
            if shard not in present:
                raise WeightdiffError(f"{index} lists shard {shard}, which is missing from {model_dir}")
        return dict(weight_map)
    shards = sorted(shard_files(model_dir))
    if not shards:
        raise WeightdiffError(f"no *.safetensors in {model_dir} (pickle checkpoints are not read)")
    if len(shards) > 1:
        raise WeightdiffError(f"{model_dir} has {len(shards)} safetensors files but no {INDEX_FILE}")
    return {name: shards[0] for name in _open(model_dir, shards[0]).keys()}


def shard_files(model_dir: Path) -> set[str]:
    """The checkpoint's safetensors files: in the directory, or on the Hub for a streamed one (remote.json)."""
    if is_remote(model_dir):
        return set(RemoteShards.of(model_dir).shards)
    return {p.name for p in model_dir.glob("*.safetensors")}


def index_weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name → shard map, refused unless every shard is a safetensors file name in the same
    directory: the index comes from the Hub, and a path in it must not point anywhere else."""
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
        raise WeightdiffError(f"{index}: not a safetensors index (expected a 'weight_map' object): {e}") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(shard, str) and shard.endswith(".safetensors") and Path(shard).name == shard
        for shard in weight_map.values()
    ):
        raise WeightdiffError(
            f"{index}: 'weight_map' must map tensor names to .safetensors file names in "
            f"{index.parent}, not {str(weight_map)[:200]}"
        )
    return weight_map


def quantization(model_dir: Path) -> Scheme | None:
    """How the checkpoint's weights are quantized, from its config.json (None: they are not, or it has none)."""
    path = model_dir / "config.json"
    return scheme_of(path, model_config(model_dir)) if path.is_file() else None


def tensor_infos(model_dir: Path) -> dict[str, TensorInfo]:
    """Name, shard, dtype and shape of every tensor of the model, read from the headers alone: a quantized
    tensor as the dtype and shape it stands for, its stored parts (packed values, scales) not among them."""
    by_shard: dict[str, list[str]] = {}
    shards, scheme = shard_map(model_dir), quantization(model_dir)
    for name, shard in shards.items():
        by_shard.setdefault(shard, []).append(name)
    stored = {}
    for shard, names in sorted(by_shard.items()):
        f = _open(model_dir, shard)
        present = set(f.keys())
        for name in names:
            if name not in present:
                raise WeightdiffError(f"{model_dir / INDEX_FILE} puts {name} in {shard}, which does not hold it")
            sl = f.get_slice(name)
            stored[name] = TensorInfo(shard, sl.get_dtype(), tuple(sl.get_shape()))
    if scheme is None:
        return stored
    quantized = scheme.parts(shards, model_dir)
    stored_parts = {p for parts in quantized.values() for p in parts.values()}
    infos = {n: i for n, i in stored.items() if n not in stored_parts}
    for name, parts in quantized.items():
        shard = stored[next(iter(parts.values()))].shard
        headers = {role: (stored[p].dtype, stored[p].shape) for role, p in parts.items()}
        infos[name] = TensorInfo(shard, *scheme.header(name, headers, model_dir / shard))
    return infos


class TensorReader:
    """Reads tensors of one checkpoint one at a time, keeping each shard open (mapped) until `unmap()`.

    Pages of a mapped shard that were read count in the process's RSS for as long as it stays mapped, so
    a long extraction unmaps after each unit of work: memory then follows the tensors, not the shards.
    """

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.shards = shard_map(model_dir)
        self.quantization = quantization(model_dir)
        self.quantized = self.quantization.parts(self.shards, model_dir) if self.quantization else {}
        for name, parts in self.quantized.items():  # where a message about the tensor points: its first part's shard
            self.shards.setdefault(name, self.shards[next(iter(parts.values()))])
        self._open: dict[str, object] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.unmap()

    def unmap(self) -> None:
        self._open.clear()

    def get(self, name: str) -> torch.Tensor:
        """The tensor as the model uses it: a quantized weight dequantized to fp32 from its stored parts."""
        if self.quantization is not None and name in self.quantized:
            parts = {role: self._read(p, lambda f, p=p: f.get_tensor(p)) for role, p in self.quantized[name].items()}
            return self.quantization.dequantized(name, parts, self.model_dir / self.shards[name])
        stored = self._read(name, lambda f: f.get_tensor(name))
        if stored.dtype in FP8:
            raise WeightdiffError(
                f"{self.model_dir / self.shards[name]}: tensor {name} is float8 without a {SCALE} scale or an fp8 "
                "quantization_config in config.json: its values are not the weights"
            )
        return stored

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape `get` gives, from the header alone: a streamed tensor is not fetched for it."""
        if self.quantization is not None and name in self.quantized:
            headers = {role: self._header(p) for role, p in self.quantized[name].items()}
            return self.quantization.header(name, headers, self.model_dir / self.shards[name])[1]
        return tuple(self._read(name, lambda f: f.get_slice(name).get_shape()))

    def _header(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(dtype, shape) of a stored tensor, from its header."""
        header = cast(Any, self._read(name, lambda f: f.get_slice(name)))
        return header.get_dtype(), tuple(header.get_shape())

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start…stop of a tensor, read alone: a slice of a 2 GB embedding costs only that slice (a quantized
        one is dequantized whole first: its scales come in blocks of rows)."""
        if name in self.quantized:
            return self.get(name)[start:stop]
        return self._read(name, lambda f: f.get_slice(name)[start:stop])

    def _read(self, name: str, read) -> torch.Tensor:
        if name not in self.shards:
            raise WeightdiffError(f"tensor {name} is not in {self.model_dir}")
        shard = self.shards[name]
        if shard not in self._open:
            self._open[shard] = _open(self.model_dir, shard)
        try:
            return read(self._open[shard])
        except Exception as e:  # safetensors raises its own error types and OSError for truncated data
            raise WeightdiffError(f"{self.model_dir / shard}: cannot read tensor {name}: {e}") from e


def _open(model_dir: Path, shard: str):
    """The shard as safetensors.safe_open opens it, or its stand-in reading byte ranges from the Hub."""
    if is_remote(model_dir):
        return RemoteShards.of(model_dir).open(shard)
    path = model_dir / shard
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError: all mean the file cannot be used
        raise WeightdiffError(f"{path}: not a readable safetensors file ({e}){truncation(path)}") from e


def truncation(path: Path) -> str:
    """'; tensor X ...' naming the first tensor whose bytes lie past the end of a file whose header is intact.

    safetensors says only that the file is "not fully covered"; the tensor says where a copy or download
    stopped. Best effort, for a message: any other damage gives "".
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if n <= size - 8 else {}
        data = size - 8 - n
        end, name = min(
            (entry["data_offsets"][1], name)
            for name, entry in header.items()
            if name != "__metadata__" and entry["data_offsets"][1] > data
        )
    except Exception:  # noqa: BLE001 - no diagnosis beyond safetensors' own
        return ""
    return f"; tensor {name} ends at byte {end} of the data, which has {data}: the file is truncated"
