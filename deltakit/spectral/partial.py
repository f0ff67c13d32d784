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
  Each probe gets two quadrature rules from one Lanczos run, Gauss and Gauss–Radau with a node
  fixed at 0, which bracket its value; the estimate is their midpoint, and half their gap plus
  the spread over probes (jackknife) is its error (:func:`effective_rank_estimate`).

Nothing here decides which metric is settled; :mod:`deltakit.spectral.spectrum` does. Every
function takes the matrix on its device and moves only small arrays to the host.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

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
    residuals: np.ndarray | None = None  # per value: ρᵢ = ‖ΔW·ΔWᵀuᵢ − θᵢ²uᵢ‖ of its left Ritz vector

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
        self.basis = power_iterations(matrix, sketch, warmup)
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
        self.ritz_basis, self.basis = basis, orthonormal_basis(image, "shifted")
        self._vectors, self._right = vectors, right
        self.iterations += 1
        host = torch.stack([theta, rho, positive.double()]).cpu().numpy()  # one transfer, one synchronisation
        return RitzBlock(host[0], value_errors(host[0], host[1], host[2] > 0), self.width, self.iterations, host[1])


    def left_vectors(self, count: int) -> torch.Tensor:
        """The first ``count`` left Ritz vectors of the last round (m×count, orthonormal)."""
        return self.ritz_basis @ self._vectors[:, :count].to(self.matrix.dtype)

    def right_vectors(self) -> torch.Tensor:
        """The right Ritz vectors of the last round (n×b): a start for a wider block."""
        return self._right


_controller: ThreadpoolController | None = None
_single_threaded = 0  # contexts open in any thread
_single_lock = threading.Lock()
_restore: Any = None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """A context in which the host's BLAS and LAPACK (numpy's, scipy's) run on one thread.

    The host problems here are tiny (128×128, 64×64): a thread per core spends longer waking and
    spinning than solving, and spinning threads starve the threads reading the checkpoints
    (docs/benchmarks.md has the cost). The limit is process-wide, so it is counted: set by the
    first context to open (in any thread) and lifted when the last one closes.
    """
    global _controller, _single_threaded, _restore
    with _single_lock:
        if _single_threaded == 0:
            if _controller is None:
                _controller = ThreadpoolController()
            _restore = _controller.limit(limits=1, user_api="blas")
        _single_threaded += 1
    try:
        yield
    finally:
        with _single_lock:
            _single_threaded -= 1
            if _single_threaded == 0:
                _restore.restore_original_limits()


def power_iterations(matrix: torch.Tensor, sketch: torch.Tensor, count: int) -> torch.Tensor:
    """An orthonormal basis of (M·Mᵀ)^count·M·sketch: ``count`` power iterations without Rayleigh–Ritz
    (the first rounds never settle anything). Between them one pass of orthonormalisation keeps
    the span; the last one is complete. No host synchronisation (shifted CholeskyQR on a GPU)."""
    basis = matrix @ sketch
    for _ in range(count):
        basis = matrix @ orthonormal_basis(matrix.T @ orthonormal_basis(basis, "shifted", 1), "shifted", 1)
    return orthonormal_basis(basis, "shifted")


