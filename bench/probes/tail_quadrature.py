"""The tail's quadrature rules against an fp64 truth: which rule, how many probes and steps.

    python -m bench.probes.tail_quadrature --device cpu --out OUT [--shape 4096x4096] [--seeds 8]

One bench-like bf16 pair (bench/synth.py's delta: decaying spectrum, 2 % dense noise, bf16
rounding; square by default, the hard case: the noise's singular values run down to 0). The
top block is found and deflated as `rank` does; then, per Lanczos seed, 64 probes run 64 steps
once, and every (steps, probes) prefix gives the effective rank by three rules: Gauss, Gauss–Radau
with a node at 0, and their midpoint (what `rank` reports), each against the effective rank of an
fp64 eigendecomposition of ΔWᵀΔW; at 64 steps also the rule `rank` used before, Gauss extrapolated
from 32 and 64 steps as if its error fell as 1/steps. Writes ``tail_quadrature.json``: per (steps, probes, rule)
the mean, spread and worst relative error over the seeds, in percent.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.probes import shape_arg, write_result
from bench.probes.adaptive_probe import bench_like_pair
from deltakit.spectral import metrics
from deltakit.spectral.partial import (
    SubspaceIteration, deflatable, deflated_lanczos, dense_tridiagonals, entropy_rank, quadrature_sums, rademacher,
    radau_tridiagonals,
)
from deltakit.spectral.spectrum import AdaptivePlan


def step_counts(text: str) -> list[int]:
    """An argparse type: ``32,48,64`` → [32, 48, 64], each at least 2."""
    counts = [int(v) for v in text.split(",") if v.isdigit()]
    if len(counts) != len(text.split(",")) or min(counts) < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of step counts like 32,48,64")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=shape_arg, default="4096x4096")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=step_counts, default=[32, 48, 64],
                        help="Lanczos step counts to compare (one run of the largest; the others are its prefixes)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    m, n = args.shape
    base, ft = bench_like_pair(m, n, 512, device, seed=0)
    delta = (ft.double() - base.double())
    delta = delta if m >= n else delta.T
    truth = metrics.effective_rank(torch.linalg.eigvalsh(delta.T @ delta).clamp_min(0).sqrt().flip(0).cpu().numpy())
    matrix, dim = delta.float(), delta.shape[1]
    plan = AdaptivePlan()
    iteration = SubspaceIteration(matrix, plan.start_width, warmup=plan.warmup)
    block = iteration.round()
    count = deflatable(block, plan.settled_relative, plan.deflation_angle)
    basis, scale = iteration.left_vectors(count), float(block.values[0])
    top = block.values[:count] / scale
    s_top, t_top = float(top.sum()), float(np.sum(top * np.log(top)))
    errors: dict[str, list[float]] = {}
    for seed in range(1, args.seeds + 1):
        start = rademacher(dim, 64, seed, device, torch.float32)
        alphas, betas = (x.double().cpu().numpy() / scale ** 2
                         for x in deflated_lanczos(matrix, basis, start, max(args.steps)))
        gauss_32 = quadrature_sums(dense_tridiagonals(alphas[:32], betas[:32]), dim)
        for steps in args.steps:
            gauss = quadrature_sums(dense_tridiagonals(alphas[:steps], betas[:steps]), dim)
            radau = quadrature_sums(radau_tridiagonals(alphas[:steps], betas[:steps]), dim)
            for probes in (16, 32, 64):
                rules = {"gauss": gauss, "radau": radau, "midpoint": tuple((g + r) / 2 for g, r in zip(gauss, radau))}
                for rule, (nuclear, entropy) in rules.items():
                    estimate = entropy_rank(s_top + float(nuclear[:probes].mean()), t_top + float(entropy[:probes].mean()))
                    errors.setdefault(f"{steps} steps, {probes} probes, {rule}", []).append(100 * (estimate / truth - 1))
                if steps == 64:  # the rule before: Gauss at 64 steps extrapolated from 32 as if its error were ∝ 1/steps
                    half = entropy_rank(s_top + float(gauss_32[0][:probes].mean()), t_top + float(gauss_32[1][:probes].mean()))
                    whole = entropy_rank(s_top + float(gauss[0][:probes].mean()), t_top + float(gauss[1][:probes].mean()))
                    errors.setdefault(f"64 steps, {probes} probes, extrapolated", []).append(
                        100 * ((2 * whole - half) / truth - 1))
    rows = {key: {"mean_pct": float(np.mean(v)), "std_pct": float(np.std(v)), "worst_pct": float(np.max(np.abs(v)))}
            for key, v in errors.items()}
    for key, row in rows.items():
        print(f"{key:36s} mean {row['mean_pct']:+.3f} % std {row['std_pct']:.3f} % worst {row['worst_pct']:.3f} %")
    write_result(args.out, "tail_quadrature.json", {"shape": [m, n], "device": str(device), "truth": truth,
                                                    "deflated": count, "seeds": args.seeds, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
