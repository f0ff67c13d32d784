"""Run one command in a fresh child process and collect what it cost.

The child is ``python -m bench.measure -- ARGV`` (see measure.py), so every command, deltakit's
or a baseline's, starts from a fresh interpreter with nothing cached. From out here: wall
time (interpreter start and imports included), the child's peak RSS from ``wait4``, and its
peak anonymous / file-backed RSS sampled from /proc every 50 ms (mapped safetensors pages
count in RSS; the anonymous part is what the command really allocated).

With ``tree=True`` (a command that starts worker processes, e.g. under torchrun) the /proc
samples cover the child and all its descendants: the peaks per process (largest single
process, as wait4's ``ru_maxrss`` is) and summed over them; ``--timeout`` kills them all,
though torchrun starts its workers in sessions of their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = "bench_measure"


def child_env() -> dict[str, str]:
    """The environment for children: the repo on PYTHONPATH (no install needed), unbuffered output."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ChildResult:
    rc: int | None
    wall_s: float
    timed_out: bool = False
    measure: dict[str, object] = field(default_factory=dict)  # the child's own JSON line
    max_rss_mb: float | None = None
    peak_anon_mb: float | None = None
    peak_file_mb: float | None = None
    stderr_tail: str = ""
    # with tree=True: peaks of the sums over the child and its descendants, and how many were seen at once
    peak_anon_total_mb: float | None = None
    peak_file_total_mb: float | None = None
    max_processes: int | None = None
    workers: list[dict[str, object]] = field(default_factory=list)  # torchrun workers' own lines, by rank


def _proc_rss(pid: int) -> tuple[float, float] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("RssAnon", 0.0), values.get("RssFile", 0.0) + values.get("RssShmem", 0.0)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, their children, ...), from every /proc/N/stat's ppid."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _kill_tree(pid: int, below: list[int]) -> None:
    """SIGKILL the child's process group and each descendant's (torchrun's workers lead their own)."""
    for target in dict.fromkeys([pid, *below]):
        for kill in (os.killpg, os.kill):
            try:
                kill(target, signal.SIGKILL)
                break
            except (ProcessLookupError, PermissionError):
                continue


def run_measured(argv: list[str], log_prefix: Path, timeout_s: float | None = None,
                 python: str = sys.executable, tree: bool = False) -> ChildResult:
    """Run ``python -m bench.measure -- argv``; stdout/stderr go to ``log_prefix``.{out,err}.

    ``tree``: sample (and on timeout kill) the child's descendants too, not the child alone.
    """
    command = [python, "-m", "bench.measure", "--", *argv]
    out_path, err_path = log_prefix.with_suffix(".out"), log_prefix.with_suffix(".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(), stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        peaks = {"anon": 0.0, "file": 0.0, "anon_total": 0.0, "file_total": 0.0, "processes": 0}
        done = threading.Event()
        timed_out = threading.Event()

        def watch() -> None:
            below: list[int] = []
            ticks = 0
            while not done.wait(0.05):
                if tree and ticks % 10 == 0:  # look for new workers every 0.5 s
                    below = _descendants(proc.pid)
                ticks += 1
                samples = [s for s in map(_proc_rss, [proc.pid, *below]) if s]
                if samples:
                    peaks["anon"] = max(peaks["anon"], *(s[0] for s in samples))
                    peaks["file"] = max(peaks["file"], *(s[1] for s in samples))
                    peaks["anon_total"] = max(peaks["anon_total"], sum(s[0] for s in samples))
                    peaks["file_total"] = max(peaks["file_total"], sum(s[1] for s in samples))
                    peaks["processes"] = max(peaks["processes"], len(samples))
                if timeout_s and time.perf_counter() - start > timeout_s and not timed_out.is_set():
                    timed_out.set()
                    if tree:
                        _kill_tree(proc.pid, _descendants(proc.pid))
                    else:
                        try:
                            os.killpg(proc.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    lines = marker_lines(out_path.read_text(errors="replace"))
    measure = next((line for line in lines[::-1] if "worker" not in line), {})
    workers = worker_lines(lines)
    have_proc = peaks["anon"] > 0 or peaks["file"] > 0
    return ChildResult(
        rc=proc.returncode, wall_s=wall, timed_out=timed_out.is_set(), measure=measure,
        max_rss_mb=max(usage.ru_maxrss / 1024, float(measure.get("max_rss_mb") or 0)),
        peak_anon_mb=peaks["anon"] if have_proc else None, peak_file_mb=peaks["file"] if have_proc else None,
        stderr_tail=_tail(err_path, 40),
        peak_anon_total_mb=peaks["anon_total"] if tree and have_proc else None,
        peak_file_total_mb=peaks["file_total"] if tree and have_proc else None,
        max_processes=int(peaks["processes"]) if tree and have_proc else None,
        workers=workers,
    )


def marker_lines(stdout: str) -> list[dict[str, object]]:
    """Every ``bench.measure`` JSON line in a child's stdout, in order."""
    found = []
    for line in stdout.splitlines():
        if line.startswith("{") and MARKER in line:
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def worker_lines(lines: list[dict[str, object]]) -> list[dict[str, object]]:
    """The torchrun workers' lines (``bench.measure --worker``), one per rank (the last if repeated), by rank."""
    by_rank = {int(line["worker"]): line for line in lines if "worker" in line}  # type: ignore[arg-type]
    return [by_rank[rank] for rank in sorted(by_rank)]


def check_available(argv: list[str], python: str = sys.executable) -> tuple[bool, str]:
    """(available, reason) for a command and its flags, asked in a fresh child."""
    proc = subprocess.run([python, "-m", "bench.measure", "--check", "--", *argv], cwd=REPO_ROOT, env=child_env(),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    for line in proc.stdout.splitlines()[::-1]:
        if MARKER in line:
            payload = json.loads(line)
            return bool(payload["available"]), str(payload.get("reason", ""))
    return False, f"the availability check failed (rc {proc.returncode}): {_last_line(proc.stderr)}"


def run_helper(argv: list[str], python: str = sys.executable) -> tuple[int, str]:
    """Run an untimed helper (``python -m bench.xxx ...``); (rc, stderr tail)."""
    proc = subprocess.run([python, *argv], cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, "\n".join((proc.stderr or "").splitlines()[-20:])


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # progress bars redraw with \r: keep the last state of each line
    cleaned = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    while cleaned and not cleaned[-1].strip():
        cleaned.pop()
    return "\n".join(cleaned[-lines:])


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
