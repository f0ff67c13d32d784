"""Paired statistics for notebook 02's claims: per-query differences pooled over seeds, a bootstrap
confidence interval, Wilcoxon's signed-rank test, and one verdict rule for every claim.

A claim compares two arms (full fine-tuning, LoRA) on the same queries. Each measure is a matrix of
per-query differences ``d[seed, query]``, oriented so that the claim predicts ``d > 0`` (claim 1,
"LoRA learns less": full's reciprocal rank − LoRA's on each held-out code query). The rule:

* **established** when the confidence interval of the mean difference lies wholly above 0;
* **contradicted** when it lies wholly below 0;
* **not established** otherwise (the interval includes 0).

A claim judged on several measures is established (or contradicted) only when every measure is;
measures that disagree leave it not established. Pure numpy/scipy functions, no files.

Example::

    import paired_stats
    test = paired_stats.paired_test(full_rr - lora_rr)      # (seeds, queries)
    test["verdict"]                                         # "established" / "contradicted" / "not established"
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

ESTABLISHED, CONTRADICTED, NOT_ESTABLISHED = "established", "contradicted", "not established"


def as_seed_matrix(differences: Sequence[float] | Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Per-query differences as a float64 (seeds, queries) matrix; a 1-D input is one seed."""
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim == 1:
        d = d[None, :]
    if d.ndim != 2 or d.shape[1] < 2 or not np.all(np.isfinite(d)):
        raise ValueError(f"need finite differences of shape (seeds, queries >= 2), got {d.shape}")
    return d


def bootstrap_ci(differences: Any, level: float = 0.95, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``d[seed, query]``, resampling both levels.

    Each replicate draws the queries with replacement (the same draw for every seed: the
    comparison stays paired) and the seeds with replacement, and takes the mean difference; so
    the interval is as wide as query sampling and seed-to-seed variation together make it
    (a two-level, "hierarchical" bootstrap; Efron & Tibshirani 1993, ch. 8).
    """
    d = as_seed_matrix(differences)
    seeds, queries = d.shape
    rng = np.random.default_rng(seed)
    query_counts = rng.multinomial(queries, np.full(queries, 1.0 / queries), size=resamples)  # (R, Q)
    per_seed = query_counts @ d.T / queries  # (R, S): each seed's mean over the resampled queries
    seed_counts = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=resamples)  # (R, S)
    means = (per_seed * seed_counts).sum(1) / seeds
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def wilcoxon_p(differences: Any) -> float | None:
    """Two-sided p of Wilcoxon's signed-rank test on the per-query differences averaged over seeds
    (zeros dropped, as Wilcoxon proposed); None when every difference is 0."""
    from scipy.stats import wilcoxon

    per_query = as_seed_matrix(differences).mean(0)
    if not np.any(per_query != 0):
        return None
    return float(wilcoxon(per_query, zero_method="wilcox", alternative="two-sided").pvalue)


def verdict(low: float, high: float) -> str:
    """The one rule: an interval wholly above 0 establishes the claim, wholly below contradicts it."""
    if low > 0:
        return ESTABLISHED
    if high < 0:
        return CONTRADICTED
    return NOT_ESTABLISHED


def combined_verdict(verdicts: Sequence[str]) -> str:
    """A claim judged on several measures: their verdict when all agree, else not established."""
    if not verdicts:
        raise ValueError("no measure to judge the claim on")
    return verdicts[0] if all(v == verdicts[0] for v in verdicts) else NOT_ESTABLISHED


def paired_test(differences: Any, level: float = 0.95, resamples: int = 4000, seed: int = 0) -> dict[str, Any]:
    """Everything the findings print about one measure: mean difference, per-seed means, the
    bootstrap interval, Wilcoxon's p, how many queries differ in each direction, and the verdict."""
    d = as_seed_matrix(differences)
    low, high = bootstrap_ci(d, level, resamples, seed)
    per_query = d.mean(0)
    return {
        "mean": float(d.mean()), "per_seed": [float(m) for m in d.mean(1)], "seeds": int(d.shape[0]),
        "queries": int(d.shape[1]), "level": level, "ci": [low, high], "wilcoxon_p": wilcoxon_p(d),
        "positive": int((per_query > 0).sum()), "negative": int((per_query < 0).sum()), "verdict": verdict(low, high),
    }
