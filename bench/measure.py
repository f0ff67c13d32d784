"""Run one console command in this process and print what it cost as a JSON line.

    python -m bench.measure -- deltakit rank BASE FT --json out.json --device auto
    python -m bench.measure -- mergekit-extract-lora --model FT --base-model BASE ...
    python -m bench.measure -- python -m bench.baselines rank BASE FT
    python -m bench.measure --check -- deltakit extract --rank --json   # is it there, with these flags?
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m bench.measure --worker -- deltakit rank ...

The last stdout line is ``{"bench_measure": 1, "rc": .., "wall_s": .., "max_rss_mb": ..,
"gpu_peak_mb": ..}``: wall_s is the command alone (imports of the command's module
included, interpreter start not), max_rss_mb is this process's peak resident set
(getrusage), gpu_peak_mb is torch.cuda.max_memory_reserved summed over devices (0 when
CUDA was never used). A console name is resolved through its installed entry point, or
through the table below when the package is only on PYTHONPATH (deltakit's ``cli/``
folder is imported as ``deltakit_cli`` as the editable install would). A click command is
called with ``standalone_mode=False``; a plain ``main()`` is called as the console script
would call it, with sys.argv set and its SystemExit caught. ``--check`` looks the
subcommand and flags up on the click group beside such a ``main()``.

``--worker`` runs the command the same way (its exit code is the command's): the entry point
of torchrun's worker processes, so that they resolve ``deltakit`` (and ``deltakit_cli``)
exactly as above, installed or not. Each worker prints one line of its own,
``{"bench_measure": 1, "worker": RANK, "gpu_peak_mb": .., "gpu_peak_allocated_mb": ..}``; the
outer ``bench.measure`` around torchrun reports wall time and RSS, and the bench adds up the
workers' GPU memory (:func:`bench.runner.worker_lines`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import json
import resource
import runpy
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
MARKER = "bench_measure"

# Console scripts the harness runs, for when they are importable but not installed.
KNOWN_ENTRY_POINTS = {
    "deltakit": "deltakit_cli.main:main",
    "mergekit-extract-lora": "mergekit.scripts.extract_lora:main",
}


class NotAvailable(Exception):
    """The command (or a flag it needs) does not exist in this checkout or environment."""


def _alias_cli_package() -> None:
    """Make ``deltakit_cli`` importable from the repo's ``cli/`` folder (pyproject maps it so)."""
    if importlib.util.find_spec("deltakit_cli") is not None:
        return
    init = REPO_ROOT / "cli" / "__init__.py"
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location("deltakit_cli", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["deltakit_cli"] = module
    spec.loader.exec_module(module)


def resolve_console(name: str) -> Callable[..., Any]:
    """The callable behind a console script name."""
    target = None
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="console_scripts", name=name):
            target = ep.value
            break
    except Exception:  # noqa: BLE001 - broken metadata: fall back to the table
        target = None
    target = target or KNOWN_ENTRY_POINTS.get(name)
    if target is None:
        raise NotAvailable(f"no console script named {name}")
    module_name, _, attr = target.partition(":")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    if module_name.startswith("deltakit_cli"):
        _alias_cli_package()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise NotAvailable(f"{name}: cannot import {module_name} ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a half-written module is "not available", with its error
        raise NotAvailable(f"{name}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise NotAvailable(f"{name}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    return obj


def check_available(argv: list[str]) -> None:
    """Raise NotAvailable unless ``argv[0]`` resolves, its subcommand exists and has each --flag in argv."""
    if argv[:2] == ["python", "-m"]:
        if importlib.util.find_spec(argv[2]) is None:
            raise NotAvailable(f"no module {argv[2]}")
        return
    command = resolve_console(argv[0])
    try:
        import click
    except ImportError:
        return
    if not isinstance(command, click.Command):
        command = _click_command_beside(command)
        if command is None:
            return
    words = argv[1:]
    if isinstance(command, click.Group) and words and not words[0].startswith("-"):
        ctx = click.Context(command)
        sub = command.get_command(ctx, words[0])
        if sub is None:
            have = ", ".join(command.list_commands(ctx))
            raise NotAvailable(f"{argv[0]} has no command {words[0]!r} (it has: {have})")
        command, words = sub, words[1:]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    missing = [w for w in words if w.startswith("-") and w.split("=")[0] not in known]
    if missing:
        raise NotAvailable(f"{' '.join(argv[:2])} has no option {', '.join(missing)}")


def _click_command_beside(function: Callable[..., Any]) -> Any:
    """The click group (else command) defined in the module of a plain ``main()`` entry point."""
    import click

    module = sys.modules.get(getattr(function, "__module__", ""), None)
    found = [v for v in vars(module).values() if isinstance(v, click.Command)] if module else []
    groups = [v for v in found if isinstance(v, click.Group)]
    return (groups or found or [None])[0]


def _invoke(argv: list[str]) -> int:
    """Run argv in this process; return its exit code."""
    if argv[:2] == ["python", "-m"]:
        sys.argv = [argv[2], *argv[3:]]
        try:
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            return _exit_code(exc.code)
        return 0
    command = resolve_console(argv[0])
    sys.argv = list(argv)
    try:
        import click
    except ImportError:
        click = None
    try:
        if click is not None and isinstance(command, click.Command):
            try:
                result = command.main(args=argv[1:], prog_name=argv[0], standalone_mode=False)
            except click.exceptions.Abort:
                print("Aborted!", file=sys.stderr)
                return 1
            except click.ClickException as exc:
                exc.show()
                return exc.exit_code
            return result if isinstance(result, int) else 0
        result = command()
        return result if isinstance(result, int) else 0
    except SystemExit as exc:
        return _exit_code(exc.code)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def gpu_peak_mb() -> tuple[float, float]:
    """(max reserved, max allocated) MiB over all devices, without initialising CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0.0, 0.0
    reserved = allocated = 0
    for device in range(torch.cuda.device_count()):
        reserved += torch.cuda.max_memory_reserved(device)
        allocated += torch.cuda.max_memory_allocated(device)
    return reserved / 2**20, allocated / 2**20


def main(args: list[str]) -> int:
    check = args[:1] == ["--check"]
    worker = args[:1] == ["--worker"]
    if check or worker:
        args = args[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    if worker:
        try:
            rc = _invoke(args)
        except NotAvailable as exc:
            print(f"not available: {exc}", file=sys.stderr)
            return 127
        _print_measurement({"worker": int(os.environ.get("RANK", "0"))})
        return rc
    if check:
        try:
            check_available(args)
            payload = {MARKER: 1, "available": True}
        except NotAvailable as exc:
            payload = {MARKER: 1, "available": False, "reason": str(exc)}
        print(json.dumps(payload), flush=True)
        return 0
    start = time.perf_counter()
    error = None
    try:
        rc = _invoke(args)
    except NotAvailable as exc:
        rc, error = 127, str(exc)
        print(f"not available: {exc}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - report it and still print the measurement
        traceback.print_exc()
        rc, error = 1, f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - start
    _print_measurement({"rc": rc, "wall_s": wall, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "error": error})
    return rc


def _print_measurement(fields: dict[str, object]) -> None:
    """The marked JSON line, with this process's GPU peaks, on the real stdout after the command's own output."""
    reserved, allocated = gpu_peak_mb()
    sys.stdout.flush()
    print(json.dumps({MARKER: 1, **fields, "gpu_peak_mb": reserved, "gpu_peak_allocated_mb": allocated}),
          file=sys.__stdout__, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
