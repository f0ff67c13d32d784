"""Reading tensors onto a device ahead of the work that needs them, within a memory budget.

:func:`prefetched` runs producers (reads) on background threads, a bounded number and bounded
bytes ahead of the consumer; :func:`fetch` reads one stored tensor (or rows of it) onto a device
through pinned host memory; :func:`released_pairs` zips without keeping what it yielded.

Example::

    for value in prefetched([lambda: fetch(ckpt, name, device) for name in names], depth=2, sizes=sizes,
                            budget=read_ahead_budget(device, PREFETCH_BYTES)):
        ...
"""

from __future__ import annotations

import collections
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from deltakit.device.placement import make_current
from deltakit.device.streams import kept_stream
from deltakit.io.checkpoint import Checkpoint
from deltakit.io.writer import IO_THREADS


def may_read_ahead(held: int, size: int, ahead: int, depth: int, budget: float) -> bool:
    """Whether a value of ``size`` bytes may be started ahead of the consumer, which (with the
    ``ahead`` values already started) holds ``held`` bytes: :func:`prefetched`'s whole policy."""
    return ahead < depth and held + size <= budget


def prefetched(producers: Sequence[Callable[[], object]], depth: int = 2, workers: int = 1,
               sizes: Sequence[int] | None = None, budget: float | None = None,
               device: torch.device | None = None) -> Iterator[object]:
    """Yield ``producer()`` for each producer in order, running up to ``depth`` ahead on ``workers`` threads.

    ``sizes[i]`` is the bytes producer i's value holds; with a ``budget`` the value the consumer
    holds (the last one yielded, until it asks for the next) and those ahead add up to at most
    ``budget`` bytes, except that the next value is always produced once the consumer asks for
    it, so a value larger than the budget is produced alone, one at a time. An exception in a
    producer is re-raised in the consumer at its position. Several workers help where one
    thread cannot read as fast as the machine can (copies out of the page cache are bound by
    one core per thread). A CUDA ``device`` (cuda:N) is the worker threads' current device.
    """
    if depth <= 0:
        for produce in producers:
            yield produce()
        return
    count = len(producers)
    nbytes = [0] * count if sizes is None else [int(size) for size in sizes]
    if len(nbytes) != count:
        raise ValueError(f"{count} producers but {len(nbytes)} sizes")
    limit = math.inf if budget is None else budget
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="deltakit-prefetch",
                              initializer=make_current, initargs=(device or torch.device("cpu"),))
    ahead: collections.deque[tuple[Future, int]] = collections.deque()
    following = 0  # index of the next producer to start
    held = 0  # bytes of the value with the consumer and of those ahead

    def start() -> None:
        nonlocal following, held
        ahead.append((pool.submit(producers[following]), nbytes[following]))
        held += nbytes[following]
        following += 1

    try:
        while True:
            if not ahead:  # the consumer waits: start the next whatever its size
                if following == count:
                    return
                start()
            future, size = ahead.popleft()
            while following < count and may_read_ahead(held, nbytes[following], len(ahead), depth, limit):
                start()
            value = future.result()
            del future  # a done future holds its value: only the consumer should
            yield value
            del value
            held -= size  # the consumer asked for the next one: it is done with this one
    finally:
        for future, _ in ahead:  # the consumer stopped early: start nothing new
            future.cancel()
        pool.shutdown(wait=True)


PREFETCH_BYTES = 4 * 10**9
"""Default read-ahead budget: stored bytes of the pair being worked on plus those read ahead.

At 70B shapes (a 28672×8192 bf16 pair is 0.94 GB) it lets ``prefetch=2`` pairs be read ahead
as before; at 405B shapes (a 53248×16384 bf16 pair is 3.5 GB) the MLP pairs are read one at a
time, so the device holds one pair (W_base bf16 + ΔW fp32, 5.2 GB) plus the spectral workspace
and at most 0.5 GB read ahead: under 8 GB (the memory model of docs/benchmarks.md)."""