def small_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of a small symmetric float64 matrix (the b×b Rayleigh–Ritz problem), on the host.

    A GPU eigensolver spends milliseconds on launches for b ≈ 128; LAPACK on the host takes a
    fraction of that, and the values have to come to the host anyway.
    """
    if gram.device.type == "cpu":
        return torch.linalg.eigh(gram)
    host = gram.cpu().numpy()
    with one_blas_thread():
        values, vectors = np.linalg.eigh(host)
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


def deflatable(block: RitzBlock, value_tolerance: float, angle_tolerance: float) -> int:
    """How many top Ritz vectors may deflate the tail: the largest d whose values are settled (error
    ≤ ``value_tolerance``·θ) and whose span is within ``angle_tolerance`` of the true top-d subspace.

    A value is accurate long before its vector is (its error is quadratic in the angle), and a
    tail deflated by a span that is off by an angle keeps ~angle·σ of the top directions, which
    the top's exact sum then counts twice. The Davis–Kahan sin Θ theorem bounds the angle by
    ‖(ρ₁ … ρ_d)‖ / (θ_d² − λ_{d+1}), with λ_{d+1} at most the next value's upper estimate; the span
    of a cluster of equal values is sound although its single vectors are not.
    """
    values, errors = block.values, block.errors
    settled = errors <= value_tolerance * values
    count = int(np.argmin(settled)) if not settled.all() else values.size
    if block.residuals is None or count == 0:
        return count
    residual = np.sqrt(np.cumsum(block.residuals[:count] ** 2))
    following = np.append((values + errors)[1:], 0.0)[:count]  # upper estimates of the next values
    gaps = values[:count] ** 2 - following ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        sound = (gaps > 0) & (residual <= angle_tolerance * gaps)
    return int(np.flatnonzero(sound)[-1]) + 1 if sound.any() else 0


@dataclass(frozen=True)
class TailSums:
    """Σσ and Σσ·ln σ over the singular values outside a computed block, in units of ``scale``.

    Per-probe estimates are kept so that every quantity derived from them gets a jackknife error.
    Each comes from two rules: Gauss (``nuclear``, ``entropy``) and Gauss–Radau with a node at 0
    (``radau_*``). For Σσ the first is an upper and the second a lower bound of the probe's value
    (the derivatives of √λ alternate in sign), and for square noisy deltas they bracket the
    effective rank from both sides.
    """

    nuclear: np.ndarray  # per probe, Gauss: estimate of Σ (σ/scale)
    entropy: np.ndarray  # per probe, Gauss: estimate of Σ (σ/scale)·ln(σ/scale)
    scale: float
    steps: int
    radau_nuclear: np.ndarray  # the same by Gauss–Radau (a node fixed at 0)
    radau_entropy: np.ndarray


@functools.lru_cache(maxsize=8)
def rademacher(dim: int, probes: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``probes`` seeded random ±1/√dim columns (dim×probes): the Lanczos starts, the same for every
    matrix of a width (kept: read-only)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    start = torch.randint(0, 2, (dim, probes), device=device, generator=generator, dtype=torch.int8)
    start = (start.to(dtype) * 2 - 1) / math.sqrt(dim)
    if start.is_cuda:  # other threads' streams read it too (deltakit.device.workers): complete before it is shared
        torch.cuda.current_stream(start.device).synchronize()
    return start


def lanczos_tridiagonals(apply: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """α (steps×probes) and β (steps×probes), on the device, of Lanczos on a symmetric operator from
    the unit columns of ``start`` (dim×probes).

    All probes run together as the columns of one block (one product per step). Only the
    three-term recurrence is kept, as in stochastic Lanczos quadrature (Ubaru, Chen & Saad
    2017): lost orthogonality repeats converged Ritz values, which shares their quadrature
    weight among the copies rather than changing the sum. No step synchronises with the host,
    so the loop can be captured in a CUDA graph (:mod:`deltakit.device.graphs`).
    """
    vector = start
    steps = min(steps, start.shape[0])
    alphas, betas = [], []
    previous = torch.zeros_like(vector)
    beta = torch.zeros(start.shape[1], device=start.device, dtype=start.dtype)
    tiny = torch.finfo(start.dtype).tiny
    for _ in range(steps):  # few kernels a step: the loop is bound by launches, not by its products
        w = apply(vector)
        w.addcmul_(previous, beta, value=-1.0)
        alpha = torch.linalg.vecdot(w, vector, dim=0)
        w.addcmul_(vector, alpha, value=-1.0)
        beta = torch.linalg.vector_norm(w, dim=0)
        alphas.append(alpha)
        betas.append(beta)
        previous, vector = vector, w / beta.clamp_min(tiny)  # β = 0 only where w is 0
    return torch.stack(alphas), torch.stack(betas)


def deflated_lanczos(matrix: torch.Tensor, basis: torch.Tensor, start: torch.Tensor, steps: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lanczos coefficients of RᵀR, R = (I − QQᵀ)M (M = ``matrix`` m×n, Q = ``basis`` m×b, orthonormal
    columns or zero ones), from ``start`` (n×probes). A pure function of its tensors: replayable."""
    def apply(v: torch.Tensor) -> torch.Tensor:
        y = matrix @ v
        y = torch.addmm(y, basis, basis.T @ y, alpha=-1.0)  # (I − QQᵀ)·M·v in one product
        return matrix.T @ y

    return lanczos_tridiagonals(apply, start, steps)


