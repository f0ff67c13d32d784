"""The one loop every command runs its units through (tensor pairs, rows of several fine-tunes, row blocks).

For the plan's units, :func:`run`:

1. **shares** them among processes under torchrun (balanced by cost, longest first; all of them in
   one process), keeping the units of one group together;
2. **reads** this process's units through the caller's reader, which streams each unit's item
   onto the device ahead of the work, within its read-ahead budget;
3. **works** on each item with the caller's per-unit function, in this process's order;
4. **releases** each item before the next one is read: the loop holds the only reference the work
   did not keep, and drops it itself, so a unit too large to read ahead is read only once the one
   before it is gone. No caller deletes items; a caller's work function keeps only what it returns;
5. **fails together**: an error in one process stops every process at its next exchange;
6. **gathers** every process's results, in plan order, on every process;
7. reports **progress** through the caller's progress function (a bar, or log lines); without one, a
   display in a Jupyter kernel and nothing elsewhere (:func:`deltakit.progress.default_progress`).

A work function may return a pending value that ``finish`` completes ``behind`` units later, so
the host's part of one unit runs beside the device's part of the next.

Example::

    results = run(costs, lambda mine: source.stream(mine, device), lambda index, item: analyse(item),
                  parallel=parallel, progress=progress, label="ΔW spectra")
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from deltakit.distributed import Parallel, fail_together, gather_in_order
from deltakit.progress import default_progress

Item = TypeVar("Item")
Result = TypeVar("Result")
ProgressFn = Callable[[Iterable[Any], int, str], Iterator[Any]]  # wraps an iterator: (items, length, label)


def share(costs: Sequence[float], parallel: Parallel, groups: Sequence[Sequence[int]] | None = None) -> list[int]:
    """This process's units (ascending), balanced by ``costs``; the units of each of ``groups`` stay together."""
    if groups is None:
        return parallel.share(costs)
    group_costs = [sum(costs[i] for i in group) for group in groups]
    return sorted(i for chosen in parallel.share(group_costs) for i in groups[chosen])


def run(
    costs: Sequence[float],
    read: Callable[[list[int]], Iterable[Item]],
    work: Callable[[int, Item], Any],
    *,
    parallel: Parallel = Parallel(),
    progress: ProgressFn | None = None,
    label: str = "",
    groups: Sequence[Sequence[int]] | None = None,
    arrange: Callable[[list[int]], list[int]] | None = None,
    finish: Callable[[Any], Result] | None = None,
    behind: int = 0,
) -> list[Result]:
    """Every unit's ``finish(work(index, item))`` in plan order, on every process (see the module docstring).

    ``costs[i]`` weighs unit i when sharing; ``read(mine)`` yields one item per index of ``mine``, in
    that order (``arrange`` may reorder this process's units first, e.g. round-robin over output files);
    ``work(index, item)`` must not keep ``item``. ``finish`` runs ``behind`` units later (default: at once).
    """
    mine = share(costs, parallel, groups)
    if arrange is not None:
        mine = arrange(mine)
    complete = finish if finish is not None else _identity
    if progress is None:
        progress = default_progress()  # a display in a Jupyter kernel; nothing elsewhere
    local: list[tuple[int, Any]] = []
    pending: collections.deque[tuple[int, Any]] = collections.deque()
    with fail_together(parallel):
        items = read(mine)
        if progress is not None:
            items = progress(items, len(mine), label)
        stream = iter(items)
        try:
            for index in mine:
                try:
                    item = next(stream)
                except StopIteration:
                    break
                pending.append((index, work(index, item)))
                del item  # the only reference left: the next read may use its memory
                while len(pending) > behind:
                    done, value = pending.popleft()
                    local.append((done, complete(value)))
            while pending:
                done, value = pending.popleft()
                local.append((done, complete(value)))
            if progress is not None:
                next(stream, None)  # the reader is done: the progress wrapper counts the last unit and closes
        finally:
            if progress is not None and hasattr(stream, "close"):
                stream.close()  # on an error too: a log's closing line says how far the run got
        return gather_in_order(local, parallel)


def _identity(value: Any) -> Any:
    return value
