"""Where a `deltakit rank` process's wall time goes: interpreter start, the command (torch's import,
CUDA's start, `rank()`, the report), and the process's exit after it.

    python -m bench.probes.cli_timeline BASE FT --out OUT [--repeat 3] [--hard-exit]

Each run is a fresh interpreter that stamps the time before importing the CLI, before and after
the command; the parent times the whole process. `rank()`'s own time is the report's elapsed_s.
Writes ``cli_timeline.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.probes import existing_path, write_result

CHILD = """
import sys, time
started = time.time()
import deltakit_cli.main as cli
imported = time.time()
sys.argv = ["deltakit"] + sys.argv[1:]
try:
    cli.main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("DK_STAMPS", started, imported, time.time(), code, flush=True)
if HARD_EXIT:  # the variant: leave at once, as os._exit does (no interpreter shutdown, no C++ destructors)
    import os
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
"""


def one_run(base: Path, ft: Path, report: Path, hard_exit: bool = False) -> dict[str, float]:
    argv = [sys.executable, "-c", f"HARD_EXIT = {hard_exit}\n" + CHILD, "rank", str(base), str(ft), "--json", str(report), "--force", "-q"]
    spawned = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    exited = time.time()
    line = next((x for x in proc.stdout.splitlines() if x.startswith("DK_STAMPS")), None)
    if proc.returncode != 0 or line is None:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"rank failed (rc {proc.returncode}): {last}")
    started, imported, finished = (float(x) for x in line.split()[1:4])
    elapsed = json.loads(report.read_text())["elapsed_s"]
    return {"wall_s": exited - spawned, "interpreter_s": started - spawned, "cli_import_s": imported - started,
            "command_s": finished - imported, "rank_elapsed_s": elapsed,
            "command_less_rank_s": finished - imported - elapsed, "exit_s": exited - finished}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=existing_path)
    parser.add_argument("ft", type=existing_path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hard-exit", action="store_true",
                        help="the child leaves with os._exit once the command is done (what shutdown costs)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.repeat):
            row = one_run(args.base, args.ft, Path(work) / "report.json", args.hard_exit)
            print("  ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
            rows.append(row)
    write_result(args.out, "cli_timeline.json", {"rows": rows})


if __name__ == "__main__":
    main()
