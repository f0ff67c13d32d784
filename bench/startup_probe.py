"""How long does a fresh process take before deltakit does any work?

Two parts, each a JSON line per measurement, in seconds:

* the CLI's start-up, each case a new process, wall time and CPU time (user + system; less
  sensitive than wall time to other work on a shared machine), min and median over ``--repeat``:
  a bare ``python -c pass`` for reference, ``deltakit --help``, ``--version``, ``rank --help``, a
  usage error (``rank a b --bogus``), and a command's start-up up to its first user error
  (``rank`` on a missing path: the library is imported, no file is read). ``--checkout DIR``
  measures another checkout of the repository (e.g. ``git archive COMMIT | tar -x -C DIR``),
  for before/after figures. The load average is printed beside them;
* ``import torch``, then what ``import deltakit`` adds, then CUDA start-up when there is a GPU.

Run: python -m bench.startup_probe [--repeat 5] [--checkout DIR] [--skip-imports]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "python -c pass (interpreter only)": None,
    "deltakit --help": ["--help"],
    "deltakit --version": ["--version"],
    "deltakit rank --help": ["rank", "--help"],
    "usage error: deltakit rank a b --bogus": ["rank", "a", "b", "--bogus"],
    "command start-up: deltakit rank (missing path)": ["rank", "/nonexistent/base", "/nonexistent/ft"],
}
LAUNCH = "import sys; sys.argv[0] = 'deltakit'; from deltakit_cli.main import main; main()"


def cli_environment(checkout: Path, shim: Path) -> dict[str, str]:
    """Python path that imports ``deltakit`` and ``deltakit_cli`` (its cli/ folder) from ``checkout``."""
    link = shim / "deltakit_cli"
    if not link.exists():
        link.symlink_to(checkout / "cli", target_is_directory=True)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(checkout)])}


def time_cli(args: list[str] | None, env: dict[str, str], repeat: int) -> tuple[list[float], list[float], int]:
    """Wall and CPU seconds of ``repeat`` fresh processes running the CLI with ``args`` (None: ``python -c pass``)."""
    command = [sys.executable, "-c", "pass"] if args is None else [sys.executable, "-c", LAUNCH, *args]
    wall, cpu, code = [], [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        wall.append(time.perf_counter() - start)
        cpu.append(usage.ru_utime + usage.ru_stime)
        process.returncode = code = os.waitstatus_to_exitcode(status)
    return wall, cpu, code


def probe_cli(checkout: Path, repeat: int) -> None:
    with tempfile.TemporaryDirectory(prefix="deltakit-startup-") as shim:
        env = cli_environment(checkout, Path(shim))
        time_cli(["--version"], env, 1)  # warm the file cache once
        for label, args in CASES.items():
            wall, cpu, code = time_cli(args, env, repeat)
            print(json.dumps({"probe": label, "checkout": str(checkout), "exit_code": code,
                              "wall_min_s": round(min(wall), 3), "wall_median_s": round(statistics.median(wall), 3),
                              "cpu_min_s": round(min(cpu), 3), "cpu_median_s": round(statistics.median(cpu), 3),
                              "runs": repeat, "load_average": [round(x, 1) for x in os.getloadavg()],
                              "cpus": os.cpu_count()}), flush=True)


def probe_imports() -> None:
    start = time.perf_counter()
    torch = importlib.import_module("torch")  # timed: the import is what is measured
    print(json.dumps({"probe": "import torch", "seconds": round(time.perf_counter() - start, 2)}), flush=True)
    start = time.perf_counter()
    importlib.import_module("deltakit")  # timed: what deltakit adds on top of torch
    print(json.dumps({"probe": "import deltakit (torch already imported)",
                      "seconds": round(time.perf_counter() - start, 2)}), flush=True)
    if torch.cuda.is_available():
        start = time.perf_counter()
        torch.zeros(1, device="cuda")
        print(json.dumps({"probe": "CUDA start-up", "seconds": round(time.perf_counter() - start, 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="Fresh processes per CLI case.")
    parser.add_argument("--checkout", type=Path, default=REPO, help="Repository checkout whose CLI is timed.")
    parser.add_argument("--skip-imports", action="store_true", help="Only the CLI cases.")
    args = parser.parse_args()
    probe_cli(args.checkout.resolve(), max(1, args.repeat))
    if not args.skip_imports:
        probe_imports()


if __name__ == "__main__":
    main()
