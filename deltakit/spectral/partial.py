"""The top of a spectrum without the rest: Ritz values by subspace iteration, and the tail's sums by
stochastic Lanczos quadrature.

Most rank metrics need only the largest singular values of ΔW: rank@X stops where the top
values hold X·‖ΔW‖²_F (and ‖ΔW‖²_F is known without any spectrum), stable rank needs σ₁. A full
eigendecomposition of the Gram matrix costs O(n³) whatever the metrics need; a block of b
vectors iterated a few times costs O(m·n·b) in matrix products. This module computes

* :class:`SubspaceIteration`: Ritz values θ₁ ≥ … ≥ θ_b of ΔW from subspace iteration (Halko, Martinsson
  & Tropp 2011, Alg. 4.4 with Rayleigh–Ritz after each round) and, per value, an error estimate
  from the residual of its Ritz vector. θᵢ ≤ σᵢ always (Cauchy interlacing: they are singular
  values of QᵀΔW for an orthonormal Q), so sums of θ² are lower bounds of sums of σ²; the
  residual gives the upper side.
* :func:`tail_sums`: Σσ and Σσ·ln σ over the part of ΔW the block does not hold, by stochastic
  Lanczos quadrature (Ubaru, Chen & Saad 2017) with Rademacher probes, for the effective rank.
  The spread over probes (jackknife) and the change from half the Lanczos steps give the
  error estimate (:func:`effective_rank_estimate`).

Nothing here decides which metric is settled; :mod:`deltakit.spectral.spectrum` does. Every
function takes the matrix on its device and moves only small arrays to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from deltakit.spectral.svd import orthonormal_basis


@dataclass(frozen=True)
class RitzBlock:
    """Ritz values of one ΔW from a block of ``width`` vectors after ``iterations`` rounds.

    ``values``: θ (descending, float64, lower bounds of the σ at the same positions).
    ``errors``: per value an estimate of σᵢ − θᵢ from its residual (≥ 0).
    """

    values: np.ndarray
    errors: np.ndarray
    width: int
    iterations: int

    @property
    def upper(self) -> np.ndarray:
        return self.values + self.errors


class SubspaceIteration:
    """Subspace iteration on one tall matrix M (m×n, m ≥ n), one round at a time.

    Each round costs two products with M: B = QᵀM (its singular values are the Ritz values) and
    Y = M·V with V the right Ritz vectors (the next block, and the residual). Usage::

        it = SubspaceIteration(matrix, width=128)
        block = it.round()   # after the first round
        block = it.round()   # one more power iteration
    """

    def __init__(self, matrix: torch.Tensor, width: int, seed: int = 0, start: torch.Tensor | None = None,
                 warmup: int = 0):
        self.matrix = matrix
        m, n = matrix.shape
        self.width = min(width, n)
        generator = torch.Generator(device=matrix.device).manual_seed(seed)
        sketch = torch.randn(n, self.width, device=matrix.device, dtype=matrix.dtype, generator=generator)
        if start is not None:  # keep what an earlier, narrower block found
            sketch[:, : start.shape[1]] = start
        self.basis = orthonormal_basis(matrix @ sketch)
        for _ in range(warmup):  # power iterations without Rayleigh–Ritz: the first rounds never settle anything
            self.basis = orthonormal_basis(matrix @ orthonormal_basis(matrix.T @ self.basis))
        self.iterations = warmup
        self.ritz_basis = self.basis  # the block the last Ritz values came from
        self._vectors: torch.Tensor | None = None
        self._right: torch.Tensor | None = None

    def round(self) -> RitzBlock:
        """Rayleigh–Ritz on the current block, its residuals, and the block for the next round."""
        matrix, basis = self.matrix, self.basis
        projected = (basis.T @ matrix).double()  # b × n
        eigenvalues, vectors = small_eigh(projected @ projected.T)
        eigenvalues, vectors = eigenvalues.flip(0).clamp_min(0.0), vectors.flip(1)
        theta = eigenvalues.sqrt()
        positive = theta > theta[0] * 1e-12 if theta[0] > 0 else torch.zeros_like(theta, dtype=torch.bool)
        safe = torch.where(positive, theta, torch.ones_like(theta))
        right = ((projected.T @ vectors) / safe).to(matrix.dtype)  # n × b, orthonormal where θ > 0
        image = matrix @ right  # m × b: M·vᵢ = M·Mᵀuᵢ / θᵢ, the next block
        left = basis @ vectors.to(matrix.dtype)  # uᵢ = Q·Uᵢ
        # the Ritz pair (θᵢ², uᵢ) of M·Mᵀ has residual θᵢ·(M·vᵢ − θᵢ·uᵢ)
        rho = theta * torch.linalg.vector_norm((image - left * theta.to(matrix.dtype)).double(), dim=0)
        self.ritz_basis, self.basis = basis, orthonormal_basis(image)
        self._vectors, self._right = vectors, right
        self.iterations += 1
        host = torch.stack([theta, rho, positive.double()]).cpu().numpy()  # one transfer, one synchronisation
        return RitzBlock(host[0], value_errors(host[0], host[1], host[2] > 0), self.width, self.iterations)


    def left_vectors(self, count: int) -> torch.Tensor:
        """The first ``count`` left Ritz vectors of the last round (m×count, orthonormal)."""
        return self.ritz_basis @ self._vectors[:, :count].to(self.matrix.dtype)

    def right_vectors(self) -> torch.Tensor:
        """The right Ritz vectors of the last round (n×b): a start for a wider block."""
        return self._right


def small_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of a small symmetric float64 matrix (the b×b Rayleigh–Ritz problem), on the host.

    A GPU eigensolver spends milliseconds on launches for b ≈ 128; LAPACK on the host takes a
    fraction of that, and the values have to come to the host anyway.
    """
    if gram.device.type == "cpu":
        return torch.linalg.eigh(gram)
    values, vectors = np.linalg.eigh(gram.cpu().numpy())
    return (torch.from_numpy(values).to(gram.device, non_blocking=True),
            torch.from_numpy(vectors).to(gram.device, non_blocking=True))


