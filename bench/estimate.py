"""Estimate, in seconds, what the plain loop's linear algebra will cost for a preset, before running it.

    python -m bench.estimate --preset 7b --device cuda

Times ``torch.linalg.svdvals`` and ``torch.linalg.svd`` (fp32, full_matrices=False) once per
distinct matrix shape of the preset, after one warm-up, and multiplies by how many matrices
have that shape. The result bounds baseline (a)'s compute time (and mergekit's, which runs
the same svd per matrix) so a run can be split to fit a time limit (run_bench --only/--append).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines import pick_device  # noqa: E402
from bench.synth import PRESETS, llama_layout  # noqa: E402


def _time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def estimate(preset: str, device: torch.device, ops: tuple[str, ...] = ("svdvals", "svd")) -> dict[str, object]:
    counts = collections.Counter(shape for _, shape in llama_layout(PRESETS[preset]) if len(shape) == 2)
    per_shape = []
    totals = dict.fromkeys(ops, 0.0)
    for shape, count in counts.items():
        matrix = torch.randn(shape, device=device)
        entry: dict[str, object] = {"shape": list(shape), "count": count}
        for op in ops:
            fn = functools.partial(torch.linalg.svdvals, matrix) if op == "svdvals" else functools.partial(
                torch.linalg.svd, matrix, full_matrices=False)
            fn()  # warm-up: library load, workspace
            seconds = _time(fn, device)
            entry[f"{op}_s"] = seconds
            totals[op] += seconds * count
        per_shape.append(entry)
        del matrix
    return {"preset": preset, "device": str(device), "per_shape": per_shape,
            "total_s": totals, "note": "linear algebra only; reading, ΔW and writing come on top"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.estimate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    print(json.dumps(estimate(args.preset, pick_device(args.device)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
