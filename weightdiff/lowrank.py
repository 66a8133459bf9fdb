"""Truncated SVD of a weight delta and its split into LoRA factors.

Only the top `rank` singular triplets are ever used, so the default is a randomized range finder
(Halko, Martinsson & Tropp 2011): a Gaussian sketch with at least `oversample` extra columns, re-orthonormalised
power iterations to sharpen a slowly decaying spectrum (a fixed count, or as many as the energy needs), then
an exact SVD of the small projected matrix: for a rank-16 cut of a 4096² delta, two orders of magnitude less
work than torch.linalg.svd (benchmarks/ measure it).

Precision where it matters: the passes that only find the range multiply a bf16 copy of ΔW (on AVX512_BF16 CPUs
and GPUs several times the fp32 throughput; the range they find is as good, see randomized_svd), the one
projection the factors and energies come from multiplies ΔW itself in fp32.

Everything here also takes a stack of matrices [..., m, n] (the experts of a MoE layer) and decomposes each
of them in the same calls: torch's matmul, QR and SVD run over the leading axes without a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Truncated:
    U: torch.Tensor  # [..., out, r]
    S: torch.Tensor  # [..., r], descending
    Vh: torch.Tensor  # [..., r, in]
    spanned: torch.Tensor | None = None  # [...] ‖ΔW‖² inside the final sketch's span (None: an exact SVD)
    # [..., k] the next singular values past the rank, as far as the SVD saw: a randomized sketch's are each a lower
    # bound on ΔW's own (the projection's singular values interlace ΔW's), an exact SVD's are ΔW's
    beyond: torch.Tensor | None = None


MAX_POWER_ITERS = 10  # what power_iters=auto may spend on a delta whose spectrum decays slowly
# The smallest energy gain a bf16 pass resolves, relative to the energy: measured on 4096² and 14336×4096 deltas,
# a bf16 sketch's estimate of the captured energy wanders by up to ~4e-4 of it from pass to pass (its products are
# rounded to bf16); gains below this are noise, and waiting for them would spend every allowed pass.
SKETCH_RESOLUTION = 5e-4


def randomized_svd(
    M: torch.Tensor,
    rank: int,
    oversample: int,
    power_iters: int | str,
    generator: torch.Generator,
    tol: float = 1e-4,
    sketch: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
    width: int = 0,
) -> Truncated:
    """Halko et al.'s algorithm 4.4: passes over ΔW that alternate sides, the early ones on a bf16 copy.

    Each pass is one product with ΔW (the cost: it is read once), and each leaves an orthonormal basis of the
    side it sketched. The early range passes run on `sketch`, a bf16 copy of M (made here when not given), at
    bf16 throughput; their products are good to ~2e-3 only, so the basis they leave misses ~1e-6 of the energy
    it should hold, which is ~1e-3 of ‖ΔW‖ in the reconstruction. The last range pass therefore runs on M itself
    and sharpens that basis by the spectrum's decay, and the projection of M on it in M's dtype (M ≈ (M·P)·Pᵀ
    from a right basis P, M ≈ Q·(Qᵀ·M) from a left one) gives the factors, the kept energy and the energy the
    sketch spans (`spanned`, for the a-posteriori bound).

    A fixed `power_iters` makes 2 + 2·power_iters passes, the last two on M. `auto` estimates the energy of the
    top `rank` directions after every bf16 pass from the second and stops them once a pass adds less than `tol`
    of it (or than a bf16 pass resolves, SKETCH_RESOLUTION), in every matrix of a stack: a merged LoRA takes 3
    bf16 passes, a full fine-tune's slowly decaying spectrum the passes it needs.

    `start` [..., n, k ≤ q]: row-space directions the first pass begins from, Gaussian columns filling the rest.
    `width`: singular values wanted in all (rank and `beyond`), when more than rank + oversample: the sketch widens.
    """
    *batch, m, n = M.shape
    q = min(-(-max(rank + oversample, width) // 8) * 8, m, n)  # kernels take a width that is a multiple of 8 faster
    ranged = M.to(torch.bfloat16) if sketch is None else sketch
    auto = power_iters == "auto"
    least_gain = max(tol, SKETCH_RESOLUTION)
    basis = torch.randn(*batch, n, q, generator=generator).to(M.device)
    if start is not None:
        basis[..., : start.shape[-1]] = start
    right = True  # the basis is of the row space (n×q: the next product is M·basis), else of the column space
    captured = None
    for p in range(1, 1 + 2 * (MAX_POWER_ITERS if auto else int(power_iters))):
        narrow = basis.to(ranged.dtype)
        product = pass_over(ranged, narrow, right).to(M.dtype)
        basis, R = cholesky_qr(product)
        right = not right
        if auto and p >= 2:
            energy = captured_energy(R, narrow, rank)
            if captured is not None and bool(((energy - captured) <= least_gain * energy).all()):
                break
            captured = energy
    basis, right = torch.linalg.qr(pass_over(M, basis, right)).Q, not right
    if right:
        U, S, Wh = torch.linalg.svd(pass_over(M, basis, right), full_matrices=False)  # M ≈ (M·basis)·basisᵀ
        Vh = Wh @ basis.mT
    else:
        Ub, S, Vh = torch.linalg.svd(pass_over(M, basis, right).mT, full_matrices=False)  # M ≈ basis·(basisᵀ·M)
        U = basis @ Ub
    spanned = S.double().square().sum(-1)
    return Truncated(U[..., :rank], S[..., :rank], Vh[..., :rank, :], spanned, S[..., rank : max(rank, width)])


def pass_over(M: torch.Tensor, basis: torch.Tensor, right: bool) -> torch.Tensor:
    """M·basis for a row-space basis, Mᵀ·basis for a column-space one, the latter as (basisᵀ·M)ᵀ: on CPUs that
    orientation of the product is the faster one, in fp32 and bf16 alike."""
    return M @ basis if right else (basis.mT @ M).mT


def cholesky_qr(product: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, R) of product [..., m, q] from the Cholesky factor of its Gram: a fifth of Householder QR's time at a
    range pass's shapes, and orthonormal to ~κ²·1e-7, ample for a basis rounded to bf16 next. Householder where
    the Gram is not positive definite in fp32 (directions at the rounding level, a zero delta)."""
    L, info = torch.linalg.cholesky_ex((product.mT @ product).double())
    if bool((info != 0).any()):
        return torch.linalg.qr(product)
    L = L.to(product.dtype)
    return torch.linalg.solve_triangular(L, product.mT, upper=False).mT, L.mT


