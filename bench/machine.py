"""What the machine can do with files, and what it is: read and write bandwidth, page-cache residency.

A row's floor is the bytes it must read ÷ the read bandwidth plus the bytes it writes ÷ the write
bandwidth, both measured in the same run on the same files in the page-cache state the commands
see (one stream of 64 MiB reads; buffered writes, as the commands write). No implementation beats
its floor without reading less.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CHUNK = 64 * 1024 * 1024


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore); None where it cannot be read."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            vec = (ctypes.c_ubyte * pages)()
            ok = libc.mincore(ctypes.c_void_p(addr), size, vec) == 0
            libc.munmap(ctypes.c_void_p(addr), size)
            if not ok:
                return None
            resident += sum(b & 1 for b in bytes(vec))
            total += pages
        finally:
            os.close(fd)
    return resident / total if total else None


def drop_from_cache(paths: list[Path]) -> None:
    """Evict the files' pages (fsync first, so that dirty pages become clean, then POSIX_FADV_DONTNEED)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bandwidth(paths: list[Path]) -> dict[str, float | None]:
    """Bytes/s reading the files once, one stream of 64 MiB chunks, with their residency before."""
    resident = resident_fraction(paths)
    view = memoryview(bytearray(CHUNK))
    done = 0
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while n := handle.readinto(view):
                done += n
    seconds = time.perf_counter() - start
    return {"bytes": done, "seconds": seconds, "bytes_per_s": done / seconds, "resident_before": resident}


def write_bandwidth(folder: Path, size: int) -> dict[str, float]:
    """Bytes/s writing ``size`` bytes buffered (no fsync, as the commands' writes return); the file is removed."""
    path = folder / ".bench-write-probe"
    block = os.urandom(min(CHUNK, max(size, 1)))
    done = 0
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        while done < size:
            done += handle.write(block[: min(len(block), size - done)])
    seconds = time.perf_counter() - start
    path.unlink()
    return {"bytes": done, "seconds": seconds, "bytes_per_s": done / seconds}


def bandwidth(files: list[Path], scratch: Path, cache: str) -> dict[str, dict]:
    """Read bandwidth of the pair in the cache state the rows will see ("warm": resident, read twice if
    the first pass came from disk; "cold": evicted) and write bandwidth for one shard's size (≤ 4 GiB)."""
    if cache == "cold":
        drop_from_cache(files)
        read = read_bandwidth(files)
        drop_from_cache(files)
    else:
        read = read_bandwidth(files)
        if (read["resident_before"] or 0) < 0.99:
            read = read_bandwidth(files)
    write = write_bandwidth(scratch, min(max(p.stat().st_size for p in files), 4 * 1024**3))
    return {"read": read, "write": write}


def describe() -> dict[str, object]:
    """GPU, CPU, memory and package versions: what a table per machine needs."""
    info: dict[str, object] = {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
                               "python": platform.python_version()}
    for line in _lines("/proc/cpuinfo"):
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
            break
    for line in _lines("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            info["memory_gb"] = round(int(line.split()[1]) * 1024 / 1e9, 1)
    import torch

    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["gpus"] = [f"{torch.cuda.get_device_name(i)} "
                        f"({torch.cuda.get_device_properties(i).total_memory / 1e9:.0f} GB)"
                        for i in range(torch.cuda.device_count())]
    for name in ("torch", "safetensors", "transformers", "peft", "mergekit"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    return info


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []
