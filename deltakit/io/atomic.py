"""Write-then-rename outputs: nothing half-written ever sits at the target path, and nothing is left behind.

An output ``out/merged`` is written inside a temporary folder beside it,
``out/.merged.tmp-XXXXXXXX/``, which holds two entries:

- ``.deltakit-owner``: who is writing (host, boot id, pid and the process's start time), locked with
  ``flock`` for as long as the writer lives;
- ``merged``: the output itself (a folder or a file).

Publishing fsyncs the output's files and folders, renames it onto the target (an old target, with
``force``, is swapped out in the same step where the file system allows it), fsyncs the parent
folder, and removes the temporary folder. On an exception (a signal turned into one by the CLI
included) the temporary folder is removed. A process killed outright (SIGKILL, the OOM killer, a
node crash) cannot clean up: the next run that writes to the same target removes temporary
folders whose owner is gone, on the same host only, and says so on stderr; one whose owner is
alive, or on another host, or that has no owner record, is never touched.

Durability: the fsyncs make a published output complete after a crash or power loss. They can be
turned off with ``DELTAKIT_FSYNC=0`` in the environment (scratch outputs on a fast local disk);
docs/benchmarks.md measures what they cost.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from deltakit.errors import DeltakitError
from deltakit.io.inputs import InputFootprint, refuse_input_overlap

OWNER_FILE = ".deltakit-owner"
# Write errors that mean "the output does not fit": a full disk, a quota, a file-size limit.
SPACE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def fsync_enabled() -> bool:
    """Whether outputs are fsynced before they are published (``DELTAKIT_FSYNC=0`` turns it off)."""
    return os.environ.get("DELTAKIT_FSYNC", "1").strip().lower() not in ("0", "false", "no", "off")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or folder (a folder's fsync makes its entries durable).

    File systems that cannot fsync (EINVAL, ENOTSUP) are passed over; any other error (EIO,
    ENOSPC surfacing from delayed allocation) is raised.
    """
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder from the deepest up (``root`` included)."""
    if not root.is_dir():
        fsync_path(root)
        return
    folders = []
    for folder, _, files in os.walk(root):
        folders.append(folder)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_path(path)
    for folder in reversed(folders):
        fsync_path(folder)


def check_output_path(target: str | os.PathLike, force: bool, inputs: Iterable[InputFootprint] = ()) -> Path:
    """Refuse a ``target`` that is, holds or lies inside one of ``inputs`` (even with ``force``), or that
    exists already unless ``force``; return it as a Path."""
    refuse_input_overlap(target, inputs)
    target = Path(target)
    if target.exists() and not force:
        raise DeltakitError(f"{target} already exists; pass force=True (--force) to overwrite it")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise DeltakitError(f"output folder {parent} does not exist")
    return target


# ---------------------------------------------------------------- owners of temporary folders

def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, from /proc; None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ("gone", 0) if Path("/proc/self/stat").exists() else None
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[19])


def owner_record() -> dict[str, Any]:
    """This process, as a temporary folder's owner."""
    state = _process_state(os.getpid())
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "start": state[1] if state else None}


def owner_alive(owner: dict[str, Any]) -> bool | None:
    """Whether the process that wrote ``owner`` still runs; None when that cannot be told from here."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return None
    boot = _boot_id()
    if boot is not None and owner.get("boot_id") is not None and owner["boot_id"] != boot:
        return False  # this host rebooted since
    pid = owner["pid"]
    state = _process_state(pid)
    if state is None:  # no /proc: ask the kernel whether the pid exists at all
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if state[0] in ("gone", "Z", "X"):
        return False
    return owner.get("start") is None or state[1] == owner["start"]  # else the pid was reused


def _lock(path: Path) -> int:
    """Create ``path`` holding this process's owner record, locked (flock) until the descriptor closes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with contextlib.suppress(OSError):  # file systems without flock: the record alone decides
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, (json.dumps(owner_record()) + "\n").encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlocked(path: Path) -> bool:
    """True when nobody holds the flock on ``path`` (or flock cannot tell); False when someone does."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDWR)
    except (ImportError, OSError):
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases a lock taken here
    return True


def _read_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def temporary_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def reclaim_stale(target: str | os.PathLike) -> list[Path]:
    """Remove temporary folders of ``target`` whose owner process is gone (same host); return them.

    A folder is removed only when its owner record names this host and a process that no longer
    runs (or a pid since reused, or an earlier boot) and nobody holds its lock. Each removal is
    reported on stderr.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    removed = []
    for name in sorted(glob.glob(glob.escape(temporary_prefix(target)) + "*", root_dir=parent)):
        folder = parent / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        owner = _read_owner(folder / OWNER_FILE)
        if owner is None or owner_alive(owner) is not False or not _unlocked(folder / OWNER_FILE):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
            print(f"deltakit: removed {folder}, a temporary output left by process {owner['pid']} on "
                  f"{owner['host']}, which is no longer running", file=sys.stderr)
    return removed


# ---------------------------------------------------------------- the temporary output

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2(a, b, flags); False where the system or file system cannot (then the caller falls back)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (RENAME_EXCHANGE); False where the system cannot."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _appeared(target: Path) -> DeltakitError:
    return DeltakitError(f"{target} appeared while deltakit was writing it (another run?); "
                         "nothing was overwritten; pass --force to overwrite it")


def _usual_mode(tmp: Path) -> None:
    """The output gets the modes of any file the user creates (0666 / 0777 less the umask), not a temporary
    file's 0600."""
    with contextlib.suppress(OSError):
        os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_umask())


