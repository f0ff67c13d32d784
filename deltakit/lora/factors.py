"""Split a ΔW into LoRA factors: truncated SVD, singular values shared evenly by B and A.

For a matrix M = ΔW in PEFT's orientation (out × in) with truncated SVD M_r = U_r S_r V_rᵀ,

    B = U_r √S_r   (out × r),        A = √S_r V_rᵀ   (r × in),        B @ A = M_r,

which by Eckart–Young is the best rank-r approximation of M in the Frobenius norm; the even
split keeps ‖B‖ and ‖A‖ balanced, so neither factor overflows in half precision. PEFT applies
ΔW = scaling · B @ A with scaling = lora_alpha / r (Hu et al. 2021); extracted adapters set
lora_alpha = r so scaling is 1.

Orientation: a Linear weight is stored (out, in) = B @ A. GPT-2's Conv1D stores (in, out), PEFT
adds (B @ A)ᵀ there (``fan_in_fan_out``), and an embedding is stored (vocab, dim) with PEFT's
``lora_embedding_B @ lora_embedding_A`` of shape (dim, vocab): both factor ΔWᵀ. So does an
input-major expert slice (gpt-oss stores each expert (in, out), PEFT's ParamWrapper B @ A is (out, in)).
Which is which is the pair's one orientation, :meth:`deltakit.pairing.TensorPair.to_out_in`.

Example::

    factors = svd_factors(delta, rank=8)             # randomized, seeded
    torch.dist(factors.b @ factors.a, delta)         # ≈ ‖ΔW − ΔW_8‖_F
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltakit.spectral.norms import dim0_blocks
from deltakit.spectral.svd import randomized_svd

# Measured on 512×1536 and 1024×1024 matrices with flat spectra σ_i = i^-d, d in 0.02..0.2
# (the hardest case for range finders), ranks 16..256: rank + max(16, rank) sketch columns
# and 4 power iterations kept the Frobenius error within 0.6% of the exact truncated SVD's;
# 16 extra columns and 3 iterations went up to 2.6% (tests/test_surgery_ranks.py keeps the 1% promise).
POWER_ITERATIONS = 4


def oversample(rank: int) -> int:
    """Extra sketch columns of the randomized SVD for a rank-``rank`` approximation."""
    return max(16, rank)


@dataclass
class LoraFactors:
    """B (out × r), A (r × in) and the singular values (r,) they carry; B @ A ≈ M."""

    b: torch.Tensor
    a: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.singular_values.numel())


def split_singular_values(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> LoraFactors:
    """B = U √S, A = √S Vᵀ from a (truncated) SVD U diag(S) Vh."""
    root = s.clamp_min(0).sqrt()
    return LoraFactors(b=u * root, a=root[:, None] * vh, singular_values=s)


def svd_factors(
    matrix: torch.Tensor, rank: int, exact: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32
) -> LoraFactors:
    """Rank-``rank`` LoRA factors of ``matrix`` (out × in), on its device, in ``dtype``.

    ``exact``: a full SVD (torch.linalg.svd). Otherwise the seeded randomized SVD (Halko et al.
    2011) with ``oversample(rank)`` extra columns and POWER_ITERATIONS power iterations: on a
    GPU many times faster for r ≪ min(m, n), within 1% of the exact error (see above).
    """
    rank = min(rank, *matrix.shape)
    if exact:
        u, s, vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
        return split_singular_values(u[:, :rank], s[:rank], vh[:rank])
    u, s, vh = randomized_svd(matrix, rank, oversample=oversample(rank), power_iterations=POWER_ITERATIONS,
                              seed=seed, dtype=dtype)
    return split_singular_values(u, s, vh)


def clamp_quantile(factors: LoraFactors, quantile: float) -> LoraFactors:
    """kohya-ss sd-scripts' outlier clamp (``extract_lora_from_models.py``, ``--clamp_quantile``, default
    0.99 there): with every singular value in the up factor, up = U_r S_r and down = V_rᵀ, h is the
    ``quantile`` (linear interpolation, as ``torch.quantile``) of all entries of up and down together,
    and both are clamped to [−h, h]. Returns (B = clamped up, A = clamped down): B @ A no longer is the
    truncated SVD, and what that costs is the growth of ‖ΔW − BA‖_F. The quantile is of signed entries,
    so (in sd-scripts too) the result depends on the sign the SVD gives each singular vector pair.
    """
    root = factors.singular_values.clamp_min(0).sqrt().to(factors.b.dtype)
    up = factors.b * root
    down = factors.a / torch.where(root > 0, root, torch.ones_like(root))[:, None]
    high = _quantile(torch.cat([up.flatten(), down.flatten()]).float(), quantile).to(up.dtype)
    return LoraFactors(b=up.clamp(-high, high), a=down.clamp(-high, high), singular_values=factors.singular_values)


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for any length: kthvalue has no 2^24 limit."""
    n = values.numel()
    position = q * (n - 1)
    low = int(position)
    lower = torch.kthvalue(values.cpu(), low + 1).values
    upper = torch.kthvalue(values.cpu(), min(low + 2, n)).values
    return (lower + (upper - lower) * (position - low)).to(values.device)


def reconstruction_error(matrix: torch.Tensor, factors: LoraFactors, dtype: torch.dtype | None = None) -> float:
    """‖M − B A‖_F, with B and A first rounded to ``dtype`` (the dtype they are stored in)."""
    b, a = factors.b, factors.a
    if dtype is not None:
        b, a = b.to(dtype), a.to(dtype)
    b, a = b.to(matrix.dtype), a.to(matrix.dtype)
    blocks = dim0_blocks(matrix)
    if len(blocks) == 1:
        return float(torch.linalg.vector_norm(matrix - b @ a, dtype=torch.float64))
    # a block of rows at a time: no m×n residual, no float64 copy of it (see deltakit.spectral.norms)
    parts = torch.stack([torch.linalg.vector_norm(matrix[rows] - b[rows] @ a, dtype=torch.float64) for rows in blocks])
    return float(torch.linalg.vector_norm(parts))
