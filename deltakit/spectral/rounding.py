"""Which side of a same-dtype pair was rounded: the fine-tune alone (one-sided) or both (two-sided).

Two workflows store a pair on one grid (docs/metrics.md, "storage noise"):

* **one-sided**: the fine-tune was trained from the *stored* base and saved once, W_ft = round(W_base + δ)
  with W_base exactly on the grid. In grid steps u, ΔW/u = round(t), t = δ/u: rounding variance u²/12
  where |δ| ≫ u, and below half a step the update is erased (ΔW = 0).
* **two-sided**: both were rounded from unrounded weights (a vendor's base and instruct models cast from
  fp32 masters), W_base = round(w), W_ft = round(w + δ): the base's position within its cell is uniform,
  ΔW/u ∈ {⌊t⌋, ⌈t⌉} with E|ΔW| = |δ| exactly (dithered rounding), variance u²·φ(1 − φ) → u²/6.

The two are told apart where the grid step is coarse against the update: there a two-sided ΔW keeps its
mean absolute value, E|ΔW| = E|δ| at every step size, while a one-sided one shrinks,
E|ΔW| = E[u·|round(δ/u)|] → 0 as u grows. :class:`RoundingSums` gathers, in units of each entry's update
scale ŝ (:class:`~deltakit.spectral.noise.UpdateScale`), a histogram of |ΔW|/ŝ against u/ŝ;
:func:`decide_rounding` takes the distribution of |δ|/ŝ from the entries whose step is fine (u ≤ ŝ/8,
where ΔW ≈ δ under either model), predicts the mean |ΔW|/ŝ of the coarse-step entries (u ≥ ŝ) under
each model, and keeps the one closer to what is observed. The test assumes δ independent of where the
base sits in its binade; it needs entries of both kinds. Where the predictions do not differ by more
than the sampling noise (every step fine against the update: a large update, whose rounding share is
small either way) the model is "between": the geometric mean of the two variances, within √2 of either.

Example::

    sums = RoundingSums(device); sums.add(delta, step, scale)
    sides, why = decide_rounding(sums, "auto")
"""

from __future__ import annotations

import math

import numpy as np
import torch

ROUNDING_CHOICES = ("auto", "one-sided", "two-sided")
SIDES = ("one-sided", "two-sided", "between")
LOG2_LOW, LOG2_HIGH = -12.0, 8.0  # |ΔW|/ŝ and u/ŝ binned over 2⁻¹² … 2⁸ (clamped at both ends)
VALUE_BINS = 160  # eighth-binades of |ΔW|/ŝ: round(v/x) at bin centres is exact to ~4 %
STEP_BINS = 40  # half-binades of u/ŝ
FINE_STEP = 1.0 / 8.0  # u/ŝ at or below: ΔW ≈ δ under both models (rounding ≤ u/√6 ≈ 5 % of ŝ)
COARSE_STEP = 1.0  # u/ŝ at or above: the models' E|ΔW| differ by ≥ 10 % for a Gaussian δ
SEPARATION = 25.0  # Σ n (p₁ − p₂)² / var(|δ|/ŝ) at least this (5 standard errors) to decide
MIN_REFERENCE = 256  # fine-step entries needed for the distribution of |δ|/ŝ


