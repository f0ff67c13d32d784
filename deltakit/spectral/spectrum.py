"""One spectrum object for every command: the singular values of one ΔW, the floors under them,
and the estimate of what fine-tuning learned once storage rounding is taken out.

``rank``, ``extract``, ``intruders`` and ``plot`` all read a :class:`Spectrum`, so a metric
means the same thing in each. Two floors sit under the values:

* the *method* floor: below it a value is noise of the computation (Gram/eigh resolves
  ~√eps·σ₁), so such values are set to 0 before any metric is taken;
* the *storage* floor: below it a value may be storage rounding of the checkpoints
  (see :mod:`deltakit.spectral.noise`).

The *signal* spectrum keeps the components above the rounding's spectral edge and removes the
rounding's bias from each (the spiked-model inversion of Benaych-Georges & Nadakuditi 2012,
the same model Gavish & Donoho 2017 shrink with); the signal energy is ‖ΔW‖²_F minus the
rounding's expected energy. Formulas and limits: docs/metrics.md.

Example::

    spec = compute_spectrum(delta, SpectralOptions(), noise=storage_noise(base, delta, bf16, bf16))
    spec.rank_at(0.9), spec.signal_rank_at(0.9), spec.noise_share
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

from deltakit.spectral import metrics
from deltakit.spectral.noise import StorageNoise
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.partial import (
    PendingTail, RitzBlock, SubspaceIteration, TailSums, deflatable, effective_rank_estimate, start_tail_sums,
)
from deltakit.spectral.svd import method_noise_floor, singular_values

STORAGE_FLOOR_SAFETY = 2.0  # numerical rank counts values above 2× the rounding's spectral edge
NEGLIGIBLE_SHARE = 1e-6  # rounding below this share of ‖ΔW‖² cannot move a metric: the signal spectrum is the raw one


def method_name(options: SpectralOptions) -> str:
    """The ``spectrum_method`` recorded per matrix: gram, exact or fp64."""
    return "fp64" if options.precision == "fp64" else options.method


def debiased_values(values: np.ndarray, shape: tuple[int, int], noise_rms: float, edge: float) -> np.ndarray:
    """The signal singular values θ behind observed values σ > ``edge`` of signal + white noise.

    In the spiked model X = S + N with N's entries of variance τ² and x = σ/(τ√N), N the larger
    side and β = min/max, an isolated signal value θ (in the same units) is seen at
    x² = (1 + θ²)(β + θ²)/θ² when θ > β^¼; inverting gives
    θ² = ((x² − 1 − β) + √((x² − 1 − β)² − 4β)) / 2. Values at or below ``edge`` (at least the
    bulk edge 1 + √β) carry no recoverable signal and are dropped (returned as zeros).
    """
    small, large = sorted(shape)
    beta = small / large
    unit = noise_rms * math.sqrt(large)
    out = np.zeros_like(values)
    if unit <= 0.0:
        return values.copy()
    x = values / unit
    keep = (values > edge) & (x > 1.0 + math.sqrt(beta))
    y = x[keep] ** 2 - 1.0 - beta
    theta2 = (y + np.sqrt(np.clip(y * y - 4.0 * beta, 0.0, None))) / 2.0
    out[keep] = np.sqrt(theta2) * unit
    return out


@dataclass(frozen=True)
class Spectrum:
    """Singular values of one ΔW (m×n) and every rank metric taken from them.

    ``values``: descending, float64, values at or below ``method_floor`` set to 0.
    ``noise``: the storage rounding model of this ΔW, None when not estimated.
    ``signal``: descending debiased values of the components above the rounding's edge.
    ``signal_energy``: estimated ‖δ‖²_F of the true update (‖ΔW‖² − rounding energy).
    """

    values: np.ndarray
    shape: tuple[int, int]
    method: str
    method_floor: float
    noise: StorageNoise | None = None
    signal: np.ndarray = field(default=None)  # type: ignore[assignment]
    signal_energy: float = 0.0
    total_energy: float = 0.0  # ‖ΔW‖²_F measured directly
    unresolved: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def energy(self) -> float:
        """Σσ² of the resolved values (= ‖ΔW‖²_F up to what lies under the method floor)."""
        return float(np.sum(self.values * self.values))

    @property
    def complete(self) -> bool:
        """True: every singular value was computed (the full path); False: only the top (adaptive)."""
        return True

    @property
    def all_values(self) -> np.ndarray:
        """The resolved values followed by the values under the method floor that carry measured energy
        (:func:`unresolved_values`): what energy curves and the effective rank are taken from."""
        if not self.unresolved.size:
            return self.values
        out = self.values.copy()
        start = int(np.count_nonzero(out))  # the values under the floor were set to 0 at the end
        out[start:start + self.unresolved.size] = self.unresolved
        return out

    @property
    def storage_floor(self) -> float:
        """Values at or below it may be storage rounding: 2 × the rounding's spectral edge."""
        return STORAGE_FLOOR_SAFETY * self.noise.spectral_edge if self.noise is not None else 0.0

    @property
    def noise_floor(self) -> float:
        """The numerical rank's threshold: the larger of the method and storage floors."""
        return max(self.method_floor, self.storage_floor)

    @property
    def rank(self) -> int | None:
        """Numerical rank: values strictly above :attr:`noise_floor`."""
        return metrics.numerical_rank(self.values, self.noise_floor) if self.energy > 0 else 0

    @property
    def noise_share(self) -> float:
        """Estimated fraction of ‖ΔW‖²_F that storage rounding accounts for, in [0, 1]."""
        return self.noise.share(self.total_energy) if self.noise is not None else 0.0

    @property
    def unchanged_fraction(self) -> float | None:
        return self.noise.unchanged_fraction if self.noise is not None else None

    @property
    def signal_is_raw(self) -> bool:
        """True when rounding cannot matter (see :func:`rounding_matters`): the signal spectrum is the raw one."""
        return not rounding_matters(self.noise, self.method_floor, self.total_energy)

    def rank_at(self, fraction: float) -> int:
        return metrics.rank_at_energy(self.all_values, fraction)

    def stable_rank(self) -> float:
        return metrics.stable_rank(self.all_values)

    def effective_rank(self) -> float:
        return metrics.effective_rank(self.all_values)

    @property
    def effective_rank_error(self) -> float | None:
        """Standard error of :meth:`effective_rank` where it is estimated; None where it is exact."""
        return None

    @property
    def lower_bounds(self) -> dict[str, int]:
        """Counts the adaptive path could only bound from below (name → bound); empty on the full path."""
        return {}

    def signal_rank_at(self, fraction: float) -> int | None:
        """Components needed to hold ``fraction`` of the estimated signal energy; None when the
        components above the rounding's edge hold less than that (the rest is buried in rounding)."""
        if self.signal_is_raw:
            return self.rank_at(fraction)
        if self.signal_energy <= 0.0:
            return 0 if self.total_energy == 0 else None
        cumulative = np.cumsum(self.signal * self.signal)
        target = fraction * self.signal_energy * (1.0 - 4 * np.finfo(np.float64).eps)
        if cumulative.size == 0 or cumulative[-1] < target:
            return None
        return int(np.searchsorted(cumulative, target, side="left") + 1)

    def signal_effective_rank(self) -> float | None:
        return self.effective_rank() if self.signal_is_raw else metrics.effective_rank(self.signal)

    @property
    def signal_rank(self) -> int | None:
        """Components above the rounding's spectral edge (the signal spectrum's nonzero count)."""
        return int(np.count_nonzero(self.signal))


