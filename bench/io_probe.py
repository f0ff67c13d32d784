"""Time the data movements `merge` is made of: file writes by 1..N threads, pinned reads, host↔GPU copies.

Run: python -m bench.io_probe --dir /tmp/probe [--gigabytes 4]. Prints one JSON line per
measurement (GB/s), so a merge's wall time can be set beside what each step can do on the
machine. Files are buffered writes into the page cache, as the commands write; they are
removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch

CHUNK = 64 * 1024 * 1024


def report(label: str, nbytes: int, seconds: float) -> None:
    print(json.dumps({"probe": label, "GB": round(nbytes / 1e9, 2), "seconds": round(seconds, 3),
                      "GB_per_s": round(nbytes / seconds / 1e9, 2)}), flush=True)


def on_threads(work, threads: int) -> float:
    """Run ``work`` on ``threads`` threads at once; the seconds until all are done."""
    start = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def write_threads(folder: Path, total: int, threads: int, files: int) -> float:
    """``threads`` writers, each writing its share of ``total`` bytes in 64 MiB pwrites, into ``files`` files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"probe-{i}.bin" for i in range(files)]
    per_file = total // files
    for path in paths:
        with open(path, "wb") as fh:
            fh.truncate(per_file)
    chunk = bytes(CHUNK)
    jobs = [(paths[i % files], (i // files) * CHUNK) for i in range(total // CHUNK)]
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                path, offset = jobs.pop(0)
            fd = os.open(path, os.O_WRONLY)
            try:
                pwrite_all(fd, memoryview(chunk), offset)
            finally:
                os.close(fd)

    return on_threads(work, threads)


def read_pinned(paths: list[Path], threads: int, pin: bool) -> tuple[int, float]:
    """Read the files into (pinned) tensors with preadv, ``threads`` at a time; bytes and seconds."""
    jobs = []
    for path in paths:
        size = path.stat().st_size
        jobs += [(path, offset, min(CHUNK, size - offset)) for offset in range(0, size, CHUNK)]
    lock = threading.Lock()
    total = sum(j[2] for j in jobs)

    def work() -> None:
        buffer = torch.empty(CHUNK, dtype=torch.uint8, pin_memory=pin)
        view = memoryview(buffer.numpy())
        while True:
            with lock:
                if not jobs:
                    return
                path, offset, size = jobs.pop(0)
            fd = os.open(path, os.O_RDONLY)
            try:
                done = 0
                while done < size:
                    done += os.preadv(fd, [view[done:size]], offset + done)
            finally:
                os.close(fd)

    return total, on_threads(work, threads)


def copies(device: torch.device) -> None:
    """Host↔device bandwidth for one 11008×4096 bf16 tensor (an MLP weight of a 7B model)."""
    tensor = torch.randn(11008, 4096, device=device).to(torch.bfloat16)
    nbytes = tensor.numel() * 2
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    repeats = 20
    for label, fn in (
        ("d2h pageable .to('cpu')", lambda: tensor.to("cpu")),
        ("d2h pinned copy_", lambda: pinned.copy_(tensor, non_blocking=True)),
        ("h2d pinned", lambda: tensor.copy_(pinned, non_blocking=True)),
        ("d2h pinned alloc+copy", lambda: torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
         .copy_(tensor, non_blocking=True)),
        ("isfinite.all", lambda: bool(torch.isfinite(tensor).all())),
    ):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        report(label, nbytes * repeats, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--gigabytes", type=float, default=4.0)
    args = parser.parse_args()
    total = int(args.gigabytes * 1e9) // (8 * CHUNK) * (8 * CHUNK)  # whole chunks in every file
    folder = args.dir / "io-probe"
    try:
        for threads, files in ((1, 1), (1, 1), (4, 1), (4, 4), (8, 8)):
            shutil.rmtree(folder, ignore_errors=True)
            report(f"write {threads} thread(s) {files} file(s)", total, write_threads(folder, total, threads, files))
        paths = sorted(folder.glob("probe-*.bin"))
        for threads, pin in ((1, False), (1, True), (4, True)):
            nbytes, seconds = read_pinned(paths, threads, pin and torch.cuda.is_available())
            report(f"read {threads} thread(s) pinned={pin}", nbytes, seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if torch.cuda.is_available():
        copies(torch.device("cuda"))


if __name__ == "__main__":
    main()
