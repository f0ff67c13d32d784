"""Rank metrics as pure functions of a spectrum (a 1-D array of singular values, any order).

Every function takes singular values ``s`` (numpy array or torch tensor, non-negative)
and returns a plain number; none touches a device or a file. Formulas are in
docs/metrics.md.

Example::

    s = np.array([3.0, 2.0, 1.0, 0.0])
    rank_at_energy(s, 0.9)   # -> 2 : 9+4 = 13 of 14 is >= 0.9
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]


def as_sorted_spectrum(s: ArrayLike) -> np.ndarray:
    """Singular values as a descending float64 numpy array, negatives (round-off) clipped to 0."""
    if isinstance(s, torch.Tensor):
        s = s.detach().to("cpu", torch.float64).numpy()
    arr = np.clip(np.asarray(s, dtype=np.float64).reshape(-1), 0.0, None)
    return np.sort(arr)[::-1]


def energy_curve(s: ArrayLike, total: float | None = None) -> np.ndarray:
    """Cumulative explained energy: entry k-1 is sum(s[:k]^2) / sum(s^2) (all zeros if s is 0).

    ``total``: ||Δ||_F^2 when ``s`` holds only the top values (a partial spectrum); the curve
    then ends below 1, at the share the computed values hold.
    """
    s = as_sorted_spectrum(s)
    sq = np.cumsum(s * s)
    if total is None:
        total = sq[-1] if sq.size else 0.0
    return sq / total if total > 0 else np.zeros_like(sq)


def lowrank_error_curve(s: ArrayLike, total: float | None = None) -> np.ndarray:
    """Entry k-1: ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F for the best rank-k ΔW_k, = sqrt(1 − energy_curve[k-1]) (Eckart–Young);
    ``total`` as for :func:`energy_curve`."""
    return np.sqrt(np.clip(1.0 - energy_curve(s, total), 0.0, None))


CROSSING_SLACK = 4 * float(np.finfo(np.float64).eps)


def crossing(values: ArrayLike, target: float) -> int | None:
    """Smallest k with Σ_{i≤k} values_i² ≥ ``target`` (values descending); 0 for a target ≤ 0, None when
    the values never get there. Every "rank that holds X of the energy" is decided here.

    A relative slack of a few ulps keeps an exact split (0.5 of two equal values) from being pushed
    one rank higher by rounding in the cumulative sum.
    """
    if target <= 0.0:
        return 0
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    cumulative = np.cumsum(values * values)
    goal = target * (1.0 - CROSSING_SLACK)
    if cumulative.size == 0 or cumulative[-1] < goal:
        return None
    return int(np.searchsorted(cumulative, goal, side="left") + 1)


def rank_at_energy(s: ArrayLike, fraction: float, total: float | None = None) -> int | None:
    """Smallest k whose top-k singular values hold ``fraction`` of ||Δ||_F^2 (0 for a zero matrix).

    The paper's "rank needed to explain 90% of the variance" is ``rank_at_energy(s, 0.9)``.
    ``total`` as for :func:`energy_curve`; None when the values given never hold ``fraction`` of it.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction}")
    s = as_sorted_spectrum(s)
    total = float(np.sum(s * s)) if total is None else total
    return crossing(s, fraction * total) if total > 0.0 else 0


def stable_rank(s: ArrayLike) -> float:
    """||Δ||_F^2 / ||Δ||_2^2: a rank that small singular values cannot inflate (0 for a zero matrix)."""
    s = as_sorted_spectrum(s)
    if s.size == 0 or s[0] == 0.0:
        return 0.0
    return float(np.sum(s * s) / (s[0] * s[0]))


def effective_rank(s: ArrayLike) -> float:
    """Entropy effective rank exp(H(p)), p_i = s_i / sum(s) (Roy & Vetterli, EUSIPCO 2007); 0 for a zero matrix."""
    s = as_sorted_spectrum(s)
    total = float(np.sum(s))
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(math.exp(-np.sum(p * np.log(p))))


def numerical_rank(s: ArrayLike, floor: float) -> int:
    """How many singular values are strictly above ``floor`` (an absolute threshold)."""
    s = as_sorted_spectrum(s)
    return int(np.count_nonzero(s > floor))


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff u = 2^-p of a floating dtype (half the distance from 1 to the next number)."""
    return float(torch.finfo(dtype).eps) / 2.0


def marchenko_pastur_spectrum(shape: tuple[int, int], grid: int = 20001) -> np.ndarray:
    """Expected squared singular values (descending, mean 1) of an m×n i.i.d. Gaussian matrix.

    Uses the Marchenko-Pastur law with aspect ratio c = min/max: the i-th largest of
    p = min(m, n) eigenvalues sits at the MP quantile 1 - (i - 1/2)/p. The density is
    integrated on x = a + (b - a)(1 - cos θ)/2, which tames its square-root edges.
    """
    p, q = sorted(int(d) for d in shape)
    if p <= 1:
        return np.ones(max(p, 0))
    c = p / q
    a, b = (1 - math.sqrt(c)) ** 2, (1 + math.sqrt(c)) ** 2
    theta = np.linspace(0.0, math.pi, grid)
    x = a + (b - a) * (1 - np.cos(theta)) / 2
    dx_dtheta = (b - a) * np.sin(theta) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.sqrt(np.clip((b - x) * (x - a), 0, None)) / (2 * math.pi * c * x)
    integrand = np.nan_to_num(density * dx_dtheta)
    cdf = np.concatenate([[0.0], np.cumsum((integrand[1:] + integrand[:-1]) / 2 * np.diff(theta))])
    cdf /= cdf[-1]
    quantiles = 1.0 - (np.arange(p) + 0.5) / p
    values = np.interp(quantiles, cdf, x)
    return values / values.mean()


def random_rank_at_energy(shape: tuple[int, int], fraction: float) -> int:
    """Rank needed to explain ``fraction`` of the energy of a Gaussian random matrix of ``shape``.

    The baseline of Biderman et al. (2024): a delta with no low-rank structure at all.
    """
    eigenvalues = marchenko_pastur_spectrum(shape)
    return rank_at_energy(np.sqrt(eigenvalues), fraction)