def captured_energy(R: torch.Tensor, basis: torch.Tensor, rank: int) -> torch.Tensor:
    """Σ of the top `rank` σ² of ΔW projected on span(basis), from the R of the QR of product = ΔW·basis (or of its
    transposed pass): product has R's singular values, and only q×q matrices are touched.

    The bf16 basis is orthonormal only to ~4e-3; its Gram's Cholesky factor L makes basis·L⁻ᵀ exactly so, and
    product·L⁻ᵀ the projection on it: without it the estimate would wander by ~1e-2 from pass to pass.
    """
    wide = basis.to(R.dtype)
    L = torch.linalg.cholesky(wide.mT @ wide)
    projected = torch.linalg.solve_triangular(L, R.mT, upper=False).mT  # R·L⁻ᵀ
    return torch.linalg.svdvals(projected)[..., :rank].double().square().sum(-1)


def exact_svd(M: torch.Tensor, rank: int, width: int = 0) -> Truncated:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    # spanned None: all of M is
    return Truncated(U[..., :rank], S[..., :rank], Vh[..., :rank, :], beyond=S[..., rank : max(rank, width)])


def truncated_svd(
    M: torch.Tensor,
    rank: int,
    method: str,
    oversample: int,
    power_iters: int | str,
    seed: int,
    tol: float,
    sketch: torch.Tensor | None = None,
    width: int = 0,
) -> Truncated:
    """The top-`rank` SVD of M (fp32), or of each matrix of a stack. `rank` must not exceed min(m, n).
    `sketch`: M's bf16 copy for the randomized range passes, when the caller already has one. `width`: how many
    singular values to report in all, the ones past `rank` in `beyond`."""
    if method == "exact":
        return exact_svd(M, rank, width)
    generator = torch.Generator().manual_seed(seed)
    return randomized_svd(M, rank, oversample, power_iters, generator, tol, sketch, width=width)


