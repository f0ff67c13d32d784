"""``python -m bench run ...``: the suite's one entry point (bench/run.py; bench/README.md)."""

import sys

from bench import run

if sys.argv[1:2] != ["run"]:
    raise SystemExit("usage: python -m bench run [--preset tiny|7b|tall] [--target T,...] [--peers] "
                     "[--baseline REV|DIR] [--device D] --out DIR   (python -m bench run --help)")
sys.exit(run.main(sys.argv[2:]))
