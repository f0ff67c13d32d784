"""Spreading per-matrix work over processes with torch.distributed (launched by ``torchrun``).

Every process plans the same list of tensor pairs, takes the share :func:`partition` gives
it (balanced by the cost of a decomposition, longest first), and the results are gathered
back into plan order, so a run on N processes reports exactly what one process would.
NCCL is used between GPUs, gloo on the CPU. Without ``torchrun`` (no ``WORLD_SIZE`` in the
environment) nothing here is used.

Example::

    torchrun --nproc_per_node 8 -m deltakit_cli.main rank BASE FT --json report.json
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Parallel:
    """This process's place among ``world_size`` workers."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_parallel(device: str = "auto") -> Parallel:
    """Join the process group torchrun set up; pick cuda:LOCAL_RANK (NCCL) or the CPU (gloo)."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Parallel()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Parallel(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    device=f"cuda:{local_rank}" if use_cuda else "cpu")


def matrix_cost(shape: Sequence[int]) -> float:
    """Relative cost of a Gram + eigendecomposition of an m×n matrix: m·n·p + p³, p = min(m, n)."""
    if len(shape) != 2:
        return float(sum(shape))  # vectors: a norm, nearly free
    m, n = shape
    p = min(m, n)
    return float(m * n * p + p**3)


def partition(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Indices of ``costs`` split into ``world_size`` lists of near-equal total cost.

    Longest-processing-time-first: each item, most expensive first, goes to the least loaded
    worker; the result is within 4/3 of the optimal makespan (Graham 1969). Deterministic,
    so every process computes the same split. Each list is returned in ascending index order.
    """
    heap = [(0.0, worker) for worker in range(world_size)]
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, worker = heapq.heappop(heap)
        shares[worker].append(index)
        heapq.heappush(heap, (load + costs[index], worker))
    return [sorted(share) for share in shares]


def gather_in_order(local: list[tuple[int, Any]], parallel: Parallel) -> list[Any]:
    """All processes' (plan index, result) pairs, merged into plan order on every process."""
    if not parallel.active:
        return [result for _, result in sorted(local, key=lambda item: item[0])]
    import torch.distributed as dist

    everything: list[list[tuple[int, Any]] | None] = [None] * parallel.world_size
    dist.all_gather_object(everything, local)
    merged = [item for part in everything if part for item in part]
    return [result for _, result in sorted(merged, key=lambda item: item[0])]


def barrier(parallel: Parallel) -> None:
    if parallel.active:
        import torch.distributed as dist

        dist.barrier()


def finish(parallel: Parallel) -> None:
    """Leave the process group cleanly."""
    if parallel.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
