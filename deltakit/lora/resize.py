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

from dataclasses import dataclass
from typing import Iterable

import torch

from deltakit.lora.factors import LoraFactors, split_singular_values


def lowrank_svd(b: torch.Tensor, a: torch.Tensor, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ΔW = scaling · b @ a from its factors: U (m×p), S (p,), Vh (p×n), p ≤ k.

    ``b`` is m×k and ``a`` is k×n, in one floating dtype on one device; the QRs run there in
    that dtype, the p×p core's SVD in float64 (p = min(m, n, k), a few hundred numbers at most).
    Singular values are descending and include the zero ones of a rank-deficient product.
    """
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"factors of shapes {tuple(b.shape)} and {tuple(a.shape)} do not multiply")
    q_left, r_left = torch.linalg.qr(b)  # (m×p_l), (p_l×k)
    q_right, r_right = torch.linalg.qr(a.T)  # (n×p_r), (p_r×k)
    core = (r_left.double() @ r_right.double().T) * scaling  # p_l × p_r
    u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
    u = q_left @ u_core.to(b.dtype)
    vh = vh_core.to(a.dtype) @ q_right.T
    return u, s.to(b.dtype), vh


def lowrank_frobenius(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖b @ a‖_F without the product: ‖R_b R_aᵀ‖_F from the QRs of b and aᵀ (b: m×k, a: k×n)."""
    r_left = torch.linalg.qr(b, mode="r")[1]
    r_right = torch.linalg.qr(a.T, mode="r")[1]
    return float(torch.linalg.matrix_norm(r_left.double() @ r_right.double().T))


@dataclass(frozen=True)
class LowRankDelta:
    """ΔW = left @ right kept as its factors: left (m×k), right (k×n), ΔW (m×n).

    The stand-in for a dense ΔW where it is low rank by construction (LoRA modules, and sums
    of them); ``.T`` and ``.shape`` behave as a tensor's, so orientation code serves both.
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

    @property
    def T(self) -> "LowRankDelta":  # noqa: N802 - mirrors torch.Tensor.T
        return LowRankDelta(self.right.T, self.left.T)

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
        return lowrank_frobenius(self.left, self.right)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact thin SVD U, S, Vh of ΔW (see :func:`lowrank_svd`)."""
        return lowrank_svd(self.left, self.right)

    def singular_values(self) -> torch.Tensor:
        """The (at most k) singular values of ΔW, descending; all others are 0."""
        r_left = torch.linalg.qr(self.left, mode="r")[1]
        r_right = torch.linalg.qr(self.right.T, mode="r")[1]
        return torch.linalg.svdvals(r_left.double() @ r_right.double().T).to(self.left.dtype)

    def factors(self, rank: int) -> LoraFactors:
        """The best rank-``rank`` LoRA factors B (m×r), A (r×n), √S split evenly (as extract's)."""
        u, s, vh = self.svd()
        rank = min(rank, int(s.numel()))
        return split_singular_values(u[:, :rank], s[:rank], vh[:rank])

    def residual_norm(self, factors: LoraFactors, dtype: torch.dtype | None = None) -> float:
        """‖ΔW − B A‖_F, with B and A first rounded to ``dtype`` (as stored), still in factor space."""
        b, a = factors.b, factors.a
        if dtype is not None:
            b, a = b.to(dtype), a.to(dtype)
        left = torch.cat([self.left, -b.to(self.left.dtype)], dim=1)
        right = torch.cat([self.right, a.to(self.right.dtype)], dim=0)
        return lowrank_frobenius(left, right)
