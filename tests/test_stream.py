"""Forming ΔW: exact against the obvious computation, in a reused workspace, with its bf16 sketch."""

import pytest
import torch
from safetensors.torch import save_file

from weightdiff.errors import WeightdiffError
from weightdiff.plan import Unit
from weightdiff.safetensors_io import TensorReader
from weightdiff.stream import BLOCK, Workspace, difference_into, read_unit

SHAPES = {
    "big.weight": (BLOCK // 100 + 7, 300),
    "small.weight": (3, 5),
    "norm.weight": (11,),
    "experts.weight": (4, 9, 13),
    "wide.weight": (2, BLOCK + 1),
}


@pytest.fixture
def pair(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = {n: torch.randn(s, generator=g).bfloat16() for n, s in SHAPES.items()}
    b = {
        n: (w.float() + torch.randn(s, generator=g) * 1e-2).bfloat16()
        for (n, w), s in zip(a.items(), SHAPES.values(), strict=True)
    }
    for side, tensors in (("a", a), ("b", b)):
        (tmp_path / side).mkdir()
        save_file(tensors, tmp_path / side / "model.safetensors")
    return tmp_path, a, b


def test_deltas_are_exact_in_a_reused_workspace(pair):
    root, a, b = pair
    # small after big, big again: workspaces are reused at every size, never stale
    order = ["big.weight", "small.weight", "norm.weight", "big.weight", "experts.weight", "wide.weight", "small.weight"]
    units = [Unit("lora", n.removesuffix(".weight"), (n,)) for n in order] + [
        Unit("whole", "pair", ("norm.weight", "small.weight"))
    ]
    readers, space = (TensorReader(root / "a"), TensorReader(root / "b")), Workspace()
    for unit in units:
        ds = read_unit(unit, *readers, False, space)
        for name, d in zip(unit.tensors, ds, strict=True):
            assert d.name == name and d.value.dtype == torch.float32
            exact = b[name].float() - a[name].float()
            assert torch.equal(d.value, exact), name
            # the SVD's range passes get the weight's bf16 copy, formed with it (a lora unit's first tensor)
            if unit.action == "lora":
                assert d.sketch is not None and torch.equal(d.sketch, exact.bfloat16()), name
            else:
                assert d.sketch is None
            assert abs(d.norm - exact.double().norm().item()) <= 1e-6 * d.norm


def test_difference_into_reports_non_finite_weights():
    wa = torch.zeros(5, 7, dtype=torch.bfloat16)
    wb = wa.clone()
    wb[3, 2] = float("nan")
    assert difference_into(torch.empty(5, 7), wa, wb) != difference_into(torch.empty(5, 7), wa, wb)  # NaN
    wb[3, 2] = float("inf")
    assert difference_into(torch.empty(5, 7), wa, wb) == float("inf")


def test_nan_names_model_and_tensor(pair):
    root, a, b = pair
    b = dict(b)
    b["small.weight"] = b["small.weight"].clone()
    b["small.weight"][1, 1] = float("nan")
    save_file(b, root / "b" / "model.safetensors")
    unit = Unit("linear", "small", ("small.weight",))
    with pytest.raises(WeightdiffError, match=r"b/model.safetensors: tensor small.weight has 1 NaN/Inf"):
        read_unit(unit, TensorReader(root / "a"), TensorReader(root / "b"), False, Workspace())
