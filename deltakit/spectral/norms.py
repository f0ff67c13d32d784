"""Norms of large matrices in bounded memory: float64 sums over row blocks, never a float64 copy.

``torch.linalg.vector_norm(w, dtype=torch.float64)`` first converts the whole of ``w`` to
float64: for a 53248×16384 matrix that is a 7 GB temporary. Here each block of rows (at most
``block_elements`` entries, 128 MiB in float64) is converted and reduced in turn; a matrix that
fits in one block takes exactly the one-call path, so small results are unchanged to the bit.

Example::

    frobenius_norm(torch.ones(3, 4, dtype=torch.bfloat16))   # 3.4641016151377544 (√12)
"""

from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 24  # entries converted to float64 at a time (128 MiB)


def dim0_blocks(tensor: torch.Tensor, block_elements: int = BLOCK_ELEMENTS) -> list[slice]:
    """Slices of ``tensor``'s first dimension, each covering at most ~``block_elements`` entries (at least one row)."""
    if tensor.ndim == 0:
        return [slice(None)]
    rows = int(tensor.shape[0])
    per_row = max(1, tensor.numel() // rows) if rows else 1
    step = max(1, block_elements // per_row)
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)] or [slice(None)]


def frobenius_norm(tensor: torch.Tensor, block_elements: int = BLOCK_ELEMENTS) -> float:
    """‖tensor‖_F (any shape, any float dtype) summed in float64, holding at most one block in float64.

    Several blocks: the float64 norms of the blocks, combined as the float64 norm of that
    vector; this differs from the one-call norm only in the order of float64 additions
    (relative ~1e-16, tests/test_memory.py checks it against math.fsum).
    """
    if tensor.numel() <= block_elements or tensor.ndim == 0:
        return float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
    parts = torch.stack([torch.linalg.vector_norm(tensor[rows], dtype=torch.float64)
                         for rows in dim0_blocks(tensor, block_elements)])
    return float(torch.linalg.vector_norm(parts))
