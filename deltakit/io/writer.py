"""A sharded safetensors writer that streams: one tensor in memory at a time.

The layout (names, shapes, dtypes) is planned up front, so every shard's header and
every tensor's byte offset are known before any data arrives; tensors may then be
written in any order, each straight to its place in a pre-sized file. Shards are
named as Hugging Face names them and the index is written last, by :meth:`finish`.
Use inside :func:`deltakit.io.atomic.atomic_directory` so a failure leaves nothing.

Example::

    with atomic_directory("merged") as tmp:
        writer = ShardedWriter(tmp, [("w", (4, 4), torch.float32)])
        writer.write("w", torch.zeros(4, 4))
        writer.finish()
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, TypeVar

T = TypeVar("T")

import torch

from deltakit.errors import DeltakitError
from deltakit.io.atomic import fsync_enabled, fsync_path

DEFAULT_SHARD_BYTES = 5 * 1024**3
# Threads for reading or writing many tensors: a copy into or out of the page cache is bound by
# one core per thread, so a few threads on different files are several times faster than one.
IO_THREADS = min(4, os.cpu_count() or 1)

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = _st


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_file_names(count: int, prefix: str = "model") -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedWriter:
    """Write planned tensors into safetensors shards under ``folder``; see the module docstring."""

    def __init__(
        self,
        folder: str | os.PathLike,
        tensors: list[tuple[str, tuple[int, ...], torch.dtype]] | list[PlannedTensor],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
        create_files: bool = True,
    ) -> None:
        self.folder = Path(folder)
        planned = [t if isinstance(t, PlannedTensor) else PlannedTensor(t[0], tuple(t[1]), t[2]) for t in tensors]
        if len({t.name for t in planned}) != len(planned):
            raise ValueError("duplicate tensor names in the write plan")
        self.shards = plan_shards(planned, max_shard_bytes)
        self.file_names = shard_file_names(len(self.shards), prefix)
        self.prefix = prefix
        self._where: dict[str, tuple[Path, int, PlannedTensor]] = {}
        self._written: set[str] = set()
        self._rows_written: dict[str, int] = {}
        self._lock = threading.Lock()
        # Durability: a shard this writer filled completely is fsynced by the thread that finished
        # it, overlapping the rest of the work; finish() fsyncs the others it wrote into.
        self._unwritten = {self.folder / name: {t.name for t in shard} for shard, name in zip(self.shards, self.file_names)}
        self._touched: set[Path] = set()
        self._synced: set[Path] = set()
        meta = {"format": "pt", **(metadata or {})}
        files = []
        for shard, file_name in zip(self.shards, self.file_names):
            path = self.folder / file_name
            header: dict[str, object] = {"__metadata__": meta}
            offset = 0
            for t in shard:
                header[t.name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                                  "data_offsets": [offset, offset + t.nbytes]}
                offset += t.nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            start = 8 + len(blob)
            files.append((path, blob, start + offset))
            for t in shard:
                begin = header[t.name]["data_offsets"][0]  # type: ignore[index]
                self._where[t.name] = (path, start + begin, t)
        if create_files:  # else another process made them (see deltakit.distributed)
            check_free_space(self.folder, sum(size for _, _, size in files))
            for path, blob, size in files:
                try:
                    with open(path, "wb") as fh:
                        fh.write(len(blob).to_bytes(8, "little"))
                        fh.write(blob)
                        fh.truncate(size)
                except OSError as exc:
                    raise _write_error(exc, path, f"its header, sized for {size:,} bytes") from None

    def interleaved(self, items: Iterable[T], name_of: Callable[[T], str] = str) -> list[T]:
        """``items`` (tensor names, or anything ``name_of`` maps to one) reordered round-robin over
        the shards they go to, each shard's own order kept.

        Writing in this order keeps concurrent writers on different files: on Linux, buffered
        writes into one file largely serialise, writes into different files do not.
        """
        by_shard: dict[Path, list[T]] = {}
        for item in items:
            by_shard.setdefault(self._where[name_of(item)][0], []).append(item)
        queues = list(by_shard.values())
        return [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]

    def write(self, name: str, tensor: torch.Tensor, start_row: int | None = None) -> None:
        """Write one planned tensor's bytes at its place (any order, each exactly once).

        With ``start_row``, ``tensor`` is rows ``start_row:start_row + len(tensor)`` of the
        planned tensor; the rows of a tensor may come in several writes, from several threads.
        """
        path, offset, planned = self._where[name]
        rows = planned.shape[0] if planned.shape else 1
        if start_row is None:
            start_row, expected = 0, planned.shape
        else:
            expected = (tensor.shape[0] if tensor.ndim else -1, *planned.shape[1:])
            if not planned.shape or not 0 <= start_row <= start_row + expected[0] <= rows:
                raise ValueError(f"{name}: rows {start_row}:{start_row + expected[0]} outside planned {planned.shape}")
            offset += start_row * (planned.nbytes // rows if rows else 0)
        if tuple(tensor.shape) != tuple(expected) or tensor.dtype != planned.dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {planned.shape} {planned.dtype}")
        data = memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        first, total = offset, len(data)
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                while data:  # pwrite: threads (and processes) may write other tensors of the same file at once
                    written = os.pwrite(fd, data, offset)
                    data, offset = data[written:], offset + written
            finally:
                os.close(fd)
        except OSError as exc:
            raise _write_error(exc, path, f"tensor {name}, {total:,} bytes at byte {first:,}") from None
        complete = False
        with self._lock:
            self._touched.add(path)
            self._rows_written[name] = self._rows_written.get(name, 0) + (tensor.shape[0] if planned.shape else 1)
            if self._rows_written[name] >= rows:
                self._written.add(name)
                self._unwritten[path].discard(name)
                complete = not self._unwritten[path] and path not in self._synced
                if complete:
                    self._synced.add(path)
        if complete and fsync_enabled():
            self._fsync(path)

    def _fsync(self, path: Path) -> None:
        try:
            fsync_path(path)
        except OSError as exc:
            raise _write_error(exc, path, "its data to disk (fsync)") from None

    def finish(self, extra_index_metadata: dict[str, object] | None = None,
               expected: Iterable[str] | Mapping[str, int] | None = None, write_index: bool = True) -> list[Path]:
        """Check every tensor (or every ``expected`` one) was written; write the index when there are several shards.

        ``expected`` names the tensors this writer wrote whole or, as a mapping, how many rows of
        each it wrote: processes that share a tensor's rows each check their own.
        """
        if isinstance(expected, Mapping):
            missing = [name for name, rows in expected.items() if self._rows_written.get(name, 0) < rows]
        else:
            missing = [name for name in (self._where if expected is None else expected) if name not in self._written]
        if missing:
            raise DeltakitError(f"internal: {len(missing)} planned tensors were never written, first {missing[0]}")
        if fsync_enabled():  # every file this process wrote into (others fsync their own writes)
            unsynced = sorted(self._touched - self._synced)
            with ThreadPoolExecutor(max_workers=max(1, min(IO_THREADS, len(unsynced)))) as pool:
                list(pool.map(self._fsync, unsynced))
            self._synced.update(unsynced)
        paths = [self.folder / n for n in self.file_names]
        if len(paths) > 1 and write_index:
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {
                "metadata": {"total_size": total, **(extra_index_metadata or {})},
                "weight_map": {t.name: file_name for shard, file_name in zip(self.shards, self.file_names) for t in shard},
            }
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return paths


def rows_to_write(writes: Iterable[tuple[str, tuple[int, int] | None]],
                  shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """How many rows of each tensor ``writes`` cover, each (name, rows start:stop or None for all of
    it) with ``shapes`` the planned ones: what one process checks with ``finish(expected=...)`` where
    processes share a tensor's rows."""
    rows: dict[str, int] = {}
    for name, span in writes:
        shape = shapes[name]
        rows[name] = rows.get(name, 0) + (span[1] - span[0] if span else (shape[0] if shape else 1))
    return rows


