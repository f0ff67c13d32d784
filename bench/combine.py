"""Join the results.json of runs split over several calls (``run_bench --only ...``) into one.

    python -m bench.combine --out bench/results part1/results.json part2/results.json ...

All parts must be for the same pair (same spec); a later part's row replaces an earlier one
with the same key. Machine and bandwidth fields come from the first part; each row keeps the
floor computed with its own run's bandwidth (``read_bytes_per_s`` / ``write_bytes_per_s``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402
from bench.run_bench import combine_rows, write_outputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.combine", description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="+", type=Path, help="results.json files, in run order")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    parts = [json.loads(p.read_text()) for p in args.parts]
    first = parts[0]
    rows: list[dict] = []
    for path, part in zip(args.parts, parts, strict=True):
        if part.get("spec") != first.get("spec"):
            raise SystemExit(f"{path} is for another pair than {args.parts[0]}; not combining")
        gpus = lambda p: [g.get("name") for g in p["machine"].get("gpus", [])]  # noqa: E731
        if gpus(part) != gpus(first):
            print(f"warning: {path} ran on {gpus(part)}, {args.parts[0]} on {gpus(first)}", file=sys.stderr)
        rows = combine_rows(rows, part["rows"])
    result = {**first, "rows": rows, "parts": [str(p) for p in args.parts]}
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(args.out, result)
    print(report.markdown_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
