"""`rank()` on the same pair with 1, 2, 3 ... threads computing spectra (deltakit.workers).

    python -m bench.probes.rank_workers BASE FT --threads 1,2,3 --out OUT

One warm-up run (graph captures, kernel loading, page cache), then each thread count ``--repeat``
times: `rank()`'s own elapsed time (imports and interpreter start excluded) and the device memory
torch reserved. Every report must equal the one-thread report (all metrics, every matrix): the
threads change when a matrix is computed, not how. Writes ``rank_workers.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.probes import pair_parser, write_result
from deltakit.analysis import rank
from deltakit.spectral.options import SpectralOptions


def threads_arg(text: str) -> list[int]:
    """An argparse type: ``1,2,3`` → [1, 2, 3] (each at least 1)."""
    parts = [part.strip() for part in text.split(",")]
    if not parts or not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of thread counts like 1,2,3")
    return [int(part) for part in parts]


def comparable(report) -> dict:
    """A report's JSON without its elapsed time: what must not depend on the thread count."""
    data = report.to_dict()
    data.pop("elapsed_s", None)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = pair_parser(__doc__)
    parser.add_argument("--threads", type=threads_arg, default=[1, 2, 3])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--energy", type=float, nargs="+", default=[0.9])
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    rank(args.base, args.ft, args.energy, SpectralOptions(device=args.device))  # warm-up
    reference = None
    rows = []
    for threads in args.threads:
        times, reserved, equal = [], [], []
        for _ in range(args.repeat):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            report = rank(args.base, args.ft, args.energy, SpectralOptions(device=args.device, workers=threads))
            times.append(report.elapsed_s)
            reserved.append(torch.cuda.max_memory_reserved() / 1e9 if cuda else 0.0)
            data = comparable(report)
            if reference is None:
                reference = data
            equal.append(data == reference)
        rows.append({"threads": threads, "elapsed_s": times, "median_s": statistics.median(times),
                     "peak_reserved_gb": max(reserved), "report_equal_to_first": all(equal)})
        print(json.dumps(rows[-1]), flush=True)
    write_result(args.out, "rank_workers.json", {"device": args.device, "matrices": len(reference["matrices"]),
                                                  "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
