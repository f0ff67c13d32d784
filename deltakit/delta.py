"""ΔW = W_ft − W_base, one pair at a time, streamed onto the compute device.

A background thread reads the next tensors from disk while the device works on the
current ones, so reading and linear algebra overlap; at most ``prefetch`` pairs, and at most
``prefetch_bytes`` of stored tensors counting the pair being worked on, are held at once,
which bounds host and device memory whatever the model size. W_base stays in its stored
dtype (bf16: 2 bytes an entry); the delta is formed in fp32 (or fp64), once, from the stored
values: the difference of two bf16/fp16 values is exact there, so ΔW carries no rounding of
its own. A consumer should drop its item before asking for the next (``del item`` at the end
of the loop body, and :func:`zip_released` rather than ``zip``, which keeps its last tuple): the
read of a pair too large for the budget starts only then.

Example::

    for item in stream_deltas(plan.pairs, base_ckpt, ft_ckpt, device="cuda"):
        item.delta            # fp32 on the device, item.pair.shape
"""

from __future__ import annotations

import collections
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from deltakit.errors import DeltakitError
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.adapters import Adapter, AdapterModule, base_info, open_adapter, stored_transposed
from deltakit.io.peft import is_peft_adapter
from deltakit.io.writer import IO_THREADS
from deltakit.pairing import (
    TensorPair, adapted_layout, layer_index, match_names, module_type, nothing_left_message, pair_tensors, selected,
)
from deltakit.streams import kept_stream, make_current


ProgressFn = Callable[[Iterable[Any], int, str], Iterator[Any]]  # wraps an iterator: (items, length, label)


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


def may_read_ahead(held: int, size: int, ahead: int, depth: int, budget: float) -> bool:
    """Whether a value of ``size`` bytes may be started ahead of the consumer, which (with the
    ``ahead`` values already started) holds ``held`` bytes: :func:`prefetched`'s whole policy,
    also what bench/estimate.py simulates."""
    return ahead < depth and held + size <= budget


def prefetched(producers: Sequence[Callable[[], object]], depth: int = 2, workers: int = 1,
               sizes: Sequence[int] | None = None, budget: float | None = None,
               device: torch.device | None = None) -> Iterator[object]:
    """Yield ``producer()`` for each producer in order, running up to ``depth`` ahead on ``workers`` threads.

    ``sizes[i]`` is the bytes producer i's value holds; with a ``budget`` the value the consumer
    holds (the last one yielded, until it asks for the next) and those ahead add up to at most
    ``budget`` bytes, except that the next value is always produced once the consumer asks for
    it, so a value larger than the budget is produced alone, one at a time. An exception in a
    producer is re-raised in the consumer at its position. Several workers help where one
    thread cannot read as fast as the machine can (copies out of the page cache are bound by
    one core per thread). A CUDA ``device`` (cuda:N) is the worker threads' current device.
    """
    if depth <= 0:
        for produce in producers:
            yield produce()
        return
    count = len(producers)
    nbytes = [0] * count if sizes is None else [int(size) for size in sizes]
    if len(nbytes) != count:
        raise ValueError(f"{count} producers but {len(nbytes)} sizes")
    limit = math.inf if budget is None else budget
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="deltakit-prefetch",
                              initializer=make_current, initargs=(device or torch.device("cpu"),))
    ahead: collections.deque[tuple[Future, int]] = collections.deque()
    following = 0  # index of the next producer to start
    held = 0  # bytes of the value with the consumer and of those ahead

    def start() -> None:
        nonlocal following, held
        ahead.append((pool.submit(producers[following]), nbytes[following]))
        held += nbytes[following]
        following += 1

    try:
        while True:
            if not ahead:  # the consumer waits: start the next whatever its size
                if following == count:
                    return
                start()
            future, size = ahead.popleft()
            while following < count and may_read_ahead(held, nbytes[following], len(ahead), depth, limit):
                start()
            value = future.result()
            del future  # a done future holds its value: only the consumer should
            yield value
            del value
            held -= size  # the consumer asked for the next one: it is done with this one
    finally:
        for future, _ in ahead:  # the consumer stopped early: start nothing new
            future.cancel()
        pool.shutdown(wait=True)


