"""How fast a pair can be read onto the device, by thread count: the bound under `rank`'s stream.

    python -m bench.probes.read_paths BASE FT --device cuda --out OUT

1. raw: every safetensors file of both checkpoints read with ``os.preadv`` in 64 MiB pieces into
   pinned host buffers (one per thread, reused), by 1, 2, 4 and 8 threads; then the same with
   each piece copied on to the device (one CUDA stream per thread);
2. the stream that `rank` consumes (:meth:`DeltaSource.stream`: read, copy, ΔW in fp32), nothing
   computed, for several (pairs read ahead, reader threads).
Writes ``read_paths.json``: seconds and GB/s per row. The harness's floor reads with one thread
(bench/machine.py), so a row above its bandwidth reads faster than the floor assumes.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

import deltakit.delta as delta_module
from bench.probes import pair_parser, write_result
from deltakit.delta import open_delta_source, resolve_device
from deltakit.spectral.options import SpectralOptions

PIECE = 64 * 1024**2


def pieces(files: list[Path]) -> list[tuple[Path, int, int]]:
    """(file, offset, length) of every 64 MiB piece of the files."""
    out = []
    for path in files:
        size = path.stat().st_size
        out.extend((path, offset, min(PIECE, size - offset)) for offset in range(0, size, PIECE))
    return out


def raw_read(files: list[Path], threads: int, device: torch.device | None) -> dict[str, float]:
    """Read every piece once on ``threads`` threads (each taking every threads-th piece); GB/s."""
    work = pieces(files)
    total = sum(length for _, _, length in work)

    def run(index: int) -> None:
        buffer = torch.empty(PIECE, dtype=torch.uint8, pin_memory=device is not None)
        view = memoryview(buffer.numpy())
        stream = torch.cuda.Stream(device) if device is not None else None
        target = torch.empty(PIECE, dtype=torch.uint8, device=device) if device is not None else None
        handles: dict[Path, int] = {}
        for path, offset, length in work[index::threads]:
            fd = handles.get(path)
            if fd is None:
                fd = handles[path] = os.open(path, os.O_RDONLY)
            done = 0
            while done < length:
                done += os.preadv(fd, [view[done:length]], offset + done)
            if stream is not None:
                with torch.cuda.stream(stream):
                    target[:length].copy_(buffer[:length], non_blocking=True)
                stream.synchronize()
        for fd in handles.values():
            os.close(fd)

    start = time.perf_counter()
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - start
    return {"threads": threads, "to_device": device is not None, "seconds": seconds, "gb_per_s": total / seconds / 1e9}


def stream_only(base: str, ft: str, device: torch.device, prefetch: int, threads: int) -> dict[str, float]:
    """The stream `rank` consumes, nothing computed, with ``prefetch`` pairs ahead on ``threads`` readers."""
    options = SpectralOptions(device=str(device))
    source = open_delta_source(base, ft, (), ())
    original = delta_module.read_threads
    delta_module.read_threads = lambda _prefetch: threads
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        read = 0
        for item in source.stream(range(len(source.pairs)), device, options.dtype, prefetch):
            read += item.base.numel() * item.base.element_size() * 2
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            del item
        seconds = time.perf_counter() - start
    finally:
        delta_module.read_threads = original
    return {"prefetch": prefetch, "threads": threads, "seconds": seconds, "gb_per_s": read / seconds / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = pair_parser(__doc__)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    files = sorted(Path(args.base).glob("*.safetensors")) + sorted(Path(args.ft).glob("*.safetensors"))
    result: dict[str, object] = {"device": str(device), "bytes": sum(f.stat().st_size for f in files),
                                 "cpus": os.cpu_count(), "raw": [], "stream": []}
    targets = [None] + ([device] if device.type == "cuda" else [])
    for target in targets:
        for threads in (1, 2, 4, 8):
            row = raw_read(files, threads, target)
            result["raw"].append(row)
            print("raw", row, flush=True)
    for prefetch, threads in ((2, 2), (4, 4), (8, 4), (8, 8)):
        row = stream_only(args.base, args.ft, device, prefetch, threads)
        result["stream"].append(row)
        print("stream", row, flush=True)
    write_result(args.out, "read_paths.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