def rounding_matters(noise: StorageNoise | None, method_floor: float, energy: float) -> bool:
    """Whether storage rounding is resolvable: above the method's floor and above a millionth of ‖ΔW‖²."""
    return noise is not None and noise.spectral_edge > method_floor and noise.energy > NEGLIGIBLE_SHARE * energy


def unresolved_threshold(shape: tuple[int, int], sigma_max: float, dtype: torch.dtype) -> float:
    """Energy below which what the method floor hides is its own rounding: min(m, n)·eps·σ₁².

    The eigensolver's (or SVD's) errors are ~eps·σ₁² per squared value, so over min(m, n)
    values they can sum to this much; measured energy beyond it is ΔW's own.
    """
    return min(shape) * float(torch.finfo(dtype).eps) * sigma_max * sigma_max


def unresolved_values(raw: np.ndarray, floor: float, energy: float, resolved_energy: float, threshold: float) -> np.ndarray:
    """The computed values at or below the method floor, scaled to carry the energy the resolved ones miss.

    Below the floor single values are not to be trusted (an exact rank-4 ΔW shows ~√eps·σ₁ of
    solver noise there), but their total is: ‖ΔW‖²_F − Σ resolved σ² is measured. Where that is
    within the method's own rounding (``threshold``) nothing is kept, so exact low-rank deltas
    read their rank; where it is more (a noisy, full-rank ΔW, whose many small values carry a
    large part of Σσ) the computed values are kept with that total, so the effective rank and
    energy fractions count them.
    """
    missing = energy - resolved_energy
    below = raw[(raw <= floor) & (raw > 0)]
    if missing <= threshold or below.size == 0:
        return np.zeros(0)
    return below * math.sqrt(missing / float(np.sum(below * below)))


