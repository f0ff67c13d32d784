"""Which device a run computes on, and making it the current one for the threads that use it.

Example::

    device = resolve_device("auto")          # cuda when there is a GPU, else cpu
    with current_device(device):
        ...
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from deltakit.errors import DeltakitError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> the first CUDA GPU when there is one, else the CPU; refuse a CUDA device that is absent."""
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(text)
    except RuntimeError:
        raise DeltakitError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeltakitError(f"device {text} asked for, but no CUDA GPU is available; "
                                "use device='cpu' (--device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeltakitError(f"device {text} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    elif resolved.type != "cpu":
        raise DeltakitError(f"unsupported device {text!r}; use auto, cpu, cuda or cuda:N")
    return resolved


def make_current(device: torch.device) -> None:
    """Make ``device`` this thread's current CUDA device: a pool's initializer, so that whatever a
    library call takes from the current device is ``device``'s (as in DataLoader's pinning
    thread). Nothing for the CPU or a GPU without an index (the current one, cuda:0 in a new thread)."""
    if _numbered_gpu(device):
        torch.cuda.set_device(device)


def current_device(device: torch.device) -> ContextManager[object]:
    """A context in which ``device`` is the current CUDA device (nothing for the CPU).

    Work on a GPU runs with that GPU current: some torch kernels launch on the current GPU
    whatever their tensors' device (``torch.ldexp`` with an integer exponent, which
    :func:`deltakit.spectral.noise.grid_step` avoids for that reason), and on another GPU they
    read memory that is not theirs.
    """
    return torch.cuda.device(device) if _numbered_gpu(device) else contextlib.nullcontext()


def _numbered_gpu(device: torch.device) -> bool:
    """A GPU named by its index (cuda:N), which can be made current; "cuda" is whichever is."""
    return device.type == "cuda" and device.index is not None
