"""Fuzzing safetensors headers and shard indexes: whatever the bytes, reading a checkpoint either works or
raises WeightdiffError naming the file, never another exception (the stage CLI would print a traceback).

safetensors (0.8) validates headers itself (length, JSON, dtypes, offsets against the file size, shape ×
dtype against the byte span) and raises SafetensorError, which safetensors_io.py turns into WeightdiffError;
these tests hold that up against random, mutated and well-formed-but-odd headers.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from weightdiff.errors import WeightdiffError
from weightdiff.safetensors_io import INDEX_FILE, TensorReader, tensor_infos

VALID = save(
    {
        "model.embed_tokens.weight": torch.randn(4, 3),
        "model.norm.weight": torch.ones(3, dtype=torch.bfloat16),
        "step": torch.arange(2, dtype=torch.int64),
    },
    metadata={"format": "pt"},
)
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]
BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U8": 8,
    "U16": 16,
    "U32": 32,
    "U64": 64,
    "BOOL": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "C64": 64,
}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_reads_or_names_the_file(model_dir: Path, shard: bytes) -> None:
    """What verify, index and extract do with a checkpoint: every header entry, then every tensor."""
    path = model_dir / "model.safetensors"
    path.write_bytes(shard)
    try:
        names = tensor_infos(model_dir)
        with TensorReader(model_dir) as reader:
            for name in names:
                reader.get(name)
    except WeightdiffError as e:
        assert str(model_dir) in str(e)


def with_length(header: bytes, data: bytes, slack: int = 0) -> bytes:
    return struct.pack("<Q", len(header) + slack) + header + data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(tmp_path, shard):
    assert_reads_or_names_the_file(tmp_path, shard)


@FUZZ
@given(
    st.one_of(
        st.lists(st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
            lambda flips: bytes(b if i not in dict(flips) else dict(flips)[i] for i, b in enumerate(VALID))
        ),
        st.integers(0, len(VALID) - 1).map(lambda n: VALID[:n]),
        st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n) + VALID[8:]),
        st.binary(min_size=1, max_size=64).map(lambda tail: VALID + tail),
    )
)
def test_mutated_valid_file(tmp_path, shard):
    """Bytes of the header flipped, the file truncated or grown, the length prefix replaced."""
    assert_reads_or_names_the_file(tmp_path, shard)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=6), st.sampled_from(sorted(BITS)), st.lists(st.integers(0, 5), max_size=3)
        ),
        max_size=4,
        unique_by=lambda t: t[0],
    ),
    st.integers(-2, 2),
)
def test_consistent_headers_of_every_dtype_and_shape(tmp_path, tensors, slack):
    """Well-formed files of any dtype (sub-byte and complex ones too), empty and scalar shapes, contiguous
    offsets; the data one or two bytes short or long at times."""
    header, offset = {}, 0
    for name, dtype, shape in tensors:
        size = math.ceil(math.prod(shape) * BITS[dtype] / 8)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    assert_reads_or_names_the_file(tmp_path, with_length(json.dumps(header).encode(), bytes(max(offset + slack, 0))))


@FUZZ
@given(
    st.dictionaries(
        st.text(max_size=12) | st.just("__metadata__"),
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from([*BITS, "F6_E2M3", "X", ""]) | json_values,
                "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
                "data_offsets": st.lists(st.integers(-2, 2**40), min_size=2, max_size=2) | json_values,
            }
        )
        | json_values,
        max_size=4,
    )
    | json_values,
    st.integers(0, 128),
    st.integers(0, 2),
)
def test_arbitrary_json_headers(tmp_path, header, data_len, slack):
    assert_reads_or_names_the_file(tmp_path, with_length(json.dumps(header).encode(), bytes(data_len), slack))


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=64),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(
            st.text(max_size=8),
            json_values
            | st.sampled_from(["model.safetensors", "../model.safetensors", "/etc/model.safetensors", "x.bin"]),
            max_size=3,
        ).map(lambda m: json.dumps({"weight_map": m}).encode()),
    )
)
def test_shard_index(tmp_path, index):
    (tmp_path / INDEX_FILE).write_bytes(index)
    assert_reads_or_names_the_file(tmp_path, VALID)
