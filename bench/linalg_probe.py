"""Time the decompositions deltakit's GPU paths rest on, for one matrix of each 7B shape.

Run: python -m bench.linalg_probe [--device cuda]. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from deltakit.spectral.svd import orthonormal_basis, randomized_svd, singular_values


def timed(label: str, fn, device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up: library handles, workspaces
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    print(json.dumps({"probe": label, "seconds": round(seconds, 5)}), flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eig-sizes", default="", help="also time Gram+eigvalsh of n×n matrices, e.g. 2048,8192")
    parser.add_argument("--concurrency", action="store_true",
                        help="only time 8 eigvalsh of 4096² one after another, batched, and on 2-4 threads / streams")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    if args.concurrency:
        concurrency(device, g)
        return
    for size in [int(s) for s in args.eig_sizes.split(",") if s]:
        square = torch.randn(size, size, device=device, generator=g)
        timed(f"gram+eigvalsh {size}x{size}", lambda: singular_values(square, "gram"), device, 2)
    if args.eig_sizes:
        return
    for m, n in [(4096, 4096), (11008, 4096)]:
        matrix = torch.randn(m, n, device=device, generator=g)
        tag = f"{m}x{n}"
        timed(f"svdvals {tag}", lambda: torch.linalg.svdvals(matrix), device, 1)
        timed(f"gram+eigvalsh {tag}", lambda: singular_values(matrix, "gram"), device)
        if device.type == "cuda":
            gram = matrix.T @ matrix
            for library in ("cusolver", "magma"):
                torch.backends.cuda.preferred_linalg_library(library)
                timed(f"eigvalsh[{library}] {n}", lambda: torch.linalg.eigvalsh(gram), device)
            torch.backends.cuda.preferred_linalg_library("default")
        tall = torch.randn(max(m, n), 128, device=device, generator=g)
        timed(f"householder qr {max(m, n)}x128", lambda: torch.linalg.qr(tall), device)
        timed(f"cholesky qr2 {max(m, n)}x128", lambda: orthonormal_basis(tall), device)
        timed(f"randomized svd r64 {tag}", lambda: randomized_svd(matrix, 64, oversample=64, power_iterations=4),
              device)


def concurrency(device: torch.device, g: torch.Generator, count: int = 8, n: int = 4096) -> None:
    """Can several eigendecompositions share the GPU better than one at a time?"""
    from concurrent.futures import ThreadPoolExecutor

    grams = []
    for _ in range(count):
        m = torch.randn(n, n, device=device, generator=g)
        grams.append(m.T @ m)
    timed(f"{count} x eigvalsh {n}, one after another", lambda: [torch.linalg.eigvalsh(x) for x in grams], device, 2)
    stacked = torch.stack(grams[:4])
    timed(f"{count} x eigvalsh {n}, batched by 4", lambda: [torch.linalg.eigvalsh(stacked) for _ in range(count // 4)],
          device, 2)
    if device.type != "cuda":
        return
    for threads in (2, 4):
        streams = [torch.cuda.Stream(device) for _ in range(threads)]

        def on_stream(i: int) -> None:
            with torch.cuda.stream(streams[i % threads]):
                torch.linalg.eigvalsh(grams[i])
            streams[i % threads].synchronize()

        with ThreadPoolExecutor(threads) as pool:
            timed(f"{count} x eigvalsh {n}, {threads} threads, a stream each",
                  lambda: list(pool.map(on_stream, range(count))), device, 2)
    for driver in ("gesvdj", "gesvda"):
        square = torch.randn(n, n, device=device, generator=g)
        timed(f"svd driver={driver} {n}x{n} (values only used)",
              lambda: torch.linalg.svd(square, full_matrices=False, driver=driver), device, 1)


if __name__ == "__main__":
    main()
