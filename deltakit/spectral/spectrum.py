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
from typing import Sequence

import numpy as np
import torch

from deltakit.errors import DeltakitError
from deltakit.spectral import metrics
from deltakit.spectral.noise import StorageNoise
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.svd import gram_singular_values, method_noise_floor, randomized_svd, singular_values

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
    refined: bool = False  # the fp32 Gram path could not resolve the data's floor: the values are a wider solve's

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
        return metrics.crossing(self.signal, fraction * self.signal_energy)

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


def build_spectrum(values: np.ndarray | torch.Tensor | None, shape: tuple[int, int], method: str, floor_kind: str,
                   noise: StorageNoise | None = None, delta_energy: float | None = None,
                   dtype: torch.dtype = torch.float32, gram: torch.Tensor | None = None,
                   refined: bool = False) -> Spectrum:
    """The one way to a :class:`Spectrum`: from computed singular values, or from a Gram matrix G = ΔWᵀΔW
    (``gram``; its eigenvalues are their squares), with the method's floor applied and the signal estimated.

    ``method`` names the path in reports ("gram", "exact", "gram-blocked", "factor-space"); ``floor_kind``
    ("gram" or "exact") says how far its values are resolved (:func:`~deltakit.spectral.svd.method_noise_floor`
    in ``dtype``). ``delta_energy`` is ‖ΔW‖²_F measured directly (default: Σσ² of the resolved values); a
    zero ΔW gives the all-zero spectrum. ``refined``: the values come from :func:`refined_values` (a wider
    solve than ``method`` names), resolved to the data's floor; ``floor_kind`` is then "exact".
    """
    if gram is not None:
        values = gram_singular_values(gram)
    raw = metrics.as_sorted_spectrum(values if values is not None else np.zeros(0))
    if delta_energy == 0.0 or not raw.size or raw[0] <= 0.0:
        return zero_spectrum(shape, method, noise)
    method_floor = method_noise_floor(float(raw[0]), shape, floor_kind, dtype)
    resolved = raw.copy()
    resolved[resolved <= method_floor] = 0.0
    resolved_energy = float(np.sum(resolved * resolved))
    energy = resolved_energy if delta_energy is None else delta_energy
    unresolved = unresolved_values(raw, method_floor, energy, resolved_energy,
                                   unresolved_threshold(shape, float(raw[0]), dtype))
    if not rounding_matters(noise, method_floor, energy):
        return Spectrum(resolved, shape, method, method_floor, noise, resolved.copy(), energy, energy, unresolved,
                        refined)
    signal = debiased_values(resolved, shape, noise.rms, noise.spectral_edge)
    signal_energy = max(energy - noise.energy, float(np.sum(signal * signal)))
    return Spectrum(resolved, shape, method, method_floor, noise, signal, signal_energy, energy, unresolved, refined)


def zero_spectrum(shape: tuple[int, int], method: str, noise: StorageNoise | None = None) -> Spectrum:
    """The spectrum of a zero ΔW: min(m, n) zeros, every metric 0."""
    zeros = np.zeros(min(shape))
    return Spectrum(zeros, shape, method, 0.0, noise, zeros.copy(), 0.0, 0.0)


def compute_spectrum(matrix: torch.Tensor, options: SpectralOptions, noise: StorageNoise | None = None,
                     delta_energy: float | None = None, resolve: bool = False) -> Spectrum:
    """All singular values of ``matrix`` (m×n, on its device) by ``options``, as a :class:`Spectrum`.

    ``resolve``: where the Gram path cannot tell the data's values from its own rounding (its floor lies
    above :func:`resolution_floor`), refine: the band is certified empty (:func:`tail_below`) or the
    values are recomputed by :func:`refined_values`, so that the numerical rank is exact at the data's floor.
    """
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    values = singular_values(matrix, options.method, options.dtype)
    spectrum = build_spectrum(values, shape, method_name(options), options.method, noise, delta_energy, options.dtype)
    if not resolve or not unresolved_band(spectrum, options.dtype):
        return spectrum
    floor = resolution_floor(spectrum, options.dtype)
    count = int(np.count_nonzero(spectrum.values))
    if not band_shows_values(metrics.as_sorted_spectrum(values), spectrum) and tail_below(matrix, count, floor,
                                                                                          options.dtype):
        return spectrum
    return build_spectrum(refined_values(matrix, options.dtype), shape, method_name(options), "exact", noise,
                          delta_energy, options.dtype, refined=True)


