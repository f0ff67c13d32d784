"""Per-matrix work on a few threads, each with its own CUDA stream, so that one matrix's host
work (small eigensolvers, decisions, launches) runs while another's kernels keep the GPU busy.

`rank`'s adaptive path waits for the device a few times per matrix (each Rayleigh–Ritz round
ends on the host) and solves a 128×128 eigenproblem there each time; with several threads the
waits of one overlap the kernels of the others (docs/benchmarks.md has what it buys). Each
matrix is computed exactly as on one thread, from the same seeds and with the same kernels,
so the report does not depend on the number of threads (tests/test_workers.py holds them equal).

The consumer hands over a item (a :class:`~deltakit.delta.DeltaItem`) made on its own stream:
:meth:`MatrixWorkers.submit` records an event there, and the worker's stream waits for it
and takes the item's tensors over (``record_stream``), so the caching allocator reuses their
memory only once the worker's kernels are done with them (and so for tensors among the
arguments). At most ``threads`` items, holding at most :data:`IN_FLIGHT_BYTES` together (one
item always runs, whatever its size), are queued or running at once: ``submit`` waits for one
to finish first.

Example::

    with MatrixWorkers(device, threads=2) as workers:
        for item in items:
            futures.append(workers.submit(analyse, item))
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from deltakit.device.placement import make_current
from deltakit.device.streams import kept_stream

IN_FLIGHT_BYTES = 2 * 10**9
"""Bytes of items (W_base + ΔW on the device) the threads hold at once, beyond which they take
one at a time: three 11008×4096 pairs of a 7B model hold 0.8 GB; a 28672×8192 pair (70B) 1.4 GB,
so those go one at a time; a 53248×16384 one (405B) 5.2 GB, alone as on one thread."""


class MatrixWorkers:
    """Run ``function(item, ...)`` for DeltaItems on ``threads`` threads (each with one CUDA stream
    of its own on a GPU); with one thread, in the caller's thread and stream, as a plain call."""

    def __init__(self, device: torch.device, threads: int = 1, budget: float = IN_FLIGHT_BYTES):
        self.device = device
        self.threads = max(1, int(threads))
        self.budget = budget
        self._pool: ThreadPoolExecutor | None = None
        self._running: dict[Future, int] = {}  # queued or running, with the bytes their items hold
        self._local = threading.local()
        self._slots = 0  # threads that have taken a stream
        self._lock = threading.Lock()

    def __enter__(self) -> "MatrixWorkers":
        if self.threads > 1:
            if self.device.type == "cuda":
                load_linalg(self.device)
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="deltakit-matrix",
                                            initializer=make_current, initargs=(self.device,))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self.device.type == "cuda":
            for slot in range(self._slots):  # what the caller does next sees the workers' results
                torch.cuda.current_stream(self.device).wait_stream(kept_stream(self.device, f"worker {slot}"))

    def held(self) -> int:
        """Bytes of the items queued or running now."""
        return sum(self._running.values())

    def wait_for_room(self, size: int) -> None:
        """Wait until an item of ``size`` bytes fits: fewer than ``threads`` queued or running and
        ``budget`` not passed, or nothing queued or running."""
        while self._running and (len(self._running) >= self.threads or self.held() + size > self.budget):
            finished, _ = wait(self._running, return_when=FIRST_COMPLETED)
            for future in finished:
                del self._running[future]

    def paced(self, items: Iterable[Any], sizes: Sequence[int]) -> Iterator[Any]:
        """``items`` in order, each taken from its (read-ahead) source only once an item of
        ``sizes[i]`` bytes fits (:meth:`wait_for_room`): the caller then never holds the next item
        on the device while the threads hold the budget, so a pair larger than the budget (405B's
        MLP, 5.2 GB) is on the device once, as on one thread."""
        iterator = iter(items)
        for size in sizes:
            if self._pool is not None:
                self.wait_for_room(size)
            try:
                item = next(iterator)
            except StopIteration:
                return
            yield item
            del item

    def submit(self, function: Callable[..., Any], item: Any, *args: Any) -> Future:
        """A future of ``function(item, *args)``. Waits while ``threads`` items are queued or running,
        or while taking this one would hold more than ``budget`` bytes of items (one always runs)."""
        if self._pool is None:
            done: Future = Future()
            try:
                done.set_result(function(item, *args))
            except BaseException as error:  # noqa: BLE001 - re-raised by result(), as a pool's future does
                done.set_exception(error)
            return done
        size = item_bytes(item)
        self.wait_for_room(size)
        ready = None
        if item.delta.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(item.delta.device))
        future = self._pool.submit(self._run, function, item, ready, args)
        self._running[future] = size
        return future

    def _stream(self) -> torch.cuda.Stream:
        """This thread's stream: the k-th kept worker stream of the device (the same on every run, so
        that a notebook calling `rank` again and again reuses its cached blocks)."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            with self._lock:
                slot, self._slots = self._slots, self._slots + 1
            stream = self._local.stream = kept_stream(self.device, f"worker {slot}")
        return stream

    def _run(self, function: Callable[..., Any], item: Any, ready: torch.cuda.Event | None,
             args: tuple[Any, ...]) -> Any:
        if ready is None:
            return function(item, *args)
        stream = self._stream()
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            for tensor in device_tensors((item.base, item.delta, args)):
                tensor.record_stream(stream)
            return function(item, *args)


def item_bytes(item: Any) -> int:
    """Bytes an item's tensors hold (``item.base`` and ``item.delta``: W_base as stored, ΔW in the compute dtype)."""
    return sum(t.numel() * t.element_size() for t in (item.base, item.delta) if isinstance(t, torch.Tensor))


def load_linalg(device: torch.device) -> None:
    """Load torch's CUDA linear algebra (cuSOLVER) on this thread before other threads use it.

    torch loads it lazily at the first factorisation, and two threads doing that at once fail
    with "lazy wrapper should be called at most once" (pytorch/pytorch#90613). One tiny call of
    each kind `rank` makes.
    """
    one = torch.ones(1, 1, device=device, dtype=torch.float64)
    torch.linalg.cholesky_ex(one)
    torch.linalg.eigh(one)
    torch.linalg.qr(one)
    torch.linalg.svd(one)
    torch.cuda.current_stream(device).synchronize()


def device_tensors(value: Any) -> list[torch.Tensor]:
    """The CUDA tensors in ``value`` (a tensor, or tuples and lists of them at any depth)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_cuda else []
    if isinstance(value, (tuple, list)):
        return [tensor for part in value for tensor in device_tensors(part)]
    return []
