"""`rank` under variants of the adaptive plan, each timed and checked against reference reports.

    python -m bench.probes.plan_variants BASE FT --variant probes=64 --variant steps=96 \
        --reference full=RUNS/deltakit-rank-full.json --reference fp64=RUNS/deltakit-rank-fp64.json --out OUT

Each variant replaces fields of :data:`deltakit.analysis.ADAPTIVE_PLAN` (the default plan runs first,
as ``default``) and runs :func:`deltakit.analysis.rank` in this process, so imports and the CUDA
start are paid once. Per variant: rank()'s seconds and, per reference, issue 17's agreement counts
(:func:`bench.run_bench.spectrum_paths_agree`, with the signed mean of the effective-rank error).
Writes ``plan_variants.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time

import deltakit.analysis as analysis
from bench.probes import pair_parser, write_result
from bench.run_bench import spectrum_paths_agree
from deltakit.spectral.options import SpectralOptions


def parse_variant(text: str) -> dict[str, float | int]:
    """``probes=64,steps=96`` → {"probes": 64, "steps": 96} (ints where they parse as ints)."""
    fields: dict[str, float | int] = {}
    for item in text.split(","):
        key, value = item.split("=")
        fields[key] = int(value) if value.isdigit() else float(value)
    return fields


def main(argv: list[str] | None = None) -> int:
    parser = pair_parser(__doc__)
    parser.add_argument("--variant", action="append", default=[], help="plan fields, e.g. probes=64,steps=96")
    parser.add_argument("--reference", action="append", default=[], help="NAME=PATH of a rank --json report")
    args = parser.parse_args(argv)
    references = {}
    for item in args.reference:
        name, path = item.split("=", 1)
        with open(path) as fh:
            references[name] = json.load(fh)["matrices"]
    default = analysis.ADAPTIVE_PLAN
    rows = []
    try:
        for text in ["default"] + args.variant:
            plan = default if text == "default" else dataclasses.replace(default, **parse_variant(text))
            analysis.ADAPTIVE_PLAN = plan
            start = time.perf_counter()
            report = analysis.rank(args.base, args.ft, (0.9,), SpectralOptions(device=args.device, spectrum="adaptive"))
            seconds = time.perf_counter() - start
            matrices = report.to_dict()["matrices"]
            row = {"variant": text, "plan": str(plan), "rank_s": seconds,
                   "checks": {name: spectrum_paths_agree(matrices, ref) for name, ref in references.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        analysis.ADAPTIVE_PLAN = default
    write_result(args.out, "plan_variants.json", {"device": args.device, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
