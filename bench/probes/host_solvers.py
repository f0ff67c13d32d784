"""The tail quadrature's host eigenproblems timed several ways (32 tridiagonals of 64 steps).

    python -m bench.probes.host_solvers --out OUT

Per-probe LAPACK calls (stevd, stemr) with the BLAS on one thread and on all of them, scipy's
eigh_tridiagonal, numpy's and torch's batched dense eigh, and the 128×128 Rayleigh–Ritz eigh:
the fastest way differs between hosts (a 2-core VM and a 16-core GPU host disagreed by 8×).
Writes ``host_solvers.json`` with the BLAS libraries threadpoolctl found.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal, lapack
from threadpoolctl import threadpool_info

from bench.probes import write_result
from deltakit.spectral.partial import dense_tridiagonals, one_blas_thread, quadrature


def timed(fn, repeats: int = 7) -> float:
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        fn()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_probe(solver, alphas: np.ndarray, betas: np.ndarray) -> None:
    """``solver(diagonal, off_diagonal)`` on each probe's tridiagonal (α, β: steps×probes)."""
    for p in range(alphas.shape[1]):
        solver(np.ascontiguousarray(alphas[:, p]), np.ascontiguousarray(betas[:-1, p]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    probes, steps = 32, 64
    alphas, betas = rng.random((steps, probes)) + 0.5, rng.random((steps, probes)) * 0.4
    tri = dense_tridiagonals(alphas, betas)
    gram = rng.standard_normal((128, 128))
    gram = gram @ gram.T
    stevd = lambda d, e: lapack.dstevd(d, e)
    stemr = lambda d, e: eigh_tridiagonal(d, e, lapack_driver="stemr")

    def on_one_thread(fn):
        def run():
            with one_blas_thread():
                fn()
        return run

    rows = {
        "quadrature_32x64": timed(lambda: quadrature(tri)),
        "stevd_all_threads": timed(lambda: per_probe(stevd, alphas, betas)),
        "stevd_one_thread": timed(on_one_thread(lambda: per_probe(stevd, alphas, betas))),
        "stevd_values_only": timed(lambda: per_probe(lambda d, e: lapack.dstevd(d, e, compute_v=0), alphas, betas)),
        "sterf_values_only": timed(lambda: per_probe(lambda d, e: lapack.dsterf(d, e), alphas, betas)),
        "stemr_all_threads": timed(lambda: per_probe(stemr, alphas, betas)),
        "stemr_one_thread": timed(on_one_thread(lambda: per_probe(stemr, alphas, betas))),
        "numpy_batched_eigh": timed(lambda: np.linalg.eigh(tri)),
        "numpy_batched_eigh_one_thread": timed(on_one_thread(lambda: np.linalg.eigh(tri))),
        "torch_batched_eigh": timed(lambda: torch.linalg.eigh(torch.from_numpy(tri))),
        "eigh_128_all_threads": timed(lambda: np.linalg.eigh(gram)),
        "eigh_128_one_thread": timed(on_one_thread(lambda: np.linalg.eigh(gram))),
        "one_blas_thread_enter_exit": timed(on_one_thread(lambda: None)),
    }
    print(json.dumps({k: round(v * 1e3, 3) for k, v in rows.items()}), flush=True)
    libraries = [{k: v for k, v in info.items() if k in ("internal_api", "num_threads", "version", "filepath")}
                 for info in threadpool_info()]
    print(json.dumps(libraries), flush=True)
    write_result(args.out, "host_solvers.json", {"seconds": rows, "blas": libraries,
                                                 "torch_threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
