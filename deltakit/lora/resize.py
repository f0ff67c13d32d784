"""Resize and sum LoRA adapters in factor space: the exact SVD of ΔW = B·A without forming ΔW.

For ΔW = L·R with L (m×k), R (k×n) and k small (a LoRA module: L = scaling·B, R = A), the thin
QR factorisations L = Q_L·R_L and Rᵀ = Q_R·R_R give

    ΔW = Q_L (R_L R_Rᵀ) Q_Rᵀ,   and with the SVD of the small core  R_L R_Rᵀ = U_c S V_cᵀ,
    ΔW = (Q_L U_c) · S · (Q_R V_c)ᵀ,

an exact thin SVD of ΔW in O((m + n)·k² + k³) time and O((m + n)·k) memory: ‖ΔW‖_F, its
whole spectrum and its best rank-r factors (Eckart–Young) without the m×n matrix. A weighted
sum of LoRA modules on one weight is again such a product, its factors stacked:

    Σ_i w_i s_i B_i A_i = [w_1 s_1 B_1, …, w_N s_N B_N] · [A_1; …; A_N],     k = Σ_i r_i.

Nothing here reads files or knows tensor names.

Example::

    u, s, vh = lowrank_svd(lora_b, lora_a, scaling=alpha / r)     # ΔW = u · diag(s) · vh
    LowRankDelta(lora_b * scaling, lora_a).factors(4)              # the best rank-4 B, A
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

import torch

from deltakit.lora.factors import LoraFactors, split_singular_values


def lowrank_core(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q_b (m×p), Q_a (n×q) and the float64 core R_b R_aᵀ (p×q) with b @ a = Q_b · core · Q_aᵀ.

    ``b`` is m×k and ``a`` is k×n, in one floating dtype on one device; the thin QRs of b and
    aᵀ run there in that dtype, the core (p, q ≤ k) is formed in float64.
    """
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"factors of shapes {tuple(b.shape)} and {tuple(a.shape)} do not multiply")
    q_left, r_left = torch.linalg.qr(b)
    q_right, r_right = torch.linalg.qr(a.T)
    return q_left, q_right, r_left.double() @ r_right.double().T


