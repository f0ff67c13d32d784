"""Rank metrics against hand-computed values and a numpy float64 reference."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from deltakit.spectral import metrics
from deltakit.spectral.noise import storage_noise

from conftest import low_rank


def numpy_rank_at(s: np.ndarray, fraction: float) -> int:
    """Reference: smallest k with sum(s[:k]^2) >= fraction * sum(s^2), in exact rational arithmetic."""
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    squares = [Fraction(float(v)) ** 2 for v in s]
    target, running = Fraction(fraction) * sum(squares), Fraction(0)
    for k, square in enumerate(squares, start=1):
        running += square
        if running >= target:
            return k
    return len(s)


def test_rank_at_energy_hand_values():
    assert metrics.rank_at_energy([3.0, 2.0, 1.0, 0.0], 0.9) == 2  # 13/14 = 0.93
    assert metrics.rank_at_energy([3.0, 2.0, 1.0, 0.0], 0.95) == 3
    assert metrics.rank_at_energy([1.0, 1.0], 0.5) == 1  # an exact split stays at 1
    assert metrics.rank_at_energy([1.0, 1.0, 1.0, 1.0], 1.0) == 4
    assert metrics.rank_at_energy(np.zeros(5), 0.9) == 0


@pytest.mark.parametrize("seed", range(5))
def test_rank_at_energy_matches_float64_reference(seed):
    rng = np.random.default_rng(seed)
    s = np.abs(rng.standard_normal(200)) ** 3
    for fraction in (0.25, 0.5, 0.9, 0.99):
        assert metrics.rank_at_energy(s, fraction) == numpy_rank_at(s, fraction)


def test_rank_at_energy_rejects_bad_fraction():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            metrics.rank_at_energy([1.0], bad)


def test_stable_and_effective_rank():
    assert metrics.stable_rank([2.0, 1.0]) == pytest.approx(5 / 4)
    assert metrics.stable_rank([1.0] * 7) == pytest.approx(7.0)
    assert metrics.effective_rank([1.0] * 7) == pytest.approx(7.0)
    p = np.array([3.0, 1.0]) / 4
    assert metrics.effective_rank([3.0, 1.0]) == pytest.approx(math.exp(-np.sum(p * np.log(p))))
    assert metrics.stable_rank([0.0, 0.0]) == 0.0 and metrics.effective_rank([0.0]) == 0.0


def test_known_spectrum_matrix_metrics_exact():
    """A matrix built with singular values (5,4,3,2,1): every metric follows from them."""
    delta = low_rank(40, 30, 5)
    s = torch.linalg.svdvals(delta)
    assert metrics.numerical_rank(s, 1e-8) == 5
    assert metrics.stable_rank(s) == pytest.approx(55 / 25)
    assert metrics.rank_at_energy(s, 0.9) == numpy_rank_at(np.arange(5, 0, -1.0), 0.9) == 3  # 50/55


def test_marchenko_pastur_baseline_matches_sampled_gaussians():
    rng = np.random.default_rng(0)
    for shape in [(64, 64), (100, 300), (500, 120)]:
        for fraction in (0.5, 0.9, 0.99):
            sampled = [metrics.rank_at_energy(np.linalg.svd(rng.standard_normal(shape), compute_uv=False), fraction)
                       for _ in range(3)]
            predicted = metrics.random_rank_at_energy(shape, fraction)
            assert abs(predicted - np.mean(sampled)) <= max(1.5, 0.02 * predicted), (shape, fraction, sampled, predicted)


def test_unit_roundoff():
    assert metrics.unit_roundoff(torch.bfloat16) == 2.0**-8
    assert metrics.unit_roundoff(torch.float32) == 2.0**-24


def test_storage_noise_edge_bounds_measured_bf16_noise():
    """The storage floor (2 × the rounding's spectral edge) sits above the largest singular value that
    bf16 rounding alone puts into ΔW, and not far above it."""
    torch.manual_seed(0)
    for m, n in [(64, 64), (256, 128), (512, 1024)]:
        w = torch.randn(m, n, dtype=torch.float64) * 0.02
        ft = w.bfloat16().double()
        noise = ft - w  # storage rounding only (an fp64 base)
        largest = torch.linalg.svdvals(noise)[0].item()
        edge = storage_noise(w, noise, torch.float64, torch.bfloat16).spectral_edge
        assert largest < 2 * edge < 6 * largest, (m, n, largest, edge)
