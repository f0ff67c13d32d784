"""What every command shares: one-line errors, device choice, progress on stderr, JSON output.

Nothing here imports torch, numpy or the library at module level: `deltakit --help`,
`--version` and usage errors must answer in a fraction of a second. Commands import the
library inside their bodies (tests/test_cli_errors.py checks that torch stays unloaded).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import click

if TYPE_CHECKING:
    from deltakit.distributed import Parallel
    from deltakit.io.inputs import InputFootprint

T = TypeVar("T")

# The library names a setting in both spellings, "force=True (--force)"; the CLI keeps the flag.
_PYTHON_AND_FLAG = re.compile(r"\b[a-z_]+=\S+? \((--[a-z][a-z0-9-]*(?: [a-z0-9:._-]+)?)\)")


def cli_terms(message: str) -> str:
    """A library message in command-line terms: 'pass force=True (--force)' -> 'pass --force'."""
    return _PYTHON_AND_FLAG.sub(r"\1", message)


def _is_user_error(exc: BaseException) -> bool:
    """A DeltakitError, looked up without importing the library (it is loaded once a command ran)."""
    errors = sys.modules.get("deltakit.errors")
    return errors is not None and isinstance(exc, errors.DeltakitError)


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP, SIGINT) turned into an exception, so that the stack unwinds
    through the atomic writers (which remove their temporary output) and under torchrun through
    the group's failure exchange (so the other processes stop too)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted ({signal.Signals(signum).name})")


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name))


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While the block runs, SIGTERM / SIGHUP / SIGINT raise :class:`Interrupted` in the main thread.

    Only the first signal raises: later ones arrive while the stack is unwinding and would cut
    the cleanup short, so they are ignored (SIGKILL still ends the process). The previous
    handlers are restored after the block. Off the main thread (where Python cannot install
    handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def handler(signum: int, frame: Any) -> None:
        if not raised:
            raised.append(signum)
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """While the block runs, each :class:`~deltakit.errors.DeltakitWarning` is one ``warning: ...`` line on
    stderr (every time it is raised); other warnings are shown as Python shows them."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
            if getattr(category, "__name__", "") == "DeltakitWarning":
                click.echo(f"warning: {str(message).strip().splitlines()[0]}", err=True)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        warnings.filterwarnings("always", message="", category=Warning, module="deltakit")
        yield


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn DeltakitError (and a few OS errors) into ``Error: ...`` on stderr and exit 1.

    A stop signal during the command removes its temporary output and ends it with
    ``Error: interrupted (SIGTERM)`` (or SIGHUP, SIGINT) and exit status 128 + the signal number.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with stop_signals_raise(), warnings_as_lines():
                return command(*args, **kwargs)
        except Interrupted as exc:
            _fail(str(exc), code=128 + exc.signum)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            _fail(f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc))
        except BrokenPipeError:  # `deltakit rank ... | head`: the reader left; nothing to say
            sys.stderr.close()
            sys.exit(0)
        except OSError as exc:  # disk full, read-only file system...
            _fail(str(exc))
        except KeyboardInterrupt:  # raised before the handlers were in place, or by other code
            _fail("interrupted (SIGINT)", code=130)
        except Exception as exc:  # noqa: BLE001 -- only DeltakitError is handled; anything else is a bug
            if not _is_user_error(exc):
                raise
            _fail(cli_terms(str(exc)))

    return wrapper


def usage_error_line(exc: click.ClickException) -> str:
    """click's usage error as one line with the help hint: "no such option: --x (see 'deltakit rank --help')"."""
    message = exc.format_message().strip().replace("\n", " ")
    if message.endswith(".") and not message.endswith(".."):
        message = message[:-1]
    if len(message) > 1 and message[0].isupper() and message[1].islower():
        message = message[0].lower() + message[1:]
    context = getattr(exc, "ctx", None)
    if context is None:
        return message
    return f"{message} (see '{context.command_path} --help')"


class DeltakitGroup(click.Group):
    """The `deltakit` group: click's own errors become one ``Error:`` line and exit 1, like ours.

    click prints usage errors (unknown option, bad choice, value out of range) as a usage
    block, a hint and the error, exit 2; here they are one line that names the help to read.
    ``deltakit`` alone prints the help.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        _INVOCATION[:] = ["deltakit", *(sys.argv[1:] if args is None else [str(a) for a in args])]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else "")
            sys.exit(0)
        except click.ClickException as exc:
            _fail(usage_error_line(exc))
        except click.Abort:
            _fail("aborted; nothing was written", code=130)
        sys.exit(result if isinstance(result, int) else 0)


@contextlib.contextmanager
def parallel_workers(device: str) -> Iterator["Parallel"]:
    """Join torchrun's process group when launched by it (else a single worker, its --device current); leave it after."""
    from deltakit.device.host import threads_for_free_cores
    from deltakit.distributed import finish, init_parallel

    parallel = init_parallel(device)
    try:
        with threads_for_free_cores():  # BLAS threads beyond the free cores spin: 5× slower on a busy machine
            yield parallel
    finally:
        finish(parallel)


