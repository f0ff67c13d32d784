"""Where deltakit may read: inside the folder the user named, and only regular files.

Two invariants, each checked here and nowhere else (the third, that inputs are never written,
is :mod:`deltakit.io.inputs`):

- **Reads stay inside the folder the user named.** Every file a checkpoint names (a shard in an
  index, a weight file found in a folder, a config or tokenizer file copied into an output) lies,
  once symbolic links are followed, inside that folder's :func:`containment_root`. A path that
  leaves it (``../x``, an absolute path, a link to elsewhere) is refused, never read.
- **Only regular files are opened.** :func:`open_regular` refuses a FIFO, a socket or a device
  without blocking on it (a FIFO named ``model.safetensors`` would otherwise hang ``open``).

Example::

    fd = open_regular(folder / "model.safetensors")
    shard = contained_file(index.parent, "model-00001-of-00002.safetensors", index)
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from deltakit.errors import DeltakitError


def containment_root(folder: str | os.PathLike) -> Path:
    """The real folder whose inside ``folder``'s files must stay in.

    That is ``folder`` itself, except for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<commit>``), whose files are links into the repository's
    ``blobs/``: there it is the repository's cache folder, which holds both.
    """
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path``, its links followed, is ``root`` or lies under it (``root`` taken as a real path)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def contained_file(folder: Path, name: str, named_in: str | os.PathLike) -> Path:
    """``folder / name`` for a file name read from ``named_in`` (a shard index), refused unless it stays inside.

    ``name`` must be a relative path without ``..`` components, and the file it names, links
    followed, must lie inside ``folder``'s :func:`containment_root`.
    """
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or "\0" in name:
        raise DeltakitError(f"{named_in} names {name!r}, a path outside {folder}; "
                            "deltakit reads only files inside the folder it was given")
    path = folder / name
    if not is_inside(path, containment_root(folder)):
        raise DeltakitError(f"{named_in} names {name}, which links to {os.path.realpath(path)}, outside {folder}; "
                            "deltakit reads only files inside the folder it was given")
    return path


def refuse_escaping_link(path: Path, folder: Path) -> None:
    """Refuse a file of ``folder`` that is a symbolic link to somewhere outside it."""
    if not is_inside(path, containment_root(folder)):
        raise DeltakitError(f"{path} is a symbolic link to {os.path.realpath(path)}, outside {folder}; "
                            "deltakit reads only files inside the folder it was given")


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (links followed).

    Opened non-blocking, so that a FIFO answers at once instead of waiting for a writer; the
    descriptor is made blocking again before it is returned. Raises :class:`DeltakitError`
    for anything else than a regular file, and OSError as ``os.open`` does.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise DeltakitError(f"{path} is {kind}, not a regular file; deltakit reads only regular files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_bytes(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file ``path``, refused (one line) if it holds more than ``limit``."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise DeltakitError(f"{path} is {size:,} bytes, more than the {limit:,} deltakit reads of such a file")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > limit:
                raise DeltakitError(f"{path} grew past {limit:,} bytes while deltakit was reading it")
            chunks.append(chunk)
    finally:
        os.close(fd)
