"""The adaptive path's pieces timed one by one on the device (synchronised, median of 5).

    python -m bench.probes.adaptive_parts --device cuda --out OUT

For a 4096² and an 11008×4096 fp32 matrix: the products of one round, its small eigenproblem,
the orthonormalisation, one Lanczos step and the whole quadrature, so the next optimisation
goes where the time is. The tail's sums are timed with and without the CUDA graph. Writes ``adaptive_parts.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from bench.probes import shapes_arg, write_result
from deltakit.spectral import graphs
from deltakit.spectral.partial import (
    SubspaceIteration, deflated_lanczos, dense_tridiagonals, lanczos_tridiagonals, effective_rank_estimate, quadrature, rademacher, small_eigh,
    tail_sums,
)
from deltakit.spectral.svd import orthonormal_basis


def timed(fn, device: torch.device, repeats: int = 5) -> float:
    times = []
    for i in range(repeats + 2):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def rows_lanczos(matrix: torch.Tensor, basis: torch.Tensor, start: torch.Tensor, steps: int):
    """The Lanczos of :func:`deflated_lanczos` with the probes as rows (probes×n): every reduction runs
    along contiguous memory. Timed against it to see whether the layout matters."""
    vector = start.T.contiguous()
    previous = torch.zeros_like(vector)
    beta = torch.zeros(vector.shape[0], 1, device=vector.device, dtype=vector.dtype)
    alphas, betas = [], []
    for _ in range(steps):
        y = vector @ matrix.T  # p×m
        y = torch.addmm(y, y @ basis, basis.T, alpha=-1.0)
        w = y @ matrix  # p×n
        w.addcmul_(previous, beta, value=-1.0)
        alpha = torch.linalg.vecdot(w, vector, dim=1).unsqueeze(1)
        w.addcmul_(vector, alpha, value=-1.0)
        beta = torch.linalg.vector_norm(w, dim=1, keepdim=True)
        alphas.append(alpha)
        betas.append(beta)
        previous, vector = vector, w / beta.clamp_min(torch.finfo(w.dtype).tiny)
    return torch.cat(alphas, 1).T, torch.cat(betas, 1).T


def with_tf32(fn):
    """``fn()`` with TF32 matrix products allowed (the tensor cores' 10-bit mantissas)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return fn()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def sliced(matrix: torch.Tensor, block: torch.Tensor, parts: int, transposed: bool = False) -> torch.Tensor:
    """matrix @ block (or matrix.T @ block) as one batched product over ``parts`` slices of the inner
    dimension, summed: ``parts`` times the output tiles, for skinny products that leave SMs idle."""
    m, n = matrix.shape
    if transposed:  # Mᵀ·Y: slices of M's rows
        return torch.bmm(matrix.view(parts, m // parts, n).transpose(1, 2), block.view(parts, m // parts, -1)).sum(0)
    return torch.bmm(matrix.view(m, parts, n // parts).transpose(0, 1), block.view(parts, n // parts, -1)).sum(0)


def sliced_lanczos(parts: int):
    """deflated_lanczos with both products of each step sliced (:func:`sliced`)."""
    def run(matrix, basis, start, steps):
        def apply(v):
            y = sliced(matrix, v, parts)
            y = torch.addmm(y, basis, basis.T @ y, alpha=-1.0)
            return sliced(matrix, y, parts, transposed=True)
        return lanczos_tridiagonals(apply, start, steps)
    return run


def without_graphs(fn):
    graphs.ENABLED = False
    try:
        return fn()
    finally:
        graphs.ENABLED = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", type=shapes_arg, default="4096x4096,11008x4096")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for m, n in args.shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        matrix = torch.randn(m, n, device=device, generator=gen)
        q = orthonormal_basis(torch.randn(m, 128, device=device, generator=gen))
        v = torch.randn(n, 128, device=device, generator=gen)
        probes = torch.randn(n, 32, device=device, generator=gen)
        gram = (q.T @ matrix).double()
        gram = gram @ gram.T
        it = SubspaceIteration(matrix, 128, warmup=2)
        it.round()
        left = it.left_vectors(100)
        tridiag_a = torch.rand(64, 32, device=device, dtype=torch.float64)
        tridiag_b = torch.rand(64, 32, device=device, dtype=torch.float64)
        row = {
            "shape": [m, n],
            "gemm_QtM_128": timed(lambda: q.T @ matrix, device),
            "gemm_MV_128": timed(lambda: matrix @ v, device),
            "gemm_MV_32": timed(lambda: matrix @ probes, device),
            "gram_fp64_128": timed(lambda: (q.T @ matrix).double() @ (q.T @ matrix).double().T, device),
            "small_eigh_host_128": timed(lambda: small_eigh(gram), device),
            "eigh_device_128": timed(lambda: torch.linalg.eigh(gram), device),
            "orthonormal_128": timed(lambda: orthonormal_basis(matrix @ v), device),
            "round": timed(lambda: it.round(), device),
            "init_warmup2": timed(lambda: SubspaceIteration(matrix, 128, warmup=2), device),
            "init_warmup4": timed(lambda: SubspaceIteration(matrix, 128, warmup=4), device),
            "init_warmup5": timed(lambda: SubspaceIteration(matrix, 128, warmup=5), device),
            "init_warmup5_tf32": timed(lambda: with_tf32(lambda: SubspaceIteration(matrix, 128, warmup=5)), device),
            "tail_sums_32x64": timed(lambda: tail_sums(matrix, left, 1.0, 32, 64, padded_width=128), device),
            "tail_sums_32x64_no_graph": timed(lambda: without_graphs(lambda: tail_sums(matrix, left, 1.0, 32, 64)), device),
            "tail_sums_32x32": timed(lambda: tail_sums(matrix, left, 1.0, 32, 32), device),
            "tail_sums_16x64": timed(lambda: tail_sums(matrix, left, 1.0, 16, 64), device),
            "tail_sums_64x64": timed(lambda: tail_sums(matrix, left, 1.0, 64, 64, padded_width=128), device),
            "quadrature_host_32x64": timed(lambda: quadrature(dense_tridiagonals(tridiag_a.cpu().numpy(), tridiag_b.cpu().numpy())), device),
        }
        start = rademacher(n, 32, 2, device, matrix.dtype)
        padded = torch.zeros(m, 128, device=device)
        padded[:, :100] = left
        lanczos_inputs = (matrix, padded, start)
        def replayed(name, lanczos):  # through the graph, to the host, as rank does (without a graph: plain)
            return graphs.replay_to_host(name, lambda *x: lanczos(*x, 64), lanczos_inputs).done()

        row["lanczos_replay_32x64"] = timed(lambda: replayed("parts", deflated_lanczos), device)
        row["lanczos_rows_replay_32x64"] = timed(lambda: replayed("parts-rows", rows_lanczos), device)
        row["lanczos_eager_32x64"] = timed(lambda: deflated_lanczos(*lanczos_inputs, 64), device)
        same = replayed("parts-rows", rows_lanczos)[0].to(device)
        # the first steps only: without reorthogonalisation the late coefficients follow the rounding
        row["rows_layout_alpha_max_rel_diff_8_steps"] = float(
            ((same[:8] - deflated_lanczos(*lanczos_inputs, 64)[0][:8]).abs().max() / same[:8].abs().max()))
        y32 = torch.randn(m, 32, device=device, generator=gen)
        row["gemm_MtY_32"] = timed(lambda: matrix.T @ y32, device)
        for parts in (2, 4, 8, 16):
            row[f"gemm_MV_32_sliced{parts}"] = timed(lambda: sliced(matrix, probes, parts), device)
            row[f"gemm_MtY_32_sliced{parts}"] = timed(lambda: sliced(matrix, y32, parts, transposed=True), device)
        for parts in (4, 8):
            row[f"lanczos_sliced{parts}_replay_32x64"] = timed(lambda: replayed(f"parts-sliced{parts}", sliced_lanczos(parts)), device)
        row["sliced8_alpha_max_rel_diff_8_steps"] = float(
            ((replayed("parts-sliced8", sliced_lanczos(8))[0].to(device)[:8] - deflated_lanczos(*lanczos_inputs, 64)[0][:8]).abs().max()
             / same[:8].abs().max()))
        row["sliced8_product_max_rel_diff"] = float((sliced(matrix, probes, 8) - matrix @ probes).abs().max()
                                                    / (matrix @ probes).abs().max())
        tail = tail_sums(matrix, left, 1.0, 32, 64)
        row["effective_rank_estimate"] = timed(lambda: effective_rank_estimate(np.linspace(2, 1, 100), tail), device)
        rows.append(row)
        print(json.dumps({k: (round(v * 1e3, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    write_result(args.out, "adaptive_parts.json", {"device": str(device), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
