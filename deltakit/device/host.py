"""Host threads that solve small problems while the device works on the next matrix.

The tails' quadratures of the adaptive spectrum (:mod:`deltakit.spectral.adaptive`) are two batched
eigendecompositions of small tridiagonal matrices per matrix: on one core they take about as long as
the device's work on a matrix, so they run on a few threads of their own (numpy's eigh lets go of
Python's lock), a quarter of the cores at most, leaving the rest to the readers.

Example::

    future = solver_pool().submit(solve, coefficients)
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

SOLVER_THREADS = max(1, min(4, (os.cpu_count() or 1) // 4))

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()  # around the pool's creation only


def solver_pool() -> ThreadPoolExecutor:
    """The process's pool for host solves (made on first use, kept for later commands in the same process)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=SOLVER_THREADS, thread_name_prefix="deltakit-solver")
        return _pool


def free_cores() -> int:
    """Cores this process may use that other processes are not already using: the cores it may run on
    less the 1-minute load average (which counts running processes), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, int(cores - load + 0.5)))


@contextlib.contextmanager
def threads_for_free_cores() -> Iterator[int]:
    """torch's intra-op threads lowered, for the block, to the cores other processes leave free.

    BLAS and OpenMP threads that outnumber the free cores spin while they wait for each other:
    on a busy machine a run with the default threads was 5× slower than with one. Never raises the
    count, and leaves it alone when ``OMP_NUM_THREADS`` is set (the user chose). Yields the count used.
    """
    import torch

    before = torch.get_num_threads()
    chosen = before if "OMP_NUM_THREADS" in os.environ else min(before, free_cores())
    if chosen != before:
        torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        if chosen != before:
            torch.set_num_threads(before)
