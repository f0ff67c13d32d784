"""The docs run: every fenced `deltakit ...` command of README.md and docs/*.md, in order, in one folder.

Order: README.md, docs/guide.md, then the other docs/*.md alphabetically — as a reader who
follows them one after the other in one fresh folder would. Per command the test checks:

* the exit code: 0, or 1 where the doc pastes an ``Error: ...`` line after it (then that line too);
* the files it promises: the paths after ``-o/--out/--output``, ``--json``, ``--csv``,
  ``--save-spectra`` and ``--keep`` exist afterwards;
* a pasted output is whole: it has as many lines as the command prints, unless it holds a
  ``...`` line that marks a cut.

What runs: in ```` ```console ```` and plain ```` ``` ```` blocks, the lines after ``$ `` (the lines
up to the next ``$`` are the pasted output); in ```` ```bash ```` / ```` ```sh ```` blocks, every line
that starts with ``deltakit`` (``\\`` continues a line). A ```` ```python ```` block runs only when
``<!-- run -->`` stands on the line before its fence (e.g. one that writes the files the next
commands read). ``<!-- not-run: REASON -->`` before a fence skips that block (a GPU, the network,
torchrun, placeholders such as BASE). Commands that start with anything but ``deltakit``
(torchrun, python, pip) never run here.

Run ``python tests/test_docs.py`` to print what each command prints now, for pasting.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FLAGS = {"-o", "--out", "--output", "--json", "--csv", "--save-spectra", "--keep"}
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.+?)\s*-->\s*$")
RUN = re.compile(r"^<!--\s*run\s*-->\s*$")


@dataclass
class Step:
    """One thing to run: a deltakit command (``args``) or a Python block (``code``)."""

    doc: str
    line: int
    args: list[str] = field(default_factory=list)
    code: str = ""
    pasted: list[str] | None = None  # the output lines pasted under a `$ ` command; None in bash blocks

    @property
    def expects_error(self) -> str | None:
        lines = [line for line in self.pasted or [] if line.strip()]
        return lines[0] if lines and lines[0].startswith("Error: ") else None

    def where(self) -> str:
        return f"{self.doc}:{self.line}: " + (shlex.join(["deltakit", *self.args]) if self.args else "python block")


def doc_paths() -> list[Path]:
    others = sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "guide.md")
    return [REPO / "README.md", REPO / "docs" / "guide.md", *others]


def _blocks(text: str):
    """(language, first line number, lines, marker) per fenced block; marker: 'run', 'not-run' or None."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        previous = lines[i - 1].strip() if i > 0 else ""
        marker = "not-run" if NOT_RUN.match(previous) else "run" if RUN.match(previous) else None
        start, i = i + 1, i + 1
        while i < len(lines) and not re.match(rf"^{opened.group(1)}```\s*$", lines[i]):
            i += 1
        yield opened.group(2).lower(), start + 1, lines[start:i], marker
        i += 1


def _joined(lines: list[str], first: int):
    """Lines with trailing-backslash continuations joined: (line number, text)."""
    pending, number = "", first
    for offset, line in enumerate(lines):
        if not pending:
            number = first + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield number, pending + line
        pending = ""


def steps_of(path: Path) -> list[Step]:
    doc = str(path.relative_to(REPO))
    steps: list[Step] = []
    for language, first, lines, marker in _blocks(path.read_text()):
        if marker == "not-run":
            continue
        if language in ("python", "py"):
            if marker == "run":
                steps.append(Step(doc, first, code="\n".join(lines)))
            continue
        if language in ("console", ""):
            current: Step | None = None
            for number, line in _joined(lines, first):
                if line.startswith("$ "):
                    words = shlex.split(line[2:], comments=True)
                    current = Step(doc, number, args=words[1:], pasted=[]) if words[:1] == ["deltakit"] else None
                    if current:
                        steps.append(current)
                elif current is not None:
                    current.pasted.append(line)
        elif language in ("bash", "sh", "shell"):
            for number, line in _joined(lines, first):
                words = shlex.split(line, comments=True)
                if words[:1] == ["deltakit"]:
                    steps.append(Step(doc, number, args=words[1:]))
    return steps


def all_steps() -> list[Step]:
    return [step for path in doc_paths() for step in steps_of(path)]


def promised_files(args: list[str]) -> list[str]:
    return [value for flag, value in zip(args, args[1:]) if flag in OUTPUT_FLAGS and value != "-"]