def build_spectrum(values: np.ndarray, shape: tuple[int, int], method: str, method_floor: float,
                   noise: StorageNoise | None = None, delta_energy: float | None = None,
                   dtype: torch.dtype = torch.float32) -> Spectrum:
    """A :class:`Spectrum` from computed singular values: floors applied, signal estimated.

    ``delta_energy`` is ‖ΔW‖²_F measured directly (defaults to Σσ² of the resolved values).
    """
    raw = metrics.as_sorted_spectrum(values)
    resolved = raw.copy()
    resolved[resolved <= method_floor] = 0.0
    resolved_energy = float(np.sum(resolved * resolved))
    energy = resolved_energy if delta_energy is None else delta_energy
    sigma_max = float(raw[0]) if raw.size else 0.0
    unresolved = unresolved_values(raw, method_floor, energy, resolved_energy,
                                   unresolved_threshold(shape, sigma_max, dtype))
    if not rounding_matters(noise, method_floor, energy):
        return Spectrum(resolved, shape, method, method_floor, noise, resolved.copy(), energy, energy, unresolved)
    signal = debiased_values(resolved, shape, noise.rms, noise.spectral_edge)
    signal_energy = max(energy - noise.energy, float(np.sum(signal * signal)))
    return Spectrum(resolved, shape, method, method_floor, noise, signal, signal_energy, energy, unresolved)


def compute_spectrum(matrix: torch.Tensor, options: SpectralOptions, noise: StorageNoise | None = None,
                     delta_energy: float | None = None) -> Spectrum:
    """All singular values of ``matrix`` (m×n, on its device) by ``options``, as a :class:`Spectrum`."""
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    values = metrics.as_sorted_spectrum(singular_values(matrix, options.method, options.dtype))
    floor = method_noise_floor(float(values[0]), shape, options.method, options.dtype) if values.size else 0.0
    return build_spectrum(values, shape, method_name(options), floor if values.size and values[0] > 0 else 0.0,
                          noise, delta_energy, options.dtype)


SMALL_OR_ZERO = ("small matrix", "zero ΔW")  # reasons the full path runs that are no fallback


