"""The verdict comes from validate's gap_closed; the energy kept and what was left out only explain it."""

import pytest

from weightdiff.verdict import judged, percent, verdict_of

FULL_FINE_TUNE = {"rank": 32, "rank_min": 32, "energy": 0.37, "diagnosis": {"target": 0.9}}
TIED_HEAD_MISSING = {
    "rank": 32,
    "rank_min": 32,
    "energy": 0.999,
    "diagnosis": {"target": 0.9},
    "left_out": [
        {"module_type": "input_layernorm", "tensors": 30, "share": 0.001, "reason": "extract.extras.norms=skip"},
        {"module_type": "embed_tokens", "tensors": 1, "share": 0.05, "reason": "extract.extras.embeddings=skip"},
    ],
}


@pytest.mark.parametrize(
    ("gap", "verdict"),
    [(None, "no_gap"), (0.995, "reproduces"), (0.99, "reproduces"), (0.94, "falls_short"), (-0.2, "worse")],
)
def test_the_verdict_is_gap_closed_against_the_target(gap, verdict):
    assert verdict_of(gap, 0.99) == verdict


def test_low_energy_that_still_reproduces_b_is_said_so_not_flagged():
    judgement = judged({"gap_closed": 0.993}, FULL_FINE_TUNE, 0.99)
    assert judgement["verdict"] == "reproduces"
    assert "rank 32 keeps 37% of ‖ΔW‖² yet closes 99.3% of the KL gap" in judgement["verdict_summary"]


def test_high_energy_that_falls_short_points_at_the_largest_delta_left_out():
    judgement = judged({"gap_closed": 0.94}, TIED_HEAD_MISSING, 0.99)
    assert judgement["verdict"] == "falls_short"
    assert "although rank 32 keeps 99.9% of ‖ΔW‖²" in judgement["verdict_summary"]
    assert "embed_tokens (1 tensor, 5% of ‖ΔW‖²: extract.extras.embeddings=skip)" in judgement["verdict_summary"]


def test_low_energy_that_falls_short_suggests_more_rank():
    summary = judged({"gap_closed": 0.8}, FULL_FINE_TUNE | {"rank_min": 4}, 0.99)["verdict_summary"]
    assert "ranks 4–32 keeps 37%" in summary and "extract.rank" in summary


def test_percentages_keep_the_digits_that_matter():
    assert [percent(x) for x in (0.99987, 0.993, 0.37, 1.0, 0.0005)] == ["99.99%", "99.3%", "37%", "100%", "0.05%"]
    # an fp32 adapter of an exactly low-rank delta: KL 3.4e-12 against 3.49 (a rounding to 100% past 8 decimals)
    assert percent(1 - 3.4e-12 / 3.49) == "99.9999999999%" and percent(1 - 1e-16) == "100%"