CPU_PREFETCH_BYTES = 512 * 1024**2
"""Read-ahead budget on the CPU, where what is read ahead sits in the process's own memory: a pair
larger than this is read only once the one before it is done, so that analysing a pair holds that
pair's stored tensors, its ΔW and a few bounded temporaries (peak RSS about one pair plus one ΔW)."""


def read_ahead_budget(device: torch.device, budget: float | None) -> float | None:
    """``budget`` for reads onto ``device``, capped at CPU_PREFETCH_BYTES where that is host memory."""
    if device.type == "cuda" or budget is None:
        return budget if device.type == "cuda" else CPU_PREFETCH_BYTES
    return min(budget, CPU_PREFETCH_BYTES)


def released_pairs(first: Iterable[Any], second: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """``zip(first, second)`` that keeps nothing it yielded: CPython's zip reuses its result tuple, which
    so holds the previous item (a whole ΔW on the device) while the next one is read. Stops at the shorter."""
    rest = iter(second)
    for left in first:
        try:
            right = next(rest)
        except StopIteration:
            return
        yield left, right
        del left, right


def read_threads(prefetch: int) -> int:
    """Threads reading the ``prefetch`` pairs ahead: all of them at once, up to IO_THREADS.

    Memory stays that of ``prefetch`` pairs; a copy out of the page cache is bound by one core
    per thread, so a few threads on different tensors read several times faster than one
    (docs/benchmarks.md).
    """
    return max(1, min(prefetch, IO_THREADS))


STAGING_BYTES = 64 * 1024**2  # host memory a GPU read goes through, per piece


def fetch(ckpt: Checkpoint, name: str, device: torch.device, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor (or its ``rows`` start:stop) onto ``device``; meant for the prefetch threads.

    For a GPU the bytes go from disk into pinned host memory, at most STAGING_BYTES at a time,
    and on to the device on the one stream every reader copies on (``kept_stream(device, "copy")``:
    one stream, one pool of cached blocks), so the copy overlaps the consumer's kernels and host
    memory stays bounded whatever the tensor's size; the stream is synchronised before
    returning. The copies queue behind each other; at ~50 GB/s they are not what bounds a read.
    The consumer must :func:`adopt` the tensor.
    """
    shape = ckpt.shape(name)
    start, stop = rows if rows is not None else (0, shape[0] if shape else 0)
    if device.type != "cuda":
        return ckpt.get(name) if rows is None else ckpt.get_rows(name, start, stop)
    stream = kept_stream(device, "copy")
    if name in ckpt.quantized:  # the stored bytes go to the device and are dequantized there
        with torch.cuda.stream(stream):
            on_device = ckpt.dequantized(name, device, rows, pin=True)
        stream.synchronize()
        return on_device
    row_bytes = ckpt.infos[name].nbytes // shape[0] if shape and shape[0] else 0
    if not shape or row_bytes == 0 or (stop - start) * row_bytes <= STAGING_BYTES or ckpt.format == "pickle":
        host = ckpt.get(name, pin=True) if rows is None else ckpt.get_rows(name, start, stop, pin=True)
        with torch.cuda.stream(stream):
            on_device = host.to(device, non_blocking=True)
        stream.synchronize()
        return on_device
    with torch.cuda.stream(stream):  # allocated on the copy stream, like the single-copy case above
        on_device = torch.empty((stop - start, *shape[1:]), dtype=ckpt.dtype(name), device=device)
    step = max(1, STAGING_BYTES // row_bytes)
    for first in range(start, stop, step):
        last = min(stop, first + step)
        host = ckpt.get_rows(name, first, last, pin=True)
        with torch.cuda.stream(stream):
            on_device[first - start:last - start].copy_(host, non_blocking=True)
        stream.synchronize()  # the pinned piece is reused by the allocator only after its copy
    return on_device


def adopt(tensor: torch.Tensor) -> torch.Tensor:
    """Tell the caching allocator a tensor fetched on another stream is now used on the current one."""
    if tensor.is_cuda:
        tensor.record_stream(torch.cuda.current_stream(tensor.device))
    return tensor