@dataclass(frozen=True)
class AdaptivePlan:
    """How far the adaptive path goes before the full eigendecomposition is cheaper.

    ``min_side``: matrices with a smaller side go straight to the full path (it is cheap there).
    ``start_width`` doubles while the metrics need more values, up to ``crossover`` × min(m, n).
    ``rounds``: power iterations per width. ``probes`` × ``steps``: the Lanczos quadrature of the tail.
    """

    min_side: int = 2048  # below it the full path is faster (bench/probes/adaptive_probe.py: 1024×8192 on an H200)
    start_width: int = 128
    crossover: float = 0.25
    rounds: int = 8
    warmup: int = 5  # power iterations before the first Rayleigh–Ritz round (bench-like ΔW then settle in one)
    probes: int = 32
    steps: int = 64  # Lanczos steps at a side of 4096 or less; more above it (steps_for)
    settled_relative: float = 1e-3  # a top value counts as converged (and deflates the tail) below this error
    deflation_angle: float = 1e-3  # ... and the span of those within this angle (sin) of the true one

    def steps_for(self, side: int) -> int:
        """Lanczos steps for a tail whose operator is side×side: ``steps`` up to 4096, then ∝ √side in
        multiples of 32 (8192: 96, 16384: 128). The quadrature's bias on square noisy deltas grows with
        the side at a fixed step count: −0.27 % at 4096² and −0.58 % at 8192² with 64 steps, −0.30 %
        at 8192² with 96 (fp64 truth, bench.probes.tail_quadrature, bench/measured/2026-11-29-dev-vm)."""
        scaled = self.steps * math.sqrt(max(side, 1) / 4096)
        return max(self.steps, 32 * math.ceil(scaled / 32 - 1e-9))


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


def crossing(values: np.ndarray, target: float) -> int | None:
    """Smallest k with Σ_{i≤k} values² ≥ target (a few ulps of slack), None when the values never get there."""
    if target <= 0.0:
        return 0
    cumulative = np.cumsum(values * values)
    goal = target * (1.0 - 4 * np.finfo(np.float64).eps)
    if cumulative.size == 0 or cumulative[-1] < goal:
        return None
    return int(np.searchsorted(cumulative, goal, side="left") + 1)


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
                      seed: int = 0) -> tuple[Spectrum | None, str]:
    """The top of ΔW's spectrum grown until rank@X (and signal_rank@X) for ``fractions`` are settled.

    Returns (spectrum, "") or (None, why) when the full path should run instead: the matrix is
    small, or a metric needs more values than ``plan.crossover`` of min(m, n).
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
            return _partial(iteration, block, shape, noise, delta_energy, plan, seed), ""
        start = iteration.right_vectors()
        width *= 2
    return None, f"{verdict.reason} needs more than {plan.crossover:g}·min(m, n) singular values"


def _partial(iteration: SubspaceIteration, block: RitzBlock, shape: tuple[int, int], noise: StorageNoise | None,
             energy: float, plan: AdaptivePlan, seed: int) -> PartialSpectrum:
    """A :class:`PartialSpectrum` from a settled block: floors, counts, signal values and the tail's sums."""
    values = block.values.copy()
    sigma_max = float(values[0])
    method_floor = method_noise_floor(sigma_max, shape, "gram", torch.float32)
    trusted = block.width - max(8, block.width // 8)
    deflated = deflatable(block, plan.settled_relative, plan.deflation_angle)
    tail_energy = energy - float(np.sum(values[:deflated] ** 2))
    tail = None
    if tail_energy > unresolved_threshold(shape, sigma_max, torch.float32):
        tail = start_tail_sums(iteration.matrix, iteration.left_vectors(deflated), sigma_max, plan.probes,
                               plan.steps_for(min(shape)),
                               seed + 1, padded_width=block.width)
    else:  # the rest is rounding of an (exactly) low-rank ΔW: drop it as the full path does
        values[values <= method_floor] = 0.0
        tail_energy = 0.0
    matters = rounding_matters(noise, method_floor, energy)
    storage = STORAGE_FLOOR_SAFETY * noise.spectral_edge if noise is not None else 0.0
    bounds: dict[str, int] = {}
    rank_count = count_above(block, max(method_floor, storage), trusted)
    if rank_count is None:
        bounds["rank"] = int(np.count_nonzero(values > max(method_floor, storage)))
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
