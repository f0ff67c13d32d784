"""Where `rank`'s per-matrix time goes on the device: spectrum, storage-noise model, amplification.

    python -m bench.probes.rank_parts --device cuda --out OUT

Times (median of 5 after 2 warm-ups, synchronised) each part on bench-like bf16 pairs of the 7B
shapes; writes ``rank_parts.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.probes import shapes_arg, write_result
from deltakit.spectral.noise import storage_noise
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.spectrum import compute_spectrum
from deltakit.spectral.subspace import amplification


def timed(fn, device: torch.device, repeats: int = 5) -> float:
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", type=shapes_arg, default="4096x4096,11008x4096")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for m, n in args.shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        w = (torch.randn(m, n, device=device, generator=gen) * 0.02).bfloat16()
        ft = (w.float() + torch.randn(m, n, device=device, generator=gen) * 4e-4).bfloat16()
        base, delta = w.float(), ft.float() - w.float()
        options = SpectralOptions(device=str(device))
        noise = storage_noise(base, delta, torch.bfloat16, torch.bfloat16)
        fro = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
        row = {
            "shape": [m, n],
            "spectrum_s": timed(lambda: compute_spectrum(delta, options, noise, fro * fro), device),
            "storage_noise_s": timed(lambda: storage_noise(base, delta, torch.bfloat16, torch.bfloat16), device),
            "amplification_s": timed(lambda: amplification(base, delta, fro, 64), device),
            "fro_fp64_s": timed(lambda: float(torch.linalg.vector_norm(delta, dtype=torch.float64)), device),
        }
        rows.append(row)
        print(row, flush=True)
    write_result(args.out, "rank_parts.json", {"device": str(device), "rows": rows})


if __name__ == "__main__":
    main()
