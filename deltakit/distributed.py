"""Spreading per-matrix work over processes with torch.distributed (launched by ``torchrun``).

Every process plans the same list of tensor pairs, takes the share :func:`partition` gives
it (balanced by cost, longest first), and the results are gathered back into plan order, so
a run on N processes reports exactly what one process would. NCCL is used between GPUs,
gloo on the CPU. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) nothing here
is used.

Outputs: :func:`shared_directory` is :func:`~deltakit.io.atomic.atomic_directory` for a group
of processes. Process 0 makes the temporary folder and the files' headers, every process
writes its own tensors into them at planned offsets, process 0 writes the index and renames
the folder into place once all are done. With several hosts the output must be on a file
system they share.

Failures. Every collective here is one :func:`exchange` of (error, payload): a process that
fails reports its error at the next exchange, where every other process raises
:class:`PeerFailed` too, instead of waiting forever for it.

Example::

    torchrun --nproc_per_node 8 -m deltakit_cli.main rank BASE FT --json report.json
"""

from __future__ import annotations

import contextlib
import heapq
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from deltakit.device.placement import resolve_device
from deltakit.errors import DeltakitError
from deltakit.io.atomic import atomic_directory, check_output_path, explain_write_error, temporary_output
from deltakit.io.inputs import InputFootprint
from deltakit.io.writer import ShardedWriter
from deltakit.device.placement import make_current


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

    def share(self, costs: Sequence[float]) -> list[int]:
        """Indices of the items this process works on, of all items with these ``costs`` (see :func:`partition`)."""
        return partition(costs, self.world_size)[self.rank]


def process_device(parallel: Parallel, asked: str | torch.device) -> torch.device:
    """Where this process computes: its own device under torchrun, else ``asked`` resolved ("auto": a GPU if any)."""
    return resolve_device(parallel.device if parallel.active else asked)


def reported_device(parallel: Parallel, device: torch.device) -> str:
    """The device a report names: under torchrun the kind every process used, one device each ("cuda"),
    which is also what one process reports for ``--device cuda`` or ``auto``; the same JSON either way."""
    return device.type if parallel.active else str(device)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_parallel(device: str = "auto") -> Parallel:
    """Join the process group torchrun set up; pick cuda:LOCAL_RANK (NCCL) or the CPU (gloo).

    Without torchrun: a single worker, with ``device`` (cuda:N) made the current CUDA device."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:  # one process: its device is current from here on, as in each torchrun process
        make_current(resolve_device(device))
        return Parallel()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DeltakitError(
                f"torchrun started more processes on this host than it has GPUs ({torch.cuda.device_count()}); "
                "NCCL needs one GPU per process: use --nproc_per_node "
                f"{torch.cuda.device_count()}, or --device cpu for CPU processes")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Parallel(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    device=f"cuda:{local_rank}" if use_cuda else "cpu")


def matrix_cost(shape: Sequence[int]) -> float:
    """Relative cost of a Gram + eigendecomposition of an m×n matrix: m·n·p + p³, p = min(m, n)."""
    if len(shape) == 3:  # fused experts: one matrix per expert
        return float(shape[0]) * matrix_cost(shape[1:])
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


class PeerFailed(DeltakitError):
    """Another process of the group failed; every process stops at the same exchange."""


def exchange(parallel: Parallel, payload: Any = None, error: str | None = None) -> list[Any]:
    """Every process's ``payload``, in process order, on every process.

    Raises :class:`PeerFailed` on every process when any of them passes an ``error``.
    """
    if not parallel.active:
        if error is not None:
            raise PeerFailed(error)
        return [payload]
    import torch.distributed as dist

    everything: list[tuple[str | None, Any] | None] = [None] * parallel.world_size
    dist.all_gather_object(everything, (error, payload))
    for process, (message, _) in enumerate(everything):  # type: ignore[misc]
        if message is not None:
            raise PeerFailed(message if process == parallel.rank else f"process {process} failed: {message}")
    return [item[1] for item in everything]  # type: ignore[index]


def _tell_others(parallel: Parallel, exc: BaseException) -> None:
    """Report this process's failure at the others' next exchange (once per exception)."""
    if not parallel.active or isinstance(exc, PeerFailed) or getattr(exc, "_deltakit_told", False):
        return
    with contextlib.suppress(Exception):
        exc._deltakit_told = True  # type: ignore[attr-defined]
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    with contextlib.suppress(PeerFailed):
        exchange(parallel, None, error=message)


@contextlib.contextmanager
def fail_together(parallel: Parallel) -> Iterator[None]:
    """If this process fails inside the block, the others learn it at their next exchange."""
    try:
        yield
    except BaseException as exc:
        _tell_others(parallel, exc)
        raise


@contextlib.contextmanager
def shared_directory(target: str | os.PathLike, force: bool, parallel: Parallel,
                     inputs: Iterable[InputFootprint] = ()) -> Iterator[Path]:
    """:func:`~deltakit.io.atomic.atomic_directory` for all processes: one temporary folder, renamed once.

    Process 0 makes the folder (and owns it: see :mod:`deltakit.io.atomic`); every process gets
    its path. On leaving the block without error everywhere, process 0 publishes it onto
    ``target`` (fsync, rename) and every process returns after that; if any process fails, process
    0 removes it and every process raises. A write error inside the folder is reported with the
    output's path, as :func:`~deltakit.io.atomic.atomic_directory` reports it. A ``target`` that
    is, holds or lies inside one of ``inputs`` is refused before anything is written.
    """
    if not parallel.active:
        with atomic_directory(target, force, inputs) as tmp:
            yield tmp
        return
    target = check_output_path(target, force, inputs)
    with fail_together(parallel):
        output = temporary_output(target, directory=True, force=force) if parallel.is_main else None
        tmp = Path(exchange(parallel, str(output.path) if output else None)[0])
        if not tmp.is_dir():
            raise DeltakitError(f"process {parallel.rank} cannot see the output's temporary folder {tmp}: with "
                                "several hosts the output must be on a file system all of them share")
        try:
            yield tmp
            exchange(parallel)  # everyone's writes are complete
            if output is not None:
                output.publish()
        except BaseException as exc:
            explained = explain_write_error(exc, tmp, target)
            _tell_others(parallel, explained)  # before removing: the others stop writing first
            if output is not None:
                output.discard()
            if explained is not exc:
                raise explained from None
            raise
        exchange(parallel)  # the output is in place for everyone


def shared_writer(parallel: Parallel, folder: Path, tensors: list, **options: Any) -> ShardedWriter:
    """A :class:`ShardedWriter` every process writes into: process 0 makes the files, the others attach.

    Returns once the files and their headers exist for everyone.
    """
    writer = ShardedWriter(folder, tensors, create_files=parallel.is_main, **options)
    barrier(parallel)
    return writer


def gather_in_order(local: list[tuple[int, Any]], parallel: Parallel) -> list[Any]:
    """All processes' (plan index, result) pairs, merged into plan order on every process."""
    merged = [item for part in exchange(parallel, local) for item in part]
    return [result for _, result in sorted(merged, key=lambda item: item[0])]


def barrier(parallel: Parallel) -> None:
    """Wait for every process (a failed one makes every process raise)."""
    if parallel.active:
        exchange(parallel)


def finish(parallel: Parallel) -> None:
    """Leave the process group cleanly."""
    if parallel.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
