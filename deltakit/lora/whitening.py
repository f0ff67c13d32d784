"""LoRA factors that minimise the error of a layer's output on its real inputs, not of its weight.

A layer sees inputs X (tokens × in) with covariance C = XᵀX. The output error of an update
B·A for ΔW (out × in) is

    ‖(ΔW − B·A)·Xᵀ‖_F² = tr((ΔW − B·A) C (ΔW − B·A)ᵀ) = ‖(ΔW − B·A)·L‖_F²,   C = L·Lᵀ,

so with M = ΔW·L the best rank-r update is B·(A·L) = [M]_r, the truncated SVD of M (Eckart–Young
in the whitened space): B·A = [ΔW·L]_r·L⁻¹. This is the closed form of activation-aware
low-rank approximation (SVD-LLM, Wang et al. 2024, arXiv:2403.07378; ASVD, Yuan et al. 2023,
arXiv:2312.05821, scale the columns only). The error it leaves is Σ_{i>r} σ_i(M)², so rank
selectors read σ(M) as they read σ(ΔW).

C may be singular (fewer tokens than inputs, dead units): L is the Cholesky factor of
C + λI with λ = RIDGE · tr(C)/n, which minimises ‖E·Xᵀ‖² + λ‖E‖² and so also picks the
smallest weight error among the updates the inputs cannot tell apart. With C ∝ I, M ∝ ΔW and
the factors are the plain ones. Since the plain SVD minimises ‖E‖², the whitened factors'
output error is never larger than the plain factors' (for exact SVDs of both).

The singular values of B·A are not S of M, so B and A are balanced component by component
(‖B[:, k]‖ = ‖A[k, :]‖, neither overflows in half precision); isotropic inputs then give the
plain factors exactly. Cholesky, whitening and L⁻¹ are in float64.

Example::

    covariance = InputCovariance(x.T @ x)
    factors = covariance.factors(delta, rank=8)
    covariance.output_error(delta, factors.b, factors.a)     # ‖(ΔW − BA)Xᵀ‖ / ‖ΔW Xᵀ‖
"""

from __future__ import annotations

import math
from functools import cached_property

import torch

from deltakit.lora.factors import LoraFactors, svd_factors

RIDGE = 1e-4  # λ = RIDGE · tr(C)/n added to C's diagonal before its Cholesky factorisation


class InputCovariance:
    """C = XᵀX of one layer's inputs (in × in), on the device the matrices are on, in float64."""

    def __init__(self, covariance: torch.Tensor, ridge: float = RIDGE) -> None:
        self.covariance = covariance.to(torch.float64)
        self.ridge = ridge

    @cached_property
    def cholesky(self) -> torch.Tensor:
        """Lower-triangular L with L·Lᵀ = C + λI (module docstring); I for C = 0."""
        c = self.covariance
        n = c.shape[0]
        scale = float(torch.diagonal(c).sum()) / n
        if scale <= 0:
            return torch.eye(n, dtype=c.dtype, device=c.device)
        shifted = c + (self.ridge * scale) * torch.eye(n, dtype=c.dtype, device=c.device)
        return torch.linalg.cholesky(shifted)

    def whiten(self, matrix: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """M = ΔW·L (out × in) in ``dtype``: the matrix whose truncated SVD is the activation-aware optimum."""
        return (matrix.to(torch.float64) @ self.cholesky).to(dtype)

    def factors(self, matrix: torch.Tensor, rank: int, exact: bool = False, seed: int = 0,
                dtype: torch.dtype = torch.float32, whitened: torch.Tensor | None = None) -> LoraFactors:
        """B, A minimising ‖(ΔW − B·A)·L‖_F at ``rank``: [ΔW·L]_r·L⁻¹, balanced; singular values are σ(M).

        ``whitened``: M when the caller has it already.
        """
        m = self.whiten(matrix, dtype) if whitened is None else whitened
        top = svd_factors(m, rank, exact=exact, seed=seed, dtype=dtype)
        # A·L = A'  ⇔  A = A'·L⁻¹: a triangular solve from the right
        a = torch.linalg.solve_triangular(self.cholesky, top.a.to(torch.float64), upper=False, left=False)
        b = top.b.to(torch.float64)
        b, a = balanced(b, a)
        return LoraFactors(b=b.to(dtype), a=a.to(dtype), singular_values=top.singular_values)

    def output_error(self, matrix: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float | None:
        """‖(ΔW − B·A)·Xᵀ‖_F / ‖ΔW·Xᵀ‖_F from C (float64); see :func:`relative_output_error`."""
        delta = matrix.to(torch.float64)
        error = delta - b.to(delta.device, torch.float64) @ a.to(delta.device, torch.float64)
        return relative_output_error(error, delta, self.covariance)


def relative_output_error(error: torch.Tensor, delta: torch.Tensor, covariance: torch.Tensor) -> float | None:
    """√(tr(E C Eᵀ) / tr(ΔW C ΔWᵀ)) for E and ΔW (out × in) and C (in × in), in float64.

    0 when both are 0; None when only ΔW·Xᵀ is (the inputs never reach ΔW: no scale to measure against).
    """
    c = covariance.to(torch.float64)
    num = float(((error.to(torch.float64) @ c) * error).sum())
    den = float(((delta.to(torch.float64) @ c) * delta).sum())
    if den <= 0:
        return 0.0 if num <= 0 else None
    return math.sqrt(max(num, 0.0) / den)


def balanced(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B·D, D⁻¹·A) with D diagonal so that column k of B and row k of A have the same norm; B·A unchanged."""
    b_norms = torch.linalg.vector_norm(b, dim=0)
    a_norms = torch.linalg.vector_norm(a, dim=1)
    ok = (b_norms > 0) & (a_norms > 0)
    scale = torch.where(ok, (a_norms / torch.where(ok, b_norms, 1.0)).sqrt(), torch.ones_like(b_norms))
    return b * scale, a / scale[:, None]
