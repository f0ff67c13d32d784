"""How many LoRA ranks each ΔW gets: a fixed rank, an energy fraction or a singular-value ratio per matrix,
or a global parameter budget.

Everything here is a pure function of spectra (1-D arrays of singular values) and matrix
costs; nothing reads files or touches a device.

Example::

    choice = RankChoice(budget=10_000, max_rank=64)
    ranks = allocate_budget([s_q, s_v], costs=[64 + 64, 64 + 32], budget=10_000, caps=[64, 32])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from deltakit.errors import DeltakitError
from deltakit.spectral.metrics import as_sorted_spectrum, rank_at_energy

MODES = ("rank", "energy", "budget", "ratio", "sv_ratio", "sv_fro", "sv_cumulative", "quantile")
# The dynamic rules of kohya-ss sd-scripts (resize_lora.py) and LyCORIS (extract_locon), beside ours.
KOHYA_RULES = ("sv_ratio", "sv_fro", "sv_cumulative", "quantile")


@dataclass(frozen=True)
class RankChoice:
    """Exactly one of ``rank``, ``energy``, ``budget`` or ``ratio``; ``max_rank`` clamps them all.

    rank: the same rank for every changed matrix (≥ 1).
    energy: per matrix, the smallest rank keeping this fraction of ‖ΔW‖_F² (in (0, 1]).
    budget: a total number of LoRA parameters, Σ r_i·(m_i + n_i), spent where it removes the
        most squared error (see :func:`allocate_budget`).
    ratio: per matrix, keep every σ_i ≥ ratio·σ_1 (in (0, 1]; see :func:`ratio_rank`).
    sv_ratio, sv_fro, sv_cumulative: kohya-ss sd-scripts' dynamic rules, quantile: LyCORIS's, each per
        matrix exactly as the tool computes it (see :func:`kohya_rank`).
    max_rank: no matrix gets more than this (≥ 1), whatever the mode.
    conv_rank, conv_energy: at most one; a fixed rank or an energy fraction for convolutions with a kernel
        larger than 1×1 (kohya-ss's conv_dim, LyCORIS's conv rank), which otherwise follow the rule of
        the linear layers; 1×1 convolutions always do, as in both tools (:meth:`of`).
    """

    rank: int | None = None
    energy: float | None = None
    budget: int | None = None
    max_rank: int | None = None
    ratio: float | None = None
    sv_ratio: float | None = None
    sv_fro: float | None = None
    sv_cumulative: float | None = None
    quantile: float | None = None
    conv_rank: int | None = None
    conv_energy: float | None = None

    def __post_init__(self) -> None:
        given = [name for name in MODES if getattr(self, name) is not None]
        if len(given) != 1:
            raise DeltakitError("give exactly one of --rank, --energy, --budget or --ratio (or kohya's --sv-ratio, "
                                "--sv-fro, --sv-cumulative, LyCORIS's --quantile)"
                                + (f" (got {', '.join('--' + g.replace('_', '-') for g in given)})" if given else ""))
        for name in KOHYA_RULES:
            value = getattr(self, name)
            if value is not None:
                _check_rule(name, float(value))
        if self.conv_rank is not None and self.conv_energy is not None:
            raise DeltakitError("give at most one of --conv-rank and --conv-energy")
        if self.conv_rank is not None:
            _check_positive_int("conv-rank", self.conv_rank)
        if self.conv_energy is not None:
            _check_fraction("conv-energy", self.conv_energy)
        if self.rank is not None:
            _check_positive_int("rank", self.rank)
        if self.budget is not None:
            _check_positive_int("budget", self.budget)
        if self.max_rank is not None:
            _check_positive_int("max-rank", self.max_rank)
        if self.energy is not None:
            _check_fraction("energy", self.energy)
        if self.ratio is not None:
            ratio = float(self.ratio)
            if math.isnan(ratio) or not 0.0 < ratio <= 1.0:
                hint = f" (kohya's sv_ratio {ratio:g} is --ratio {1 / ratio:.6g})" if ratio > 1 else ""
                raise DeltakitError(f"ratio {self.ratio:g} is outside (0, 1]; use e.g. --ratio 0.1{hint}")

    @property
    def mode(self) -> str:
        """"rank", "energy", "budget" or "ratio"."""
        return next(name for name in MODES if getattr(self, name) is not None)

    @property
    def needs_spectra(self) -> bool:
        """Energy, budget and ratio choose ranks from every singular value, so they need a first pass
        (for some matrices at least: the convolutions' rule may differ)."""
        return self.mode != "rank" or self.conv_energy is not None

    def of(self, convolution: bool) -> "RankChoice":
        """The rule of one matrix: the convolutions' (``conv_rank`` / ``conv_energy``) for a convolution with a
        kernel larger than 1×1 when one is given, else this choice's own; ``max_rank`` clamps both."""
        if convolution and (self.conv_rank is not None or self.conv_energy is not None):
            return RankChoice(rank=self.conv_rank, energy=self.conv_energy, max_rank=self.max_rank)
        if self.conv_rank is None and self.conv_energy is None:
            return self
        return RankChoice(**{name: getattr(self, name) for name in (*MODES, "max_rank")})

    def cap(self, shape: tuple[int, int]) -> int:
        """The largest rank a matrix of ``shape`` may get: min(m, n), clamped by max_rank."""
        cap = min(shape)
        return cap if self.max_rank is None else min(cap, self.max_rank)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"mode": self.mode, "rank": self.rank, "energy": self.energy, "budget": self.budget,
                                  "ratio": self.ratio, "max_rank": self.max_rank}
        out.update({name: getattr(self, name) for name in (*KOHYA_RULES, "conv_rank", "conv_energy")
                    if getattr(self, name) is not None})
        return out

    def matrix_rank(self, spectrum: Sequence[float] | np.ndarray, cap: int) -> int:
        """The rank a per-matrix mode (energy, ratio, kohya's and LyCORIS's rules) gives one spectrum."""
        if self.mode == "energy":
            return energy_rank(spectrum, self.energy, cap)  # type: ignore[arg-type]
        if self.mode == "ratio":
            return ratio_rank(spectrum, self.ratio, cap)  # type: ignore[arg-type]
        return kohya_rank(spectrum, self.mode, float(getattr(self, self.mode)), cap)


