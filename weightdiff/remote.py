"""Checkpoints read from the Hub without a local copy (download.mode=stream): each tensor's bytes fetched with an
HTTP Range request at a pinned commit, from safetensors headers kept on disk.

The download stage keeps the small files (config, tokenizer, shard index) and `remote.json`: the repo, the commit
sha, the endpoint and every shard's size and header. A shard here behaves as `safetensors.safe_open` does for a
local one (keys, get_slice(...).get_dtype/get_shape, rows of a slice, get_tensor), so the readers above it do not
know where the bytes come from. A tensor is read once, straight into its own buffer: memory is the tensor, and a
connection that drops mid-tensor resumes from the byte reached. The commit sha pins the bytes: a file at a commit
never changes on the Hub, it can only disappear (an error naming repo, file and revision).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_url
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

try:  # the HTTP client under huggingface_hub (httpx2 from 2.x, httpx in 1.x); its RequestError is no OSError
    from httpx2 import RequestError
except ImportError:
    from httpx import RequestError  # type: ignore[no-redef]  # the same class, in huggingface_hub 1.x

from huggingface_hub.errors import HfHubHTTPError

from weightdiff.errors import WeightdiffError
from weightdiff.files import write_json

REMOTE_FILE = "remote.json"
# safetensors' dtype names (its format specification), as torch holds them
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
RETRIED_STATUS = (408, 429, 500, 502, 503, 504)  # huggingface_hub's own choice (http_backoff)
ATTEMPTS = 5  # reads of one byte range, each resuming where the previous one stopped
MAX_HEADER = 100 << 20  # safetensors' own limit on a header's size


@dataclass(frozen=True)
class RemoteRepo:
    """A model repo at one commit of one Hub endpoint."""

    repo_id: str
    revision: str  # the commit sha
    endpoint: str

    def where(self, filename: str) -> str:
        return f"{self.repo_id}@{self.revision}/{filename} ({self.endpoint})"

    def read_into(self, filename: str, start: int, out: torch.Tensor) -> None:
        """Bytes start… of the file into `out` (uint8), by Range requests; a dropped or refused connection and a
        busy server (408, 429, 5xx) are retried with backoff, resuming from the byte reached (ATTEMPTS in a row
        without progress give up)."""
        view = out.numpy().data
        got, failures = 0, 0
        while got < len(view):
            reached = got
            try:
                for chunk in self._chunks(filename, start + got, start + len(view) - 1):
                    n = min(len(chunk), len(view) - got)
                    view[got : got + n] = chunk[:n]
                    got += n
                if got < len(view):
                    raise RequestError(f"the connection closed after {got} of {len(view)} bytes")
            except RequestError as e:
                failures = 1 if got > reached else failures + 1
                if failures >= ATTEMPTS:
                    raise WeightdiffError(
                        f"{self.where(filename)}: bytes {start}–{start + len(view) - 1} still incomplete after "
                        f"{ATTEMPTS} attempts ({type(e).__name__}: {e}); got {got} of {len(view)}"
                    ) from e
                time.sleep(min(8.0, 0.5 * 2 ** (failures - 1)))

    def _chunks(self, filename: str, first: int, last: int) -> Iterator[bytes]:
        """The bytes first…last (inclusive) of the file as they arrive; errors the user must act on (a file gone,
        no access, a server without ranges) are a WeightdiffError, transient ones a RequestError."""
        url = hf_hub_url(self.repo_id, filename, revision=self.revision, endpoint=self.endpoint)
        headers = build_hf_headers() | {"Range": f"bytes={first}-{last}"}
        with get_session().stream("GET", url, headers=headers) as response:
            if response.status_code in RETRIED_STATUS:
                raise RequestError(f"the server answered {response.status_code}")
            try:
                hf_raise_for_status(response)
            except HfHubHTTPError as e:
                raise WeightdiffError(
                    f"{self.where(filename)}: cannot read bytes {first}–{last}: {e}. The file may have been deleted "
                    "or the repo made private or gated since the download stage (a gated repo needs HF_TOKEN)"
                ) from e
            if response.status_code != 206:
                raise WeightdiffError(
                    f"{self.where(filename)}: the server answered a Range request with {response.status_code}, "
                    "not 206 Partial Content: streaming needs ranged reads (use download.mode=fetch)"
                )
            yield from response.iter_bytes()

    def read(self, filename: str, start: int, size: int) -> bytes:
        out = torch.empty(size, dtype=torch.uint8)
        self.read_into(filename, start, out)
        return out.numpy().tobytes()


@dataclass(frozen=True)
class RemoteShardInfo:
    size: int  # of the whole file
    data_start: int  # 8 + the header's length: where the tensors' bytes begin
    header: dict  # the file's safetensors header: name → {dtype, shape, data_offsets}, and __metadata__

    def tensors(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]


def shard_header(repo: RemoteRepo, filename: str, size: int) -> RemoteShardInfo:
    """A shard's header, read with two ranged requests (its length, then itself), checked as safetensors does."""
    if size < 8:
        raise WeightdiffError(f"{repo.where(filename)}: {size} bytes, too short for a safetensors file")
    n = int.from_bytes(repo.read(filename, 0, 8), "little")
    if not 0 < n <= min(MAX_HEADER, size - 8):
        raise WeightdiffError(f"{repo.where(filename)}: header length {n} does not fit a file of {size} bytes")
    try:
        header = json.loads(repo.read(filename, 8, n))
    except (ValueError, RecursionError) as e:
        raise WeightdiffError(f"{repo.where(filename)}: the safetensors header is not JSON ({e})") from e
    info = RemoteShardInfo(size, 8 + n, header)
    for name in info.tensors():
        RemoteTensor.of(repo, filename, info, name)  # every entry well-formed and inside the file
    return info


