"""Run one console command in this (fresh) process and record, at exit, what only the process can see.

    python bench/child.py deltakit rank BASE FT --json OUT        # deltakit_cli.main:main, as the console script
    python bench/child.py mergekit-extract-lora --model FT ...    # mergekit's console script
    python bench/child.py peer svdvals BASE FT --json OUT         # bench/peers.py

Run as a file, not as ``-m bench.child``: ``deltakit`` and ``deltakit_cli`` then come from PYTHONPATH, which
the runner points at the tree being measured (a baseline revision, or this one). At exit (atexit, so also
after SystemExit) it writes JSON to $BENCH_CHILD_REPORT (``.RANK`` appended under torchrun): peak GPU memory
(torch.cuda.max_memory_reserved / _allocated over devices, 0 when CUDA was never started) and the file
deltakit was imported from.
"""

from __future__ import annotations

import atexit
import json
import os
import sys


def _report() -> None:
    path = os.environ.get("BENCH_CHILD_REPORT")
    if not path:
        return
    torch = sys.modules.get("torch")
    reserved = allocated = 0
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            reserved += torch.cuda.max_memory_reserved(device)
            allocated += torch.cuda.max_memory_allocated(device)
    deltakit = sys.modules.get("deltakit")
    with open(path + (f".{os.environ['RANK']}" if "RANK" in os.environ else ""), "w") as handle:
        json.dump({"gpu_peak_reserved_mb": reserved / 2**20, "gpu_peak_allocated_mb": allocated / 2**20,
                   "deltakit_file": getattr(deltakit, "__file__", None)}, handle)


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    atexit.register(_report)
    sys.argv = [command, *args]
    if command == "deltakit":
        from deltakit_cli.main import main as entry
    elif command == "mergekit-extract-lora":
        from mergekit.scripts.extract_lora import main as entry
    elif command == "peer":
        from peers import main as entry  # this file's folder is sys.path[0]
    else:
        raise SystemExit(f"bench/child.py: unknown command {command!r}")
    entry()


if __name__ == "__main__":
    main()
