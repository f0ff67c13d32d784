"""Rank selection and factor splitting, by construction: no files, no models."""

import itertools
import math

import numpy as np
import pytest
import torch

from deltakit.errors import DeltakitError
from deltakit.lora import RankChoice, allocate_budget, energy_rank, kept_energy, svd_factors, total_squared_error
from deltakit.lora.factors import reconstruction_error, split_singular_values
from deltakit.pairing import TensorPair


def brute_force(spectra, costs, budget, caps):
    """The exact optimum: every rank combination within the budget."""
    best, best_ranks = math.inf, None
    for ranks in itertools.product(*[range(c + 1) for c in caps]):
        if sum(r * c for r, c in zip(ranks, costs)) <= budget:
            error = total_squared_error(spectra, ranks)
            if error < best - 1e-12:
                best, best_ranks = error, ranks
    return best, best_ranks


def random_problem(rng, matrices, max_len, equal_costs):
    spectra, costs = [], []
    for _ in range(matrices):
        length = int(rng.integers(1, max_len + 1))
        s = np.sort(rng.gamma(0.7, size=length))[::-1] * rng.uniform(0.2, 3.0)
        spectra.append(s)
        costs.append(6 if equal_costs else int(rng.integers(2, 12)))
    return spectra, costs, [len(s) for s in spectra]


def greedy_breakpoints(spectra, costs):
    """Costs at which the strict-prefix greedy stops exactly (item prefixes in value-per-cost order)."""
    items = sorted(((s * s / c, c) for spectrum, c in zip(spectra, costs) for s in spectrum if s > 0),
                   key=lambda t: -t[0])
    return list(itertools.accumulate(c for _, c in items))


def test_budget_is_exactly_optimal_when_costs_are_equal():
    rng = np.random.default_rng(0)
    for trial in range(40):
        spectra, costs, caps = random_problem(rng, 3, 4, equal_costs=True)
        for budget in range(0, 6 * sum(caps) + 7, 5):
            ranks = allocate_budget(spectra, costs, budget, caps)
            assert sum(r * c for r, c in zip(ranks, costs)) <= budget
            optimum, _ = brute_force(spectra, costs, budget, caps)
            assert total_squared_error(spectra, ranks) == pytest.approx(optimum, rel=1e-12, abs=1e-12), (trial, budget)


def test_budget_is_exactly_optimal_at_greedy_breakpoints():
    rng = np.random.default_rng(1)
    for trial in range(40):
        spectra, costs, caps = random_problem(rng, 3, 4, equal_costs=False)
        for budget in greedy_breakpoints(spectra, costs):
            ranks = allocate_budget(spectra, costs, budget, caps)
            optimum, _ = brute_force(spectra, costs, budget, caps)
            assert total_squared_error(spectra, ranks) == pytest.approx(optimum, rel=1e-12, abs=1e-12), (trial, budget)


def test_budget_between_breakpoints_is_within_one_singular_value_of_optimal():
    """The docstring's bound: greedy error − optimal error < σ² of the first item the greedy could not afford."""
    rng = np.random.default_rng(2)
    worst_gap = 0.0
    for trial in range(60):
        spectra, costs, caps = random_problem(rng, 3, 4, equal_costs=False)
        largest = max(float(np.max(s)) ** 2 for s in spectra)
        for budget in range(0, max(costs) * sum(caps) + 1, 3):
            ranks = allocate_budget(spectra, costs, budget, caps)
            assert sum(r * c for r, c in zip(ranks, costs)) <= budget
            optimum, _ = brute_force(spectra, costs, budget, caps)
            gap = total_squared_error(spectra, ranks) - optimum
            assert -1e-12 <= gap <= largest + 1e-12, (trial, budget)
            worst_gap = max(worst_gap, gap)
    assert worst_gap > 0  # the greedy is not always optimal: see the next test


def test_greedy_is_not_optimal_for_every_budget():
    """0/1 knapsack in disguise: one singular value per matrix, unequal costs."""
    spectra = [np.array([math.sqrt(6.0)]), np.array([math.sqrt(4.9)]), np.array([math.sqrt(4.9)])]
    costs, budget = [6, 5, 5], 10
    ranks = allocate_budget(spectra, costs, budget)
    optimum, best = brute_force(spectra, costs, budget, [1, 1, 1])
    assert ranks == [1, 0, 0] and best == (0, 1, 1)
    assert total_squared_error(spectra, ranks) - optimum == pytest.approx(3.8)