def write_remote(directory: Path, repo: RemoteRepo, shards: dict[str, int]) -> None:
    """remote.json of a streamed checkpoint: the repo at its commit and the headers of `shards` (file → size)."""
    infos = {name: asdict(shard_header(repo, name, size)) for name, size in sorted(shards.items())}
    write_json(directory / REMOTE_FILE, {"repo": asdict(repo), "shards": infos})


def is_remote(model_dir: Path) -> bool:
    return (model_dir / REMOTE_FILE).is_file()


class RemoteShards:
    """The shards of a streamed checkpoint, from its remote.json."""

    @classmethod
    def of(cls, model_dir: Path) -> RemoteShards:
        """Parsed once per process and file version: readers reopen shards after every unit of work, and the
        headers of a 600B model's shards take megabytes."""
        stat = (model_dir / REMOTE_FILE).stat()
        return _parsed(model_dir.resolve(), stat.st_mtime_ns, stat.st_size)

    def __init__(self, model_dir: Path):
        path = model_dir / REMOTE_FILE
        try:
            data = json.loads(path.read_text())
            self.repo = RemoteRepo(**data["repo"])
            self.shards = {name: RemoteShardInfo(**info) for name, info in data["shards"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightdiffError(f"{path}: not a streamed checkpoint's description ({e}); rerun download") from e

    def open(self, filename: str) -> RemoteShard:
        if filename not in self.shards:
            raise WeightdiffError(f"{self.repo.where(filename)} is not among the shards the download stage listed")
        return RemoteShard(self.repo, filename, self.shards[filename])


@dataclass(frozen=True)
class RemoteTensor:
    """One tensor of a remote shard: where its bytes are and what they hold."""

    repo: RemoteRepo
    filename: str
    start: int  # absolute offset in the file
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, repo: RemoteRepo, filename: str, info: RemoteShardInfo, name: str) -> RemoteTensor:
        entry = info.header[name]
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            torch_dtype = DTYPES[dtype]
        except (KeyError, TypeError, ValueError) as e:
            raise WeightdiffError(f"{repo.where(filename)}: header entry of {name} is not readable ({entry})") from e
        expected = math.prod(shape) * torch_dtype.itemsize
        if not (0 <= begin <= end and end - begin == expected and info.data_start + end <= info.size):
            raise WeightdiffError(
                f"{repo.where(filename)}: {name} ({dtype} {list(shape)}) has data_offsets {[begin, end]}: expected "
                f"{expected} bytes within the file's {info.size - info.data_start}"
            )
        return cls(repo, filename, info.data_start + begin, end - begin, dtype, shape)

    def get_dtype(self) -> str:
        return self.dtype

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        row = math.prod(self.shape[1:]) * DTYPES[self.dtype].itemsize
        count = max(0, min(stop, self.shape[0]) - start)
        out = torch.empty(count * row, dtype=torch.uint8)
        if count:
            self.repo.read_into(self.filename, self.start + start * row, out)
        return out.view(DTYPES[self.dtype]).reshape(count, *self.shape[1:])

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """Rows of the tensor, as safetensors' slices give them (a step or a negative bound is not supported)."""
        if not self.shape or rows.step not in (None, 1) or (rows.start or 0) < 0 or (rows.stop or 0) < 0:
            raise WeightdiffError(f"{self.repo.where(self.filename)}: unsupported slice {rows} of a remote tensor")
        return self.rows(rows.start or 0, self.shape[0] if rows.stop is None else rows.stop)

    def read(self) -> torch.Tensor:
        out = torch.empty(self.nbytes, dtype=torch.uint8)
        if self.nbytes:
            self.repo.read_into(self.filename, self.start, out)
        return out.view(DTYPES[self.dtype]).reshape(self.shape)


@functools.lru_cache(maxsize=8)
def _parsed(model_dir: Path, mtime_ns: int, size: int) -> RemoteShards:
    return RemoteShards(model_dir)


class RemoteShard:
    """What safetensors.safe_open gives for a local shard, for a shard on the Hub."""

    def __init__(self, repo: RemoteRepo, filename: str, info: RemoteShardInfo):
        self.repo, self.filename, self.info = repo, filename, info

    def keys(self) -> list[str]:
        return self.info.tensors()

    def metadata(self) -> dict | None:
        return self.info.header.get("__metadata__")

    def get_slice(self, name: str) -> RemoteTensor:
        if name not in self.info.header or name == "__metadata__":
            raise WeightdiffError(f"{self.repo.where(self.filename)} has no tensor {name}")
        return RemoteTensor.of(self.repo, self.filename, self.info, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get_slice(name).read()
