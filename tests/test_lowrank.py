import pytest
import torch
from torch.overrides import TorchFunctionMode

from weightdiff.lowrank import frobenius_norm, frobenius_norms, lora_factors, reconstruction_errors, residual_norms
from weightdiff.lowrank import truncated_svd as svd


def truncated_svd(M, rank, method="randomized", oversample=10, power_iters=2, seed=0, tol=1e-4):
    """weightdiff.lowrank.truncated_svd with the settings' own defaults but power_iters (2 here, auto there)."""
    return svd(M, rank, method, oversample, power_iters, seed, tol)


def low_rank_plus_noise(m: int, n: int, r: int, noise: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -1, r)
    return (torch.randn(m, r, generator=g) * decay) @ torch.randn(r, n, generator=g) + noise * torch.randn(
        m, n, generator=g
    )


@pytest.mark.parametrize("shape", [(256, 128), (96, 300)])
def test_randomized_matches_exact_singular_values(shape):
    M = low_rank_plus_noise(*shape, r=24, noise=0.01)
    exact = truncated_svd(M, 16, method="exact")
    fast = truncated_svd(M, 16, method="randomized", oversample=10, power_iters=2, seed=3)
    torch.testing.assert_close(fast.S, exact.S, rtol=1e-3, atol=1e-4)
    # same subspace: the reconstructions agree
    torch.testing.assert_close(fast.U * fast.S @ fast.Vh, exact.U * exact.S @ exact.Vh, rtol=0, atol=2e-3)


@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_the_spectrum_past_the_rank_reaches_the_width_asked_and_bounds_the_exact_one_from_below(method):
    M = low_rank_plus_noise(256, 192, r=64, noise=0.01)
    exact = torch.linalg.svdvals(M)
    t = svd(M, 16, method, 10, 2, 0, 1e-4, width=32)
    assert t.beyond is not None and t.beyond.shape == (16,)
    assert bool((t.beyond <= exact[16:32] * (1 + 1e-5)).all())  # interlacing: a projection's σ are no larger
    torch.testing.assert_close(t.beyond[:4], exact[16:20], rtol=2e-2, atol=0)  # the first ones close to exact
    assert svd(M, 16, method, 10, 2, 0, 1e-4).beyond.numel() == 0  # nothing past the rank unless asked


def test_randomized_is_deterministic_for_a_seed_and_varies_with_it():
    M = low_rank_plus_noise(64, 64, r=64, noise=0.5)
    a, b = truncated_svd(M, 8, seed=1), truncated_svd(M, 8, seed=1)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)
    assert not torch.equal(truncated_svd(M, 8, seed=2, power_iters=0).S, truncated_svd(M, 8, seed=1, power_iters=0).S)


@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.25])
def test_factors_times_scaling_give_the_truncated_delta(scaling):
    M = low_rank_plus_noise(80, 40, r=6, noise=0.0)
    t = truncated_svd(M, 6, method="exact")
    B, A = lora_factors(t, scaling)
    assert B.shape == (80, 6) and A.shape == (6, 40)
    torch.testing.assert_close(scaling * B @ A, M, rtol=0, atol=1e-4)
    # balanced split: both factors carry √σ, so their row/column norms match
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-4, atol=1e-6)