def run_step(step: Step, runner, env: dict) -> tuple[int, str]:
    """Run one step in the current folder; (exit code, what it printed: stdout and stderr interleaved)."""
    from deltakit_cli.main import cli

    if step.code:
        exec(compile(step.code, step.where(), "exec"), {"__name__": "__doc_block__"})  # noqa: S102
        return 0, ""
    result = runner.invoke(cli, step.args, env=env, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{step.where()}: {result.exception!r}") from result.exception
    return result.exit_code, result.output


def check_step(step: Step, code: int, output: str) -> None:
    where = step.where()
    printed = [line for line in output.splitlines() if line.strip()]
    expected_error = step.expects_error
    if expected_error:
        assert code == 1, f"{where}: the doc says it fails, it exited {code}:\n{output}"
        assert expected_error in printed, f"{where}: the doc pastes {expected_error!r}, it printed:\n{output}"
        return
    assert code == 0, f"{where}: exit {code}:\n{output}"
    for promised in promised_files(step.args):
        assert Path(promised).exists(), f"{where}: {promised} was not written"
    pasted = [line for line in step.pasted or [] if line.strip()]
    if pasted and not any(line.strip() == "..." for line in pasted):
        assert len(pasted) == len(printed), (f"{where}: {len(pasted)} lines pasted, {len(printed)} printed; paste "
                                             "it whole or mark the cut with a '...' line:\n" + "\n".join(printed))


def test_every_doc_has_runnable_commands():
    """The parser finds what the docs hold (a regression here would make the run below vacuous)."""
    steps = all_steps()
    by_doc = {step.doc for step in steps if step.args}
    assert {"README.md", "docs/guide.md", "docs/plots.md", "docs/surgery.md", "docs/intruders.md"} <= by_doc
    assert any(step.expects_error for step in steps)  # the guide shows a refusal too
    assert not [s.where() for s in steps if any(re.fullmatch(r"[A-Z][A-Z_]+/?", a) for a in s.args)], \
        "a command with a placeholder (BASE, FT, ...) runs: make it concrete or mark its block not-run"


def test_the_checks_catch_drift(tmp_path, monkeypatch):
    """Each check fails where the doc and the program disagree."""
    monkeypatch.chdir(tmp_path)
    Path("written.json").write_text("{}")
    fine = Step("doc.md", 1, args=["rank", "a", "b", "--json", "written.json"], pasted=["one", "two"])
    check_step(fine, 0, "one\ntwo\n")
    with pytest.raises(AssertionError, match="2 lines pasted, 3 printed"):
        check_step(fine, 0, "one\ntwo\nthree\n")
    check_step(Step("doc.md", 1, args=["rank"], pasted=["one", "...", "three"]), 0, "one\ntwo\nthree\nfour\n")
    with pytest.raises(AssertionError, match="missing.json was not written"):
        check_step(Step("doc.md", 1, args=["rank", "--json", "missing.json"], pasted=[]), 0, "")
    with pytest.raises(AssertionError, match="exit 1"):
        check_step(fine, 1, "Error: no\n")
    refusal = Step("doc.md", 1, args=["merge"], pasted=["Error: merged already exists; pass --force to overwrite it"])
    check_step(refusal, 1, "Error: merged already exists; pass --force to overwrite it\n")
    with pytest.raises(AssertionError, match="the doc says it fails"):
        check_step(refusal, 0, "")
    with pytest.raises(AssertionError, match="the doc pastes"):
        check_step(refusal, 1, "Error: something else\n")


def test_markers_and_block_kinds(tmp_path):
    """not-run skips a block, run runs a python block, bash lines and console `$ ` lines are commands."""
    doc = tmp_path / "x.md"
    doc.write_text("\n".join([
        "```bash", "deltakit rank a b \\", "    --json r.json   # comment", "pip install x", "```",
        "<!-- not-run: needs network -->", "```bash", "deltakit rank hub/model b", "```",
        "```python", "print('not run')", "```",
        "<!-- run -->", "```python", "print('run')", "```",
        "```console", "$ deltakit merge a b -o m", "Error: m already exists",
        "$ torchrun -m deltakit_cli.main x", "```",
    ]))
    monkeypatch_repo = pytest.MonkeyPatch()
    monkeypatch_repo.setattr(sys.modules[__name__], "REPO", tmp_path)
    try:
        steps = steps_of(doc)
    finally:
        monkeypatch_repo.undo()
    assert [(s.args, s.code) for s in steps] == [(["rank", "a", "b", "--json", "r.json"], ""), ([], "print('run')"),
                                                 (["merge", "a", "b", "-o", "m"], "")]
    assert steps[2].expects_error == "Error: m already exists" and promised_files(steps[0].args) == ["r.json"]


def test_docs_run_in_sequence_in_one_folder(tmp_path, monkeypatch):
    """README.md then the guide then the other docs, as a new user runs them, on the CPU."""
    from click.testing import CliRunner

    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    env = {"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    runner = CliRunner()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and does not spin on a busy shared CPU
    try:
        for step in all_steps():
            code, output = run_step(step, runner, env)
            check_step(step, code, output)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # print what each command prints now, in a fresh folder, for pasting into the docs
    import tempfile

    from click.testing import CliRunner

    os.environ["MPLBACKEND"] = "Agg"
    with tempfile.TemporaryDirectory(prefix="deltakit-docs-") as folder:
        os.chdir(folder)
        runner = CliRunner()
        import time

        for step in all_steps():
            start = time.perf_counter()
            code, output = run_step(step, runner, {"CUDA_VISIBLE_DEVICES": ""})
            print(f"### {step.where()}  (exit {code}, {time.perf_counter() - start:.1f} s)")
            print(output, end="" if output.endswith("\n") or not output else "\n")
        sys.exit(0)
