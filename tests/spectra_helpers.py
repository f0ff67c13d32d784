"""Constructed matrices and report comparisons shared by the tests of the adaptive spectrum and the matrix
threads (tests/test_adaptive.py, tests/test_workers.py)."""

from __future__ import annotations

import numpy as np
import torch

from deltakit.spectral.noise import StorageNoise, storage_noise
from deltakit.spectral.options import AdaptivePlan

TEST_PLAN = AdaptivePlan(min_side=256, start_width=32, probes=16, steps=32)  # lets 768×512 take the adaptive path


def spectrum_matrix(m: int, n: int, sigma: np.ndarray, seed: int) -> torch.Tensor:
    """An m×n float32 matrix with singular values ``sigma`` and seeded random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(m, sigma.size, generator=gen))
    right, _ = torch.linalg.qr(torch.randn(n, sigma.size, generator=gen))
    return (left * torch.tensor(sigma, dtype=torch.float32)) @ right.T


def noisy_bf16_pair(seed: int = 2, noise_rms: float = 2e-4, shape: tuple[int, int] = (768, 512)
                    ) -> tuple[torch.Tensor, StorageNoise]:
    """ΔW of a bf16 base and fine-tune (fast-decaying update, dense noise, both sides rounded to bf16)
    and its storage-noise model."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    weight = torch.randn(m, n, generator=gen) * 0.02
    update = spectrum_matrix(m, n, 0.5 * np.arange(1, 65) ** -1.2, seed)
    update += noise_rms * torch.randn(m, n, generator=gen)
    base, ft = weight.bfloat16(), (weight + update).bfloat16()
    delta = ft.float() - base.float()
    return delta, storage_noise(base, delta, torch.bfloat16, torch.bfloat16)


def comparable(report) -> dict:
    """A report's JSON without its elapsed time: what must not depend on the thread count."""
    data = report.to_dict()
    data.pop("elapsed_s", None)
    return data


def spectrum_paths_agree(adaptive: list[dict], full: list[dict], tolerance: float = 0.01) -> dict[str, object]:
    """Per matrix, the adaptive report against --full-spectrum's, by issue 17's definition of equal:
    rank_at the same (±1 counted apart), stable rank to 1e-4 relative, effective rank to ``tolerance``,
    signal_rank_at the same, numerical rank the same or a lower bound at most it."""
    by_name = {m["name"]: m for m in full}
    counts = {"matrices": 0, "adaptive": 0, "rank_at_equal": 0, "rank_at_within_1": 0, "stable_rank_1e-4": 0,
              "effective_rank_1pct": 0, "effective_rank_within_2_errors": 0, "signal_rank_at_equal": 0,
              "rank_equal": 0, "rank_bounded": 0}
    worst = {"effective_rank_rel": 0.0, "stable_rank_rel": 0.0}
    signed = []  # effective rank: ours / reference − 1, per matrix (a bias shows where |worst| does not)
    for ours in adaptive:
        ref = by_name.get(ours["name"])
        if ref is None:
            continue
        counts["matrices"] += 1
        counts["adaptive"] += str(ours.get("spectrum_method", "")).startswith("adaptive")
        same = ours["rank_at"] == ref["rank_at"]
        counts["rank_at_equal"] += same
        counts["rank_at_within_1"] += all(abs(ours["rank_at"][k] - ref["rank_at"][k]) <= 1 for k in ref["rank_at"])
        stable = abs(ours["stable_rank"] - ref["stable_rank"]) / ref["stable_rank"] if ref["stable_rank"] else 0.0
        eff = abs(ours["effective_rank"] - ref["effective_rank"]) / ref["effective_rank"] if ref["effective_rank"] else 0.0
        if ref["effective_rank"]:
            signed.append(ours["effective_rank"] / ref["effective_rank"] - 1.0)
        counts["stable_rank_1e-4"] += stable <= 1e-4
        counts["effective_rank_1pct"] += eff <= tolerance
        error = ours.get("effective_rank_error") or 0.0
        counts["effective_rank_within_2_errors"] += abs(ours["effective_rank"] - ref["effective_rank"]) <= 2 * error + 1e-9
        counts["signal_rank_at_equal"] += ours.get("signal_rank_at") == ref.get("signal_rank_at")
        if ours["rank"] is None:
            counts["rank_bounded"] += ours.get("lower_bounds", {}).get("rank", 0) <= ref["rank"]
        else:
            counts["rank_equal"] += ours["rank"] == ref["rank"]
        worst = {"effective_rank_rel": max(worst["effective_rank_rel"], eff),
                 "stable_rank_rel": max(worst["stable_rank_rel"], stable)}
    return {**counts, "worst": worst, "effective_rank_mean_rel": sum(signed) / len(signed) if signed else 0.0}
