"""Two choices of the adaptive path's plan, measured on the CPU: warm-up power iterations, and
which top vectors may deflate the tail.

    python -m bench.probes.adaptive_accuracy --out OUT

* ``rounds``: Rayleigh–Ritz rounds until a bench-like ΔW (bench/synth.py's 4096² and
  11008×4096 kind) settles rank@0.9, for 2, 4 and 5 power iterations before the first round.
* ``deflation``: the effective rank against the full path's on the tests' noisy bf16 768×512
  ΔW (:func:`noisy_bf16_pair`, seeds 6–8), with the tests' plan (16 probes × 32 steps) and the
  default one (32 × 64), deflating the tail by every top vector whose value has settled
  (``deflation_angle`` = ∞, as before) or only by spans within the Davis–Kahan bound.
Writes ``adaptive_accuracy.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np
import torch

from bench.probes import write_result
from bench.probes.adaptive_probe import bench_like_pair
from deltakit.spectral import partial
from deltakit.spectral.noise import StorageNoise, storage_noise
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.spectrum import AdaptivePlan, adaptive_spectrum, compute_spectrum

TEST_PLAN = AdaptivePlan(min_side=256, start_width=32, probes=16, steps=32)  # tests/test_adaptive.py's


def low_rank(m: int, n: int, sigma: np.ndarray, seed: int) -> torch.Tensor:
    """An m×n float32 matrix with singular values ``sigma`` and seeded random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(m, sigma.size, generator=gen))
    right, _ = torch.linalg.qr(torch.randn(n, sigma.size, generator=gen))
    return (left * torch.tensor(sigma, dtype=torch.float32)) @ right.T


def noisy_bf16_pair(seed: int = 2, noise_rms: float = 2e-4) -> tuple[torch.Tensor, StorageNoise]:
    """ΔW of a bf16 base and fine-tune (fast-decaying update, dense noise, both sides rounded to bf16)
    and its storage-noise model."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(768, 512, generator=gen) * 0.02
    update = low_rank(768, 512, 0.5 * np.arange(1, 65) ** -1.2, seed) + noise_rms * torch.randn(768, 512, generator=gen)
    base, ft = weight.bfloat16(), (weight + update).bfloat16()
    delta = ft.float() - base.float()
    return delta, storage_noise(base, delta, torch.bfloat16, torch.bfloat16)


def rounds_until_settled(delta: torch.Tensor, noise: StorageNoise, warmup: int) -> int:
    counted = []
    original = partial.SubspaceIteration.round

    def round_counted(self):
        counted.append(self.width)
        return original(self)

    partial.SubspaceIteration.round = round_counted
    try:
        energy = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
        adaptive_spectrum(delta, noise, energy, (0.9,), AdaptivePlan(warmup=warmup, probes=2, steps=2))
    finally:
        partial.SubspaceIteration.round = original
    return len(counted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    result: dict[str, list] = {"rounds": [], "deflation": []}
    for seed, (m, n) in enumerate([(4096, 4096), (11008, 4096), (4096, 11008)]):
        base, ft = bench_like_pair(m, n, 512, torch.device("cpu"), seed + 7)
        delta = ft.float() - base.float()
        noise = storage_noise(base, delta, torch.bfloat16, torch.bfloat16)
        row = {"shape": [m, n], **{f"warmup_{w}": rounds_until_settled(delta, noise, w) for w in (2, 4, 5)}}
        result["rounds"].append(row)
        print(json.dumps(row), flush=True)
    for seed in (6, 7, 8):
        delta, noise = noisy_bf16_pair(seed=seed)
        energy = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
        full = compute_spectrum(delta, SpectralOptions(), noise, energy).effective_rank()
        for probes, steps in ((16, 32), (32, 64)):
            for angle in (math.inf, AdaptivePlan().deflation_angle):
                plan = dataclasses.replace(TEST_PLAN, probes=probes, steps=steps, deflation_angle=angle)
                part, _ = adaptive_spectrum(delta, noise, energy, (0.9,), plan)
                row = {"seed": seed, "probes": probes, "steps": steps, "deflation_angle": str(angle),
                       "deflated": part.deflated, "effective_rank": part.effective_rank(),
                       "error_bar": part.effective_rank_error, "full": full,
                       "relative": part.effective_rank() / full - 1}
                result["deflation"].append(row)
                print(json.dumps(row), flush=True)
    write_result(args.out, "adaptive_accuracy.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