def lowrank_svd(b: torch.Tensor, a: torch.Tensor, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ΔW = scaling · b @ a from its factors: U (m×p), S (p,), Vh (p×n), p = min(m, n, k).

    ``b`` is m×k and ``a`` is k×n (a LoRA's B and A); U and Vh come back in their dtype on their
    device, S descending, including the zero singular values of a rank-deficient product.
    """
    q_left, q_right, core = lowrank_core(b, a)
    return _svd_from_core(q_left, q_right, core * scaling)


def _svd_from_core(q_left: torch.Tensor, q_right: torch.Tensor,
                   core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
    return q_left @ u_core.to(q_left.dtype), s.to(q_left.dtype), vh_core.to(q_right.dtype) @ q_right.T


def lowrank_frobenius(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖b @ a‖_F without the product: ‖R_b R_aᵀ‖_F from the QRs of b and aᵀ (b: m×k, a: k×n)."""
    return float(torch.linalg.matrix_norm(lowrank_core(b, a)[2]))


@dataclass(frozen=True)
class LowRankDelta:
    """ΔW = left @ right kept as its factors: left (m×k), right (k×n), ΔW (m×n).

    The stand-in for a dense ΔW where it is low rank by construction (LoRA modules, and sums
    of them); ``.T`` and ``.shape`` behave as a tensor's, so orientation code serves both.
    The QRs behind every quantity are computed once per object (and carried over by ``.T``).
    """

    left: torch.Tensor
    right: torch.Tensor

    def __post_init__(self) -> None:
        if self.left.ndim != 2 or self.right.ndim != 2 or self.left.shape[1] != self.right.shape[0]:
            raise ValueError(f"factors of shapes {tuple(self.left.shape)} and {tuple(self.right.shape)} do not multiply")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.left.shape[0], self.right.shape[1]))

    @property
    def inner(self) -> int:
        """k: the number of columns of ``left`` (an upper bound on the rank)."""
        return int(self.left.shape[1])

    @cached_property
    def _core(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return lowrank_core(self.left, self.right)

    @property
    def T(self) -> "LowRankDelta":  # noqa: N802 - mirrors torch.Tensor.T
        transposed = LowRankDelta(self.right.T, self.left.T)
        if "_core" in self.__dict__:  # (Q_l C Q_rᵀ)ᵀ = Q_r Cᵀ Q_lᵀ
            q_left, q_right, core = self._core
            transposed.__dict__["_core"] = (q_right, q_left, core.T)
        return transposed

    @classmethod
    def stack(cls, terms: Iterable[tuple[float, "LowRankDelta"]]) -> "LowRankDelta":
        """Σ c_i · L_i R_i as one product [c_1 L_1, …] · [R_1; …] (every term of the same m×n)."""
        terms = list(terms)
        if not terms:
            raise ValueError("nothing to stack")
        shapes = {tuple(t.shape) for _, t in terms}
        if len(shapes) != 1:
            raise ValueError(f"cannot sum low-rank terms of different shapes {sorted(shapes)}")
        left = torch.cat([t.left * coefficient for coefficient, t in terms], dim=1)
        return cls(left, torch.cat([t.right for _, t in terms], dim=0))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LowRankDelta":
        return LowRankDelta(self.left.to(device, dtype), self.right.to(device, dtype))

    def dense(self) -> torch.Tensor:
        """The m×n matrix (tests and small checks only: it is what this class avoids)."""
        return self.left @ self.right

    def frobenius(self) -> float:
        """‖ΔW‖_F."""
        return float(torch.linalg.matrix_norm(self._core[2]))

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact thin SVD U, S, Vh of ΔW (see :func:`lowrank_svd`)."""
        return _svd_from_core(*self._core)

    def singular_values(self) -> torch.Tensor:
        """The (at most k) singular values of ΔW, descending; all others are 0."""
        return torch.linalg.svdvals(self._core[2]).to(self.left.dtype)

    def factors(self, rank: int) -> LoraFactors:
        """The best rank-``rank`` LoRA factors B (m×r), A (r×n), √S split evenly (as extract's)."""
        u, s, vh = self.svd()
        rank = min(rank, int(s.numel()))
        return split_singular_values(u[:, :rank], s[:rank], vh[:rank])

    def residual_norm(self, factors: LoraFactors, dtype: torch.dtype | None = None) -> float:
        """‖ΔW − B A‖_F, with B and A first rounded to ``dtype`` (as stored), in factor space.

        ‖LR − BA‖² = ‖LR‖² − 2⟨LR, BA⟩ + ‖BA‖², with ⟨LR, BA⟩ = Σ (LᵀB) ∘ (RAᵀ) and
        ‖BA‖² = Σ (BᵀB) ∘ (AAᵀ) (likewise ‖LR‖²): k×k, k×r and r×r products only, in float64,
        so an error down to ~1e-8·‖ΔW‖_F is resolved.
        """
        b, a = factors.b, factors.a
        if dtype is not None:
            b, a = b.to(dtype), a.to(dtype)
        b, a = b.to(self.left.device, torch.float64), a.to(self.left.device, torch.float64)
        left, right = self.left.double(), self.right.double()
        # All three terms from the stored values in float64 (not ‖core‖², which carries the
        # QR's rounding in the factors' dtype and would swamp a small residual).
        total = float(torch.sum((left.T @ left) * (right @ right.T)))
        cross = float(torch.sum((left.T @ b) * (right @ a.T)))
        own = float(torch.sum((b.T @ b) * (a @ a.T)))
        return math.sqrt(max(total - 2.0 * cross + own, 0.0))