def _check_fraction(name: str, value: float) -> None:
    if math.isnan(float(value)) or not 0.0 < float(value) <= 1.0:
        raise DeltakitError(f"{name} {value:g} is outside (0, 1]; use e.g. --{name} 0.9")


def _check_rule(name: str, value: float) -> None:
    if name == "sv_ratio":
        if math.isnan(value) or value < 1.0:
            raise DeltakitError(f"sv-ratio {value:g} is below 1; kohya's sv_ratio T keeps σ_i > σ_1 / T (e.g. --sv-ratio 4)")
    elif math.isnan(value) or not 0.0 < value <= 1.0:
        raise DeltakitError(f"{name.replace('_', '-')} {value:g} is outside (0, 1]; use e.g. --{name.replace('_', '-')} 0.9")


def kohya_rank(spectrum: Sequence[float] | np.ndarray, rule: str, param: float, cap: int) -> int:
    """The rank kohya-ss sd-scripts or LyCORIS gives a matrix of singular values σ_1 ≥ … ≥ σ_n, clamped to ``cap``.

    With c_k = Σ_{i≤k} σ_i / Σ_i σ_i (the cumulative sum of σ, not of σ²) and e_k = Σ_{i≤k} σ_i² / Σ_i σ_i²:

    * ``sv_ratio`` T (sd-scripts ``resize_lora.py``, ``index_sv_ratio``): #{i : σ_i > σ_1 / T}, at least 1;
      the same count as ``ratio`` 1/T except for a σ exactly on the boundary.
    * ``sv_fro`` t (``index_sv_fro``): the smallest k with e_k ≥ t², i.e. ``energy`` t²: kohya's t is a
      fraction of ‖ΔW‖_F, ours of ‖ΔW‖_F².
    * ``sv_cumulative`` t (``index_sv_cumulative``): the smallest k with c_k ≥ t.
    * ``quantile`` q (LyCORIS ``extract_linear`` / ``extract_conv``, mode "quantile"): #{k : c_k < q}, at
      least 1: one less than sv_cumulative's k at the same parameter (LyCORIS also stores a module whole when
      this reaches half the output size; deltakit keeps it a LoRA).

    All give n at most, and sd-scripts gives a zero matrix (σ_1 ≤ 1e-6) rank 1: here a zero matrix gets 0
    (it has nothing to keep; extract leaves unchanged matrices out before any rule).
    """
    s = as_sorted_spectrum(spectrum)
    if s.size == 0 or s[0] <= 0:
        return 0
    if rule == "sv_ratio":
        count = int(np.count_nonzero(s > s[0] / param))
    elif rule == "sv_fro":
        energy = np.cumsum(s * s) / float(np.sum(s * s))
        count = int(np.searchsorted(energy, param * param, side="left")) + 1
    elif rule == "sv_cumulative":
        count = int(np.searchsorted(np.cumsum(s) / float(np.sum(s)), param, side="left")) + 1
    elif rule == "quantile":
        count = int(np.count_nonzero(np.cumsum(s) < param * float(np.sum(s))))
    else:
        raise ValueError(f"unknown rule {rule!r}")
    return min(max(1, min(count, s.size)), cap)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DeltakitError(f"{name} must be a whole number, got {value!r}")
    if value <= 0:
        raise DeltakitError(f"{name} must be at least 1, got {value}")


