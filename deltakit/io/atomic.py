"""Write-then-rename outputs: nothing half-written ever sits at the target path."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from deltakit.errors import DeltakitError


def check_output_path(target: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing ``target`` unless ``force``; return it as a Path."""
    target = Path(target)
    if target.exists() and not force:
        raise DeltakitError(f"{target} already exists; pass force=True (--force) to overwrite it")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise DeltakitError(f"output folder {parent} does not exist")
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_with(tmp: Path, target: Path) -> None:
    """Move ``tmp`` onto ``target``, removing an old target only once tmp is complete.

    mkstemp / mkdtemp create owner-only entries; the output gets the usual umask modes.
    """
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_umask())
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, target)


def temporary_directory(target: Path) -> Path:
    """A new empty folder beside ``target`` (same file system, so the final rename is atomic)."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it into place on success.

    On any exception the temporary folder is removed and ``target`` is untouched.
    Example::

        with atomic_directory("out/merged", force=False) as tmp:
            save_file(tensors, tmp / "model.safetensors")
    """
    target = check_output_path(target, force)
    tmp = temporary_directory(target)
    try:
        yield tmp
        replace_with(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; rename it into place on success."""
    target = check_output_path(target, force)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        replace_with(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
