"""What a fresh `deltakit rank` process pays before its first matrix, piece by piece.

    python -m bench.probes.cold_start --out OUT [--base BASE --ft FT]

Run in a new interpreter: importing torch and deltakit, CUDA's start, loading the CUDA linear
algebra (:func:`deltakit.workers.load_linalg`), a first matrix product on a new thread (its cuBLAS
handle), 1 GB of pinned host memory in 64 MB pieces, the first capture of the tail's Lanczos
graph; with a pair, `rank()` on it twice in this process (the first pays what is left: kernel
loading, the other threads' handles). Writes ``cold_start.json``.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()
import torch  # noqa: E402

T_TORCH = time.perf_counter()
import deltakit.analysis  # noqa: E402
import deltakit.report  # noqa: E402,F401

T_DELTAKIT = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402

from bench.probes import existing_path, write_result  # noqa: E402
from deltakit.spectral.options import SpectralOptions  # noqa: E402
from deltakit.spectral.partial import start_tail_sums  # noqa: E402
from deltakit.workers import load_linalg  # noqa: E402


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def on_new_thread(fn) -> float:
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("s", seconds(fn)))
    thread.start()
    thread.join()
    return out["s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", type=existing_path)
    parser.add_argument("--ft", type=existing_path)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    row = {"import_torch_s": T_TORCH - T0, "import_deltakit_s": T_DELTAKIT - T_TORCH}
    row["cuda_start_s"] = seconds(lambda: torch.zeros(1, device=device))
    row["load_linalg_s"] = seconds(lambda: load_linalg(device))
    a = torch.randn(4096, 4096, device=device)
    b = torch.randn(4096, 32, device=device)
    row["first_matmul_main_s"] = seconds(lambda: a @ b)
    row["first_matmul_new_thread_s"] = on_new_thread(lambda: a @ b)
    row["second_matmul_new_thread_s"] = on_new_thread(lambda: a @ b)
    row["pinned_1gb_in_64mb_s"] = seconds(lambda: [torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
                                                   for _ in range(16)])
    basis = torch.linalg.qr(torch.randn(4096, 128, device=device))[0]
    row["first_lanczos_capture_s"] = seconds(lambda: start_tail_sums(a, basis, 1.0, 32, 64, padded_width=128).result())
    row["lanczos_replay_s"] = seconds(lambda: start_tail_sums(a, basis, 1.0, 32, 64, padded_width=128).result())
    if args.base and args.ft:
        for run in ("rank_first_s", "rank_second_s"):
            report = deltakit.analysis.rank(args.base, args.ft, (0.9,), SpectralOptions(device="cuda"))
            row[run] = report.elapsed_s
    print(json.dumps(row, indent=1), flush=True)
    write_result(args.out, "cold_start.json", row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