def test_frobenius_and_residual_norms_are_accurate_on_large_matrices():
    """torch's fp32 norm() of 58M entries is 0.5% off: enough to report energy above 1."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(14336, 4096, generator=g)
    exact = M.double().norm().item()
    assert abs(frobenius_norm(M) - exact) / exact < 1e-6
    B, A = torch.randn(14336, 4, generator=g), torch.randn(4, 4096, generator=g)
    expected = (M.double() - 0.5 * B.double() @ A.double()).norm().item()
    assert abs(residual_norms(M[None], B[None], A[None], 0.5).item() - expected) / expected < 1e-6


def test_norms_of_a_stack_are_each_matrix_own():
    g = torch.Generator().manual_seed(0)
    M, B, A = (
        torch.randn(3, 40, 70, generator=g),
        torch.randn(3, 40, 2, generator=g),
        torch.randn(3, 2, 70, generator=g),
    )
    for e in range(3):
        assert frobenius_norms(M)[e].item() == pytest.approx(M[e].double().norm().item(), rel=1e-7)
        expected = (M[e].double() - 2 * B[e].double() @ A[e].double()).norm().item()
        assert residual_norms(M, B, A, 2.0, block=128)[e].item() == pytest.approx(expected, rel=1e-6)


def with_spectrum(S: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, V = (torch.linalg.qr(torch.randn(len(S), len(S), generator=g)).Q for _ in range(2))
    return (U * S) @ V.T


def energy_gap(M: torch.Tensor, S_exact: torch.Tensor, rank: int, **svd) -> float:
    S = truncated_svd(M, rank, seed=0, **svd).S
    return ((S_exact[:rank].square().sum() - S.square().sum()) / S_exact.square().sum()).item()


class CountedPasses(TorchFunctionMode):
    """Counts products with a matrix of the given shape or its transpose: the passes over ΔW."""

    def __init__(self, shape: tuple[int, int]):
        super().__init__()
        self.shapes, self.count = (shape, shape[::-1]), 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in ("matmul", "__matmul__") and any(
            tuple(a.shape) in self.shapes for a in args[:2]
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def passes_of(M: torch.Tensor, rank: int, power_iters) -> tuple[int, torch.Tensor]:
    with CountedPasses(tuple(M.shape)) as counted:
        S = truncated_svd(M, rank, power_iters=power_iters).S
    return counted.count, S


def test_fixed_power_iterations_make_two_passes_each():
    """2 + 2·power_iters passes, the bf16 copy's and ΔW's alike."""
    M = low_rank_plus_noise(120, 90, r=8, noise=1e-2)
    assert [passes_of(M, 8, k)[0] for k in (0, 1, 3)] == [2, 4, 8]


def test_auto_power_iterations_reach_the_exact_energy_where_one_iteration_does_not():
    """A full fine-tune's spectrum decays slowly (σ_i ∝ i^-1/2): one power iteration leaves ~1e-2 of the energy."""
    S = torch.arange(1, 769.0) ** -0.5
    M = with_spectrum(S)
    assert energy_gap(M, S, 16, power_iters=1) > 3e-3
    assert energy_gap(M, S, 16, power_iters="auto") < 1e-3
    assert passes_of(M, 16, "auto")[0] > 4


def test_auto_power_iterations_stop_after_three_bf16_passes_on_a_merged_lora():
    """A rank-16 delta plus rounding noise converges at once: auto's third bf16 pass adds nothing, and the two
    passes on ΔW itself follow; what it keeps is power_iters=1's."""
    M = low_rank_plus_noise(300, 200, r=16, noise=1e-3)
    (passes, auto), (_, one) = passes_of(M, 16, "auto"), passes_of(M, 16, 1)
    assert passes == 5
    torch.testing.assert_close(auto, one, rtol=1e-5, atol=0)


@pytest.mark.parametrize("noise", [0.3, 1e-4])
def test_reconstruction_errors_of_the_stored_factors_match_the_direct_residual(noise):
    """Analytic (‖ΔW‖² − Σσ² plus the fp16 rounding) where the truncation leaves much out, measured where it does
    not: either way what ‖ΔW − B̃·Ã‖ is with the factors as saved."""
    M = low_rank_plus_noise(300, 200, r=8, noise=noise)
    t = truncated_svd(M, 8)
    B, A = lora_factors(t, 0.5)
    stored = (B.half(), A.half())
    norms = frobenius_norms(M[None])
    got = reconstruction_errors(M[None], B[None], A[None], (stored[0][None], stored[1][None]), t.S[None], norms, 0.5)
    direct = (M.double() - 0.5 * stored[0].double() @ stored[1].double()).norm().item()
    assert got.item() == pytest.approx(direct, rel=1e-3)


def test_the_energy_bound_brackets_the_exact_energy_with_the_kept_one():
    """Kept ≤ exact ≤ kept + what lies outside the sketch, on a merged LoRA (tight) and a slow spectrum (loose)."""
    for M in (low_rank_plus_noise(300, 200, r=16, noise=1e-3), with_spectrum(torch.arange(1, 301.0) ** -0.5)):
        t = truncated_svd(M, 16, power_iters="auto")
        S = torch.linalg.svdvals(M.double())
        total = S.square().sum()
        kept, exact = t.S.double().square().sum() / total, S[:16].square().sum() / total
        bound = kept + (total - t.spanned) / total
        assert kept - 1e-6 <= exact <= bound + 1e-6