GRAM_NOISE_SHARE = 0.25
"""The fp32 Gram path's own noise values sit at ≤ 2·√eps·σ₁, an eighth of its floor (tests/test_spectral.py):
a computed value above this share of the floor is the data's."""


def resolution_floor(spectrum: Spectrum, dtype: torch.dtype) -> float:
    """The data's own floor: below it a value is rounding of ΔW as held in ``dtype`` (the exact SVD's
    max(m, n)·eps·σ₁) or of the checkpoints (:attr:`Spectrum.storage_floor`)."""
    sigma_max = float(spectrum.values[0]) if spectrum.values.size else 0.0
    return max(method_noise_floor(sigma_max, spectrum.shape, "exact", dtype), spectrum.storage_floor)


def unresolved_band(spectrum: Spectrum, dtype: torch.dtype) -> bool:
    """Whether the method's floor lies above the data's: values between the two are not resolved."""
    return spectrum.total_energy > 0 and not spectrum.refined and spectrum.method_floor > resolution_floor(spectrum,
                                                                                                           dtype)


def band_shows_values(raw: np.ndarray, spectrum: Spectrum) -> bool:
    """Whether the computed values show the data under the method's floor: measured energy there beyond the
    method's rounding (:func:`unresolved_values`), or a value above :data:`GRAM_NOISE_SHARE` of the floor."""
    floor = spectrum.method_floor
    return spectrum.unresolved.size > 0 or bool(np.any((raw > GRAM_NOISE_SHARE * floor) & (raw <= floor)))


def tail_below(matrix: torch.Tensor, count: int, floor: float, dtype: torch.dtype) -> bool:
    """Whether σ_{count+1}(M) ≤ ``floor``, certified by ‖M(I − VᵀV)‖_F ≤ ``floor`` for V (count×n) the top
    right singular vectors of a randomized SVD: for any orthonormal V, σ_{count+1}(M) ≤ ‖M(I − VᵀV)‖₂ ≤ that
    norm (Eckart–Young). Cheap (O(m·n·count)) where ΔW is (nearly) exactly low-rank, as a merged LoRA is;
    False where ``count`` is too large for the sketch to pay (a quarter of min(m, n)) or the rest is larger.
    """
    if not worth_certifying(count, matrix.shape):
        return False
    held = matrix.to(dtype)
    _, _, vh = randomized_svd(held, count, dtype=dtype)
    return outside_norm(held, vh.T) <= floor


def worth_certifying(count: int, shape: Sequence[int]) -> bool:
    """Whether a count is small enough for :func:`outside_norm`'s O(m·n·count) certificate to pay: a quarter of
    min(m, n) at most (:func:`tail_below`, the adaptive path's ``certified_count``)."""
    return count <= min(shape) // 4


def outside_norm(matrix: torch.Tensor, right: torch.Tensor) -> float:
    """‖M(I − VVᵀ)‖_F for V (n×k) with orthonormal columns, in ``matrix``'s dtype summed in float64: for any such
    V it bounds σ_{k+1}(M) from above (Eckart–Young), so a small value certifies a count of k."""
    rest = matrix - (matrix @ right) @ right.T
    return float(torch.linalg.vector_norm(rest, dtype=torch.float64))


def refined_values(matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The singular values of ``matrix`` resolved to the exact SVD's floor in ``dtype``: from the float64 Gram
    matrix where ``dtype`` is float32 (its floor, 16·√eps₆₄·σ₁ = 2.4e-7·σ₁, is under max(m, n)·eps₃₂·σ₁), by
    the float64 SVD otherwise."""
    if dtype == torch.float32:
        return singular_values(matrix, "gram", torch.float64)
    return singular_values(matrix, "exact", torch.float64)


def require_finite(name: str, *norms: float) -> None:
    """A tensor holding inf / nan has no defined ΔW: one clear error, not a failed SVD or a nan in a report."""
    if not all(math.isfinite(norm) for norm in norms):
        raise DeltakitError(f"{name}: the base or the fine-tune holds inf or nan values; its ΔW is not defined")
