"""The records of weightdiff/records.py against FORMATS.md's examples and against what extraction writes."""

from __future__ import annotations

import json
import re
import types
import typing

import pytest
import typing_extensions

from helpers import REPO, run_extract
from weightdiff.index import build_index
from weightdiff.records import TensorEntry, TensorReport

EXAMPLES = re.findall(r"```json\n(.*?)```", (REPO / "FORMATS.md").read_text(), re.S)


def problems(value, kind, where: str = "") -> list[str]:
    """What in a JSON value does not fit a record's type (TypedDicts, lists, literals, unions, scalars)."""
    origin, args = typing_extensions.get_origin(kind), typing_extensions.get_args(kind)
    if typing_extensions.is_typeddict(kind):
        if not isinstance(value, dict):
            return [f"{where}: not an object"]
        hints = typing_extensions.get_type_hints(kind)
        found = [f"{where}.{k}: missing" for k in kind.__required_keys__ - value.keys()]
        found += [f"{where}.{k}: not in {kind.__name__}" for k in value.keys() - hints.keys()]
        return found + [p for k in value.keys() & hints.keys() for p in problems(value[k], hints[k], f"{where}.{k}")]
    if origin is typing.Literal:
        return [] if value in args else [f"{where}: {value!r} not one of {args}"]
    if origin in (typing.Union, types.UnionType):
        return [] if any(not problems(value, a, where) for a in args) else [f"{where}: {value!r} fits none of {args}"]
    if origin is list:
        return (
            [f"{where}: not a list"]
            if not isinstance(value, list)
            else [p for i, v in enumerate(value) for p in problems(v, args[0], f"{where}[{i}]")]
        )
    if kind is type(None):
        return [] if value is None else [f"{where}: not null"]
    if kind is float:
        return [] if isinstance(value, (int, float)) and not isinstance(value, bool) else [f"{where}: not a number"]
    return [] if isinstance(value, kind) and not (kind is int and isinstance(value, bool)) else [f"{where}: not {kind}"]


def example(starts: str):
    (text,) = [e for e in EXAMPLES if e.lstrip().startswith(starts)]
    return json.loads(text)


def test_formats_examples_are_records():
    assert problems(example('{"shard"'), TensorEntry) == []
    reports = example('[{"name"')
    assert len(reports) == 2 and [p for r in reports for p in problems(r, TensorReport)] == []


def test_the_checker_catches_what_does_not_fit():
    report = example('[{"name"')[0]
    assert problems(report | {"action": "linear"}, TensorReport)  # an old word
    assert problems(report | {"kind": "q_proj"}, TensorReport)  # an old key
    assert problems({k: v for k, v in report.items() if k != "module_type"}, TensorReport)


SKIP_EXTRAS = {"norms": "skip", "biases": "skip", "embeddings": "skip", "lm_head": "skip"}


@pytest.mark.parametrize(
    ("overrides", "actions"),
    [({}, {"lora", "save"}), ({"rank_policy": "energy", "extras": SKIP_EXTRAS}, {"lora", "skip"})],
)
def test_what_extraction_writes_is_records(tiny_pair, tmp_path, cfg, overrides, actions):
    manifest, _, reports = run_extract(*tiny_pair, tmp_path / "adapter", cfg, **overrides)
    assert {r["action"] for r in reports} >= actions
    assert [p for r in reports for p in problems(json.loads(json.dumps(r)), TensorReport, r["name"])] == []
    entries = build_index(manifest)["model_a"]["tensors"]
    assert [p for n, e in entries.items() for p in problems(e, TensorEntry, n)] == []
