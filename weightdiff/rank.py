"""How many singular triplets each delta keeps.

Policies: `fixed` (the configured rank), `energy` (the smallest r whose kept energy Σᵢ≤ᵣσᵢ²/‖ΔW‖² reaches
the target) and `noise_floor` (the singular values that stand above what rounding the two checkpoints to
their dtype would produce on its own). Adaptive policies are capped by `max_rank`.
"""

from __future__ import annotations

import math

import torch

from weightdiff.errors import WeightdiffError

# Unit roundoff (half the spacing between 1 and the next number) of checkpoint dtypes.
UNIT_ROUNDOFF = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24, "F64": 2.0**-53}


def auto_rank(parameters: int) -> int:
    """By model size, as the prototype scripts decided it: smaller models get more rank, very large ones less."""
    if parameters < 7e9:
        return 32
    return 8 if parameters > 70e9 else 16


def sketch_rank(policy: str, rank: int, max_rank: int) -> int:
    """How many triplets to compute before choosing: the rank itself, or the cap for adaptive policies."""
    return rank if policy == "fixed" else max_rank


def energy_rank(S: torch.Tensor, norm_sq: float, target: float) -> int:
    """Smallest r with Σᵢ≤ᵣ σᵢ² ≥ target·‖ΔW‖², or all of S when even that falls short."""
    kept = torch.cumsum(S.double().square(), 0) / norm_sq
    reached = (kept >= target).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(S)


def noise_floor(shape: tuple[int, int], dtype: str, rms_a: float, rms_b: float) -> float:
    """Expected largest singular value of the rounding noise in W_B − W_A.

    Rounding to a dtype with unit roundoff u leaves an error uniform in ±u·|w|, of standard deviation
    ≈ u·rms(w)/√3 per entry; the two checkpoints' errors are independent, and a random m×n matrix of
    entry deviation s has largest singular value ≈ s·(√m + √n) (Marchenko–Pastur edge).
    """
    u = UNIT_ROUNDOFF.get(dtype)
    if u is None:
        raise WeightdiffError(f"rank_policy=noise_floor needs a float checkpoint dtype, not {dtype}")
    s = u * math.hypot(rms_a, rms_b) / math.sqrt(3)
    return s * (math.sqrt(shape[0]) + math.sqrt(shape[1]))


def chosen_rank(policy: str, S: torch.Tensor, norm_sq: float, *, energy: float, floor: float) -> int:
    """The rank the policy keeps out of the computed spectrum S (descending); at least 1."""
    if policy == "fixed":
        return len(S)
    if policy == "energy":
        return energy_rank(S, norm_sq, energy)
    return max(1, int((S > floor).sum()))
