"""Progress of a long loop where a person can see it: log lines on a stream, or a display in a notebook.

A progress function wraps the iterator of a pipeline's items, ``progress(items, length, label)``
(:data:`deltakit.pipeline.ProgressFn`), and yields them unchanged. Two kinds live here; the CLI adds a
bar for terminals (``deltakit_cli.common.progress``):

* :func:`log_progress`: for a log, a pipe or a file: a line at least every ``interval`` seconds
  while the loop runs (``ΔW spectra 37/224, 10.0 s``), written by a timer thread so that one slow
  item cannot silence it, and a closing summary (``ΔW spectra 224/224 in 7.9 s``);
* :func:`notebook_progress`: in a Jupyter kernel, one display that updates in place and ends as
  the same closing summary. :func:`default_progress` returns it inside a kernel (so that the
  Python API shows progress in a notebook without being asked) and None elsewhere (a script stays
  silent).

Nothing here imports torch or IPython: the kernel is recognised by ``sys.modules`` alone.

Example::

    for item in log_progress(items, len(items), "ΔW spectra", stream=sys.stderr):
        work(item)
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

LOG_INTERVAL_S = 10.0  # the longest a log goes without a progress line while a loop runs


def summary_line(label: str, done: int, length: int, elapsed: float, finished: bool) -> str:
    """``ΔW spectra 224/224 in 7.9 s`` when ``finished``, else ``ΔW spectra 37/224, 10.0 s``."""
    name = label or "progress"
    return f"{name} {done}/{length} in {elapsed:.1f} s" if finished else f"{name} {done}/{length}, {elapsed:.1f} s"


class _Count:
    """Items done so far and the start time, shared between the loop and the timer thread."""

    def __init__(self) -> None:
        self.done = 0
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def log_progress(items: Iterable[T], length: int, label: str, stream: TextIO | None = None,
                 interval: float = LOG_INTERVAL_S) -> Iterator[T]:
    """``items`` unchanged; on ``stream`` (default stderr) a line every ``interval`` s and a closing summary.

    The summary is written when the loop ends, also when it ends early on an error (then with the
    count reached), so a log says how far a failed run got.
    """
    out = stream if stream is not None else sys.stderr
    count = _Count()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval):
            _write(out, summary_line(label, count.done, length, count.elapsed(), finished=False))

    timer = threading.Thread(target=tick, name="deltakit-progress", daemon=True)
    timer.start()
    try:
        for item in items:
            yield item
            del item  # hold no item while the next is read (the pipeline bounds memory by what is held)
            count.done += 1
    finally:
        stop.set()
        timer.join()
        _write(out, summary_line(label, count.done, length, count.elapsed(), finished=True))


def _write(stream: TextIO, line: str) -> None:
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):  # a closed pipe or file: progress is never worth failing the run for
        pass


def in_notebook() -> bool:
    """True inside a Jupyter kernel (an IPython shell that sends its output to a front end)."""
    ipython = sys.modules.get("IPython")
    if ipython is None or "ipykernel" not in sys.modules:
        return False
    shell = ipython.get_ipython() if hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def notebook_progress(items: Iterable[T], length: int, label: str, interval: float = 0.5) -> Iterator[T]:
    """``items`` unchanged, with one notebook display updated at most every ``interval`` s:
    a bar (HTML ``<progress>``) and ``label done/length``; at the end the closing summary."""
    from IPython.display import HTML, display

    count = _Count()

    def html(finished: bool) -> Any:
        text = summary_line(label, count.done, length, count.elapsed(), finished)
        return HTML(f'<progress value="{count.done}" max="{max(length, 1)}" style="width:20em"></progress> '
                    f"<code>{_escape(text)}</code>")

    handle = display(html(False), display_id=True)
    shown = count.started
    try:
        for item in items:
            yield item
            del item
            count.done += 1
            now = time.perf_counter()
            if now - shown >= interval:
                handle.update(html(False))
                shown = now
    finally:
        handle.update(html(True))


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def default_progress() -> Callable[[Iterable[Any], int, str], Iterator[Any]] | None:
    """The progress a library call shows when its caller gave none: a notebook display in a Jupyter
    kernel, nothing elsewhere."""
    return notebook_progress if in_notebook() else None
