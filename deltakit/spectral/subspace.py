"""How two changes relate, as pure functions of matrices: cosine, subspace overlap, amplification.

Nothing here knows about files or tensor names; every function takes tensors already on their
device and returns plain numbers (or tensors of singular vectors).

* :func:`delta_cosine`: cos(vec ΔW_A, vec ΔW_B), the task-vector similarity of Ilharco et al.
  ("Editing Models with Task Arithmetic", ICLR 2023);
* :func:`subspace_overlap`: ‖U_iᵀ U_j‖²_F / min(i, j), the normalised subspace similarity
  φ(A, B, i, j) of Hu et al. ("LoRA", 2021, §7.2) for orthonormal column blocks;
* :func:`amplification_factor`: ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F (Hu et al. §7.3), how strongly ΔW
  amplifies directions W already has.

Example::

    u, s, vh = top_directions(delta_a, 8)
    subspace_overlap(u, top_directions(delta_b, 8)[0])   # 1.0: the same 8 directions
"""

from __future__ import annotations

import math

import torch

from deltakit.spectral.norms import dim0_blocks
from deltakit.spectral.svd import method_noise_floor, randomized_svd


def delta_cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """cos(vec a, vec b) of two same-shaped tensors, summed in float64; None when either is zero."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    norm_a = float(torch.linalg.vector_norm(a, dtype=torch.float64))
    norm_b = float(torch.linalg.vector_norm(b, dtype=torch.float64))
    if norm_a == 0.0 or norm_b == 0.0:
        return None
    # Products in the inputs' dtype, summed in float64: each product is rounded once (relative 2⁻²⁴ in
    # fp32, independent), so |error| ≲ 1e-7·‖a‖‖b‖ without two float64 copies of a large matrix.
    dot = float(torch.sum(a * b.to(a.dtype), dtype=torch.float64))
    return max(-1.0, min(1.0, dot / (norm_a * norm_b)))


def subspace_overlap(u_a: torch.Tensor, u_b: torch.Tensor) -> float | None:
    """φ = ‖U_Aᵀ U_B‖²_F / min(i, j) for orthonormal columns U_A (m×i) and U_B (m×j); in [0, 1].

    1 when the smaller subspace lies inside the larger one, 0 when they are orthogonal; two
    random subspaces give max(i, j)/m on average (:func:`random_overlap`). None if i or j is 0.
    """
    smaller = min(u_a.shape[1], u_b.shape[1])
    if smaller == 0:
        return None
    cross = u_a.T.to(torch.float64) @ u_b.to(torch.float64)
    return float(torch.sum(cross * cross)) / smaller


def random_overlap(i: int, j: int, dim: int) -> float:
    """Expected φ of an i- and a j-dimensional subspace of R^dim drawn at random: i·j/dim / min(i, j)."""
    return max(i, j) / dim if min(i, j) > 0 else 0.0


def top_directions(
    delta: torch.Tensor, k: int, exact: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0,
    power_iterations: int = 3, storage_floor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets U (m×k'), S (k',), Vh (k'×n) of ΔW whose σ is above the method's floor.

    Randomized SVD (Halko et al. 2011) by default, ``torch.linalg.svd`` with ``exact``. A
    singular vector of a zero (or noise-level) singular value is arbitrary, so such directions
    are dropped and k' ≤ k: a rank-8 LoRA has 8 directions, whatever k asks for. The floor is
    the exact SVD's max(m, n)·eps·σ₁ on both paths, the data's own floor at which `rank` counts
    (the randomized values are those of QᵀΔW, formed in ``dtype`` and solved in float64, so they
    are resolved that far; the Gram path's 16·sqrt(eps)·σ₁ would drop a real direction at 1e-3·σ₁),
    or ``storage_floor`` where it is higher (the storage rounding's, as `rank` counts: a rank-8 LoRA
    merged into bf16 checkpoints has 8 directions, not 8 and the rounding's).
    """
    delta = delta.to(dtype)
    k = min(k, *delta.shape)
    if exact:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    else:
        u, s, vh = randomized_svd(delta, k, power_iterations=power_iterations, seed=seed, dtype=dtype)
    sigma_max = float(s[0]) if s.numel() else 0.0
    if sigma_max == 0.0:
        return u[:, :0], s[:0], vh[:0]
    floor = max(method_noise_floor(sigma_max, (delta.shape[0], delta.shape[1]), "exact", dtype), storage_floor)
    keep = int((s > floor).sum())
    return u[:, :keep], s[:keep], vh[:keep]