PREFETCH_BYTES = 4 * 10**9
"""Default read-ahead budget: stored bytes of the pair being worked on plus those read ahead.

At 70B shapes (a 28672×8192 bf16 pair is 0.94 GB) it lets ``prefetch=2`` pairs be read ahead
as before; at 405B shapes (a 53248×16384 bf16 pair is 3.5 GB) the MLP pairs are read one at a
time, so the device holds one pair (W_base bf16 + ΔW fp32, 5.2 GB) plus the spectral workspace
and at most 0.5 GB read ahead: under 8 GB (``python -m bench.estimate --memory``)."""


CPU_PREFETCH_BYTES = 512 * 1024**2
"""Read-ahead budget on the CPU, where what is read ahead sits in the process's own memory: a pair
larger than this is read only once the one before it is done, so that analysing a pair holds that
pair's stored tensors, its ΔW and a few bounded temporaries (peak RSS about one pair plus one ΔW)."""


def read_ahead_budget(device: torch.device, budget: float | None) -> float | None:
    """``budget`` for reads onto ``device``, capped at CPU_PREFETCH_BYTES where that is host memory."""
    if device.type == "cuda" or budget is None:
        return budget if device.type == "cuda" else CPU_PREFETCH_BYTES
    return min(budget, CPU_PREFETCH_BYTES)


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


