"""What the machine can do with files: read/write bandwidth, page-cache residency, its description.

The bandwidths turn into each command's floor: the bytes it must read divided by the read
bandwidth plus the bytes it must write divided by the write bandwidth. Both are measured
in the same run, on the same files, in the same page-cache state the commands see.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import time
from pathlib import Path

CHUNK_BYTES = 64 * 1024 * 1024


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), or None where it cannot be read."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        pages = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                resident += sum(1 for b in bytes(vec) if b & 1)
                total += pages
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return resident / total if total else None


def drop_from_cache(paths: list[Path]) -> None:
    """Ask the kernel to evict the files' clean pages (fsync first so dirty ones become clean)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bandwidth(paths: list[Path], limit_bytes: int | None = None) -> dict[str, float | int | None]:
    """Read the files sequentially in 64 MiB chunks (one stream, as a loader would); bytes/s.

    Reports the page-cache residency before the read, so a reader knows whether this was
    memory or disk speed.
    """
    resident_before = resident_fraction(paths)
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    done = 0
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while limit_bytes is None or done < limit_bytes:
                n = fh.readinto(view)
                if not n:
                    break
                done += n
        if limit_bytes is not None and done >= limit_bytes:
            break
    seconds = time.perf_counter() - start
    return {"bytes": done, "seconds": seconds, "bytes_per_s": done / seconds if seconds > 0 else None,
            "resident_before": resident_before}


def write_bandwidth(folder: Path, size_bytes: int) -> dict[str, float | int]:
    """Write ``size_bytes`` to a scratch file in ``folder`` in 64 MiB chunks, buffered as the
    commands write (no fsync); also report the time including fsync. The file is removed."""
    path = folder / ".bench-write-probe"
    block = os.urandom(min(CHUNK_BYTES, max(size_bytes, 1)))
    done = 0
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        while done < size_bytes:
            n = fh.write(block[: min(len(block), size_bytes - done)])
            done += n
        buffered = time.perf_counter() - start
        os.fsync(fh.fileno())
    synced = time.perf_counter() - start
    path.unlink()
    return {"bytes": done, "seconds": buffered, "bytes_per_s": done / buffered if buffered > 0 else None,
            "seconds_with_fsync": synced, "bytes_per_s_with_fsync": done / synced if synced > 0 else None}


def describe() -> dict[str, object]:
    """The machine fields a benchmark table needs (GPU, CPU, memory, software versions)."""
    info: dict[str, object] = {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "memory_gb": _memory_gb(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpus"] = [
                {"name": torch.cuda.get_device_name(i),
                 "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 1e9, 1)}
                for i in range(torch.cuda.device_count())
            ]
    except ImportError:
        pass
    for name in ("safetensors", "transformers", "peft", "mergekit"):
        info[name] = _version(name)
    return info


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 1)
    except OSError:
        pass
    return None