def test_budget_beats_uniform_ranks_on_uneven_spectra():
    """Same parameter count, lower total squared error, when spectra decay at different speeds."""
    dims = [(64, 64), (64, 128), (32, 64), (128, 64)]
    spectra = [np.exp(-np.arange(min(d)) / tau) * scale for d, tau, scale in
               zip(dims, [1.0, 20.0, 3.0, 60.0], [5.0, 1.0, 2.0, 0.5])]
    costs = [sum(d) for d in dims]
    for uniform in (2, 4, 8):
        budget = uniform * sum(costs)
        ranks = allocate_budget(spectra, costs, budget)
        assert sum(r * c for r, c in zip(ranks, costs)) <= budget
        assert total_squared_error(spectra, ranks) < 0.9 * total_squared_error(spectra, [uniform] * len(dims))
        assert len(set(ranks)) > 1


def test_budget_respects_caps_and_skips_zero_singular_values():
    spectra = [np.array([3.0, 2.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0])]
    ranks = allocate_budget(spectra, [4, 4], budget=1000, caps=[4, 2])
    assert ranks == [2, 2]
    assert allocate_budget(spectra, [4, 4], budget=3) == [0, 0]


def test_energy_rank_and_kept_energy():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 0.5, cap=4) == 1
    assert energy_rank(s, 0.9, cap=4) == 2
    assert energy_rank(s, 1.0, cap=4) == 3
    assert energy_rank(s, 1.0, cap=2) == 2
    assert kept_energy(s, 2) == pytest.approx(13 / 14)
    assert energy_rank(np.zeros(3), 0.9, cap=3) == 0


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"rank": 4, "energy": 0.9}, "exactly one"),
    ({"rank": 0}, "rank must be at least 1, got 0"),
    ({"rank": -3}, "rank must be at least 1"),
    ({"rank": 2.5}, "whole number"),
    ({"energy": 0.0}, "outside (0, 1]"),
    ({"energy": 1.5}, "outside (0, 1]"),
    ({"energy": float("nan")}, "outside (0, 1]"),
    ({"budget": 0}, "budget must be at least 1"),
    ({"rank": 4, "max_rank": 0}, "max-rank must be at least 1"),
])
def test_rank_choice_refuses_bad_values(kwargs, message):
    with pytest.raises(DeltakitError, match=None) as info:
        RankChoice(**kwargs)
    assert message in str(info.value)


def test_rank_choice_caps():
    assert RankChoice(rank=8).cap((64, 16)) == 16
    assert RankChoice(energy=0.9, max_rank=4).cap((64, 16)) == 4
    assert RankChoice(budget=100).needs_spectra and not RankChoice(rank=2).needs_spectra


def slowly_decaying(m, n, decay, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=generator, dtype=torch.float64))
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** (-decay)
    return ((u * s) @ v.T).float(), s


@pytest.mark.parametrize("decay", [0.05, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("rank", [4, 32, 96])
def test_randomized_factors_within_one_percent_of_exact(decay, rank):
    matrix, s = slowly_decaying(384, 256, decay)
    optimum = float(s[rank:].pow(2).sum().sqrt())
    exact = svd_factors(matrix, rank, exact=True)
    randomized = svd_factors(matrix, rank, exact=False, seed=3)
    exact_error = reconstruction_error(matrix, exact)
    randomized_error = reconstruction_error(matrix, randomized)
    assert exact_error == pytest.approx(optimum, rel=1e-3)
    assert randomized_error <= 1.01 * exact_error, (randomized_error / exact_error)
    assert randomized.b.shape == (384, rank) and randomized.a.shape == (rank, 256)


def test_randomized_factors_are_seeded():
    matrix, _ = slowly_decaying(128, 96, 0.3)
    first, again = svd_factors(matrix, 8, seed=5), svd_factors(matrix, 8, seed=5)
    assert torch.equal(first.b, again.b) and torch.equal(first.a, again.a)


def test_singular_values_split_evenly():
    matrix, _ = slowly_decaying(48, 40, 0.5)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    factors = split_singular_values(u[:, :6], s[:6], vh[:6])
    torch.testing.assert_close(factors.b @ factors.a, (u[:, :6] * s[:6]) @ vh[:6])
    # balanced: each factor carries √σ, so column norms of B equal row norms of A
    torch.testing.assert_close(factors.b.norm(dim=0), factors.a.norm(dim=1))
    torch.testing.assert_close(factors.b.norm(dim=0) ** 2, s[:6])


def test_exact_low_rank_is_recovered_and_oriented():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 3, generator=generator) @ torch.randn(3, 40, generator=generator)
    for kind in ("linear", "conv1d", "embedding"):
        pair = TensorPair(name="w", base_name="w", shape=(24, 40), base_dtype=torch.float32, ft_dtype=torch.float32,
                          module_type="embed" if kind == "embedding" else "x", layer=None, layout=kind,
                          transposed=kind != "linear")
        oriented = pair.to_out_in(delta)
        factors = svd_factors(oriented, 3)
        rebuilt = factors.b @ factors.a
        stored = rebuilt if kind == "linear" else rebuilt.T
        torch.testing.assert_close(stored, delta, atol=1e-4, rtol=1e-4)
