"""Where the device's time goes inside `rank`: a torch.profiler trace of the first pairs.

    python -m bench.probes.rank_trace BASE FT --layers 6 --out OUT

Runs `rank` once untraced (warm-up: graph captures, kernel loading), then traced, on the first
``--layers`` decoder layers (``model.layers.N.*``), and writes ``rank_trace.json``: the traced
wall time, the kernel time per CUDA stream, how much of the wall the device was busy on any
stream, and the kernels that took longest in total. Then once more under cProfile: where the
host's main thread spends its time (``rank_cprofile.txt``).
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.probes import pair_parser, write_result
from deltakit.analysis import rank
from deltakit.spectral.options import SpectralOptions


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (µs in, s out)."""
    total, reach = 0.0, -1.0
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = pair_parser(__doc__, device='cuda')
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--workers", type=int, default=None, help="threads computing spectra (default: by device)")
    args = parser.parse_args(argv)
    include = [f"model.layers.{layer}.*" for layer in range(args.layers)]
    options = SpectralOptions(device=args.device, workers=args.workers)
    rank(args.base, args.ft, (0.9,), options, include=include)  # warm-up
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        report = rank(args.base, args.ft, (0.9,), options, include=include)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_stream: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    intervals = []
    for event in kernels:
        span = event.time_range
        per_stream[str(getattr(event, "device_resource_id", "?"))] += (span.end - span.start) / 1e6
        by_name[event.name[:90]] += (span.end - span.start) / 1e6
        intervals.append((span.start, span.end))
    result = {
        "pairs": len(report.matrices) + len(report.vectors),
        "matrices": len(report.matrices),
        "wall_s": wall,
        "device_busy_s": busy_seconds(intervals),
        "kernel_s_per_stream": dict(per_stream),
        "top_kernels_s": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:25]),
    }
    print(json.dumps(result, indent=1), flush=True)
    out = write_result(args.out, "rank_trace.json", result).parent
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    rank(args.base, args.ft, (0.9,), options, include=include)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(f"wall under cProfile: {time.perf_counter() - start:.3f} s\n")
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(45)
    (out / "rank_cprofile.txt").write_text(text.getvalue())
    print(text.getvalue()[:9000], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
