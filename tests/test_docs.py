"""The docs run: every example of README.md and docs/*.md, in order, in one fresh folder, its pasted output
compared line for line with what the tool prints now.

Order: README.md, docs/guide.md, then the other docs/*.md alphabetically — as a reader who
follows them one after the other in one fresh folder would. Per command the test checks:

* the exit code: 0, or 1 where the doc pastes an ``Error: ...`` line after it;
* the files it promises: the paths after ``-o/--output``, ``--json``, ``--csv``, ``--html``,
  ``--save-spectra`` and ``--keep`` exist afterwards;
* the pasted output, **line for line, numbers included**: each pasted line equals the printed
  one. A line holding only ``...`` stands for any number of printed lines (a cut); the lines
  around it must still match where they fall. Two things are not compared: durations
  (``0.45 s`` reads as any number of seconds) and progress lines, which go to stderr and which a
  terminal shows as a bar (``ΔW spectra 30/30 in 0.4 s``).

What runs: in ```` ```console ```` and plain ```` ``` ```` blocks, the lines after ``$ `` (the lines
up to the next ``$`` are the pasted output): ``deltakit ...`` commands, and ``mkdir``, ``ln``,
``cp``, ``rm`` (run as they are, without a shell); in ```` ```bash ```` / ```` ```sh ```` blocks every
line that starts with ``deltakit`` (``\\`` continues a line). A ```` ```python ```` block runs only when
``<!-- run -->`` stands on the line before its fence. ``<!-- not-run: REASON -->`` before a fence
skips that block (a GPU, the network, torchrun, placeholders such as BASE).

**Refreshing the pasted outputs** after a change that is meant to change them (a new column, other
rank numbers), in one command::

    DELTAKIT_WRITE_DOCS=1 python -m pytest tests/test_docs.py

runs every example as the test does and writes what each command printed into the docs in place
(keeping each ``...`` cut where it was: the lines after a cut are found again by their first
word, e.g. the matrix name of a table row). Review the diff: prose that quotes a number is not
rewritten. ``python tests/test_docs.py`` prints what each command prints now, without writing.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FLAGS = {"-o", "--out", "--output", "--json", "--csv", "--html", "--save-spectra", "--keep"}
SHELL = {"mkdir", "ln", "cp", "rm"}  # the few shell commands a console block may run (no shell involved)
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.+?)\s*-->\s*$")
RUN = re.compile(r"^<!--\s*run\s*-->\s*$")
CUT = "..."
DURATION = re.compile(r"\b\d+\.\d+ s\b")
PROGRESS_LINE = re.compile(r"^\S.* \d+/\d+(, | in )\d+\.\d s$")
WRITE = os.environ.get("DELTAKIT_WRITE_DOCS") == "1"


@dataclass
class Step:
    """One thing to run: a deltakit command (``args``), a shell command (``shell``) or a Python block (``code``)."""

    doc: str
    line: int
    args: list[str] = field(default_factory=list)
    code: str = ""
    shell: list[str] = field(default_factory=list)
    pasted: list[str] | None = None  # the output lines pasted under a `$ ` command; None in bash blocks
    span: tuple[int, int] | None = None  # 0-based [start, end) of the pasted lines in the doc's lines

    @property
    def expects_error(self) -> str | None:
        lines = [line for line in self.pasted or [] if line.strip()]
        return lines[0] if lines and lines[0].startswith("Error: ") else None

    def where(self) -> str:
        what = (shlex.join(["deltakit", *self.args]) if self.args else shlex.join(self.shell) if self.shell
                else "python block")
        return f"{self.doc}:{self.line}: {what}"


def doc_paths() -> list[Path]:
    others = sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "guide.md")
    return [REPO / "README.md", REPO / "docs" / "guide.md", *others]


def _blocks(text: str):
    """(language, index of the first line, lines, marker) per fenced block; marker: 'run', 'not-run' or None."""
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
        yield opened.group(2).lower(), start, lines[start:i], marker
        i += 1


def _joined(lines: list[str], first: int):
    """Lines with trailing-backslash continuations joined: (0-based index of the last line, text)."""
    pending = ""
    for offset, line in enumerate(lines):
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield first + offset, pending + line
        pending = ""


def steps_of(path: Path) -> list[Step]:
    doc = str(path.relative_to(REPO))
    steps: list[Step] = []
    for language, first, lines, marker in _blocks(path.read_text()):
        if marker == "not-run":
            continue
        if language in ("python", "py"):
            if marker == "run":
                steps.append(Step(doc, first + 1, code="\n".join(lines)))
            continue
        if language in ("console", ""):
            current: Step | None = None
            for index, line in _joined(lines, first):
                if line.startswith("$ "):
                    words = shlex.split(line[2:], comments=True)
                    if words[:1] == ["deltakit"]:
                        current = Step(doc, index + 1, args=words[1:], pasted=[], span=(index + 1, index + 1))
                    elif words[:1] and words[0] in SHELL:
                        current = Step(doc, index + 1, shell=words, pasted=[], span=(index + 1, index + 1))
                    else:
                        current = None
                    if current:
                        steps.append(current)
                elif current is not None:
                    current.pasted.append(line)
                    current.span = (current.span[0], index + 1)
        elif language in ("bash", "sh", "shell"):
            for index, line in _joined(lines, first):
                words = shlex.split(line, comments=True)
                if words[:1] == ["deltakit"]:
                    steps.append(Step(doc, index + 1, args=words[1:]))
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
    if step.shell:
        done = subprocess.run(step.shell, capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr
    result = runner.invoke(cli, step.args, env=env, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{step.where()}: {result.exception!r}") from result.exception
    return result.exit_code, result.output


def shown_lines(output: str) -> list[str]:
    """What a reader's terminal keeps of an output: its lines without trailing blanks, progress lines left
    out, no blank lines at either end."""
    lines = [line.rstrip() for line in output.splitlines() if not PROGRESS_LINE.match(line.rstrip())]
    return _trimmed(lines)


def _trimmed(lines: list[str]) -> list[str]:
    lines = [line.rstrip() for line in lines]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _same(pasted: str, printed: str) -> bool:
    return DURATION.sub("N s", pasted) == DURATION.sub("N s", printed)


def _segments(pasted: list[str]) -> list[list[str]]:
    segments: list[list[str]] = [[]]
    for line in pasted:
        if line.strip() == CUT:
            segments.append([])
        else:
            segments[-1].append(line)
    return segments


def _find(segment: list[str], printed: list[str], start: int, end: int, by_first_word: bool = False) -> int | None:
    """Where ``segment`` starts in ``printed[start:end]`` (every line equal; or its first line's first word)."""
    for at in range(start, end - len(segment) + 1):
        if by_first_word:
            if printed[at].split()[:1] == segment[0].split()[:1]:
                return at
        elif all(_same(a, b) for a, b in zip(segment, printed[at:at + len(segment)])):
            return at
    return None


def compare_output(pasted: list[str], printed: list[str]) -> str | None:
    """None when ``pasted`` (with ``...`` cuts) matches ``printed`` line for line; else what differs first."""
    pasted = _trimmed(pasted)
    segments = _segments(pasted)
    if len(segments) == 1:
        for number, (a, b) in enumerate(zip(pasted, printed), 1):
            if not _same(a, b):
                return f"line {number}: pasted {a!r}, printed {b!r}"
        if len(pasted) != len(printed):
            return f"{len(pasted)} lines pasted, {len(printed)} printed"
        return None
    head, *middle, tail = segments
    if len(head) + len(tail) > len(printed):
        return f"{len(head) + len(tail)} lines pasted around the cuts, only {len(printed)} printed"
    for number, (a, b) in enumerate(zip(head, printed), 1):
        if not _same(a, b):
            return f"line {number}: pasted {a!r}, printed {b!r}"
    for offset, (a, b) in enumerate(zip(tail, printed[len(printed) - len(tail):])):
        if not _same(a, b):
            return f"line {len(printed) - len(tail) + offset + 1} (after the last cut): pasted {a!r}, printed {b!r}"
    position, end = len(head), len(printed) - len(tail)
    for segment in middle:
        if not segment:
            continue
        found = _find(segment, printed, position, end)
        if found is None:
            return f"between two cuts, pasted {segment[0]!r} ... is not printed in that order"
        position = found + len(segment)
    return None


def regenerated(pasted: list[str], printed: list[str]) -> list[str]:
    """``pasted`` rewritten from ``printed``, each ``...`` cut kept where it was (see the module docstring)."""
    segments = _segments(_trimmed(pasted))
    if len(segments) == 1:
        return printed
    head, *middle, tail = segments
    out = printed[:len(head)]
    position, end = len(head), len(printed) - len(tail)
    for segment in middle:
        out.append(CUT)
        found = _find(segment, printed, position, end, by_first_word=True) if segment else None
        if found is None:
            out += segment
            continue
        out += printed[found:found + len(segment)]
        position = found + len(segment)
    out.append(CUT)
    return out + (printed[len(printed) - len(tail):] if tail else [])


def check_step(step: Step, code: int, output: str) -> None:
    where = step.where()
    expected_error = step.expects_error
    if expected_error:
        assert code == 1, f"{where}: the doc says it fails, it exited {code}:\n{output}"
    else:
        assert code == 0, f"{where}: exit {code}:\n{output}"
        for promised in promised_files(step.args):
            assert Path(promised).exists(), f"{where}: {promised} was not written"
    if step.pasted is not None and (any(line.strip() for line in step.pasted) or step.span is not None):
        printed = shown_lines(output)
        if not any(line.strip() for line in step.pasted) and not printed:
            return
        difference = compare_output(step.pasted, printed)
        assert difference is None, (f"{where}: the pasted output differs from what it prints ({difference}); "
                                    "DELTAKIT_WRITE_DOCS=1 rewrites it. Printed:\n" + "\n".join(printed))


def write_outputs(results: list[tuple[Step, str]]) -> None:
    """Rewrite each doc's pasted outputs with what its commands printed (bottom up, so spans stay valid)."""
    by_doc: dict[str, list[tuple[Step, str]]] = {}
    for step, output in results:
        if step.span is not None and step.pasted is not None:
            by_doc.setdefault(step.doc, []).append((step, output))
    for doc, entries in by_doc.items():
        path = REPO / doc
        lines = path.read_text().splitlines()
        for step, output in sorted(entries, key=lambda entry: entry[0].span[0], reverse=True):
            start, end = step.span
            while end > start and not lines[end - 1].strip():  # keep the blank lines that close the block
                end -= 1
            lines[start:end] = regenerated(step.pasted, shown_lines(output))
        path.write_text("\n".join(lines) + "\n")


def test_every_doc_has_runnable_commands():
    """The parser finds what the docs hold (a regression here would make the run below vacuous)."""
    steps = all_steps()
    by_doc = {step.doc for step in steps if step.args}
    assert {"README.md", "docs/guide.md", "docs/plots.md", "docs/surgery.md", "docs/intruders.md"} <= by_doc
    assert any(step.expects_error for step in steps)  # the guide shows a refusal too
    assert sum(1 for step in steps if step.pasted and any(line.strip() for line in step.pasted)) >= 15
    assert not [s.where() for s in steps if any(re.fullmatch(r"[A-Z][A-Z_]+/?", a) for a in s.args)], \
        "a command with a placeholder (BASE, FT, ...) runs: make it concrete or mark its block not-run"


def test_the_checks_catch_drift(tmp_path, monkeypatch):
    """Each check fails where the doc and the program disagree, numbers included."""
    monkeypatch.chdir(tmp_path)
    Path("written.json").write_text("{}")
    fine = Step("doc.md", 1, args=["rank", "a", "b", "--json", "written.json"], pasted=["one 53", "two"], span=(1, 3))
    check_step(fine, 0, "one 53\ntwo\n")
    check_step(fine, 0, "one 53\nΔW spectra 3/3 in 0.1 s\ntwo\n")  # a progress line is not pasted
    with pytest.raises(AssertionError, match="line 1: pasted 'one 53', printed 'one 61'"):
        check_step(fine, 0, "one 61\ntwo\n")
    with pytest.raises(AssertionError, match="2 lines pasted, 3 printed"):
        check_step(fine, 0, "one 53\ntwo\nthree\n")
    timed = Step("doc.md", 1, args=["rank"], pasted=["gram spectra in fp32 on cpu, 0.45 s"], span=(1, 2))
    check_step(timed, 0, "gram spectra in fp32 on cpu, 12.31 s\n")  # durations are not compared
    cut = Step("doc.md", 1, args=["rank"], pasted=["one", "...", "three 3", "...", "five"], span=(1, 6))
    check_step(cut, 0, "one\ntwo\nthree 3\nfour\nfive\n")
    with pytest.raises(AssertionError, match="is not printed in that order"):
        check_step(cut, 0, "one\ntwo\nthree 4\nfour\nfive\n")
    with pytest.raises(AssertionError, match="after the last cut"):
        check_step(cut, 0, "one\nthree 3\nsix\n")
    with pytest.raises(AssertionError, match="missing.json was not written"):
        check_step(Step("doc.md", 1, args=["rank", "--json", "missing.json"], pasted=[]), 0, "")
    with pytest.raises(AssertionError, match="exit 1"):
        check_step(fine, 1, "Error: no\n")
    refusal = Step("doc.md", 1, args=["merge"], pasted=["Error: merged already exists; pass --force to overwrite it"],
                   span=(1, 2))
    check_step(refusal, 1, "Error: merged already exists; pass --force to overwrite it\n")
    with pytest.raises(AssertionError, match="the doc says it fails"):
        check_step(refusal, 0, "")
    with pytest.raises(AssertionError, match="differs"):
        check_step(refusal, 1, "Error: something else\n")


def test_regeneration_keeps_the_cuts():
    """A refresh writes the printed lines, with each cut where it was and its anchor line found again."""
    pasted = ["head", "...", "model.q 8 53", "...", "tail 0.1 s"]
    printed = ["head", "x", "model.k 0", "model.q 8 61", "y", "tail 2.0 s"]
    assert regenerated(pasted, printed) == ["head", "...", "model.q 8 61", "...", "tail 2.0 s"]
    assert compare_output(regenerated(pasted, printed), printed) is None
    assert regenerated(["a", "b"], ["a", "c", "d"]) == ["a", "c", "d"]


def test_markers_and_block_kinds(tmp_path):
    """not-run skips a block, run runs a python block, bash lines and console `$ ` lines are commands."""
    doc = tmp_path / "x.md"
    doc.write_text("\n".join([
        "```bash", "deltakit rank a b \\", "    --json r.json   # comment", "pip install x", "```",
        "<!-- not-run: needs network -->", "```bash", "deltakit rank hub/model b", "```",
        "```python", "print('not run')", "```",
        "<!-- run -->", "```python", "print('run')", "```",
        "```console", "$ mkdir run", "$ deltakit merge a b -o m", "Error: m already exists",
        "$ torchrun -m deltakit_cli.main x", "```",
    ]))
    monkeypatch_repo = pytest.MonkeyPatch()
    monkeypatch_repo.setattr(sys.modules[__name__], "REPO", tmp_path)
    try:
        steps = steps_of(doc)
    finally:
        monkeypatch_repo.undo()
    assert [(s.args, s.code, s.shell) for s in steps] == [
        (["rank", "a", "b", "--json", "r.json"], "", []), ([], "print('run')", []), ([], "", ["mkdir", "run"]),
        (["merge", "a", "b", "-o", "m"], "", [])]
    assert steps[3].expects_error == "Error: m already exists" and promised_files(steps[0].args) == ["r.json"]
    assert steps[3].span == (19, 20)  # the pasted line's place in the file, for a refresh


def run_all(env: dict) -> list[tuple[Step, int, str]]:
    """Every step in order in the current folder, on the CPU with one thread; (step, exit code, output)."""
    from click.testing import CliRunner

    import torch

    runner = CliRunner()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and the numbers do not depend on the cores
    try:
        return [(step, *run_step(step, runner, env)) for step in all_steps()]
    finally:
        torch.set_num_threads(threads)


def test_docs_run_in_sequence_in_one_folder(tmp_path, monkeypatch):
    """README.md then the guide then the other docs, as a new user runs them, on the CPU; outputs line for line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    results = run_all({"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"})
    if WRITE:  # the docs now hold what was printed; a second run checks them
        write_outputs([(step, output) for step, _, output in results])
        return
    failures = []
    for step, code, output in results:
        try:
            check_step(step, code, output)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} examples differ from the docs; the first:\n" + failures[0]


if __name__ == "__main__":  # print what each command prints now, in a fresh folder
    import tempfile

    os.environ["MPLBACKEND"] = "Agg"
    with tempfile.TemporaryDirectory(prefix="deltakit-docs-") as folder:
        os.chdir(folder)
        for step, code, output in run_all({"CUDA_VISIBLE_DEVICES": ""}):
            print(f"### {step.where()}  (exit {code})")
            print("\n".join(shown_lines(output)))
        sys.exit(0)
