"""Where does `deltakit merge` spend its time? Each part of it, timed alone in one warm process.

Run after the 7b pair and deltakit's adapter exist (a `run_bench.py --keep-workdir` run):

    python -m bench.merge_probe --workdir /tmp/dk-bench [--device cuda]

Prints one JSON line per measurement: the whole merge (imports and CUDA already warm), the
merge with its file writes replaced by nothing, the reads alone (as merge's prefetch thread
does them, then with several threads), and the writes alone (as merge's writer threads do
them, in model order and interleaved over shards).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from deltakit.delta import fetch, resolve_device
from deltakit.io import open_checkpoint
from deltakit.io.writer import BackgroundWriter, ShardedWriter
from deltakit.lora import merge
from deltakit.lora.merge import shard_size_of


def timed(label: str, fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"probe": label, "seconds": round(seconds, 3)}), flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--blocks", action="store_true",
                        help="only compare rank / extract / merge with and without block-wise reads and merges")
    parser.add_argument("--read-threads", action="store_true",
                        help="only compare rank and extract with 1, 2 and 4 threads reading ahead")
    args = parser.parse_args()
    base, adapter = args.workdir / "base", args.workdir / "runs" / "deltakit-adapter"
    out = args.workdir / "probe-merged"
    device = resolve_device(args.device)
    ckpt = open_checkpoint(base)
    names = list(ckpt.keys())
    torch.ones(1, device=device)  # CUDA context, outside the timings
    if args.blocks:
        compare_blocks(args.workdir, args.device)
        return
    if args.read_threads:
        compare_read_threads(args.workdir, args.device)
        return

    def whole_merge() -> None:
        merge(base, adapter, out, device=args.device, force=True)

    timed("merge (warm process)", whole_merge)
    timed("merge again", whole_merge)
    original = ShardedWriter.write
    ShardedWriter.write = lambda self, name, tensor, start_row=None: self._written.add(name)  # type: ignore[method-assign]
    try:
        timed("merge without file writes", whole_merge)
    finally:
        ShardedWriter.write = original  # type: ignore[method-assign]
    shutil.rmtree(out, ignore_errors=True)

    def read(name: str) -> None:
        fetch(ckpt, name, device) if device.type == "cuda" else ckpt.get(name)

    timed("reads, 1 thread (fetch: pinned + H2D)", lambda: [read(n) for n in names])
    for threads in (2, 4):
        with ThreadPoolExecutor(threads) as pool:
            timed(f"reads, {threads} threads", lambda: list(pool.map(read, names)))
    host = {n: ckpt.get(n) for n in names[:40]}  # write the same bytes over and over: no reads in the timing
    plan = [(n, ckpt.shape(n), ckpt.dtype(n)) for n in names]
    shard_bytes = shard_size_of(ckpt)
    sample = {n: host.get(n) if n in host else torch.empty(ckpt.shape(n), dtype=ckpt.dtype(n)) for n in names}
    for workers, interleave in ((1, False), (4, False), (4, True), (8, True)):
        out.mkdir(exist_ok=True)
        writer = ShardedWriter(out, plan, max_shard_bytes=shard_bytes)
        order = names
        if interleave:  # round-robin over the output shards, so the threads write different files
            by_shard = [[t.name for t in shard] for shard in writer.shards]
            order = [shard[i] for i in range(max(map(len, by_shard))) for shard in by_shard if i < len(shard)]
        background = BackgroundWriter(writer, depth=8, workers=workers)

        def write_all() -> None:
            for name in order:
                background.write(name, sample[name])
            background.finish()

        timed(f"writes, {workers} thread(s), {'interleaved over shards' if interleave else 'model order'}", write_all)
        shutil.rmtree(out, ignore_errors=True)


def compare_blocks(workdir: Path, device: str) -> None:
    """rank, extract and merge in this warm process, alternately with 64 MiB blocks and with whole tensors."""
    import importlib

    import deltakit.delta as delta
    from deltakit.analysis import rank
    from deltakit.lora import extract_lora
    from deltakit.spectral.options import SpectralOptions

    merging = importlib.import_module("deltakit.lora.merge")
    base, ft, adapter = workdir / "base", workdir / "ft", workdir / "runs" / "deltakit-adapter"
    blocks = (delta.STAGING_BYTES, merging.PIECE_BYTES)
    options = SpectralOptions(device=device)
    for label, (staging, piece) in (("blocks", blocks), ("whole", (1 << 62, 1 << 62))) * 2:
        delta.STAGING_BYTES, merging.PIECE_BYTES = staging, piece
        timed(f"rank, {label}", lambda: rank(base, ft, options=options))
        timed(f"extract r64, {label}", lambda: extract_lora(base, ft, workdir / "probe-adapter", rank=64,
                                                            options=options, force=True))
        timed(f"merge, {label}", lambda: merge(base, adapter, workdir / "probe-merged", device=device, force=True))
    delta.STAGING_BYTES, merging.PIECE_BYTES = blocks
    shutil.rmtree(workdir / "probe-merged", ignore_errors=True)
    shutil.rmtree(workdir / "probe-adapter", ignore_errors=True)


def compare_read_threads(workdir: Path, device: str) -> None:
    """rank and extract in this warm process with 1, 2 and 4 threads reading pairs ahead (depth 2 × threads)."""
    import functools

    import deltakit.delta as delta
    from deltakit.analysis import rank
    from deltakit.lora import extract_lora
    from deltakit.spectral.options import SpectralOptions

    base, ft = workdir / "base", workdir / "ft"
    original = delta.prefetched
    try:
        for threads in (1, 2, 4, 1):
            delta.prefetched = functools.partial(original, workers=threads)
            options = SpectralOptions(device=device, prefetch=2 * threads)
            timed(f"rank, {threads} read thread(s)", lambda: rank(base, ft, options=options))
            timed(f"extract r64, {threads} read thread(s)", lambda: extract_lora(
                base, ft, workdir / "probe-adapter", rank=64, options=options, force=True))
    finally:
        delta.prefetched = original
        shutil.rmtree(workdir / "probe-adapter", ignore_errors=True)


if __name__ == "__main__":
    main()
