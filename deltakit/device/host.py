"""Host threads that solve small problems while the device works on the next matrix.

The tails' quadratures of the adaptive spectrum (:mod:`deltakit.spectral.adaptive`) are two batched
eigendecompositions of small tridiagonal matrices per matrix: on one core they take about as long as
the device's work on a matrix, so they run on a few threads of their own (numpy's eigh lets go of
Python's lock), a quarter of the cores at most, leaving the rest to the readers.

Example::

    future = solver_pool().submit(solve, coefficients)
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

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