def lora_factors(t: Truncated, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, in]) with scaling · B @ A = U diag(S) Vh.

    √Σ goes to both sides so that B and A have the same magnitude, which keeps bf16 rounding of the
    factors balanced; 1/scaling is split the same way so PEFT's alpha/r scaling lands exactly on ΔW.
    """
    root = (t.S / scaling).sqrt()
    return t.U * root[..., None, :], root[..., :, None] * t.Vh


def frobenius_norm(M: torch.Tensor) -> float:
    """‖M‖_F to ~1e-7: torch's fp32 `norm()` of a 58M-entry matrix is off by ~0.5%, of a 2^18-entry block by
    ~1e-5, enough to report an energy above 1 when little is left out. Row norms in fp32 (rows longer than
    32768 in fp64) are exact enough; their sum goes in fp64."""
    if not M.numel():
        return 0.0
    return frobenius_norms(M.reshape(-1, M.shape[-1]) if M.ndim else M.reshape(1, 1)).item()


def frobenius_norms(M: torch.Tensor) -> torch.Tensor:
    """‖M[e]‖_F in fp64 of each matrix of a stack [..., m, n] (a 0-d tensor for one matrix), as frobenius_norm."""
    precision = torch.float64 if M.shape[-1] > 1 << 15 else None
    return torch.linalg.vector_norm(M, dim=-1, dtype=precision).double().square().sum(-1).sqrt()


# Below this share of ‖ΔW‖² left out, ‖ΔW‖² − Σσ² loses too many digits to cancellation (each term is good to
# ~1e-6 of ‖ΔW‖²): the residual is then measured directly, with one more pass over ΔW.
ANALYTIC_RESIDUAL_FLOOR = 1e-4


def reconstruction_errors(
    M: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    stored: tuple[torch.Tensor, torch.Tensor],
    kept: torch.Tensor,
    norms: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """‖M[e] − scaling·B̃[e]·Ã[e]‖_F in fp64 of the stored factors (B̃, Ã) = `stored`, for a stack [E, m, n] whose
    exact factors B, A (U√Σ, √Σ·Vh of the kept singular values `kept` [E, r], zero beyond each rank) they round.

    Where the truncation leaves enough out, without a pass over M: M − U·Σ·Vh is orthogonal to what is kept, so
    its ‖·‖² is ‖M‖² − Σ kept σ²; rounding the factors adds ‖scaling·(B·A − B̃·Ã)‖², exact from 2r×2r Grams.
    Their cross term, a sum of rounding errors of random sign, is left out. Otherwise residual_norms measures it.
    """
    truncation = (norms.square() - kept.double().square().sum(-1)).clamp(min=0)
    if bool((truncation < ANALYTIC_RESIDUAL_FLOOR * norms.square()).any()):
        return residual_norms(M, stored[0].float(), stored[1].float(), scaling)
    left = torch.cat([B, stored[0].to(B.dtype)], -1).double()
    right = torch.cat([A, -stored[1].to(A.dtype)], -2).double()
    rounding = ((left.mT @ left) * (right @ right.mT)).sum((-2, -1)).clamp(min=0) * scaling**2
    return (truncation + rounding).sqrt()


def residual_norms(
    M: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float, block: int = 1 << 22
) -> torch.Tensor:
    """‖M[e] − scaling·B[e]·A[e]‖_F in fp64 of each matrix of a stack [E, m, n], by blocks of ~`block` entries
    across all matrices: never a second [E, m, n] tensor, and blocks small enough for the allocator to reuse
    their memory rather than map it afresh."""
    E, m, n = M.shape
    rows = max(1, block // max(E * n, 1))
    total = torch.zeros(E, dtype=torch.float64)
    for i in range(0, m, rows):
        part = torch.baddbmm(M[:, i : i + rows], B[:, i : i + rows], A, alpha=-scaling)
        total += part.norm(dim=-1).double().square().sum(-1)
    return total.sqrt()
