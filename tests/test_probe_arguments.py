"""The bench probes refuse malformed arguments with argparse's one-line error (exit 2), not a traceback."""

from __future__ import annotations

import json

import pytest

from bench.probes import plan_variants, rank_workers, read_paths, tail_quadrature


@pytest.mark.parametrize("argv, message", [
    (["--shape", "4096", "--out", "OUT"], "is not a shape like 4096x4096"),
    (["--steps", "32,a", "--out", "OUT"], "is not a list of step counts"),
])
def test_tail_quadrature_refuses_malformed_shapes_and_steps(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        tail_quadrature.main([a.replace("OUT", str(tmp_path)) for a in argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_pair_probes_refuse_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        read_paths.main([str(tmp_path / "missing"), str(tmp_path), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "no such file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--variant", "nosuch=3", "is not an AdaptivePlan field"),
    ("--variant", "probes=many", "the value is not a number"),
    ("--reference", "full=REPORT", "not a rank --json report"),
])
def test_plan_variants_refuses_unknown_fields_and_non_reports(flag, value, message, tmp_path, capsys):
    report = tmp_path / "config.json"
    report.write_text(json.dumps({"hidden_size": 8}))  # JSON, but not a rank report
    argv = [str(tmp_path), str(tmp_path), flag, value.replace("REPORT", str(report)), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        plan_variants.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_rank_workers_refuses_bad_thread_counts(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        rank_workers.main([str(tmp_path), str(tmp_path), "--threads", "2,0", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "is not a list of thread counts" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_timeline_splits_a_rank_process_into_its_parts(tmp_path):
    """One fresh `deltakit rank` process on the demo pair: rank()'s own time lies inside the command's."""
    from bench.probes import cli_timeline
    from deltakit.demo import write_demo_pair

    base, ft = write_demo_pair(tmp_path / "demo")
    cli_timeline.main([str(base), str(ft), "--out", str(tmp_path / "out"), "--repeat", "1"])
    (row,) = json.loads((tmp_path / "out" / "cli_timeline.json").read_text())["rows"]
    assert 0 < row["rank_elapsed_s"] <= row["command_s"] < row["wall_s"]
    assert row["command_less_rank_s"] == pytest.approx(row["command_s"] - row["rank_elapsed_s"])


@pytest.mark.parametrize("argv, message", [
    (["BASE", "FT", "--repeat", "0"], "--repeat must be at least 1"),
    (["MISSING", "FT"], "no such file or folder"),
])
def test_cli_timeline_refuses_bad_arguments(argv, message, tmp_path, capsys):
    from bench.probes import cli_timeline

    paths = {"BASE": str(tmp_path), "FT": str(tmp_path), "MISSING": str(tmp_path / "missing")}
    with pytest.raises(SystemExit) as stop:
        cli_timeline.main([paths.get(a, a) for a in argv] + ["--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps, message", [
    ("noise:cuda:1,svd:cuda:1", "each step is KIND:DEVICE"),
    ("rank", "each step is KIND:DEVICE"),
])
def test_second_gpu_refuses_unknown_steps(steps, message, capsys):
    from bench.probes import second_gpu

    with pytest.raises(SystemExit) as stop:
        second_gpu.main(["--steps", steps])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_second_gpu_needs_two_gpus(monkeypatch, capsys):
    import torch

    from bench.probes import second_gpu

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as stop:
        second_gpu.main([])
    assert stop.value.code == 2 and "needs two GPUs" in capsys.readouterr().err


def test_cli_timeline_reports_a_failed_rank_in_one_line(tmp_path):
    """A folder that holds no checkpoint: rank's own Error line, nothing written."""
    from bench.probes import cli_timeline

    with pytest.raises(SystemExit) as stop:
        cli_timeline.main([str(tmp_path), str(tmp_path), "--out", str(tmp_path / "out"), "--repeat", "1"])
    message = str(stop.value.code)
    assert message.startswith("rank failed (rc 1): Error: no weights found") and "\n" not in message
    assert not (tmp_path / "out").exists()
