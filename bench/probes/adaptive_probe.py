"""Per-matrix time and agreement of the adaptive (partial) spectrum against the full one, on bench-like ΔW.

For each shape: a bf16 base and fine-tune made as bench/synth.py makes the 7B pair (decaying spectrum
+ dense noise, bf16 rounding on both sides), then rank's per-matrix work (storage-noise model,
spectrum, metrics) timed on the full path and on the adaptive path, and their metrics compared:
rank@X, stable rank, effective rank (with the adaptive estimate's error), signal_rank@X.
The 70B-shaped rows (8192², 28672×8192, 1024×8192) give the projection in docs/benchmarks.md.

    python -m bench.probes.adaptive_probe --device cuda --out /tmp/adaptive        # 7B and 70B shapes
    python -m bench.probes.adaptive_probe --device cpu --preset tiny --out /tmp/a  # seconds, for the tests
    python -m bench.probes.adaptive_probe --device cpu --preset cpu --repeats 1 --exact-reference --out /tmp/a
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.probes import write_result
from bench.synth import DeltaSpec, make_delta
from deltakit.spectral import metrics
from deltakit.spectral.noise import storage_noise
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.spectrum import AdaptivePlan, adaptive_spectrum, compute_spectrum

PLANS = {"tiny": AdaptivePlan(min_side=256, start_width=64, probes=8, steps=16)}
PRESETS = {
    "tiny": [(768, 512, 64)],
    "cpu": [(2048, 2048, 256)],  # the CPU figures of docs/metrics.md, with --exact-reference
    "7b70b": [(4096, 4096, 512), (11008, 4096, 512), (4096, 11008, 512),
              (8192, 8192, 512), (1024, 8192, 512), (28672, 8192, 512), (8192, 28672, 512)],
}
FRACTIONS = (0.5, 0.9)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def metrics_of(spectrum) -> dict[str, object]:
    return {"method": spectrum.method, "rank": spectrum.rank, "lower_bounds": spectrum.lower_bounds,
            "rank_at": [spectrum.rank_at(x) for x in FRACTIONS],
            "signal_rank_at": [spectrum.signal_rank_at(x) for x in FRACTIONS],
            "stable_rank": spectrum.stable_rank(), "effective_rank": spectrum.effective_rank(),
            "effective_rank_error": spectrum.effective_rank_error, "signal_rank": spectrum.signal_rank,
            "noise_share": spectrum.noise_share}


def bench_like_pair(m: int, n: int, width: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 base and fine-tune (m×n) made as bench/synth.py makes the 7B pair's matrices."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(m, n, generator=gen, device=device) * 0.02
    delta = make_delta(weight, DeltaSpec(width=width), gen)
    return weight.bfloat16(), (weight + delta).bfloat16()


def one_shape(m: int, n: int, width: int, device: torch.device, repeats: int, seed: int,
              plan: AdaptivePlan = AdaptivePlan(), exact_reference: bool = False) -> dict[str, object]:
    base, ft = bench_like_pair(m, n, width, device, seed)
    row: dict[str, object] = {"shape": [m, n]}
    for path in ("full", "adaptive"):
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            stored = ft.float() - base.float()
            energy = float(torch.linalg.vector_norm(stored, dtype=torch.float64)) ** 2
            noise = storage_noise(base, stored, torch.bfloat16, torch.bfloat16)
            if path == "full":
                spectrum, why = compute_spectrum(stored, SpectralOptions(), noise, energy), ""
            else:
                spectrum, why = adaptive_spectrum(stored, noise, energy, FRACTIONS, plan, seed=seed)
                if spectrum is None:
                    spectrum = compute_spectrum(stored, SpectralOptions(), noise, energy)
            found = metrics_of(spectrum)  # the metrics are part of the work
            sync(device)
            times.append(time.perf_counter() - start)
            del stored
        row[path] = {"seconds": min(times), "all_seconds": times, "fallback": why or None, **found}
    if exact_reference:  # fp64 SVD truth, and the full path with its floor's values dropped (before the fix)
        stored = ft.float() - base.float()
        truth = torch.linalg.svdvals(stored.double()).cpu().numpy()
        energy = float(torch.linalg.vector_norm(stored, dtype=torch.float64)) ** 2
        full_spectrum = compute_spectrum(stored, SpectralOptions(), storage_noise(base, stored, torch.bfloat16,
                                                                                  torch.bfloat16), energy)
        row["exact"] = {"effective_rank": metrics.effective_rank(truth),
                        "rank_at": [metrics.rank_at_energy(truth, x) for x in FRACTIONS],
                        "full_floor_dropped_effective_rank": metrics.effective_rank(full_spectrum.values),
                        "full_floor_dropped_rank_at": [metrics.rank_at_energy(full_spectrum.values, x) for x in FRACTIONS]}
    full, part = row["full"], row["adaptive"]
    row["agree"] = {
        "rank_at": full["rank_at"] == part["rank_at"],
        "signal_rank_at": full["signal_rank_at"] == part["signal_rank_at"],
        "stable_rank_rel": abs(part["stable_rank"] - full["stable_rank"]) / full["stable_rank"],
        "effective_rank_rel": abs(part["effective_rank"] - full["effective_rank"]) / full["effective_rank"],
        "rank": full["rank"] == part["rank"] or (part["rank"] is None and part["lower_bounds"].get("rank", 0) <= full["rank"]),
    }
    row["speedup"] = full["seconds"] / part["seconds"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b70b")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--exact-reference", action="store_true", help="also the fp64 SVD's metrics (slow)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for index, (m, n, width) in enumerate(PRESETS[args.preset]):
        row = one_shape(m, n, width, device, args.repeats, seed=index, plan=PLANS.get(args.preset, AdaptivePlan()),
                        exact_reference=args.exact_reference)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("shape", "speedup", "agree")}), {p: (row[p]["seconds"], row[p]["method"],
              row[p]["effective_rank"], row[p]["effective_rank_error"]) for p in ("full", "adaptive")}, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_result(args.out, "adaptive_probe.json", {"device": str(device), "preset": args.preset, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