def rename_new(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target``, which must not exist: refused, not overwritten, if it appeared meanwhile."""
    _usual_mode(tmp)
    try:
        if _renameat2(tmp, target, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise _appeared(target) from None
    if target.exists() or target.is_symlink():
        raise _appeared(target)
    os.replace(tmp, target)


def replace_with(tmp: Path, target: Path, trash: Path | None = None) -> None:
    """Move ``tmp`` onto ``target``; an old target ends at ``trash`` (default: beside it), then is removed.

    An old target that is a folder (or a folder replaced by a file) cannot be overwritten by one
    rename: the two are swapped atomically where the system allows it (Linux), else moved aside
    first, so a crash between the two renames leaves the old one at ``trash``.
    """
    _usual_mode(tmp)
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)
        return
    if not tmp.is_dir() and not target.is_dir():
        os.replace(tmp, target)  # a file over a file (or link): one atomic rename
        return
    old = trash if trash is not None else target.with_name(f".{target.name}.old-{os.getpid()}")
    if _exchange(tmp, target):
        old = tmp if trash is None else tmp.rename(trash)
    else:
        os.replace(target, old)
        os.replace(tmp, target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


class TemporaryOutput:
    """One output being written: ``path`` (inside a temporary folder beside ``target``) until :meth:`publish`.

    See the module docstring for the layout, the owner record and what publishing does.
    """

    def __init__(self, target: str | os.PathLike, directory: bool, force: bool = False) -> None:
        self.target, self.force = Path(target), force
        parent = self.target.parent if str(self.target.parent) else Path(".")
        reclaim_stale(self.target)
        self.folder = Path(tempfile.mkdtemp(prefix=temporary_prefix(self.target), dir=parent))
        self._lock_fd: int | None = None
        try:
            self._lock_fd = _lock(self.folder / OWNER_FILE)
            # The output keeps its own name (a figure's suffix tells its format), unless that is the record's.
            self.path = self.folder / (self.target.name if self.target.name != OWNER_FILE else "output")
            if directory:
                self.path.mkdir()
            else:
                self.path.touch()
        except BaseException:
            self.discard()
            raise

    def publish(self) -> None:
        """Make the output durable, rename it onto the target, and remove the temporary folder."""
        durable = fsync_enabled()
        if durable:
            fsync_tree(self.path)
        if self.force:
            replace_with(self.path, self.target, trash=self.folder / "old-output")
        else:
            rename_new(self.path, self.target)
        if durable:
            fsync_path(self.target.parent if str(self.target.parent) else ".")
        self.discard()

    def discard(self) -> None:
        """Remove the temporary folder (and what is in it); release the owner lock."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def explain_write_error(exc: BaseException, tmp: Path, target: Path) -> BaseException:
    """``exc`` as the user should see it: a failed write of the temporary output ``tmp`` becomes one
    :class:`DeltakitError` naming the output's own path (not the temporary one) and the cause.

    That is an OSError on a path inside ``tmp``; or a full disk, quota or file-size error without
    a path (a plain ``write`` reports none; safetensors' ``save_file`` reports "(os error 28)").
    A DeltakitError naming ``tmp`` names ``target`` instead. Anything else is returned as it is.
    """
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and not isinstance(exc, DeltakitError):
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(found.group(1)) if found else None
    filename = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    inside = filename is not None and str(tmp) in str(filename)
    if inside or (filename is None and code in SPACE_ERRORS):
        where = str(filename).replace(str(tmp), str(target)) if inside else str(target)
        # An OSError's strerror may say what was being written (see deltakit.io.writer).
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else os.strerror(code) if code else str(exc)
        if code in SPACE_ERRORS:
            reason += " (the output does not fit: a full disk, a quota or a file-size limit)"
        return DeltakitError(f"cannot write {where}: {reason}; nothing was left behind")
    if isinstance(exc, DeltakitError) and str(tmp) in str(exc):
        return type(exc)(str(exc).replace(str(tmp), str(target)))
    return exc


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, force: bool = False,
                     inputs: Iterable[InputFootprint] = ()) -> Iterator[Path]:
    """Yield a temporary folder for ``target``; rename it into place on success.

    On any exception the temporary folder is removed and ``target`` is untouched. A ``target``
    that is, holds or lies inside one of ``inputs`` is refused before anything is written.
    Example::

        with atomic_directory("out/merged", force=False) as tmp:
            save_file(tensors, tmp / "model.safetensors")
    """
    with _published(target, force, directory=True, inputs=inputs) as path:
        yield path


def temporary_output(target: Path, directory: bool, force: bool) -> TemporaryOutput:
    """:class:`TemporaryOutput` of ``target``; a failure to make it (a read-only or full folder) names ``target``."""
    try:
        return TemporaryOutput(target, directory=directory, force=force)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in SPACE_ERRORS:
            reason += " (the output does not fit: a full disk, a quota or a file-size limit)"
        raise DeltakitError(f"cannot write {target}: {reason}; nothing was left behind") from None


@contextlib.contextmanager
def _published(target: str | os.PathLike, force: bool, directory: bool,
               inputs: Iterable[InputFootprint] = ()) -> Iterator[Path]:
    """The temporary output of ``target``, published on success; removed, with the error explained, on failure."""
    target = check_output_path(target, force, inputs)
    output = temporary_output(target, directory, force)
    try:
        yield output.path
        output.publish()
    except BaseException as exc:
        output.discard()
        explained = explain_write_error(exc, output.path, target)
        if explained is not exc:
            raise explained from None
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, force: bool = False, inputs: Iterable[InputFootprint] = ()) -> Iterator[Path]:
    """Yield a temporary file path for ``target`` (same name, inside a temporary folder); rename it into place on
    success. A ``target`` that is, holds or lies inside one of ``inputs`` is refused before anything is written."""
    with _published(target, force, directory=False, inputs=inputs) as path:
        yield path