def _bin(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Index of log₂(values) in ``bins`` equal bins over [LOG2_LOW, LOG2_HIGH), clamped; zeros go to bin 0."""
    scaled = (torch.log2(values.clamp_min(2.0 ** LOG2_LOW)) - LOG2_LOW) * (bins / (LOG2_HIGH - LOG2_LOW))
    return scaled.floor().clamp(0, bins - 1).long()


def _centres(bins: int) -> np.ndarray:
    return 2.0 ** (LOG2_LOW + (np.arange(bins) + 0.5) * (LOG2_HIGH - LOG2_LOW) / bins)


class RoundingSums:
    """Counts of (u/ŝ bin, |ΔW|/ŝ bin) and, per u/ŝ bin, Σ|ΔW|/ŝ, gathered a block at a time on the device."""

    def __init__(self, device: torch.device | str) -> None:
        self.counts = torch.zeros(STEP_BINS * (VALUE_BINS + 1), dtype=torch.float64, device=device)
        self.sums = torch.zeros(STEP_BINS, dtype=torch.float64, device=device)

    def add(self, delta: torch.Tensor, step: torch.Tensor, scale: torch.Tensor) -> None:
        """Entries of ΔW with their grid steps and update scales (same shape); entries of zero scale are left out."""
        keep = scale > 0
        if not bool(keep.all()):
            delta, step, scale = delta[keep], step[keep], scale[keep]
        value = delta.abs() / scale
        step_bin = _bin(step / scale, STEP_BINS)
        value_bin = torch.where(value > 0, _bin(value, VALUE_BINS) + 1, torch.zeros_like(step_bin))  # 0: ΔW = 0
        self.counts += torch.bincount((step_bin * (VALUE_BINS + 1) + value_bin).flatten(),
                                      minlength=self.counts.numel()).double()
        self.sums += torch.bincount(step_bin.flatten(), weights=value.flatten().double(), minlength=STEP_BINS)


def one_sided_mean(values: np.ndarray, weights: np.ndarray, step: float) -> float:
    """E[x·|round(v/x)|] over |δ|/ŝ = ``values`` (with ``weights``) at u/ŝ = ``step``: one-sided E|ΔW|/ŝ."""
    return float(np.sum(weights * step * np.round(values / step)) / np.sum(weights))


def decide_rounding(sums: RoundingSums, requested: str = "auto") -> tuple[str, str]:
    """The rounding model of one matrix and why: ``requested`` where it is not "auto", else the test above."""
    if requested != "auto":
        return requested, f"--rounding {requested}"
    counts = sums.counts.reshape(STEP_BINS, VALUE_BINS + 1).cpu().numpy()
    totals, observed = counts.sum(axis=1), sums.sums.cpu().numpy()
    steps, values = _centres(STEP_BINS), np.concatenate([[0.0], _centres(VALUE_BINS)])
    reference = counts[steps <= FINE_STEP].sum(axis=0)
    if reference.sum() < MIN_REFERENCE:
        return "between", "too few entries with a grid step well under the update to tell one side from two"
    mean = float(np.sum(reference * values) / reference.sum())
    variance = float(np.sum(reference * (values - mean) ** 2) / reference.sum())
    coarse = [b for b in range(STEP_BINS) if steps[b] >= COARSE_STEP and totals[b] > 0]
    one = {b: one_sided_mean(values, reference, steps[b]) for b in coarse}
    separation = sum(totals[b] * (one[b] - mean) ** 2 for b in coarse) / max(variance, 1e-300)
    entries = int(sum(totals[b] for b in coarse))
    if separation < SEPARATION:
        return "between", (f"{entries} entries with a grid step at or above the update: too few to tell one side "
                           "from two (the geometric mean of both variances)")
    seen = sum(observed[b] for b in coarse) / entries
    predicted_one = sum(totals[b] * one[b] for b in coarse) / entries
    one_error = sum(totals[b] * (observed[b] / totals[b] - one[b]) ** 2 for b in coarse)
    two_error = sum(totals[b] * (observed[b] / totals[b] - mean) ** 2 for b in coarse)
    sides = "one-sided" if one_error < two_error else "two-sided"
    return sides, (f"mean |ΔW| on {entries} entries with a grid step at or above the update: {seen / mean:.2f} of the "
                   f"update's (one-sided rounding predicts {predicted_one / mean:.2f}, two-sided 1.00)")


def between(one: float, two: float) -> float:
    """The "between" model's value of a variance (or energy) the two models put at ``one`` and ``two``."""
    return math.sqrt(one * two)