def quadrature(tridiagonals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights per probe from its Jacobi matrix (probes×k×k): (probes×k) each, on the host.

    Golub–Welsch: the nodes are the matrix's eigenvalues, the weights the squared first
    components of its eigenvectors; one batched float64 eigh on one BLAS thread. Per-probe
    LAPACK tridiagonal calls (stevd) were faster alone, but they hold Python's lock, and this
    runs on a host thread beside the main one (:class:`deltakit.spectral.adaptive.PendingTail`).
    """
    with one_blas_thread():
        values, vectors = np.linalg.eigh(tridiagonals)
    return np.clip(values, 0.0, None), vectors[:, 0, :] ** 2


def dense_tridiagonals(alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """The Lanczos tridiagonals (α, β: steps×probes, β's last row unused) as dense probes×steps×steps
    matrices: the Jacobi matrices of Gauss quadrature."""
    steps, probes = alphas.shape
    dense = np.zeros((probes, steps, steps))
    index = np.arange(steps)
    dense[:, index, index] = alphas.T
    dense[:, index[:-1], index[1:]] = betas[:-1].T
    dense[:, index[1:], index[:-1]] = betas[:-1].T
    return dense


def radau_tridiagonals(alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """The Jacobi matrices (probes×(k+1)×(k+1)) of Gauss–Radau quadrature with a node fixed at 0.

    Golub's construction: extend the k-step tridiagonal T by β_k (β's last row) and a last
    diagonal entry chosen so that 0 is an eigenvalue, β_k²·[T⁻¹]_kk = β_k²/d_k with d_k the last
    pivot of T's LDLᵀ factorisation. The operator is positive semi-definite, but in fp32 T can
    hold a Ritz value a hair below 0 (a deflated square ΔW has exact zeros): a pivot may then be
    negative, which the construction allows; only an exact zero is nudged.
    """
    steps = alphas.shape[0]
    tiny = np.finfo(np.float64).tiny

    def nonzero(x: np.ndarray) -> np.ndarray:
        return np.where(x == 0.0, tiny, x)

    pivot = nonzero(alphas[0])
    for j in range(1, steps):
        pivot = nonzero(alphas[j] - betas[j - 1] ** 2 / pivot)
    last = betas[-1] ** 2 / pivot
    # one more step whose coupling is β_k (β's last row, unused by the plain tridiagonal)
    return dense_tridiagonals(np.vstack([alphas, last]), np.vstack([betas, np.zeros_like(last)]))


def quadrature_sums(tridiagonals: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per probe: the quadrature estimates of Σσ and Σσ ln σ (σ = √λ of the operator's eigenvalues λ)."""
    nodes, weights = quadrature(tridiagonals)
    sigma = np.sqrt(nodes)
    xlogx = np.where(sigma > 0, sigma * np.log(np.where(sigma > 0, sigma, 1.0)), 0.0)
    return dim * np.sum(weights * sigma, axis=1), dim * np.sum(weights * xlogx, axis=1)


def entropy_rank(nuclear: float, entropy: float) -> float:
    """exp(H) of p = σ/Σσ from S = Σσ and T = Σσ ln σ (any common unit): H = ln S − T/S."""
    if nuclear <= 0.0:
        return 0.0
    return math.exp(math.log(nuclear) - entropy / nuclear)


def effective_rank_estimate(top: np.ndarray, tail: Any) -> tuple[float, float | None]:
    """Effective rank from exact top values plus a tail estimate, and its error; the error is None
    where nothing is estimated.

    ``tail``: :class:`TailSums`, something whose ``result()`` gives them (a pending tail), or None.
    The tail's sums are the midpoint of the Gauss and Gauss–Radau rules, which bracket them: half
    their gap is the quadrature's error (on square noisy deltas Gauss ran ~0.6 % high and Radau
    ~1.1 % low at 64 steps). The spread over probes (jackknife) is the sampling error; the two add
    in quadrature.
    """
    if tail is not None and not isinstance(tail, TailSums):
        tail = tail.result()
    if tail is None:
        positive = top[top > 0]
        if positive.size == 0:
            return 0.0, None
        units = positive / positive[0]
        return entropy_rank(float(units.sum()), float(np.sum(units * np.log(units)))), None
    units = top[top > 0] / tail.scale
    s_top, t_top = float(units.sum()), float(np.sum(units * np.log(units)))
    s = s_top + (tail.nuclear + tail.radau_nuclear) / 2
    t = t_top + (tail.entropy + tail.radau_entropy) / 2
    estimate = entropy_rank(float(s.mean()), float(t.mean()))
    count = s.size
    spread = 0.0
    if count > 1:  # jackknife over probes: the sampling error
        leave_one_out = np.array([entropy_rank(float((s.sum() - s[i]) / (count - 1)), float((t.sum() - t[i]) / (count - 1)))
                                  for i in range(count)])
        spread = (count - 1) / count * float(np.sum((leave_one_out - leave_one_out.mean()) ** 2))
    gauss = entropy_rank(s_top + float(tail.nuclear.mean()), t_top + float(tail.entropy.mean()))
    radau = entropy_rank(s_top + float(tail.radau_nuclear.mean()), t_top + float(tail.radau_entropy.mean()))
    return estimate, math.sqrt(spread + ((gauss - radau) / 2) ** 2)
