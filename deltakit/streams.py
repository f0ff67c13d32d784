"""CUDA streams kept for the life of the process: one per GPU and role.

torch's caching allocator keeps freed blocks per stream, so a stream made anew for each reader
thread, each `rank` call or each graph capture reserves memory of its own: with a stream per
reader thread, a 70B-shaped slice reserved 11.6 GB for 5.8 GB allocated
(bench/measured/2026-11-29-h200/s4-s78-6). Roles in use: "copy" (every reader thread's host to
device copies, :func:`deltakit.delta.fetch`), "worker N" (the N-th thread computing spectra,
:mod:`deltakit.workers`), "capture", "warm-up" and "replay" (the CUDA graphs,
:mod:`deltakit.spectral.graphs`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import ContextManager

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


def make_current(device: torch.device) -> None:
    """Make ``device`` this thread's current CUDA device: a pool's initializer, so that whatever a
    library call takes from the current device is ``device``'s (as in DataLoader's pinning
    thread). Nothing for the CPU or a GPU without an index (the current one, cuda:0 in a new thread)."""
    if _numbered_gpu(device):
        torch.cuda.set_device(device)


def current_device(device: torch.device) -> ContextManager[object]:
    """A context in which ``device`` is the current CUDA device (nothing for the CPU).

    `rank` on cuda:1 of a 2-GPU host failed with "an illegal memory access" while the calling
    thread's current device was cuda:0, and ran clean under torchrun, where each process makes
    its GPU current first. The cause was one torch kernel launched on the current GPU whatever its
    tensors' (``torch.ldexp``, no longer used: :func:`deltakit.spectral.noise.grid_step`); work on a
    GPU still runs with that GPU current, so that another such kernel does no harm.
    """
    return torch.cuda.device(device) if _numbered_gpu(device) else contextlib.nullcontext()


def _numbered_gpu(device: torch.device) -> bool:
    """A GPU named by its index (cuda:N), which can be made current; "cuda" is whichever is."""
    return device.type == "cuda" and device.index is not None