def _write_error(exc: OSError, path: Path, what: str) -> OSError:
    """The same OSError (errno kept: full disk, quota, file-size limit...) saying what was being written."""
    return OSError(exc.errno, f"{exc.strerror or exc} (writing {what})", str(path))


def check_free_space(folder: Path, nbytes: int) -> None:
    """Refuse early, with the numbers, when the file system holding ``folder`` has less free space than ``nbytes``.

    Quotas are not seen here; they, and a disk filling up meanwhile, surface as write errors.
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < nbytes:
        raise DeltakitError(f"not enough free space for {folder}: the output needs {_size(nbytes)}, "
                            f"the file system has {_size(free)} free; nothing was written")


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit} ({nbytes:,} bytes)"
    return f"{nbytes:,} bytes"


# Tests only: with DELTAKIT_TEST_HOLD_WRITE=PATH, a BackgroundWriter stops once a tensor is on disk,
# creates PATH.<pid> and waits until that file is removed, so that a test can signal or kill the
# process at a known point of a write (no sleeps as synchronisation).
_HOLD_ENV = "DELTAKIT_TEST_HOLD_WRITE"


class BackgroundWriter:
    """Hand writes of a :class:`ShardedWriter` to threads, so disk writes overlap reads and compute.

    ``workers`` threads write concurrently (each tensor to its own place; copying into the page
    cache is bound by one core per thread). At most ``depth`` tensors wait in memory besides the
    ones being written. A write may come with ``ready``, run on the writing thread first: it
    waits for an asynchronous device-to-host copy and may refuse the tensor by raising. An
    error in a thread is raised by the next :meth:`write` or by :meth:`finish`. Example::

        background = BackgroundWriter(ShardedWriter(tmp, plan))
        background.write("w", tensor)
        background.finish()
    """

    def __init__(self, writer: ShardedWriter, depth: int = 2, workers: int = 1) -> None:
        import queue
        import threading

        self.writer = writer
        self._queue: "queue.Queue[tuple[str, torch.Tensor, Callable[[], None] | None, int | None] | None]" = queue.Queue(
            maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._hold = os.environ.get(_HOLD_ENV)
        self._wrote_one = threading.Event()
        self._queued = False
        self._threads = [threading.Thread(target=self._run, name=f"deltakit-writer-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                name, tensor, ready, start_row = item
                try:
                    if ready is not None:
                        ready()
                    self.writer.write(name, tensor, start_row)
                    self._wrote_one.set()
                except BaseException as exc:  # re-raised in the caller's thread
                    self._error = exc
                    self._wrote_one.set()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, name: str, tensor: torch.Tensor, ready: Callable[[], None] | None = None,
              start_row: int | None = None) -> None:
        """Queue ``tensor`` (or rows from ``start_row``, see :meth:`ShardedWriter.write`) for writing."""
        self._raise_if_failed()
        if self._hold and self._wrote_one.is_set():
            self._hold_here()
        self._queued = True
        self._queue.put((name, tensor if ready is not None else tensor.detach().to("cpu"), ready, start_row))

    def _hold_here(self) -> None:
        """See _HOLD_ENV: tests only."""
        marker, self._hold = Path(f"{self._hold}.{os.getpid()}"), None
        self._wrote_one.wait()
        marker.touch()
        while marker.exists():
            time.sleep(0.01)

    def close(self) -> None:
        """Stop the threads after the queued writes (safe to call twice)."""
        alive = [thread for thread in self._threads if thread.is_alive()]
        for _ in alive:
            self._queue.put(None)
        for thread in alive:
            thread.join()

    def finish(self, extra_index_metadata: dict[str, object] | None = None, expected: Iterable[str] | None = None,
               write_index: bool = True) -> list[Path]:
        if self._hold and self._queued:
            self._hold_here()
        self.close()
        self._raise_if_failed()
        return self.writer.finish(extra_index_metadata, expected, write_index)
