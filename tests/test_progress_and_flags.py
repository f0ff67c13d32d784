"""Progress where a person can see it, one flag vocabulary, and the notebook-friendly Python API."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROGRESS_LINE, invoke

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
                                     "plot"])
def test_every_command_speaks_the_same_vocabulary(runner, command):
    text = invoke(runner, command, "--help").stdout
    assert "-q, --quiet" in text and "--json PATH" in text
    if command not in ("plot",):
        assert all(flag in text for flag in ("--revision REV", "--token TOKEN", "--cache-dir DIR", "--offline"))
    if command in ("rank", "extract", "trajectory", "plot"):
        assert "-e, --energy X" in text
    if command in ("extract", "merge", "unmerge", "intruders", "plot"):
        assert "-o, --output" in text
    if command in ("rank", "intruders", "compare", "trajectory", "extract"):
        assert "--html PATH" in text


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
