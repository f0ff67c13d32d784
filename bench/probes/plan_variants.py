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

import argparse
import dataclasses
import json
import time

import deltakit.analysis as analysis
from bench.probes import existing_path, pair_parser, write_result
from bench.run_bench import spectrum_paths_agree
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.spectrum import AdaptivePlan


def parse_variant(text: str) -> dict[str, float | int]:
    """An argparse type: ``probes=64,steps=96`` → {"probes": 64, "steps": 96} (ints where they parse as
    ints), each key a field of :class:`deltakit.spectral.spectrum.AdaptivePlan`."""
    known = {f.name for f in dataclasses.fields(AdaptivePlan)}
    fields: dict[str, float | int] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in known:
            raise argparse.ArgumentTypeError(f"{key!r} is not an AdaptivePlan field ({', '.join(sorted(known))})")
        try:
            fields[key] = int(value) if value.isdigit() else float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: the value is not a number") from None
    return fields


def reference_report(text: str) -> tuple[str, list[dict]]:
    """An argparse type: ``NAME=PATH`` of a `deltakit rank --json` report → (NAME, its matrices)."""
    name, _, path = text.partition("=")
    try:
        with open(existing_path(path)) as fh:
            return name, json.load(fh)["matrices"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"{text!r}: not a rank --json report ({error})") from None


def main(argv: list[str] | None = None) -> int:
    parser = pair_parser(__doc__)
    parser.add_argument("--variant", type=parse_variant, action="append", default=[],
                        help="plan fields, e.g. probes=64,steps=96")
    parser.add_argument("--reference", type=reference_report, action="append", default=[],
                        help="NAME=PATH of a rank --json report")
    args = parser.parse_args(argv)
    references = dict(args.reference)
    default = analysis.ADAPTIVE_PLAN
    rows = []
    try:
        for fields in [{}] + args.variant:
            plan = dataclasses.replace(default, **fields)
            text = ",".join(f"{k}={v}" for k, v in fields.items()) or "default"
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