def amplification_factor(weight: torch.Tensor, delta_fro: float, u: torch.Tensor, vh: torch.Tensor) -> float | None:
    """‖ΔW‖_F / ‖U_rᵀ W V_r‖_F (Hu et al. 2021, §7.3) with U_r (m×r), Vh_r (r×n) from ΔW's top-r triplets.

    The size of ΔW against the size of W's projection onto ΔW's own top directions: large when
    ΔW amplifies directions W hardly uses (Hu et al. report 21.5 for a rank-4 LoRA of GPT-3's
    W_q, and a much smaller factor at rank 64). None when r is 0 or the projection vanishes.
    """
    if u.shape[1] == 0:
        return None
    # U_rᵀ W in the vectors' dtype (k×n), the k×k rest in float64. W may be held as stored (bf16):
    # it is converted a block of rows at a time, never copied whole to the vectors' dtype or to float64.
    blocks = dim0_blocks(weight)
    if len(blocks) == 1:
        left = u.T @ weight.to(u.dtype)
    else:
        left = sum(u[rows].T @ weight[rows].to(u.dtype) for rows in blocks)
    projected = left.to(torch.float64) @ vh.T.to(torch.float64)
    denominator = float(torch.linalg.vector_norm(projected))
    if denominator == 0.0 or not math.isfinite(denominator):
        return None
    return delta_fro / denominator


AMPLIFICATION_MAX_K = 64  # Hu et al. report r = 4 and r = 64
SKETCH_OVERSAMPLE = 16  # randomized_svd's default
NARROW_ELEMENTS = 1 << 24  # from this size on, a narrow ΔW's sketch temporaries are worth avoiding (64 MiB in fp32)


def narrow_amplification(weight: torch.Tensor, delta: torch.Tensor, delta_fro: float,
                         k: int) -> dict[str, float | int | None]:
    """:func:`amplification_factor` of a matrix with a narrow side (n = min(m, n) small), from n×n products only.

    With ΔW = U S Vᵀ (m ≥ n; a wide matrix is taken transposed), U_rᵀ W V_r = S_r⁻¹ V_rᵀ (ΔWᵀ W) V_r,
    and V_r, S_r are the top eigenpairs of ΔWᵀΔW. Both n×n products are summed by row blocks in
    float64, so nothing of ΔW's size is formed: a sketch of m × (k + oversample) columns would be
    most of ΔW's own size when n is small (a 524288×256 ΔW).
    """
    if delta.shape[0] < delta.shape[1]:
        delta, weight = delta.T, weight.T
    n = int(delta.shape[1])
    gram = torch.zeros((n, n), dtype=torch.float64, device=delta.device)
    cross = torch.zeros((n, n), dtype=torch.float64, device=delta.device)
    for rows in dim0_blocks(delta, 1 << 21):
        block = delta[rows].to(torch.float64)
        gram += block.T @ block
        cross += block.T @ weight[rows].to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    values, vectors = eigenvalues.flip(0)[:k].clamp_min(0).sqrt(), eigenvectors.flip(1)[:, :k]
    floor = method_noise_floor(float(values[0]), (int(delta.shape[0]), n), "gram", torch.float32) if k else 0.0
    kept = values > floor
    values, vectors = values[kept], vectors[:, kept]
    projected = (vectors.T @ cross @ vectors) / values[:, None]
    denominator = float(torch.linalg.vector_norm(projected)) if values.numel() else 0.0
    value = delta_fro / denominator if denominator > 0.0 and math.isfinite(denominator) else None
    return {"k": int(values.numel()), "value": value}


def amplification(
    weight: torch.Tensor, delta: torch.Tensor, delta_fro: float, rank: int, max_k: int = AMPLIFICATION_MAX_K,
    directions: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float | int | None] | None:
    """``{"k": r, "value": ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F}`` with r = min(numerical rank of ΔW, ``max_k``).

    For a LoRA r is its rank (Hu et al.'s r); for a full fine-tune ``max_k``. The top-r
    directions are ``directions`` (U m×k', Vh k'×n, k' ≥ r: the adaptive spectrum's Ritz vectors)
    when given, else from the randomized SVD in fp32 with one power iteration: exact for a
    low-rank ΔW, and for a full fine-tune the projection of W onto a slightly rotated top-64
    subspace barely moves the ratio; it runs on every matrix `rank` sees, so it is kept cheap.
    None for an unchanged matrix.
    """
    if rank <= 0 or delta_fro == 0.0:
        return None
    k = min(rank, max_k)
    if directions is None and delta.numel() >= NARROW_ELEMENTS and min(delta.shape) <= 4 * (k + SKETCH_OVERSAMPLE):
        return narrow_amplification(weight, delta, delta_fro, min(k, *delta.shape))
    if directions is not None and directions[0].shape[1] >= k:
        u, vh = directions[0][:, :k], directions[1][:k]
    else:
        u, _, vh = top_directions(delta, k, power_iterations=1)
    return {"k": int(u.shape[1]), "value": amplification_factor(weight, delta_fro, u, vh)}