def zip_released(first: Iterable[Any], second: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
    """``zip(first, second)`` that keeps nothing it yielded: CPython's zip reuses its result tuple, which
    so holds the previous item (a whole ΔW on the device) while the next one is read. Stops at the shorter."""
    rest = iter(second)
    for left in first:
        try:
            right = next(rest)
        except StopIteration:
            return
        yield left, right
        del left, right


def read_threads(prefetch: int) -> int:
    """Threads reading the ``prefetch`` pairs ahead: all of them at once, up to IO_THREADS.

    Memory stays that of ``prefetch`` pairs; on an H100, two threads instead of one took rank
    on a 7B pair from 25.3 s to 23.7 s and extract from 6.4 s to 4.1 s (bench/merge_probe.py
    --read-threads, docs/benchmarks.md).
    """
    return max(1, min(prefetch, IO_THREADS))


STAGING_BYTES = 64 * 1024**2  # host memory a GPU read goes through, per piece


def fetch(ckpt: Checkpoint, name: str, device: torch.device, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read one tensor (or its ``rows`` start:stop) onto ``device``; meant for the prefetch threads.

    For a GPU the bytes go from disk into pinned host memory, at most STAGING_BYTES at a time,
    and on to the device on the one stream every reader copies on (``kept_stream(device, "copy")``:
    one stream, one pool of cached blocks), so the copy overlaps the consumer's kernels and host
    memory stays bounded whatever the tensor's size; the stream is synchronised before
    returning. The copies queue behind each other; at ~50 GB/s they are not what bounds a read.
    The consumer must :func:`adopt` the tensor.
    """
    shape = ckpt.shape(name)
    start, stop = rows if rows is not None else (0, shape[0] if shape else 0)
    if device.type != "cuda":
        return ckpt.get(name) if rows is None else ckpt.get_rows(name, start, stop)
    stream = kept_stream(device, "copy")
    if name in ckpt.quantized:  # the stored bytes go to the device and are dequantized there
        with torch.cuda.stream(stream):
            on_device = ckpt.dequantized(name, device, rows, pin=True)
        stream.synchronize()
        return on_device
    row_bytes = ckpt.infos[name].nbytes // shape[0] if shape and shape[0] else 0
    if not shape or row_bytes == 0 or (stop - start) * row_bytes <= STAGING_BYTES or ckpt.format == "pickle":
        host = ckpt.get(name, pin=True) if rows is None else ckpt.get_rows(name, start, stop, pin=True)
        with torch.cuda.stream(stream):
            on_device = host.to(device, non_blocking=True)
        stream.synchronize()
        return on_device
    with torch.cuda.stream(stream):  # allocated on the copy stream, like the single-copy case above
        on_device = torch.empty((stop - start, *shape[1:]), dtype=ckpt.dtype(name), device=device)
    step = max(1, STAGING_BYTES // row_bytes)
    for first in range(start, stop, step):
        last = min(stop, first + step)
        host = ckpt.get_rows(name, first, last, pin=True)
        with torch.cuda.stream(stream):
            on_device[first - start:last - start].copy_(host, non_blocking=True)
        stream.synchronize()  # the pinned piece is reused by the allocator only after its copy
    return on_device


def fetch_pair(ckpt: Checkpoint, name: str, pair: TensorPair, device: torch.device) -> torch.Tensor:
    """One side of a pair: the stored tensor ``name``, or its expert's slice (shaped ``pair.shape``)."""
    if pair.rows is None:
        return fetch(ckpt, name, device)
    return fetch(ckpt, name, device, pair.rows).reshape(pair.shape)


def adopt(tensor: torch.Tensor) -> torch.Tensor:
    """Tell the caching allocator a tensor fetched on another stream is now used on the current one."""
    if tensor.is_cuda:
        tensor.record_stream(torch.cuda.current_stream(tensor.device))
    return tensor


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
    for pair, loaded in zip_released(pairs, loaded_all):
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
        block.copy_(ft.get_rows(pair.ft_tensor, start, stop))
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
        return lambda: (fetch(base, pair.base_name, device, span), fetch(ft, pair.ft_tensor, device, span))

    loaded_all = prefetched([reader(start) for start in starts], prefetch, 1)
    for start, loaded in zip_released(starts, loaded_all):
        base_stored, ft_stored = (adopt(t).to(device) for t in loaded)  # type: ignore[union-attr]
        del loaded
        delta = ft_stored.to(dtype, copy=True)
        del ft_stored
        subtract_stored(delta, base_stored)
        yield start, base_stored, delta
        del base_stored, delta


def adapter_pairs(adapter: Adapter, base: Checkpoint) -> list[tuple[TensorPair, AdapterModule]]:
    """Pair each adapter module with the base tensor it changes; refuse an adapter that does not fit the base.

    Orientation is decided here, once, from the shapes, the model's config and the adapter's
    ``fan_in_fan_out`` (:func:`~deltakit.pairing.adapted_layout`), and carried on the pair's
    ``layout``; the module's update must have the base tensor's shape in it.
    """
    mapping = match_names(base.keys(), adapter.modules.keys())  # adapter target -> base name
    missing = [name for name in adapter.modules if name not in mapping]
    if missing:
        what = "none of its modules exist there" if len(missing) == len(adapter.modules) else "no such tensor there"
        raise DeltakitError(f"adapter {adapter.path} does not fit base {base.path}: {what} (first: {missing[0]})")
    ft_like = {name: (base.shape(mapping[name]), torch.float32) for name in adapter.modules}
    plan = pair_tensors(tensor_metas(base), ft_like, base.config)
    # An adapter changes a fused expert tensor whole: the pairing's per-expert slices become one 3-D pair again.
    fused = list(dict.fromkeys(p.ft_tensor for p in plan.pairs if p.expert_slice))
    pairs = [p for p in plan.pairs if not p.expert_slice]
    pairs += [_nd_pair(name, mapping[name], ft_like[name][0], base) for name in fused]
    pairs += [_nd_pair(s.name, mapping[s.name], ft_like[s.name][0], base)
              for s in plan.skipped if len(ft_like[s.name][0]) > 2]
    skipped = [s for s in plan.skipped if len(ft_like[s.name][0]) <= 2]
    if skipped:
        first = skipped[0]
        raise DeltakitError(f"adapter {adapter.path} does not fit base {base.path}: {first.name}: {first.reason}")
    out: list[tuple[TensorPair, AdapterModule]] = []
    order = {name: index for index, name in enumerate(adapter.modules)}
    oriented = [p for p in pairs if len(p.shape) == 2 and not adapter.modules[p.name].embedding
                and not adapter.modules[p.name].own_layout]
    shown = frozenset(_shape_layout(p, adapter.modules[p.name]) for p in oriented) - {None}
    for pair in sorted(pairs, key=lambda p: order[p.name]):
        module = adapter.modules[pair.name]
        if pair in oriented:
            layout = adapted_layout(pair, module.stored_shape(False), module.stored_shape(True),
                                    module.fan_in_fan_out, base.config, shown)
            if "conv1d" in (layout, pair.layout):  # other layouts (embedding-like heads, vectors) keep their name
                pair = replace(pair, layout=layout or pair.layout)
        expected = module.stored_shape(stored_transposed(pair, module))
        if tuple(pair.shape) != tuple(expected):
            raise DeltakitError(
                f"adapter {adapter.path} does not fit base {base.path}: {module.module} makes a "
                f"{'×'.join(map(str, expected))} update, but {pair.base_name} is {'×'.join(map(str, pair.shape))}")
        out.append((pair, module))
    return out


def _shape_layout(pair: TensorPair, module: AdapterModule) -> str | None:
    """The layout a non-square weight's shape proves for ``module`` ("linear" or "conv1d"), None if it proves none."""
    fits = [layout for layout, shape in (("linear", module.stored_shape(False)), ("conv1d", module.stored_shape(True)))
            if tuple(shape) == tuple(pair.shape)]
    return fits[0] if len(fits) == 1 else None


def _nd_pair(name: str, base_name: str, shape: tuple[int, ...], base: Checkpoint) -> TensorPair:
    """A pair for a tensor of more than two dimensions (fused experts), which pairing leaves out of analysis."""
    return TensorPair(name=name, base_name=base_name, shape=tuple(shape), base_dtype=base.dtype(base_name),
                      ft_dtype=torch.float32, module_type=module_type(name), layer=layer_index(name), layout="experts")


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
    for (pair, module), loaded in zip_released(pairs, loaded_all):
        base_stored, tensors = loaded  # type: ignore[misc]
        del loaded
        base_stored = adopt(base_stored).to(device)
        # the module forms ΔW in the dtype of the base it is given (DoRA reads W0): a ``dtype`` copy for this call
        delta = module.delta(tensors, base_stored.to(dtype), stored_transposed(pair, module))
        del tensors
        yield DeltaItem(pair=pair, base=base_stored, delta=delta)
        del base_stored, delta


def tensor_metas(ckpt: Checkpoint) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor of a checkpoint: what pairing needs, read from headers."""
    return {name: (ckpt.shape(name), ckpt.dtype(name)) for name in ckpt.keys()}


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


def open_delta_source(
    base: str | os.PathLike,
    ft: str | os.PathLike,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    allow_pickle: bool = False,
    matrices_only: bool = False,
) -> DeltaSource:
    """Open ``base`` and ``ft`` (a model or a PEFT adapter folder) and pair their tensors.

    Raises :class:`DeltakitError` when nothing is left to compare.
    """
    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle)
    keep = (lambda p: p.is_matrix and p.layout != "vector") if matrices_only else (lambda p: True)
    if is_peft_adapter(ft):
        adapter = open_adapter(ft, allow_pickle=allow_pickle, base=base_info(base_ckpt))
        adapted = [(p, m) for p, m in adapter_pairs(adapter, base_ckpt)
                   if selected(p.name, include, exclude) and keep(p)]
        source = DeltaSource(base_ckpt, None, adapter, [p for p, _ in adapted], [m for _, m in adapted], [], [], [])
    else:
        ft_ckpt = open_checkpoint(ft, allow_pickle=allow_pickle)
        plan = pair_tensors(tensor_metas(base_ckpt), tensor_metas(ft_ckpt), ft_ckpt.config or base_ckpt.config,
                            include, exclude)
        source = DeltaSource(base_ckpt, ft_ckpt, None, [p for p in plan.pairs if keep(p)], [],
                             [{"name": s.name, "reason": s.reason} for s in plan.skipped], plan.only_base, plan.only_ft)
        if not source.pairs:
            raise DeltakitError(nothing_left_message(plan, matrices_only))
    if not source.pairs:
        what = "weight matrices" if matrices_only else "tensor pairs"
        hint = " (check the include / exclude globs)" if include or exclude else ""
        raise DeltakitError(f"no {what} of the adapter left to compare{hint}")
    return source


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
    for row, loaded in zip_released(rows, loaded_all):
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
                deltas.append(module.delta(tensors, base_c, stored_transposed(pair, module)))
            else:
                delta = _shared_rows(adopt(tensors).to(device), pair).to(dtype, copy=True)
                deltas.append(subtract_stored(delta, base_w))
            pairs.append(pair)
        del base_stored, stored, base_c
        yield MultiDeltaItem(pairs=pairs, base=base_w, deltas=deltas)
        del base_w, deltas
