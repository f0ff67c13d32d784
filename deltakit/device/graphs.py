"""Fixed-shape GPU work replayed from CUDA graphs.

A loop of small kernels is bound by their launches, not by their work: the tail's 64 Lanczos
steps (:mod:`deltakit.spectral.adaptive`) on a 4096² ΔW with 32 probes ran about twice as fast
replayed from a graph as launched one by one on an H200. A graph fixes the addresses of its
tensors, so each call copies its inputs into the graph's own buffers first: one copy of the
matrix, which is why only inputs up to ``max_bytes`` are captured (larger matrices are bound by
their products, where launches no longer matter), and why a :class:`GraphCache` keeps at most
``kept`` graphs holding at most ``kept_bytes`` of buffers. A graph is dropped only after the
device has finished every replay of it (a replay may still run beside the caller): its buffers
go back to the allocator, which may hand them to a new graph while an old replay still reads them.

One graph runs at a time: every replay runs on one side stream per device, after the one before,
and one thread at a time captures, loads or replays (the cache's lock: `rank` may compute
matrices on several threads). Graphs captured on torch's shared capture stream share the cuBLAS
workspace of that stream, so two of them replayed at once on two streams could write the same
workspace; nothing else here is captured.

Use :meth:`GraphCache.replay_to_host` with a pure function of tensors; it falls back to calling the
function directly on the CPU, for large inputs, when the cache is disabled
(``DELTAKIT_CUDA_GRAPHS=0`` for the process's :func:`shared_graphs`), or when a capture fails.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from deltakit.device.streams import kept_stream

MAX_GRAPH_BYTES = 320 << 20  # inputs this large or smaller are captured: 8192² fp32 (256 MiB) fits
KEPT_GRAPHS = 8  # the least recently used graph (with its buffers) is dropped beyond this many,
KEPT_BYTES = 1536 << 20  # or beyond this many bytes of input buffers (rank at 7B keeps four graphs, ~0.5 GB)

Outputs = tuple[torch.Tensor, ...]


class CapturedCall:
    """``function(*inputs)`` captured once for inputs of these shapes, replayed on new values.

    The returned tensors are the graph's own: they hold the last call's result until the next
    replay, so copy what must outlive it.
    """

    def __init__(self, function: Callable[..., Outputs], inputs: tuple[torch.Tensor, ...]):
        device = inputs[0].device
        self.inputs = tuple(torch.empty(x.shape, dtype=x.dtype, device=device) for x in inputs)
        for buffer, value in zip(self.inputs, inputs):
            buffer.copy_(value)
        # kept streams: the graphs' cuBLAS workspaces are those of the stream they were captured
        # on, and a warm-up on the capture stream could write one while a replay reads it
        warm, capture = kept_stream(device, "warm-up"), kept_stream(device, "capture")
        warm.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(warm):  # cuBLAS picks its kernels and workspaces outside the capture
            self.first = function(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(warm)
        self.graph = torch.cuda.CUDAGraph()
        # Not torch.cuda.graph(): on entering it synchronises the device and empties torch's caches
        # of device and pinned host memory, which the readers and the other threads then allocate
        # again (a capture then costs ten replays).
        # thread_local: the read-ahead threads keep copying to the device while this thread captures.
        with torch.cuda.stream(capture):
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.outputs = function(*self.inputs)
            finally:
                self.graph.capture_end()
        self.released: torch.cuda.Event | None = None  # recorded when an asynchronous replay is done with the buffers

    def load(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Copy ``inputs`` into the graph's buffers on the current stream, once the last replay is done with them."""
        if self.released is not None:
            torch.cuda.current_stream(self.inputs[0].device).wait_event(self.released)  # on the device, not the host
        for buffer, value in zip(self.inputs, inputs):
            buffer.copy_(value)


@dataclass
class OnTheWay:
    """Outputs on their way to the host: ``values`` (host tensors) are complete once ``done()`` returns."""

    values: Outputs
    event: torch.cuda.Event | None = None

    def done(self) -> Outputs:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.values