def value_errors(theta: np.ndarray, rho: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Estimates of σᵢ − θᵢ from the residuals ρᵢ = ‖ΔW·ΔWᵀuᵢ − θᵢ² uᵢ‖ of the left Ritz pairs.

    An eigenvalue of ΔW·ΔWᵀ lies within ρᵢ of θᵢ², and within ρᵢ²/gapᵢ once the Ritz value is
    isolated (Kato–Temple), gapᵢ the distance to the nearest other Ritz value; the smaller of the
    two, turned into singular-value units. Values whose Ritz vector is undefined (θ = 0) get the
    residual bound of the last defined one: they can hold at most that much.
    """
    lam = theta * theta
    gaps = np.full_like(lam, np.inf)
    if lam.size > 1:
        diffs = np.abs(np.diff(lam))
        gaps[:-1] = diffs
        gaps[1:] = np.minimum(gaps[1:], diffs)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.minimum(rho, np.where(gaps > 0, rho * rho / gaps, rho))
    bound = np.where(positive, bound, np.max(rho[positive]) if positive.any() else 0.0)
    return np.sqrt(lam + bound) - theta


@dataclass(frozen=True)
class TailSums:
    """Σσ and Σσ·ln σ over the singular values outside a computed block, in units of ``scale``.

    Per-probe estimates are kept so that every quantity derived from them gets a jackknife error.
    """

    nuclear: np.ndarray  # per probe: estimate of Σ (σ/scale)
    entropy: np.ndarray  # per probe: estimate of Σ (σ/scale)·ln(σ/scale)
    scale: float
    steps: int
    coarse_nuclear: np.ndarray | None = None  # the same from the first steps/2 Lanczos steps: the
    coarse_entropy: np.ndarray | None = None  # quadrature's own error is about their difference


def lanczos_tridiagonals(apply, dim: int, probes: int, steps: int, device: torch.device, dtype: torch.dtype,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """α (steps×probes) and β (steps×probes), on ``device``, of Lanczos on a symmetric operator from Rademacher starts.

    All probes run together as the columns of one block (one product per step). Only the
    three-term recurrence is kept, as in stochastic Lanczos quadrature (Ubaru, Chen & Saad
    2017): lost orthogonality repeats converged Ritz values, which shares their quadrature
    weight among the copies rather than changing the sum.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    start = torch.randint(0, 2, (dim, probes), device=device, generator=generator, dtype=torch.int8)
    vector = (start.to(dtype) * 2 - 1) / math.sqrt(dim)
    steps = min(steps, dim)
    alphas, betas = [], []
    previous = torch.zeros_like(vector)
    beta = torch.zeros(probes, device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    for _ in range(steps):  # few kernels a step: the loop is bound by launches, not by its products
        w = apply(vector)
        w.addcmul_(previous, beta, value=-1.0)
        alpha = torch.linalg.vecdot(w, vector, dim=0)
        w.addcmul_(vector, alpha, value=-1.0)
        beta = torch.linalg.vector_norm(w, dim=0)
        alphas.append(alpha)
        betas.append(beta)
        previous, vector = vector, w.div_(beta.clamp_min(tiny))  # β = 0 only where w is 0
    alphas, betas = torch.stack(alphas), torch.stack(betas)
    return alphas, betas


def quadrature(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss nodes and weights per probe from its Lanczos tridiagonal: (probes×steps) each, on the host.

    Golub–Welsch: the nodes are the tridiagonal's eigenvalues, the weights the squared first
    components of its eigenvectors. LAPACK's tridiagonal solver (stemr) one probe at a time:
    for 32 probes of 64 steps it took 11 ms on the development VM against 48 ms for numpy's
    batched dense eigh, and the batch on an H200 took 23 ms (bench/probes/adaptive_parts.py).
    """
    steps, probes = alphas.shape
    nodes, weights = np.empty((probes, steps)), np.empty((probes, steps))
    for p in range(probes):
        if steps == 1:
            nodes[p], weights[p] = alphas[0, p], 1.0
            continue
        values, vectors = eigh_tridiagonal(alphas[:, p], betas[:-1, p], lapack_driver="stemr")
        nodes[p], weights[p] = values, vectors[0] ** 2
    return np.clip(nodes, 0.0, None), weights


def tail_sums(matrix: torch.Tensor, basis: torch.Tensor, scale: float, probes: int = 16, steps: int = 32,
              seed: int = 1) -> TailSums:
    """SLQ estimates of Σσ and Σσ ln σ of R = (I − QQᵀ)M, M tall (m×n), Q = ``basis`` (m×b).

    ΔWᵀΔW = BᵀB + RᵀR with B = QᵀM, so once Q holds the top of the spectrum the rest of it is
    R's; Lanczos runs on RᵀR (n×n, never formed) and its coefficients are scaled by 1/scale².
    """
    def apply(v: torch.Tensor) -> torch.Tensor:
        y = matrix @ v
        y = torch.addmm(y, basis, basis.T @ y, alpha=-1.0)  # (I − QQᵀ)·M·v in one product
        return matrix.T @ y

    dim = matrix.shape[1]
    alphas, betas = lanczos_tridiagonals(apply, dim, probes, steps, matrix.device, matrix.dtype, seed)
    host = torch.stack([alphas, betas]).double().cpu().numpy() / (scale * scale)  # one transfer
    alphas, betas = host[0], host[1]
    host = np.stack(quadrature_sums(alphas, betas, dim) + quadrature_sums(alphas[: steps // 2], betas[: steps // 2], dim))
    return TailSums(host[0], host[1], scale, alphas.shape[0], host[2], host[3])


def quadrature_sums(alphas: np.ndarray, betas: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per probe: the quadrature estimates of Σσ and Σσ ln σ (σ = √λ of the operator's eigenvalues λ)."""
    nodes, weights = quadrature(alphas, betas)
    sigma = np.sqrt(nodes)
    xlogx = np.where(sigma > 0, sigma * np.log(np.where(sigma > 0, sigma, 1.0)), 0.0)
    return dim * np.sum(weights * sigma, axis=1), dim * np.sum(weights * xlogx, axis=1)


def entropy_rank(nuclear: float, entropy: float) -> float:
    """exp(H) of p = σ/Σσ from S = Σσ and T = Σσ ln σ (any common unit): H = ln S − T/S."""
    if nuclear <= 0.0:
        return 0.0
    return math.exp(math.log(nuclear) - entropy / nuclear)


def effective_rank_estimate(top: np.ndarray, tail: TailSums | None) -> tuple[float, float | None]:
    """Effective rank from exact top values plus a tail estimate, and its error (jackknife over probes and the
    quadrature's own step, see below); the error is None where nothing is estimated."""
    if tail is None:
        positive = top[top > 0]
        if positive.size == 0:
            return 0.0, None
        units = positive / positive[0]
        return entropy_rank(float(units.sum()), float(np.sum(units * np.log(units)))), None
    units = top[top > 0] / tail.scale
    s_top, t_top = float(units.sum()), float(np.sum(units * np.log(units)))
    s, t = s_top + tail.nuclear, t_top + tail.entropy
    estimate = entropy_rank(float(s.mean()), float(t.mean()))
    count = s.size
    spread = 0.0
    if count > 1:  # jackknife over probes: the sampling error
        leave_one_out = np.array([entropy_rank(float((s.sum() - s[i]) / (count - 1)), float((t.sum() - t[i]) / (count - 1)))
                                  for i in range(count)])
        spread = (count - 1) / count * float(np.sum((leave_one_out - leave_one_out.mean()) ** 2))
    if tail.coarse_nuclear is None or tail.coarse_entropy is None:
        return estimate, math.sqrt(spread)
    # The quadrature's error falls about as 1/steps (√λ is not smooth at 0), so the estimate from
    # half the steps is about twice as far off: step once more in the same direction, and count
    # the whole step as error.
    coarse = entropy_rank(float((s_top + tail.coarse_nuclear).mean()), float((t_top + tail.coarse_entropy).mean()))
    return 2.0 * estimate - coarse, math.sqrt(spread + (coarse - estimate) ** 2)
