"""CUDA streams kept for the life of the process: one per GPU and role.

torch's caching allocator keeps freed blocks per stream, so a stream made anew for each reader
thread, each `rank` call or each graph capture reserves memory of its own (with a stream per
reader thread, a 70B-shaped slice reserved twice what it allocated). Roles in use: "copy" (every
reader thread's host to device copies, :func:`deltakit.device.reads.fetch`), "worker N" (the N-th thread computing spectra,
:mod:`deltakit.device.workers`), "capture", "warm-up" and "replay" (the CUDA graphs,
:mod:`deltakit.device.graphs`).
"""

from __future__ import annotations

import threading

import torch

_streams: dict[tuple[int, str], torch.cuda.Stream] = {}
_lock = threading.Lock()


def kept_stream(device: torch.device, role: str) -> torch.cuda.Stream:
    """The stream of ``role`` on ``device``'s GPU, made on first use and the same ever after."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        stream = _streams.get((index, role))
        if stream is None:
            stream = _streams[(index, role)] = torch.cuda.Stream(index)
        return stream