def energy_rank(spectrum: Sequence[float] | np.ndarray, fraction: float, cap: int) -> int:
    """Smallest r with Σ_{i≤r} σ_i² ≥ fraction·Σ σ_i², clamped to ``cap`` (0 for a zero matrix)."""
    return min(rank_at_energy(spectrum, fraction), cap)


def ratio_rank(spectrum: Sequence[float] | np.ndarray, ratio: float, cap: int) -> int:
    """How many σ_i ≥ ratio·σ_1, clamped to ``cap`` (0 for a zero matrix).

    kohya-ss sd-scripts' ``resize_lora.py --dynamic_method sv_ratio --dynamic_param T`` keeps
    σ_i > σ_1 / T, so T = 1 / ratio; there a value exactly on the boundary is dropped and a
    zero matrix still gets rank 1, here the boundary value is kept and a zero matrix gets 0.
    """
    s = as_sorted_spectrum(spectrum)
    if s.size == 0 or s[0] <= 0:
        return 0
    return min(int(np.count_nonzero(s >= ratio * s[0])), cap)


def kept_energy(spectrum: Sequence[float] | np.ndarray, rank: int) -> float:
    """Σ_{i≤rank} σ_i² / Σ σ_i²: the share of ‖ΔW‖_F² a rank-``rank`` truncated SVD keeps (1 for a zero matrix)."""
    s = as_sorted_spectrum(spectrum)
    total = float(np.sum(s * s))
    return float(np.sum(s[:rank] ** 2) / total) if total > 0 else 1.0


