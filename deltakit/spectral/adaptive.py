"""`rank`'s adaptive path: only the top of ΔW's spectrum, grown until the asked metrics are settled.

A block of b vectors iterated a few times (:class:`~deltakit.spectral.partial.SubspaceIteration`)
costs O(m·n·b) in matrix products, against O(n³) for a full eigendecomposition whatever the
metrics need. :func:`adaptive_spectrum` widens the block until rank@X (and signal_rank@X) are
settled by :func:`settle`, or gives up where the full path is cheaper; the effective rank's tail
comes from stochastic Lanczos quadrature (:func:`start_tail_sums`), replayed from a CUDA graph and
solved on a host thread while the device moves on (docs/metrics.md, "Adaptive spectra").

Example::

    spectrum, why = adaptive_spectrum(delta, noise, energy, fractions=(0.9,))
    spectrum.rank_at(0.9) if spectrum is not None else why
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property
import math
from typing import Sequence

import numpy as np
import torch

from deltakit.device.graphs import GraphCache, OnTheWay, shared_graphs
from deltakit.device.host import solver_pool
from deltakit.spectral import metrics
from deltakit.spectral.metrics import crossing
from deltakit.spectral.noise import StorageNoise
from deltakit.spectral.options import AdaptivePlan
from deltakit.spectral.partial import (
    RitzBlock, SubspaceIteration, TailSums, deflatable, deflated_lanczos, dense_tridiagonals,
    effective_rank_estimate, quadrature_sums, rademacher, radau_tridiagonals,
)
from deltakit.spectral.spectrum import (
    STORAGE_FLOOR_SAFETY, Spectrum, debiased_values, outside_norm, rounding_matters, unresolved_threshold,
    worth_certifying,
)
from deltakit.spectral.svd import method_noise_floor

SMALL_OR_ZERO = ("small matrix", "zero ΔW")  # reasons the full path runs that are no fallback


def tail_sums(matrix: torch.Tensor, basis: torch.Tensor, scale: float, probes: int = 16, steps: int = 32,
              seed: int = 1, padded_width: int = 0, graphs: GraphCache | None = None) -> TailSums:
    """SLQ estimates of Σσ and Σσ ln σ of R = (I − QQᵀ)M, M tall (m×n), Q = ``basis`` (m×b).

    ΔWᵀΔW = BᵀB + RᵀR with B = QᵀM, so once Q holds the top of the spectrum the rest of it is
    R's; Lanczos runs on RᵀR (n×n, never formed) and its coefficients are scaled by 1/scale².
    """
    return start_tail_sums(matrix, basis, scale, probes, steps, seed, padded_width, graphs).result()




@dataclass
class PendingTail:
    """:func:`tail_sums` whose Lanczos may still be running on the device: the quadrature runs on a
    worker thread once the coefficients arrive, and ``result()`` waits for it, so that the
    caller can start the next matrix meanwhile."""

    coefficients: OnTheWay  # α and β (steps×probes each)
    scale: float
    dim: int
    _sums: Future = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._sums = solver_pool().submit(self._solve)

    def _solve(self) -> TailSums:
        alphas, betas = (x.double().numpy() / (self.scale * self.scale) for x in self.coefficients.done())
        gauss = quadrature_sums(dense_tridiagonals(alphas, betas), self.dim)
        radau = quadrature_sums(radau_tridiagonals(alphas, betas), self.dim)
        return TailSums(gauss[0], gauss[1], self.scale, alphas.shape[0], radau[0], radau[1])

    def result(self) -> TailSums:
        return self._sums.result()


def start_tail_sums(matrix: torch.Tensor, basis: torch.Tensor, scale: float, probes: int = 16, steps: int = 32,
                    seed: int = 1, padded_width: int = 0, graphs: GraphCache | None = None) -> PendingTail:
    """:func:`tail_sums`, returned before its Lanczos has finished where a CUDA graph of ``graphs`` (default:
    the process's :func:`~deltakit.device.graphs.shared_graphs`) runs it; ``padded_width`` pads Q with zero
    columns so that blocks of any deflated width share one graph. ``matrix`` and ``basis`` may be freed
    as soon as this returns."""
    graphs = graphs if graphs is not None else shared_graphs()
    dim = matrix.shape[1]
    start = rademacher(dim, probes, seed, matrix.device, matrix.dtype)
    if start.is_cuda:  # shared by the threads' streams: freed (off the cache) only once each is done with it
        start.record_stream(torch.cuda.current_stream(start.device))
    if graphs.capturable((matrix, basis, start)):  # fixed shapes for the graph: the block padded with zero columns
        padded = basis.new_zeros(basis.shape[0], max(basis.shape[1], padded_width))
        padded[:, : basis.shape[1]] = basis
        basis = padded
    steps = min(steps, dim)
    coefficients = graphs.replay_to_host(f"lanczos{steps}", lambda *x: deflated_lanczos(*x, steps),
                                         (matrix, basis, start))
    return PendingTail(coefficients, scale, dim)


@dataclass(frozen=True)
class PartialSpectrum(Spectrum):
    """The top of a spectrum (adaptive path): every metric it reports is settled or marked.

    ``values``: the top singular values (Ritz values, lower bounds, converged to the checks in
    :func:`settle`); ``upper``: their upper estimates. ``tail``: Lanczos-quadrature sums of the
    values below the first ``deflated`` (the converged ones), None when those hold no energy
    beyond rounding; ``tail_energy``: their exact Σσ² (‖ΔW‖²_F − the top's). ``rank_count`` /
    ``signal_count``: the counts above the two floors when settled, else None with ``bounds``.
    """

    upper: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tail: TailSums | PendingTail | None = None  # pending: the quadrature runs when a metric first needs it
    tail_energy: float = 0.0
    deflated: int = 0
    rank_count: int | None = None
    signal_count: int | None = None
    bounds: dict[str, int] = field(default_factory=dict)
    width: int = 0
    directions: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def complete(self) -> bool:
        return False

    @property
    def all_values(self) -> np.ndarray:
        return self.values

    @property
    def rank(self) -> int | None:
        return self.rank_count if self.energy > 0 or self.tail_energy > 0 else 0

    @property
    def _normalizer(self) -> float:
        """Σσ² over the whole spectrum: ‖ΔW‖²_F, or the top's own where the rest is rounding."""
        return self.total_energy if self.tail is not None else self.energy

    @property
    def lower_bounds(self) -> dict[str, int]:
        return dict(self.bounds)

    def rank_at(self, fraction: float) -> int:
        found = crossing(self.values, fraction * self._normalizer)
        if found is None:  # settle() certified every requested crossing; another fraction may lie past the block
            raise ValueError(f"rank@{fraction:g} lies past the {self.values.size} computed values")
        return found

    def stable_rank(self) -> float:
        return self._normalizer / float(self.values[0]) ** 2 if self.values.size and self.values[0] > 0 else 0.0

    @cached_property
    def _effective(self) -> tuple[float, float | None]:
        """The estimate and its error, computed once (the jackknife is over every probe)."""
        top = self.values[: self.deflated] if self.tail is not None else self.values
        return effective_rank_estimate(top, self.tail)

    def effective_rank(self) -> float:
        return self._effective[0]

    @property
    def effective_rank_error(self) -> float | None:
        return self._effective[1]

    def signal_rank_at(self, fraction: float) -> int | None:
        if self.signal_is_raw:
            return self.rank_at(fraction)
        if self.signal_energy <= 0.0:
            return 0 if self.total_energy == 0 else None
        return crossing(self.signal, fraction * self.signal_energy)

    def signal_effective_rank(self) -> float | None:
        if self.signal_is_raw:
            return self.effective_rank()
        return metrics.effective_rank(self.signal) if self.signal_count is not None else None

    @property
    def signal_rank(self) -> int | None:
        return self.signal_count if not self.signal_is_raw else self.rank_count


@dataclass(frozen=True)
class Settlement:
    """What one Ritz block decides: ``done``; else ``wider`` (the answers lie past the trusted values)
    or more rounds; ``reason`` names what is not settled."""

    done: bool
    wider: bool = False
    reason: str = ""


def count_above(block: RitzBlock, threshold: float, trusted: int) -> int | None:
    """Values above ``threshold`` when certain from the block (the next value's upper estimate is below it)."""
    lower = int(np.count_nonzero(block.values > threshold))
    if lower >= trusted:
        return None
    return lower if block.upper[lower] <= threshold else None


def certified_count(iteration: SubspaceIteration, values: np.ndarray, threshold: float) -> int | None:
    """Values above ``threshold`` when ΔW outside the top right Ritz vectors is below it: Ritz values are lower
    bounds of the singular values and ‖ΔW(I − VVᵀ)‖_F bounds the next one (:func:`outside_norm`). For an
    exactly low-rank ΔW whose next Ritz value's upper estimate is too loose to settle the count (a GPU's
    products, with larger residuals at the rounding level, than the CPU's); O(m·n·count)."""
    count = int(np.count_nonzero(values > threshold))
    if count == 0 or not worth_certifying(count, iteration.matrix.shape):
        return None
    return count if outside_norm(iteration.matrix, iteration.right_vectors()[:, :count]) <= threshold else None


def signal_threshold(noise: StorageNoise, shape: tuple[int, int]) -> float:
    """The smallest observed value :func:`debiased_values` keeps: above the rounding's edge and its bulk edge."""
    small, large = sorted(shape)
    return max(noise.spectral_edge, noise.rms * math.sqrt(large) * (1.0 + math.sqrt(small / large)))


def settle(block: RitzBlock, energy: float, fractions: Sequence[float], signal_energy: float | None,
           noise: StorageNoise | None, shape: tuple[int, int]) -> Settlement:
    """Whether the block settles rank@X for every X, σ₁ (stable rank to 1e-4) and, where rounding
    matters, signal_rank@X: the crossing from the lower values equals the one from the upper estimates."""
    trusted = block.width - max(8, block.width // 8)
    if block.values.size and block.values[0] > 0 and block.errors[0] > 2.5e-5 * block.values[0]:
        return Settlement(False, reason="σ₁")
    lower, upper = block.values, block.upper
    sigma_max = float(lower[0]) if lower.size else 0.0
    if energy - float(np.sum(lower * lower)) <= unresolved_threshold(shape, sigma_max, torch.float32):
        # the rest is rounding (an exactly low-rank ΔW): as on the full path, the values under the
        # method's floor are dropped and the fractions are of what remains
        kept = lower > method_noise_floor(sigma_max, shape, "gram", torch.float32)
        lower, upper = np.where(kept, lower, 0.0), np.where(kept, upper, 0.0)
        energy = float(np.sum(lower * lower))
    for fraction in fractions:
        late = crossing(lower, fraction * energy)
        if late is None or late > trusted:
            return Settlement(False, wider=True, reason=f"rank@{fraction:g}")
        if crossing(upper, fraction * energy) != late:
            return Settlement(False, reason=f"rank@{fraction:g}")
    if signal_energy is None or noise is None:
        return Settlement(True)
    signal_lower = debiased_values(block.values, shape, noise.rms, noise.spectral_edge)
    signal_upper = debiased_values(block.upper, shape, noise.rms, noise.spectral_edge)
    for fraction in fractions:
        late = crossing(signal_lower, fraction * signal_energy)
        if late is None:
            count = count_above(block, signal_threshold(noise, shape), trusted)
            if count is not None and crossing(signal_upper, fraction * signal_energy) is None:
                continue  # every signal value is in the block and they do not reach X: None, as on the full path
            return Settlement(False, wider=True, reason=f"signal_rank@{fraction:g}")
        if late > trusted:
            return Settlement(False, wider=True, reason=f"signal_rank@{fraction:g}")
        if crossing(signal_upper, fraction * signal_energy) != late:
            return Settlement(False, reason=f"signal_rank@{fraction:g}")
    return Settlement(True)


def adaptive_spectrum(matrix: torch.Tensor, noise: StorageNoise | None, delta_energy: float,
                      fractions: Sequence[float], plan: AdaptivePlan = AdaptivePlan(),
                      seed: int = 0, graphs: GraphCache | None = None) -> tuple[Spectrum | None, str]:
    """The top of ΔW's spectrum grown until rank@X (and signal_rank@X) for ``fractions`` are settled.

    Returns (spectrum, "") or (None, why) when the full path should run instead: the matrix is
    small, or a metric needs more values than ``plan.crossover`` of min(m, n). The tail's Lanczos
    replays from ``graphs`` (default: the process's shared cache).
    """
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    small = min(shape)
    if small < plan.min_side or plan.start_width > plan.crossover * small:
        return None, SMALL_OR_ZERO[0]
    if delta_energy == 0.0:
        return None, SMALL_OR_ZERO[1]
    tall = matrix if shape[0] >= shape[1] else matrix.T
    tall = tall.float()
    width, start = plan.start_width, None
    matters = rounding_matters(noise, 0.0, delta_energy)
    signal_energy = max(delta_energy - noise.energy, 0.0) if matters and noise is not None else None
    while width <= plan.crossover * small:
        iteration = SubspaceIteration(tall, width, seed=seed, start=start, warmup=plan.warmup if start is None else 0)
        for _ in range(plan.rounds):
            block = iteration.round()
            verdict = settle(block, delta_energy, fractions, signal_energy, noise if matters else None, shape)
            if verdict.done or verdict.wider:
                break
        if verdict.done:
            return _partial(iteration, block, shape, noise, delta_energy, plan, seed, graphs), ""
        start = iteration.right_vectors()
        width *= 2
    return None, f"{verdict.reason} needs more than {plan.crossover:g}·min(m, n) singular values"


def _partial(iteration: SubspaceIteration, block: RitzBlock, shape: tuple[int, int], noise: StorageNoise | None,
             energy: float, plan: AdaptivePlan, seed: int, graphs: GraphCache | None = None) -> PartialSpectrum:
    """A :class:`PartialSpectrum` from a settled block: floors, counts, signal values and the tail's sums."""
    values = block.values.copy()
    sigma_max = float(values[0])
    # Ritz values are singular values of QᵀΔW, formed in fp32 and solved in float64: resolved to the exact
    # SVD's floor, the data's own (as the full path's refinement), not the Gram path's 16·√eps·σ₁
    method_floor = method_noise_floor(sigma_max, shape, "exact", torch.float32)
    trusted = block.width - max(8, block.width // 8)
    deflated = deflatable(block, plan.settled_relative, plan.deflation_angle)
    tail_energy = energy - float(np.sum(values[:deflated] ** 2))
    tail = None
    if tail_energy > unresolved_threshold(shape, sigma_max, torch.float32):
        tail = start_tail_sums(iteration.matrix, iteration.left_vectors(deflated), sigma_max, plan.probes,
                               plan.steps_for(min(shape)),
                               seed + 1, padded_width=block.width, graphs=graphs)
    else:  # the rest is rounding of an (exactly) low-rank ΔW: drop it as the full path does
        values[values <= method_floor] = 0.0
        tail_energy = 0.0
    matters = rounding_matters(noise, method_floor, energy)
    storage = STORAGE_FLOOR_SAFETY * noise.spectral_edge if noise is not None else 0.0
    bounds: dict[str, int] = {}
    floor = max(method_floor, storage)
    rank_count = count_above(block, floor, trusted)
    if rank_count is None and tail is None:
        rank_count = certified_count(iteration, values, floor)
    if rank_count is None:
        bounds["rank"] = int(np.count_nonzero(values > floor))
    signal_count, signal, signal_energy = rank_count, values, energy
    if matters:
        signal_count = count_above(block, signal_threshold(noise, shape), trusted)
        signal = debiased_values(values, shape, noise.rms, noise.spectral_edge)
        if signal_count is None:
            bounds["signal_rank"] = int(np.count_nonzero(signal))
        signal_energy = max(energy - noise.energy, float(np.sum(signal * signal)))
    return PartialSpectrum(values, shape, f"adaptive({block.width})", method_floor, noise, signal, signal_energy, energy,
                           upper=block.upper, tail=tail, tail_energy=max(tail_energy, 0.0), deflated=deflated,
                           rank_count=rank_count, signal_count=signal_count, bounds=bounds, width=block.width,
                           directions=top_directions_of(iteration, shape, DIRECTIONS_KEPT))


DIRECTIONS_KEPT = 64  # top singular vectors a partial spectrum keeps for the amplification factor


def top_directions_of(iteration: SubspaceIteration, shape: tuple[int, int], count: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """U (m×k) and Vh (k×n) of ΔW (m×n) from the Ritz vectors of its tall orientation."""
    count = min(count, iteration.width)
    left, right = iteration.left_vectors(count), iteration.right_vectors()[:, :count]
    return (left, right.T) if shape[0] >= shape[1] else (right, left.T)
