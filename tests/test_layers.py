"""The house keeps its shape: the import contract of pyproject.toml (layers, no cycles) holds; no module
shares its name with a function its package exports; no library file grows past ~450 lines without a
reason written at its top; the library names no benchmark folder."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import deltakit

REPO = Path(__file__).resolve().parents[1]
LIBRARY = [REPO / "deltakit", REPO / "cli"]
LONG_FILE = 450
REASON = "Longer than"  # a long module's docstring starts a paragraph with this and says why


def library_files() -> list[Path]:
    return sorted(p for root in LIBRARY for p in root.rglob("*.py"))


def test_the_import_contract_holds():
    """import-linter's layers contract (pyproject.toml): every module imports only from the layers below
    its own, and siblings of a layer do not import each other; a cycle between layers breaks it too."""
    script = Path(sys.executable).with_name("lint-imports")  # installed with the test extras
    done = subprocess.run([str(script)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_no_module_is_shadowed_by_a_function_of_its_package():
    """``deltakit.lora.merge`` is the function; the module that holds it has another name."""
    clashes = []
    for package in [deltakit, *(importlib.import_module(f"deltakit.{m.name}")
                                for m in pkgutil.iter_modules(deltakit.__path__) if m.ispkg)]:
        modules = {m.name for m in pkgutil.iter_modules(package.__path__)}
        exported = {name for name in dir(package) if callable(getattr(package, name))
                    and not isinstance(getattr(package, name), type(sys))}
        clashes += [f"{package.__name__}.{name}" for name in modules & exported]
    assert not clashes, clashes


def test_long_library_files_say_why_at_their_top():
    long = []
    for path in library_files():
        lines = path.read_text().count("\n")
        if lines > LONG_FILE:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if REASON not in doc:
                long.append(f"{path.relative_to(REPO)} ({lines} lines)")
    assert not long, long


def test_the_library_names_no_benchmark_folder():
    named = [str(p.relative_to(REPO)) for p in library_files() if "bench/" in p.read_text() or "bench." in p.read_text()]
    assert not named, named