def _fail(message: str, code: int = 1) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    click.echo(f"Error: {first}", err=True)
    sys.exit(code)


def progress(items: Iterable[T], length: int, label: str) -> Iterator[T]:
    """Progress on stderr, wherever it goes: a bar on a terminal; in a log, a pipe or a file a line at
    least every 10 s and a closing summary (``ΔW spectra 224/224 in 7.9 s``; :mod:`deltakit.progress`)."""
    if not sys.stderr.isatty():
        from deltakit.progress import log_progress

        yield from log_progress(items, length, label, stream=sys.stderr)
        return
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True, show_eta=True,
                           item_show_func=None) as bar:
        for item in items:
            yield item
            del item  # hold no item while the next is read (deltakit.delta bounds memory by what is held)
            bar.update(1)


def protect_inputs(force: bool, outputs: Iterable[str | os.PathLike | None],
                   inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> list[InputFootprint]:
    """What the command reads of its ``inputs`` ((label, path); None paths are absent), after refusing
    every output path that is, holds or lies inside one of them (even with --force) or that exists
    (without --force). None and "-" (stdout) outputs are passed over."""
    from deltakit.io import check_output_path
    from deltakit.io.inputs import footprints

    found = footprints(list(inputs))
    for path in outputs:
        if path is not None and str(path) != "-":
            check_output_path(path, force, found)
    return found


def write_json(path: str, payload: Any, force: bool = True, inputs: Iterable[InputFootprint] = ()) -> None:
    """Write ``payload`` as JSON to ``path`` ("-" for stdout), atomically, never over one of ``inputs``."""
    write_text(path, json.dumps(payload, indent=2, allow_nan=False) + "\n", force, inputs)


def write_text(path: str, text: str, force: bool = True, inputs: Iterable[InputFootprint] = ()) -> None:
    """Write ``text`` to ``path`` ("-" for stdout), atomically, never over one of ``inputs``."""
    if path == "-":
        click.echo(text, nl=False)
        return
    from deltakit.io import atomic_file

    with atomic_file(path, force=force, inputs=inputs) as tmp:
        Path(tmp).write_text(text)


def command_line() -> list[str]:
    """The words of this run's command line, ``deltakit rank ...`` (as the group received them)."""
    return list(_INVOCATION) or ["deltakit", *sys.argv[1:]]


_INVOCATION: list[str] = []


def write_html(path: str | None, report: Any, force: bool, inputs: Iterable[InputFootprint] = ()) -> None:
    """The report as one self-contained HTML page at ``path`` (nothing when None); see :mod:`deltakit.page`."""
    if not path:
        return
    from deltakit.page import report_page

    write_text(path, report_page(report, command=command_line()), force, inputs)


def stdout_taken(*paths: str | None) -> bool:
    """True when one of the outputs goes to stdout ('-'): the table then stays off it."""
    return any(path == "-" for path in paths)


device_option = click.option(
    "--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
    help="Where the linear algebra runs; auto picks CUDA when there is a GPU.",
)


force_option = click.option("--force", is_flag=True, help="Overwrite outputs that already exist.")
include_option = click.option(
    "--include", multiple=True, metavar="GLOB",
    help="Only tensors whose name matches this glob (repeatable), e.g. '*self_attn*'.",
)
exclude_option = click.option("--exclude", multiple=True, metavar="GLOB", help="Skip tensors matching this glob (repeatable).")
allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True,
    help="Also read PyTorch pickles (.bin/.pt), with torch.load(weights_only=True). Off by default: pickles can run code.",
)


def build_spectral_options(device: str = "auto", exact: bool = False, fp64: bool = False,
                           spectrum: str | None = None, rounding: str = "auto") -> Any:
    """The one :class:`~deltakit.spectral.options.SpectralOptions` of a command, from its flags."""
    from deltakit.spectral.options import SpectralOptions

    return SpectralOptions(device=device, precision="fp64" if fp64 else "fp32", exact=exact, spectrum=spectrum or "auto",
                           rounding=rounding)


def rounding_option(f):
    """--rounding: which sides of a same-dtype pair were rounded (the storage-noise model, docs/metrics.md)."""
    return click.option("--rounding", type=click.Choice(["auto", "one-sided", "two-sided"]), default="auto",
                        show_default=True,
                        help="Storage rounding of the pair: one-sided (the fine-tune trained from the stored base and "
                             "saved once), two-sided (both cast from unrounded weights), or auto (decided per matrix "
                             "from the data; the JSON says which and why).")(f)


def spectral_options(f):
    """--device, --exact, --fp64: how spectra are computed (shared with extract and intruders)."""
    f = click.option("--fp64", is_flag=True, help="Compute ΔW and its spectrum in float64 instead of float32.")(f)
    f = click.option("--exact", is_flag=True,
                     help="Full SVD instead of the fast paths (Gram/eigh spectra, randomized SVD factors): slower, exact.")(f)
    return device_option(f)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """'5GB' -> 5·10⁹ bytes, '500MiB' -> 500·2²⁰, '4096' -> 4096."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        from deltakit.errors import DeltakitError

        raise DeltakitError(f"cannot read shard size {text!r}; use e.g. 5GB, 500MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])
