"""The tail's Lanczos products in fp32 against a two-term bf16 split on tensor cores, timed and
checked against fp64.

    python -m bench.probes.split_products --device cuda --out OUT [--shapes 4096x4096,11008x4096]

A bf16 ΔW (the difference of two bf16 checkpoints) is held as hi + lo, two bf16 matrices whose
sum carries 16 significant bits (the difference of two bf16 values with close exponents needs
no more); each Lanczos block is split the same way, and M·V ≈ hi·V_hi + hi·V_lo + lo·V_hi with
fp32 accumulation and output (``torch.mm(..., out_dtype=float32)``, CUDA only). The fp32
products run on CUDA cores at ~1 TB/s; the split ones read the same bytes through tensor cores.
Per shape: the Lanczos graph's time each way, and the tail's Σσ per probe against the same
Lanczos in fp64 (same probes: only the arithmetic differs). Writes ``split_products.json``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from bench.probes import shapes_arg, write_result
from bench.probes.adaptive_parts import timed
from deltakit.spectral import graphs
from deltakit.spectral.partial import (
    dense_tridiagonals, deflated_lanczos, lanczos_tridiagonals, quadrature_sums, rademacher,
)
from deltakit.spectral.svd import orthonormal_basis


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def split_mm(hi: torch.Tensor, lo: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(hi + lo) @ v in fp32 from three bf16 products (lo·v_lo dropped)."""
    v_hi, v_lo = split(v)
    p = v.shape[1]
    both = torch.mm(hi, torch.cat([v_hi, v_lo], 1), out_dtype=torch.float32)
    out = both[:, :p] + both[:, p:]
    return out.add_(torch.mm(lo, v_hi, out_dtype=torch.float32))


def split_lanczos(hi, lo, basis, start, steps):
    def apply(v):
        y = split_mm(hi, lo, v)
        y = torch.addmm(y, basis, basis.T @ y, alpha=-1.0)
        return split_mm(hi.T, lo.T, y)
    return lanczos_tridiagonals(apply, start, steps)


def nuclear(alphas: torch.Tensor, betas: torch.Tensor, dim: int) -> np.ndarray:
    a, b = alphas.double().cpu().numpy(), betas.double().cpu().numpy()
    return quadrature_sums(dense_tridiagonals(a, b), dim)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", type=shapes_arg, default="4096x4096,11008x4096,8192x8192")
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for m, n in args.shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        weight = torch.randn(m, n, device=device, generator=gen) * 0.02
        top = torch.randn(m, 64, device=device, generator=gen) @ torch.randn(64, n, device=device, generator=gen) * 1e-4
        update = top + 2e-4 * torch.randn(m, n, device=device, generator=gen)
        matrix = (weight + update).bfloat16().float() - weight.bfloat16().float()  # ΔW of two bf16 checkpoints
        hi, lo = split(matrix)
        exact_share = float(((hi.float() + lo.float()) == matrix).float().mean())
        basis = torch.zeros(m, 128, device=device)
        basis[:, :100] = orthonormal_basis(matrix @ torch.randn(n, 100, device=device, generator=gen))
        start = rademacher(n, 32, 2, device, torch.float32)
        steps = args.steps
        fp64 = deflated_lanczos(matrix.double(), basis.double(), start.double(), steps)
        fp32 = graphs.replay_to_host(f"p32-{m}", lambda *x: deflated_lanczos(*x, steps), (matrix, basis, start)).done()
        both = graphs.replay_to_host(f"split-{m}", lambda *x: split_lanczos(*x, steps), (hi, lo, basis, start)).done()
        reference = nuclear(*fp64, n)
        row = {
            "shape": [m, n],
            "split_exact_share": exact_share,
            "fp32_ms": 1e3 * timed(lambda: graphs.replay_to_host(
                f"p32-{m}", lambda *x: deflated_lanczos(*x, steps), (matrix, basis, start)).done(), device),
            "split_ms": 1e3 * timed(lambda: graphs.replay_to_host(
                f"split-{m}", lambda *x: split_lanczos(*x, steps), (hi, lo, basis, start)).done(), device),
            "split_prepare_ms": 1e3 * timed(lambda: split(matrix), device),
            "fp32_nuclear_rel_err_max": float(np.max(np.abs(nuclear(*fp32, n) / reference - 1))),
            "split_nuclear_rel_err_max": float(np.max(np.abs(nuclear(*both, n) / reference - 1))),
            "fp32_nuclear_rel_err_mean": float(np.mean(nuclear(*fp32, n)) / np.mean(reference) - 1),
            "split_nuclear_rel_err_mean": float(np.mean(nuclear(*both, n)) / np.mean(reference) - 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        graphs.clear()
    write_result(args.out, "split_products.json", {"device": str(device), "steps": args.steps, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
