"""Singular values and vectors of one matrix on a device: Gram/eigh fast path, exact SVD, randomized SVD.

All functions take a 2-D tensor already on its device and return tensors on that device,
singular values in descending order. Nothing here knows about files or tensor names.

The Gram path forms G = MᵀM (the smaller side) and takes its eigendecomposition: about
10× faster than an SVD on a GPU, and exact in exact arithmetic, but it squares the
condition number, so singular values below ~sqrt(eps)·σ_max are rounding noise. That is
what :func:`method_noise_floor` returns, and numerical rank never counts below it.
"""

from __future__ import annotations

import math

import torch

METHODS = ("gram", "exact")
GRAM_FLOOR_FACTOR = 16.0


def _gram(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """G of the smaller side and whether it is MᵀM (right side, n×n)."""
    m, n = matrix.shape
    if m >= n:
        return matrix.T @ matrix, True
    return matrix @ matrix.T, False


def singular_values(matrix: torch.Tensor, method: str = "gram", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All min(m, n) singular values of ``matrix`` (m×n), descending, computed in ``dtype``.

    Example::

        singular_values(torch.eye(3) * 2)   # tensor([2., 2., 2.])
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    matrix = matrix.to(dtype)
    if method == "exact":
        return torch.linalg.svdvals(matrix)
    if method != "gram":
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    gram, _ = _gram(matrix)
    return gram_singular_values(gram)


def gram_singular_values(gram: torch.Tensor) -> torch.Tensor:
    """Singular values of M, descending, from its Gram matrix G = MᵀM or MMᵀ (k×k, symmetric): √eig(G)."""
    eigenvalues = torch.linalg.eigvalsh(gram)
    return eigenvalues.clamp_min(0).sqrt().flip(0)


def method_noise_floor(sigma_max: float, shape: tuple[int, int], method: str, dtype: torch.dtype) -> float:
    """Smallest singular value the method can resolve from rounding in ``dtype``.

    exact SVD: max(m, n)·eps·σ_max (LAPACK / numpy ``matrix_rank`` convention).
    Gram/eigh: eigenvalue errors are a small multiple of eps·σ_max², so singular values are
    resolved down to ~sqrt(eps)·σ_max. Measured on exact low-rank fp32 matrices from 64×64 to
    2816×1024 (tests/test_spectral.py), the largest noise value sat at 1.5-2·sqrt(eps)·σ_max;
    the floor is 16·sqrt(eps)·σ_max, a margin of 8×.
    """
    eps = torch.finfo(dtype).eps
    m, n = shape
    if method == "exact":
        return max(m, n) * eps * sigma_max
    return GRAM_FLOOR_FACTOR * math.sqrt(eps) * sigma_max


def top_singular_triplets(
    matrix: torch.Tensor, k: int, method: str = "gram", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest singular triplets: U (m×k), S (k,), Vh (k×n), with M ≈ U diag(S) Vh.

    The Gram path eigendecomposes the smaller side and recovers the other side's vectors as
    M v / σ; accurate for singular values well above sqrt(eps)·σ_max, which is where
    top-k vectors live. ``method="exact"`` uses ``torch.linalg.svd``.
    """
    matrix = matrix.to(dtype)
    k = min(k, *matrix.shape)
    if method == "exact":
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    gram, right = _gram(matrix)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    s = eigenvalues.flip(0)[:k].clamp_min(0).sqrt()
    vecs = eigenvectors.flip(1)[:, :k]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if right:  # vecs are right singular vectors (n×k)
        u = (matrix @ vecs) / safe
        return u, s, vecs.T
    vh = (vecs.T @ matrix) / safe[:, None]
    return vecs, s, vh


def spectral_norm(matrix: torch.Tensor, iterations: int = 40, seed: int = 0) -> float:
    """‖M‖₂ by power iteration on MᵀM from a seeded Gaussian start: a lower bound that converges from below."""
    if matrix.numel() == 0:
        return 0.0
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    vector = torch.randn(matrix.shape[1], device=matrix.device, dtype=matrix.dtype, generator=generator)
    norm = 0.0
    for _ in range(iterations):
        vector = matrix.T @ (matrix @ vector)
        length = float(torch.linalg.vector_norm(vector))
        if length == 0.0:
            return 0.0
        vector /= length
        norm = float(torch.linalg.vector_norm(matrix @ vector))
    return norm


def orthonormal_basis(columns: torch.Tensor, method: str = "auto", passes: int = 2) -> torch.Tensor:
    """An orthonormal basis of the span of tall ``columns`` (m×k, m ≥ k), by CholeskyQR2.

    Two rounds of Q = Y·R⁻¹ with R from the Cholesky factor of the float64 Gram matrix YᵀY:
    matrix products and a k×k factorisation only, several times faster on a GPU than
    Householder QR, and as orthogonal after the second round (Fukaya et al. 2014). The Gram
    matrix is formed in float64 so conditioning up to ~1e7 survives; beyond that, or when
    Cholesky fails, Householder QR is used. On the CPU, where LAPACK's Householder QR is the
    faster of the two, it is used directly. ``method``: "auto",
    "cholesky", "householder" or "shifted" (:func:`shifted_cholesky_qr`: never waits for the
    device; ``passes`` rounds of it).
    """
    if method == "householder" or (method in ("auto", "shifted") and not columns.is_cuda):
        return torch.linalg.qr(columns)[0]
    if method == "shifted":
        return shifted_cholesky_qr(columns, passes)
    basis = columns
    for _ in range(2):
        basis, info = cholesky_qr_pass(basis)
        if bool(info.any()):
            return torch.linalg.qr(columns)[0]
    return basis


def cholesky_qr_pass(basis: torch.Tensor, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One CholeskyQR pass, basis · L⁻ᵀ with L the Cholesky factor of the float64 Gram matrix (plus
    ``shift``·trace on its diagonal), and Cholesky's ``info`` (non-zero where it failed, left on the device)."""
    wide = basis.double()
    gram = wide.T @ wide
    if shift:
        gram.diagonal().add_(gram.diagonal().sum() * shift + torch.finfo(torch.float64).tiny)
    lower, info = torch.linalg.cholesky_ex(gram)
    # basis · L⁻ᵀ, solved as L · Xᵀ = basisᵀ
    return torch.linalg.solve_triangular(lower, wide.T, upper=False).T.to(basis.dtype), info


GRAM_SHIFT = 1e-12  # relative to trace(YᵀY): above the float64 Gram's rounding (~k·1e-16), far below float32's


def shifted_cholesky_qr(columns: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """CholeskyQR with the Gram matrix shifted by ``GRAM_SHIFT``·trace, so that the factorisation
    cannot fail and nothing has to be checked on the host (Fukaya et al. 2020, shifted CholeskyQR).

    The shift costs orthogonality of ~shift/σ_min² in one pass, which the next pass removes;
    ``passes`` = 1 suffices between power iterations, where only the span matters. Columns that
    are numerically dependent come out as small, not as NaN.
    """
    basis = columns
    for _ in range(passes):
        basis, _ = cholesky_qr_pass(basis, GRAM_SHIFT)
    return basis


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    oversample: int = 16,
    power_iterations: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD by randomized range finding (Halko, Martinsson & Tropp 2011, Alg. 4.4).

    A seeded Gaussian sketch of rank + oversample columns, ``power_iterations`` rounds of
    subspace iteration re-orthonormalised each time (stable for slowly decaying spectra),
    then the SVD of the small projected matrix B = QᵀM from the eigendecomposition of the
    (rank + oversample)² matrix B·Bᵀ in float64. Returns U (m×r), S (r,), Vh (r×n).
    """
    matrix = matrix.to(dtype)
    m, n = matrix.shape
    rank = min(rank, m, n)
    width = min(rank + oversample, m, n)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    sketch = torch.randn(n, width, device=matrix.device, dtype=dtype, generator=generator)
    q = orthonormal_basis(matrix @ sketch)
    for _ in range(power_iterations):
        z = orthonormal_basis(matrix.T @ q)
        q = orthonormal_basis(matrix @ z)
    projected = (q.T @ matrix).double()  # width × n
    eigenvalues, eigenvectors = torch.linalg.eigh(projected @ projected.T)
    s = eigenvalues.flip(0)[:rank].clamp_min(0).sqrt()
    u_small = eigenvectors.flip(1)[:, :rank]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    vh = (u_small.T @ projected) / safe[:, None]
    return (q.double() @ u_small).to(dtype), s.to(dtype), vh.to(dtype)


def truncated_svd(
    matrix: torch.Tensor, rank: int, method: str = "randomized", dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors U, S, Vh by ``method``: "randomized", "gram" or "exact"."""
    if method == "randomized":
        return randomized_svd(matrix, rank, seed=seed, dtype=dtype)
    return top_singular_triplets(matrix, rank, method=method, dtype=dtype)