def allocate_budget(
    spectra: Sequence[Sequence[float] | np.ndarray],
    costs: Sequence[int],
    budget: int,
    caps: Sequence[int] | None = None,
) -> list[int]:
    """Ranks r_i that minimise the total squared error Σ_i Σ_{j>r_i} σ_ij² under Σ_i r_i·c_i ≤ budget.

    ``spectra[i]`` are the singular values of matrix i, ``costs[i]`` = m_i + n_i is the number of
    LoRA parameters one rank of it costs (B gains a column of m, A a row of n), ``caps[i]`` bounds r_i.

    The algorithm is the greedy one: every (matrix i, rank j) is an item of value σ_ij² and
    weight c_i; items are taken in decreasing order of σ_ij² / c_i while they fit, and an item
    that does not fit blocks the rest of its matrix (they cost the same), smaller items of other
    matrices may still be taken.

    Why this is the right greedy. The truncated SVD makes the error of rank r_i exactly
    Σ_{j>r_i} σ_ij² (Eckart–Young), so the problem is separable: maximise the kept energy
    Σ_i F_i(r_i), F_i(r) = Σ_{j≤r} σ_ij², a knapsack over items (i, j) with the side condition
    that rank j of a matrix is taken only after ranks 1..j-1. Because σ_ij is non-increasing
    in j, the value per parameter σ_ij²/c_i is too, so sorting by it never puts rank j+1 of a
    matrix before rank j: the side condition holds for free, and F_i is concave.

    Optimality. (1) Let S be the items the greedy has taken before it meets the first item k
    that does not fit, and C = cost(S). The linear relaxation (items may be taken fractionally)
    at budget C is solved by taking items in decreasing value per cost: that is S, an integral
    solution, so S is optimal among *all* allocations costing at most C. In particular the
    greedy is exactly optimal whenever the budget lands on one of its breakpoints, and always
    when every matrix has the same cost m + n (then the items all weigh the same and the best
    ⌊budget/c⌋ of them are the largest σ²). (2) For a budget between breakpoints, the optimum
    is at most the relaxation's value at the full budget, which is at most value(S) + σ_k²;
    the greedy keeps at least value(S), so its total squared error exceeds the optimum by less
    than σ_k², the σ² of the first singular value it could not afford. Exact optimality for
    every budget cannot be had cheaply: with one non-zero singular value per matrix the problem
    *is* 0/1 knapsack (NP-hard); tests/test_surgery_ranks.py checks (1) and (2) against brute
    force and shows a case where the greedy is not optimal.
    """
    count = len(spectra)
    caps = [min(len(s), c) for s, c in zip(spectra, caps)] if caps is not None else [len(s) for s in spectra]
    if len(costs) != count or len(caps) != count:
        raise ValueError("spectra, costs and caps must have the same length")
    if any(c <= 0 for c in costs):
        raise ValueError("costs must be positive")
    values, owners, costs_of_items = [], [], []
    for i, (spectrum, cost, cap) in enumerate(zip(spectra, costs, caps)):
        s = as_sorted_spectrum(spectrum)[:cap]
        s = s[s > 0]  # a zero singular value removes no error: never worth a parameter
        values.append(s * s)
        owners.append(np.full(s.size, i))
        costs_of_items.append(np.full(s.size, cost, dtype=np.float64))
    ranks = [0] * count
    if not values or sum(v.size for v in values) == 0:
        return ranks
    value = np.concatenate(values)
    owner = np.concatenate(owners)
    weight = np.concatenate(costs_of_items)
    # Stable sort keeps each matrix's items in rank order when value/cost ties.
    order = np.argsort(-(value / weight), kind="stable")
    spent = np.cumsum(weight[order])
    prefix = int(np.searchsorted(spent, budget, side="right"))  # the strict-prefix greedy S
    for i in owner[order[:prefix]]:
        ranks[int(i)] += 1
    left = budget - (float(spent[prefix - 1]) if prefix else 0.0)
    blocked: set[int] = set()
    cheapest = float(np.min(weight))
    for item in order[prefix:]:  # fill: smaller items of other matrices may still fit
        if left < cheapest:
            break
        i = int(owner[item])
        if i in blocked:
            continue
        if weight[item] <= left:
            ranks[i] += 1
            left -= float(weight[item])
        else:
            blocked.add(i)
    return ranks


def total_squared_error(spectra: Sequence[Sequence[float] | np.ndarray], ranks: Sequence[int]) -> float:
    """Σ_i Σ_{j>r_i} σ_ij²: the total squared Frobenius error of rank-r_i truncated SVDs."""
    total = 0.0
    for spectrum, r in zip(spectra, ranks):
        s = as_sorted_spectrum(spectrum)
        total += float(np.sum(s[r:] ** 2))
    return total