class GraphCache:
    """Captured graphs kept for reuse, least recently used dropped first; see the module docstring.

    ``enabled`` False: every call is a plain call. Each instance has its own graphs and lock; the
    process's commands share :func:`shared_graphs`, so a notebook running `rank` again replays
    what the last run captured.
    """

    def __init__(self, enabled: bool = True, kept: int = KEPT_GRAPHS, kept_bytes: int = KEPT_BYTES,
                 max_bytes: int = MAX_GRAPH_BYTES) -> None:
        self.enabled, self.kept, self.kept_bytes_limit, self.max_bytes = enabled, kept, kept_bytes, max_bytes
        self._graphs: OrderedDict[tuple, CapturedCall] = OrderedDict()
        self._failed: set[tuple] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._graphs)

    def capturable(self, inputs: tuple[torch.Tensor, ...]) -> bool:
        """Whether :meth:`replay_to_host` would use a graph for these inputs."""
        return (self.enabled and all(x.is_cuda for x in inputs)
                and sum(x.numel() * x.element_size() for x in inputs) <= self.max_bytes)

    def kept_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for captured in self._graphs.values() for x in captured.inputs)

    def replay_to_host(self, name: str, function: Callable[..., Outputs], inputs: tuple[torch.Tensor, ...]) -> OnTheWay:
        """``function(*inputs)`` copied to the host, without waiting for it where a graph runs it.

        The inputs are copied into the graph's buffers on the current stream; the graph then runs
        on a side stream, and its outputs go to pinned host memory there, so the caller's next
        kernels (the next matrix) run beside it and the host waits only in ``done()``. The
        inputs may be freed as soon as this returns. Without a graph: computed and copied now.
        """
        if not self.capturable(inputs):
            return OnTheWay(tuple(x.cpu() for x in function(*inputs)))
        dropped: list[CapturedCall] = []
        try:
            with self._lock:
                captured, first = self._captured(name, function, inputs, dropped)
                if captured is not None and first is None:
                    return _replay(captured, inputs)
        finally:
            for old in dropped:  # outside the lock: waiting for the device must not hold up the other threads
                _drop(old)
        outputs = function(*inputs) if captured is None else first
        return OnTheWay(tuple(x.cpu() for x in outputs))

    def clear(self) -> None:
        """Drop every kept graph and its buffers."""
        with self._lock:
            dropped = list(self._graphs.values())
            self._graphs.clear()
            self._failed.clear()
        for old in dropped:
            _drop(old)

    def _captured(self, name: str, function: Callable[..., Outputs], inputs: tuple[torch.Tensor, ...],
                  dropped: list[CapturedCall]) -> tuple[CapturedCall | None, Outputs | None]:
        """The kept graph for ``name`` and these shapes, captured now if need be (then with the warm-up's
        outputs for these very inputs); (None, None) where no graph is used. Graphs evicted to make room
        go to ``dropped``. The caller holds the lock."""
        key = (name, inputs[0].device, tuple((tuple(x.shape), x.dtype) for x in inputs))
        if key in self._failed:
            return None, None
        captured = self._graphs.get(key)
        if captured is not None:
            self._graphs.move_to_end(key)
            return captured, None
        incoming = sum(x.numel() * x.element_size() for x in inputs)
        while self._graphs and (len(self._graphs) >= self.kept or self.kept_bytes() + incoming > self.kept_bytes_limit):
            dropped.append(self._graphs.popitem(last=False)[1])
        for old in dropped:  # their buffers may be reused by the capture: the device must be done with them
            _drop(old)
        dropped.clear()
        try:
            captured = CapturedCall(function, inputs)
        except RuntimeError:  # a capture this build or driver refuses: plain calls from now on
            self._failed.add(key)
            torch.cuda.synchronize(inputs[0].device)
            return None, None
        self._graphs[key] = captured
        first, captured.first = captured.first, None
        return captured, first


def _replay(captured: CapturedCall, inputs: tuple[torch.Tensor, ...]) -> OnTheWay:
    device = inputs[0].device
    captured.load(inputs)  # waits (on the device) for this graph's last replay
    side = kept_stream(device, "replay")
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        captured.graph.replay()
        host = tuple(torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)
                     for x in captured.outputs)
        event = torch.cuda.Event()
        event.record(side)
    captured.released = event
    return OnTheWay(host, event)


def _drop(captured: CapturedCall) -> None:
    """Release a graph once the device is done with it: after its last replay (its own event), or,
    never replayed, once the device has finished its capture."""
    if captured.released is not None:
        captured.released.synchronize()
    else:
        torch.cuda.synchronize(captured.inputs[0].device)
    del captured


_SHARED = GraphCache(enabled=os.environ.get("DELTAKIT_CUDA_GRAPHS", "1") != "0")


def shared_graphs() -> GraphCache:
    """The process's graph cache, which every command uses (``DELTAKIT_CUDA_GRAPHS=0`` disables it)."""
    return _SHARED
