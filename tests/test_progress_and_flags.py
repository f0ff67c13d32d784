"""Progress where a person can see it, one flag vocabulary, and the notebook-friendly Python API."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROGRESS_LINE, assert_one_line_error, invoke

import deltakit
from deltakit.demo import write_demo_pair
from deltakit.progress import log_progress, summary_line

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_pair(tmp_path_factory.mktemp("demo"))


def slow(count: int, pause: float, started: threading.Event | None = None):
    for i in range(count):
        time.sleep(pause)
        yield i


def test_log_progress_writes_a_line_per_interval_and_a_closing_summary():
    out = io.StringIO()
    items = list(log_progress(slow(4, 0.1), 4, "ΔW spectra", stream=out, interval=0.15))
    assert items == [0, 1, 2, 3]
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3, lines  # 0.4 s of work at one line per 0.15 s, then the summary
    assert all(re.fullmatch(r"ΔW spectra [0-4]/4, \d+\.\d s", line) for line in lines[:-1]), lines
    assert re.fullmatch(r"ΔW spectra 4/4 in 0\.[3-9] s|ΔW spectra 4/4 in [1-9]\.\d s", lines[-1]), lines
    assert all(PROGRESS_LINE.match(line) for line in lines)  # what the tests and the docs test leave out


def test_one_slow_item_does_not_silence_the_log():
    """The timer thread writes while the loop waits on a single long item."""
    out = io.StringIO()
    list(log_progress(slow(1, 0.5), 1, "checkpoints", stream=out, interval=0.1))
    ticks = [line for line in out.getvalue().splitlines() if line.startswith("checkpoints 0/1, ")]
    assert len(ticks) >= 3, out.getvalue()


def test_a_failed_run_says_how_far_it_got():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        for i in log_progress(iter(range(10)), 10, "merge", stream=out, interval=60):
            if i == 3:
                raise RuntimeError("boom")
    assert out.getvalue().splitlines()[-1].startswith("merge 3/10 in ")
    assert summary_line("x", 1, 2, 0.25, finished=False) == "x 1/2, 0.2 s"


def test_the_cli_logs_progress_when_stderr_is_not_a_terminal(demo, tmp_path):
    """A real process whose stderr is a file, as in a batch job's log."""
    base, ft = demo
    log = tmp_path / "log.txt"
    with log.open("w") as stderr:
        done = subprocess.run([sys.executable, "-m", "deltakit", "rank", str(base), str(ft), "-q", "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0 and done.stdout == ""
    assert re.fullmatch(r"ΔW spectra 39/39 in \d+\.\d s\n", log.read_text()), log.read_text()


def test_surgery_and_comparison_commands_log_their_progress_too(demo, tmp_path):
    """Each long command, stderr a file: its closing summary line (with -q, nothing on stdout)."""
    base, ft = demo
    commands = {
        "extract": ([str(base), str(ft), "-o", "adapter", "-r", "4"], r"writing adapter (\d+)/\1 in \d+\.\d s"),
        "merge": ([str(base), "adapter", "-o", "merged"], r"merge (\d+)/\1 in \d+\.\d s"),
        "compare": ([str(base), str(ft), "adapter"], r"ΔW subspaces (\d+)/\1 in \d+\.\d s"),
    }
    for command, (args, summary) in commands.items():
        log = tmp_path / f"{command}.txt"
        with log.open("w") as stderr:
            done = subprocess.run([sys.executable, "-m", "deltakit", command, *args, "-q", "--device", "cpu"],
                                  stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300, cwd=tmp_path,
                                  env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
        lines = log.read_text().splitlines()
        assert done.returncode == 0 and done.stdout == "", (command, lines)
        assert lines and all(PROGRESS_LINE.match(line) for line in lines), (command, lines)
        assert re.fullmatch(summary, lines[-1]), (command, lines)


def test_the_pipeline_shows_progress_in_a_notebook_kernel(demo, monkeypatch):
    """In a Jupyter kernel the library shows a display without being asked; elsewhere it stays silent."""
    import deltakit.progress as progress

    shown: list[tuple[int, str]] = []

    def fake(items, length, label):
        for item in items:
            yield item
        shown.append((length, label))

    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setattr(progress, "notebook_progress", fake)
    base, ft = demo
    deltakit.rank(base, ft, include=["*layers.0.*"])
    assert shown == [(9, "ΔW spectra")]  # 7 matrices and 2 norms of layer 0
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    deltakit.rank(base, ft, include=["*layers.0.*"])
    assert len(shown) == 1


def test_notebook_progress_updates_one_display(monkeypatch):
    """The display is made once and updated in place; it ends as the closing summary."""
    pytest.importorskip("IPython")  # a test dependency (ipykernel)
    import IPython.display

    from deltakit.progress import notebook_progress

    updates: list[str] = []

    class Handle:
        def update(self, obj):
            updates.append(obj.data)

    monkeypatch.setattr(IPython.display, "display", lambda obj, display_id=None: Handle())
    assert list(notebook_progress(iter(range(5)), 5, "ΔW spectra", interval=0.0)) == list(range(5))
    assert 'value="5" max="5"' in updates[-1] and "ΔW spectra 5/5 in " in updates[-1]


def test_old_spellings_are_hidden_aliases_with_the_same_meaning(runner, demo, tmp_path):
    base, ft = demo
    new = invoke(runner, "compare", base, ft, ft, "-k", "4", "--include", "*layers.0.self_attn.q*", "--json", "-", "--device", "cpu")
    old = invoke(runner, "compare", base, ft, ft, "--top", "4", "--include", "*layers.0.self_attn.q*", "--json", "-",
                 "--device", "cpu")
    assert new.exit_code == old.exit_code == 0
    assert json.loads(new.stdout)["top"] == json.loads(old.stdout)["top"] == [4]
    help_text = invoke(runner, "compare", "--help").stdout
    assert "--top-k" in help_text and "--top " not in help_text
    a = invoke(runner, "intruders", base, ft, "--epsilon", "0.3", "--include", "*layers.0.self_attn.q*", "--json", "-")
    b = invoke(runner, "intruders", base, ft, "-e", "0.3", "--include", "*layers.0.self_attn.q*", "--json", "-")
    assert json.loads(a.stdout)["epsilon"] == json.loads(b.stdout)["epsilon"] == [0.3]
    assert "-e," not in invoke(runner, "intruders", "--help").stdout
    result = invoke(runner, "extract", base, ft, "--out", tmp_path / "adapter", "-r", "2", "-q",
                    "--include", "*layers.0.self_attn.q*")
    assert result.exit_code == 0 and (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("command", ["rank", "extract", "merge", "unmerge", "intruders", "compare", "trajectory",
                                     "plot", "check"])
def test_every_command_speaks_the_same_vocabulary(runner, command):
    text = invoke(runner, command, "--help").stdout
    assert "-q, --quiet" in text and "--json PATH" in text
    assert not re.search(r"--out\b|--top\b(?!-)|--save-dtype", text), command  # old spellings, options or prose
    assert all(flag in text for flag in ("--revision REV", "--token TOKEN", "--cache-dir DIR", "--offline"))
    if command in ("rank", "extract", "trajectory", "plot"):
        assert "-e, --energy X" in text
    if command in ("extract", "merge", "unmerge", "intruders", "plot"):
        assert "-o, --output" in text
    if command in ("rank", "intruders", "compare", "trajectory", "extract"):
        assert "--html PATH" in text


def _options(command) -> tuple[set[str], set[str]]:
    """(visible, hidden) option spellings of a click command."""
    visible, hidden = set(), set()
    for parameter in command.params:
        if getattr(parameter, "opts", None) and parameter.param_type_name == "option":
            (hidden if parameter.hidden else visible).update(parameter.opts + parameter.secondary_opts)
    return visible, hidden


# Each concept several commands share: its visible spellings and its metavar (None: the metavar says what the
# command writes, or the option is a flag).
VOCABULARY = {
    "energy": ({"-e", "--energy"}, "X"),
    "epsilon": ({"--epsilon"}, "ε"),
    "top-k": ({"-k", "--top-k"}, "K"),
    "output": ({"-o", "--output"}, None),
    "json": ({"--json"}, "PATH"),
    "csv": ({"--csv"}, "PATH"),
    "html": ({"--html"}, "PATH"),
    "quiet": ({"-q", "--quiet"}, None),
    "revision": ({"--revision"}, "REV"),
    "token": ({"--token"}, "TOKEN"),
    "cache-dir": ({"--cache-dir"}, "DIR"),
    "offline": ({"--offline"}, None),
    "device": ({"--device"}, "auto|cpu|cuda|cuda:N"),
    "include": ({"--include"}, "GLOB"),
    "exclude": ({"--exclude"}, "GLOB"),
    "dtype": ({"--dtype"}, "fp32|bf16|fp16"),
    "force": ({"--force"}, None),
    "allow-pickle": ({"--allow-pickle"}, None),
}
OLD_SPELLINGS = {"--out": "output", "--top": "top-k", "-e": "epsilon", "--save-dtype": "dtype"}
READS_NOTHING = {"demo"}  # writes the built-in pair; no report, no checkpoint to fetch


def _option_parameters(command):
    return [p for p in command.params if p.param_type_name == "option"]


def test_every_click_command_spells_each_shared_concept_one_way():
    """Walks every command of the group (new ones included): a shared concept has one spelling and metavar
    everywhere, a visible spelling means one thing in every command, old spellings are hidden aliases of an
    option the same command shows, and every command but `demo` takes --json, -q and the Hub options."""
    from deltakit_cli.main import cli

    concept_of = {spelling: name for name, (spellings, _) in VOCABULARY.items() for spelling in spellings}
    companions: dict[str, set[tuple[str, ...]]] = {}
    found: dict[str, set[str]] = {}
    assert {"rank", "extract", "merge", "unmerge", "plot", "intruders", "compare", "trajectory", "check"} <= set(
        cli.commands)
    for name, command in cli.commands.items():
        parameters = _option_parameters(command)
        visible_dests = {p.name for p in parameters if not p.hidden}
        for parameter in parameters:
            spellings = set(parameter.opts + parameter.secondary_opts)
            if parameter.hidden:  # an old spelling: an alias of an option this command shows
                assert spellings <= set(OLD_SPELLINGS), (name, spellings)
                assert parameter.name.removesuffix("__old_spelling") in visible_dests, (name, parameter.name)
                for spelling in spellings:
                    wanted = VOCABULARY[OLD_SPELLINGS[spelling]][0]
                    assert any(set(p.opts + p.secondary_opts) == wanted for p in parameters if not p.hidden), (
                        name, spelling)
                continue
            for spelling in spellings:
                companions.setdefault(spelling, set()).add(tuple(sorted(spellings)))
            concepts = {concept_of[s] for s in spellings if s in concept_of}
            assert len(concepts) <= 1, (name, spellings)
            if concepts:
                concept = concepts.pop()
                wanted, metavar = VOCABULARY[concept]
                assert spellings == wanted, (name, concept, spellings)
                if metavar is not None:
                    assert parameter.metavar == metavar, (name, concept, parameter.metavar)
                found.setdefault(name, set()).add(concept)
        if name not in READS_NOTHING:
            assert {"json", "quiet", "revision", "token", "cache-dir", "offline"} <= found[name], (name, found[name])
    drifting = {spelling: sets for spelling, sets in companions.items() if len(sets) > 1}
    assert not drifting, drifting  # e.g. `--dtype` beside `--save-dtype` in one command and alone in another
    assert {"extract", "merge", "unmerge", "intruders", "plot"} <= {n for n, c in found.items() if "output" in c}
    assert {"rank", "extract", "trajectory", "plot"} <= {n for n, c in found.items() if "energy" in c}
    assert {"intruders", "compare", "trajectory"} <= {n for n, c in found.items() if "top-k" in c}


def _flags(words: list[str]) -> list[str]:
    """The option spellings among a command line's words (not '-' nor a negative number; `--x=v` as `--x`)."""
    found = [word.split("=", 1)[0] for word in words]
    return [flag for flag in found if flag.startswith("-") and flag != "-" and not re.fullmatch(r"-[\d.]+(e-?\d+)?", flag)]


def test_every_help_example_uses_flags_its_command_shows():
    """The examples under each command's --help (its epilog) spell every flag as the options list does."""
    from deltakit_cli.main import cli

    wrong, seen = [], 0
    for name, command in cli.commands.items():
        text = (command.epilog or "").replace("\\\n", " ")
        for line in text.splitlines():
            words = shlex.split(line.strip(), comments=True)
            if words[:1] != ["deltakit"] or len(words) < 2 or words[1] not in cli.commands:
                continue
            flags = _flags(words[2:])
            seen += len(flags)
            wrong += [f"{name}: {line.strip()}: {flag}" for flag in flags if flag not in _options(cli.commands[words[1]])[0]]
    assert seen > 40 and not wrong, wrong


def test_old_spellings_fill_the_new_option_and_clash_beside_it(runner, demo, tmp_path):
    base, ft = demo
    one = ["--include", "*layers.0.self_attn.q*", "-q", "--rank", "2"]
    old = invoke(runner, "extract", base, ft, "--out", tmp_path / "a", "--save-dtype", "fp32", *one)
    assert old.exit_code == 0, old.output
    written = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert written and {t.dtype for t in written.values()} == {torch.float32}  # the demo pair is bfloat16
    clash = invoke(runner, "extract", base, ft, "-o", tmp_path / "b", "--out", tmp_path / "c", *one)
    assert_one_line_error(clash, "--out is an old spelling of the option given beside it")
    assert not (tmp_path / "b").exists()


def _doc_commands():
    """(doc, line, words) of every `deltakit ...` command in a fenced block of README.md and docs/*.md, the blocks
    the docs test does not run included."""
    from test_docs import FENCE, _joined, doc_paths

    for path in doc_paths():
        lines = path.read_text().splitlines()
        inside = False
        block: list[str] = []
        first = 0
        for number, line in enumerate(lines):
            if FENCE.match(line):
                if inside:
                    for index, text in _joined(block, first):
                        text = text.strip()
                        text = text[2:] if text.startswith("$ ") else text
                        if text.startswith("deltakit "):
                            yield path.name, index + 1, shlex.split(text, comments=True)[1:]
                inside, block, first = not inside, [], number + 1
            elif inside:
                block.append(line)


def test_the_docs_spell_every_flag_as_help_shows_it():
    """No example uses a hidden old spelling (intruders' -e, --top, --out) or a flag its command lacks; no prose
    names an old spelling."""
    from deltakit_cli.main import cli

    wrong, seen = [], 0
    for doc, line, words in _doc_commands():
        command = cli.commands.get(words[0]) if words else None
        if command is None:
            continue
        flags = _flags(words[1:])
        seen += len(flags)
        wrong += [f"{doc}:{line}: deltakit {words[0]} {flag}" for flag in flags if flag not in _options(command)[0]]
    assert seen > 100 and not wrong, wrong
    hidden = set().union(*(_options(c)[1] for c in cli.commands.values()))
    shown = set().union(*(_options(c)[0] for c in cli.commands.values()))
    old = {flag for flag in hidden - shown if flag.startswith("--")}
    assert old >= {"--top", "--out"}
    from test_docs import doc_paths

    for path in doc_paths():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for flag in re.findall(r"`(--[a-z][a-z-]*)", line):
                assert flag not in old, f"{path.name}:{number}: {flag}"


def test_csv_dash_goes_to_stdout(runner, demo, tmp_path, monkeypatch):
    base, ft = demo
    monkeypatch.chdir(tmp_path)
    result = invoke(runner, "rank", base, ft, "--csv", "-", "--include", "*layers.0.*")
    assert result.exit_code == 0 and not Path("-").exists()
    rows = result.stdout.strip().splitlines()
    assert rows[0].startswith("name,shape,") and len(rows) == 1 + 7  # the header, then layer 0's seven matrices


def test_reports_show_as_tables_in_a_notebook_and_as_the_command_text_in_print(runner, demo):
    base, ft = demo
    report = deltakit.rank(base, ft, include=["*layers.0.*"], energy=0.9)
    from deltakit.report import render_report

    assert str(report) == render_report(report)
    html = report._repr_html_()
    assert html.count("<tr>") == 1 + 7 + 1 + 7  # matrix table: header + 7 rows; by module type: header + 7
    assert "<table>" in html and "model.layers.0.mlp.down_proj.weight" in html
    assert len(repr(report)) < 200 and "RankReport" in repr(report)
    printed = invoke(runner, "rank", base, ft, "--include", "*layers.0.*", "--device", "cpu").stdout.rstrip("\n")
    drop_time = re.compile(r", \d+\.\d+ s$")
    assert [drop_time.sub("", line) for line in str(report).splitlines()] == \
           [drop_time.sub("", line) for line in printed.splitlines()]


def test_python_dash_m_deltakit_is_the_command():
    done = subprocess.run([sys.executable, "-m", "deltakit", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"deltakit, version {deltakit.__version__}"


def test_single_file_and_sharded_folder_give_the_same_row_order(demo, tmp_path):
    """A single safetensors file lists its tensors alphabetically, a sharded folder in its index's order."""
    base, ft = demo
    folders = []
    for source in (base, ft):
        tensors = {}
        for shard in sorted(source.glob("*.safetensors")):
            tensors.update(load_file(str(shard)))
        single = tmp_path / f"single-{source.name}"
        single.mkdir()
        save_file(tensors, str(single / "model.safetensors"))
        (single / "config.json").write_text((source / "config.json").read_text())
        folders.append(single)
    sharded = [m.name for m in deltakit.rank(base, ft).matrices]
    single = [m.name for m in deltakit.rank(*folders).matrices]
    assert single == sharded
    assert sharded[:4] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                           "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    assert sharded[-1] == "lm_head.weight"


def test_spectra_files_get_the_usual_mode(runner, demo, tmp_path):
    base, ft = demo
    previous = os.umask(0o022)
    try:
        result = invoke(runner, "rank", base, ft, "-q", "--save-spectra", tmp_path / "s.safetensors",
                        "--include", "*layers.0.self_attn.q*")
    finally:
        os.umask(previous)
    assert result.exit_code == 0
    assert (tmp_path / "s.safetensors").stat().st_mode & 0o777 == 0o644


def test_threads_never_exceed_the_free_cores_and_come_back(monkeypatch):
    from deltakit.device import host

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    monkeypatch.setattr(host, "free_cores", lambda: 1)
    with host.threads_for_free_cores() as used:
        assert used == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    monkeypatch.setattr(host, "free_cores", lambda: before + 8)
    with host.threads_for_free_cores() as used:
        assert used == before == torch.get_num_threads()  # never raised
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(host, "free_cores", lambda: 1)
    with host.threads_for_free_cores() as used:
        assert used == before  # the user's OMP_NUM_THREADS decides
    assert 1 <= host.free_cores()
