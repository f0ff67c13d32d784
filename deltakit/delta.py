"""ΔW = W_ft − W_base: the two sides of a comparison opened and paired (:class:`DeltaSource`), and
each pair's ΔW streamed onto the compute device.

A background thread reads the next tensors from disk while the device works on the current
ones (:func:`deltakit.device.reads.prefetched`), so reading and linear algebra overlap; at most
``prefetch`` pairs, and at most ``prefetch_bytes`` of stored tensors counting the pair being
worked on, are held at once, which bounds host and device memory whatever the model size.
W_base stays in its stored dtype (bf16: 2 bytes an entry); the delta is formed in fp32 (or
fp64), once, from the stored values: the difference of two bf16/fp16 values is exact there, so
ΔW carries no rounding of its own. The read of a pair too large for the budget starts only once
the consumer has dropped the one before: :func:`deltakit.pipeline.run` does that for every command.

Example::

    source = open_delta_source("base", "ft")
    for item in source.stream(device="cuda"):
        item.delta            # fp32 on the device, item.pair.shape
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from deltakit.adapters import Adapter, AdapterModule, adapter_pairs, base_info, open_adapter, replacement_pairs
from deltakit.device.reads import (
    PREFETCH_BYTES, adopt, fetch, prefetched, read_ahead_budget, read_threads, released_pairs,
)
from deltakit.errors import DeltakitError
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.io.kohya_files import is_adapter
from deltakit.pair_checks import floating, warn_suspicious_pair, warn_unpaired
from deltakit.pairing import TensorPair, nothing_left_message, pair_tensors, selected, tied_pair


@dataclass
class DeltaItem:
    """One compared pair on the compute device: base and fine-tune weights and their delta."""

    pair: TensorPair
    base: torch.Tensor  # analysed shape, as stored (bf16 stays bf16: only its norm, noise grid and SVD read it)
    delta: torch.Tensor  # ft - base, analysed shape, compute dtype

    @property
    def ft(self) -> torch.Tensor:
        """W_ft in the compute dtype (a new matrix; the stored base values are exact there)."""
        return self.base + self.delta


SUBTRACT_BLOCK_ELEMENTS = 1 << 22  # entries of the base converted at a time by subtract_stored


def subtract_stored(delta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``delta -= base`` in place, ``base`` converted to ``delta``'s dtype a block of rows at a time (no
    whole-size converted copy of a bf16 base); the stored values are exact in that dtype."""
    if base.dtype == delta.dtype or base.ndim == 0 or delta.numel() <= SUBTRACT_BLOCK_ELEMENTS:
        return delta.sub_(base)
    step = max(1, SUBTRACT_BLOCK_ELEMENTS // max(1, delta.numel() // delta.shape[0]))
    for start in range(0, delta.shape[0], step):
        delta[start:start + step].sub_(base[start:start + step].to(delta.dtype))
    return delta


def pair_bytes(pair: TensorPair) -> int:
    """Bytes a pair's two stored tensors take once read (base rows + fine-tune rows, stored dtypes)."""
    entries = math.prod(pair.shape)
    rows = int(pair.shape[0]) if pair.shape else 0
    ft_entries = entries + (entries // rows * pair.added_rows if rows and pair.added_rows else 0)
    return entries * pair.base_dtype.itemsize + ft_entries * pair.ft_dtype.itemsize


def fetch_pair(ckpt: Checkpoint, name: str, pair: TensorPair, device: torch.device) -> torch.Tensor:
    """One side of a pair: the stored tensor ``name``, or its expert's slice (shaped ``pair.shape``); a
    convolution as its analysed matrix."""
    if pair.rows is None:
        return pair.as_matrix(fetch(ckpt, name, device))
    return fetch(ckpt, name, device, pair.rows).reshape(pair.shape)


def _shared_rows(tensor: torch.Tensor, pair: TensorPair) -> torch.Tensor:
    return tensor[: pair.shape[0]] if pair.added_rows else tensor


def stream_deltas(
    pairs: Iterable[TensorPair],
    base: Checkpoint,
    ft: Checkpoint,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefetch: int = 2,
    prefetch_bytes: float | None = PREFETCH_BYTES,
) -> Iterator[DeltaItem]:
    """ΔW for each pair, in order, computed on ``device`` in ``dtype`` (reads overlap compute).

    On a GPU, per pair the device holds W_base and W_ft as stored while ΔW = W_ft − W_base is
    formed in ``dtype`` (no ``dtype`` copy of W_base), then W_base as stored and ΔW. On the CPU
    the reading thread forms ΔW itself, reading W_ft a block of rows at a time into it
    (:func:`host_delta`), so host memory holds W_base as stored and ΔW, never W_ft whole.
    """
    device = torch.device(device)
    pairs = list(pairs)
    on_host = device.type != "cuda"

    def reader(pair: TensorPair) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def read() -> tuple[torch.Tensor, torch.Tensor]:
            base_stored = fetch_pair(base, pair.base_name, pair, device)
            if on_host:
                return base_stored, host_delta(ft, pair, base_stored, dtype)
            return base_stored, fetch_pair(ft, pair.ft_tensor, pair, device)
        return read

    sizes = [host_pair_bytes(p, dtype) if on_host else pair_bytes(p) for p in pairs]
    loaded_all = prefetched([reader(p) for p in pairs], prefetch, read_threads(prefetch), sizes,
                            read_ahead_budget(device, prefetch_bytes), device)
    for pair, loaded in released_pairs(pairs, loaded_all):
        base_stored, second = (adopt(t).to(device) for t in loaded)  # type: ignore[union-attr]
        del loaded
        if on_host:
            delta = second
        else:
            delta = _shared_rows(second, pair).to(dtype, copy=True)
            subtract_stored(delta, base_stored)
        del second  # device memory: the stored fine-tune is not needed any more
        yield DeltaItem(pair=pair, base=base_stored, delta=delta)
        del base_stored, delta


def pair_device_bytes(pair: TensorPair, dtype: torch.dtype) -> int:
    """Bytes a pair's item holds on the device: W_base as stored and ΔW in ``dtype``."""
    return math.prod(pair.shape) * (pair.base_dtype.itemsize + dtype.itemsize)


def host_pair_bytes(pair: TensorPair, dtype: torch.dtype) -> int:
    """Bytes a pair holds once read on the CPU: W_base as stored and ΔW in ``dtype``."""
    return math.prod(pair.shape) * (pair.base_dtype.itemsize + dtype.itemsize)


def host_delta(ft: Checkpoint, pair: TensorPair, base_stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ΔW = W_ft − W_base in ``dtype`` on the CPU, W_ft read straight into it a block of rows at a time
    (a stored safetensors tensor), else read whole first (a quantized or pickled one, an expert's slice)."""
    if pair.rows is not None or pair.ft_tensor in ft.quantized or ft.format != "safetensors" or len(pair.shape) == 0:
        delta = _shared_rows(fetch_pair(ft, pair.ft_tensor, pair, torch.device("cpu")), pair).to(dtype, copy=True)
        return subtract_stored(delta, base_stored)
    delta = torch.empty(pair.shape, dtype=dtype)
    rows = int(pair.shape[0])
    step = max(1, SUBTRACT_BLOCK_ELEMENTS // max(1, math.prod(pair.shape[1:])))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = delta[start:stop]
        block.copy_(pair.as_matrix(ft.get_rows(pair.ft_tensor, start, stop)))
        block.sub_(base_stored[start:stop].to(dtype))
    return delta


def delta_row_blocks(
    base: Checkpoint,
    ft: Checkpoint,
    pair: TensorPair,
    block_rows: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefetch: int = 1,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """ΔW of one 2-D pair by row blocks: (first row, W_base rows as stored, ΔW rows in ``dtype``) on ``device``.

    For a matrix whose whole ΔW would not fit the device: only ``block_rows`` rows of each side
    are read at a time (the next block on a background thread while the device works on this
    one), so the device holds at most ``prefetch + 1`` blocks. Rows past the base's (vocabulary
    added in the fine-tune) are not read. Drop each block before asking for the next.
    """
    device = torch.device(device)
    rows, step = int(pair.shape[0]), max(1, int(block_rows))
    starts = list(range(0, rows, step))

    def reader(start: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        span = (start, min(rows, start + step))
        return lambda: (pair.as_matrix(fetch(base, pair.base_name, device, span)),
                        pair.as_matrix(fetch(ft, pair.ft_tensor, device, span)))

    loaded_all = prefetched([reader(start) for start in starts], prefetch, 1)
    for start, loaded in released_pairs(starts, loaded_all):
        base_stored, ft_stored = (adopt(t).to(device) for t in loaded)  # type: ignore[union-attr]
        del loaded
        delta = ft_stored.to(dtype, copy=True)
        del ft_stored
        subtract_stored(delta, base_stored)
        yield start, base_stored, delta
        del base_stored, delta


def stream_adapter_deltas(
    pairs: Sequence[tuple[TensorPair, AdapterModule]],
    adapter: Adapter,
    base: Checkpoint,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefetch: int = 2,
    prefetch_bytes: float | None = PREFETCH_BYTES,
) -> Iterator[DeltaItem]:
    """ΔW of each adapted tensor (any adapter type), with its base weight as stored, on ``device``."""
    device = torch.device(device)

    def reader(pair: TensorPair, module: AdapterModule) -> Callable[[], tuple]:
        return lambda: (fetch_pair(base, pair.base_name, pair, device), adapter.load(module))

    loaders = [reader(pair, module) for pair, module in pairs]
    sizes = [math.prod(pair.shape) * pair.base_dtype.itemsize for pair, _ in pairs]
    loaded_all = prefetched(loaders, prefetch, read_threads(prefetch), sizes, read_ahead_budget(device, prefetch_bytes))
    for (pair, module), loaded in released_pairs(pairs, loaded_all):
        base_stored, tensors = loaded  # type: ignore[misc]
        del loaded
        base_stored = adopt(base_stored).to(device)
        # the module forms ΔW in the dtype of the base it is given (DoRA reads W0): a ``dtype`` copy for this call
        delta = module.delta(tensors, base_stored.to(dtype), pair.transposed)
        del tensors
        yield DeltaItem(pair=pair, base=base_stored, delta=delta)
        del base_stored, delta


@dataclass
class DeltaSource:
    """The two sides of a comparison, paired: a base and a fine-tuned model, or a base and a PEFT adapter.

    ``pairs`` are the tensors to compare; ``skipped`` (name, reason), ``only_base`` and
    ``only_ft`` say what was left out. :meth:`stream` yields their deltas on a device. With an
    adapter (any type in :mod:`deltakit.adapters`), ``modules[i]`` changes ``pairs[i]`` and a
    LoRA module's factors are ``adapter.factors(module)``; fused experts changed by LoRA on
    parameters are 3-D pairs whose whole ΔW (experts × a × b) the stream yields.
    """

    base: Checkpoint
    ft: Checkpoint | None
    adapter: Adapter | None
    pairs: list[TensorPair]
    modules: list[AdapterModule]  # aligned with pairs when the fine-tune is an adapter
    skipped: list[dict[str, str]]
    only_base: list[str]
    only_ft: list[str]

    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None

    def stream(self, indices: Sequence[int] | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, prefetch: int = 2,
               prefetch_bytes: float | None = PREFETCH_BYTES) -> Iterator[DeltaItem]:
        """ΔW of ``pairs[i]`` for each i in ``indices`` (default: all), in that order."""
        chosen = range(len(self.pairs)) if indices is None else indices
        if self.adapter is not None:
            adapted = [(self.pairs[i], self.modules[i]) for i in chosen]
            return stream_adapter_deltas(adapted, self.adapter, self.base, device, dtype, prefetch, prefetch_bytes)
        assert self.ft is not None
        return stream_deltas([self.pairs[i] for i in chosen], self.base, self.ft, device, dtype, prefetch,
                             prefetch_bytes)


@dataclass(frozen=True)
class Selection:
    """Which tensors a command reads: names matching any of ``include`` (all when empty) and none of
    ``exclude`` (globs); PyTorch pickles only with ``allow_pickle``."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))


def open_delta_source(
    base: str | os.PathLike,
    ft: str | os.PathLike,
    selection: Selection = Selection(),
    matrices_only: bool = False,
    replacements: bool = True,
) -> DeltaSource:
    """Open ``base`` and ``ft`` (a model or a PEFT adapter folder) and pair the tensors ``selection`` keeps.

    An adapter's pairs are every tensor it changes: those its modules change, and with ``replacements``
    those it carries whole (``modules_to_save``, trained biases: ΔW = R − W0; one that is no delta of
    the base is listed in ``skipped``). Raises :class:`DeltakitError` when nothing is left to compare.
    """
    include, exclude, allow_pickle = selection.include, selection.exclude, selection.allow_pickle
    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle)
    keep = (lambda p: p.is_matrix and p.layout != "vector") if matrices_only else (lambda p: True)
    if is_adapter(ft):
        adapter = open_adapter(ft, allow_pickle=allow_pickle, base=base_info(base_ckpt))
        replaced, skipped = replacement_pairs(adapter, base_ckpt) if replacements else ([], [])
        adapted = [(p, m) for p, m in adapter_pairs(adapter, base_ckpt) + replaced
                   if selected(p.name, include, exclude) and keep(p)]
        skipped = [s for s in skipped if selected(s["name"], include, exclude)]
        skipped += [dict(entry) for entry in adapter.left_out]  # a kohya file's modules of parts the base lacks
        source = DeltaSource(base_ckpt, None, adapter, [p for p, _ in adapted], [m for _, m in adapted], skipped,
                             [], [])
    else:
        ft_ckpt = open_checkpoint(ft, allow_pickle=allow_pickle)
        plan = pair_tensors(base_ckpt.metas(), ft_ckpt.metas(), ft_ckpt.config or base_ckpt.config,
                            include, exclude, base_config=base_ckpt.config)
        if plan.tied is not None and not same_tensor(ft_ckpt, *plan.tied):  # "tied", but stored apart: analysed
            untied = tied_pair(plan, base_ckpt.metas(), ft_ckpt.metas(), ft_ckpt.config or base_ckpt.config)
            plan.skipped = [s for s in plan.skipped if s.name != plan.tied[0]]
            (plan.pairs if isinstance(untied, TensorPair) else plan.skipped).append(untied)
        source = DeltaSource(base_ckpt, ft_ckpt, None, [p for p in plan.pairs if keep(p)], [],
                             [{"name": s.name, "reason": s.reason} for s in plan.skipped], plan.only_base, plan.only_ft)
        if not source.pairs:
            raise DeltakitError(nothing_left_message(plan, matrices_only))
        warn_suspicious_pair(base_ckpt, ft_ckpt, base, ft, plan)
        warn_unpaired(source.skipped, floating(source.only_base, base_ckpt), floating(source.only_ft, ft_ckpt))
    if not source.pairs:
        what = "weight matrices" if matrices_only else "tensor pairs"
        hint = " (check the include / exclude globs)" if include or exclude else ""
        raise DeltakitError(f"no {what} of the adapter left to compare{hint}")
    return source


SAME_TENSOR_ROWS = 4096  # rows of each side compared at a time


def same_tensor(ckpt: Checkpoint, first: str, second: str) -> bool:
    """Whether two stored tensors of one checkpoint hold the same values (shape, dtype and every entry),
    compared a block of rows at a time."""
    if ckpt.shape(first) != ckpt.shape(second) or ckpt.dtype(first) != ckpt.dtype(second):
        return False
    rows = ckpt.shape(first)[0] if ckpt.shape(first) else 0
    return all(torch.equal(ckpt.get_rows(first, start, min(rows, start + SAME_TENSOR_ROWS)),
                           ckpt.get_rows(second, start, min(rows, start + SAME_TENSOR_ROWS)))
               for start in range(0, rows, SAME_TENSOR_ROWS))


@dataclass
class MultiDeltaItem:
    """One matrix's base weight and its ΔW in each of several fine-tunes, on the compute device."""

    pairs: list[TensorPair]  # one per source, same base tensor
    base: torch.Tensor  # analysed shape, as stored
    deltas: list[torch.Tensor]  # ft_i − base, one per source, each as its source stores the weight


def stream_many(
    rows: Sequence[Sequence[int]],
    sources: Sequence[DeltaSource],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefetch: int = 2,
    prefetch_bytes: float | None = PREFETCH_BYTES,
) -> Iterator[MultiDeltaItem]:
    """ΔW of the same base tensor in N sources: ``rows[r][i]`` indexes ``sources[i].pairs``.

    The base tensor is read once per row (from ``sources[0].base``) and kept as stored, each
    fine-tune's tensor (or adapter factors) once; the next rows are read on background threads
    while the device works, within ``prefetch`` rows and ``prefetch_bytes``, as in :func:`stream_deltas`.
    """
    device = torch.device(device)
    base = sources[0].base

    def read_source(source: DeltaSource, index: int) -> Any:
        if source.adapter is not None:
            return source.adapter.load(source.modules[index])
        assert source.ft is not None
        pair = source.pairs[index]
        return fetch_pair(source.ft, pair.ft_tensor, pair, device)

    def reader(row: Sequence[int]) -> Callable[[], tuple]:
        first = sources[0].pairs[row[0]]
        return lambda: (fetch_pair(base, first.base_name, first, device),
                        *(read_source(s, i) for s, i in zip(sources, row)))

    def row_bytes(row: Sequence[int]) -> int:
        first = sources[0].pairs[row[0]]
        return math.prod(first.shape) * first.base_dtype.itemsize + sum(
            pair_bytes(s.pairs[i]) - math.prod(s.pairs[i].shape) * s.pairs[i].base_dtype.itemsize
            for s, i in zip(sources, row) if s.adapter is None)

    loaded_all = prefetched([reader(r) for r in rows], prefetch, read_threads(prefetch), [row_bytes(r) for r in rows],
                            read_ahead_budget(device, prefetch_bytes))
    for row, loaded in released_pairs(rows, loaded_all):
        base_stored, *stored = loaded  # type: ignore[misc]
        del loaded
        base_w = adopt(base_stored).to(device)
        # adapters form ΔW in the dtype of the base they are given (DoRA reads W0): one ``dtype`` copy per row
        base_c = base_w.to(dtype) if any(s.adapter is not None for s in sources) else None
        deltas, pairs = [], []
        for source, index, tensors in zip(sources, row, stored):
            pair = source.pairs[index]
            if source.adapter is not None:  # any adapter type: its module forms ΔW (DoRA reads W0)
                module = source.modules[index]
                deltas.append(module.delta(tensors, base_c, pair.transposed))
            else:
                delta = _shared_rows(adopt(tensors).to(device), pair).to(dtype, copy=True)
                deltas.append(subtract_stored(delta, base_w))
            pairs.append(pair)
        del base_stored, stored, base_c
        yield MultiDeltaItem(pairs=pairs, base=base_w, deltas=deltas)
        del base_w, deltas
