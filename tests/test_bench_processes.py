"""bench/run_bench.py --processes: the -xN rows' plan, their scaling note, and one real 2-process run (gloo)."""

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import run_bench  # noqa: E402


def keys(*argv: str) -> list[str]:
    return [job.key for job in run_bench.plan_jobs(Path("/w"), run_bench.parse_args(["--preset", "tiny", *argv]))]


def test_without_processes_no_multi_process_rows():
    assert keys() == ["deltakit-rank", "deltakit-rank-full", "plain-rank", "deltakit-extract", "plain-extract", "mergekit-extract",
                      "deltakit-merge", "plain-merge"]
    with pytest.raises(SystemExit, match="needs --processes"):
        keys("--only", "deltakit-rank-x2")
    assert keys("--only", "deltakit-rank,deltakit-rank-fp64") == ["deltakit-rank", "deltakit-rank-fp64"]  # a reference row runs when named


def test_processes_add_rows_after_their_one_process_row():
    assert keys("--processes", "1,2", "--only", "deltakit-rank,deltakit-merge,plain-merge") == [
        "deltakit-rank", "deltakit-rank-x2", "deltakit-merge", "deltakit-merge-x2", "plain-merge"]
    assert keys("--processes", "2,4", "--only", "deltakit-extract-x4") == ["deltakit-extract-x4"]
    assert keys("--processes", "2", "--only", "deltakit-merge", "--skip", "deltakit-merge") == ["deltakit-merge-x2"]
    args = run_bench.parse_args(["--preset", "tiny", "--processes", "2", "--only", "deltakit-extract,deltakit-merge"])
    extract, extract2, merge, merge2 = run_bench.plan_jobs(Path("/w"), args)
    assert extract2.argv[:7] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 "-m"]
    assert extract2.argv[extract2.argv.index("--") + 1:] == [
        str(extract2.adapter) if a == str(extract.adapter) else a.replace("extract.json", "extract-x2.json")
        for a in extract.argv]
    assert extract2.adapter == Path("/w/runs/deltakit-adapter-x2")
    assert merge2.merged == Path("/w/runs/deltakit-merged-x2")
    assert merge2.merge_adapter == merge.merge_adapter == extract.adapter  # the 1-process adapter first
    assert [f for f, _ in merge2.fallback_adapters] == [extract2.adapter, Path("/w/runs/plain-adapter")]


def test_scaling_and_table_order():
    rows = [{"key": "deltakit-rank-x2", "op": "rank", "status": "ok", "wall_s": 2.0, "notes": []},
            {"key": "deltakit-rank", "op": "rank", "status": "ok", "wall_s": 3.0, "notes": []},
            {"key": "deltakit-merge-x2", "op": "merge", "status": "failed (rc 1)", "wall_s": 1.0, "notes": []}]
    for _ in range(2):  # idempotent: one scaling note per row however often it runs
        scaling = run_bench.add_scaling(rows)
    assert [s["speedup"] for s in scaling] == [1.5]
    assert [n for n in rows[0]["notes"] if n.startswith("scaling:")] == [
        "scaling: 1 process 3.00 s, 2 processes 2.00 s: speedup 1.50× (ideal 2×)"]
    assert rows[2]["notes"] == ["scaling: no speedup (this row failed (rc 1), the 1-process row not run)"]
    assert [r["key"] for r in run_bench.combine_rows(rows, [{"key": "plain-rank"}])] == [
        "deltakit-rank", "deltakit-rank-x2", "plain-rank", "deltakit-merge-x2"]


def test_rank_in_two_processes_on_the_cpu(tmp_path, capsys):
    """The real thing, as small as it gets: torchrun, gloo, workers importing deltakit_cli through bench.measure."""
    out = tmp_path / "out"
    assert run_bench.main(["--preset", "tiny", "--device", "cpu", "--processes", "2", "--workdir", str(tmp_path / "w"),
                           "--only", "deltakit-rank", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    one, two = result["rows"]
    assert (one["key"], one["status"]) == ("deltakit-rank", "ok")
    assert (two["key"], two["status"]) == ("deltakit-rank-x2", "ok"), two.get("stderr_tail")
    assert two["processes"] == 2 and two["max_processes_seen"] >= 3
    assert two["gpu_peak_per_process_mb"] == [0.0, 0.0] and two["gpu_peak_mb"] == 0.0  # each worker's line, no GPU
    assert two["rank_check"]["equal_to_one_process"] == two["rank_check"]["matrices"] > 0
    assert result["scaling"][0]["key"] == "deltakit-rank-x2" and result["scaling"][0]["speedup"] > 0
    assert "deltakit rank (2 processes)" in capsys.readouterr().out
    assert not [line for line in os.popen("ps -eo args").read().splitlines() if "deltakit-rank-x2.json" in line]


def test_torchrun_compare_on_a_pair_times_and_compares_each_command(tmp_path):
    """bench/torchrun_compare.py --pair: one process against torchrun 2 (gloo), outputs compared, then removed."""
    import subprocess

    from bench.synth import DeltaSpec, PRESETS, write_pair

    write_pair(tmp_path / "pair", PRESETS["tiny"], DeltaSpec(), "cpu", log=lambda *a: None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "bench.torchrun_compare", "--workdir", str(tmp_path / "w"),
                           "--pair", str(tmp_path / "pair"), "--device", "cpu", "--rank", "4", "--ops", "extract,merge",
                           "--out", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    extract, merge = json.loads((tmp_path / "out" / "torchrun_compare.json").read_text())
    assert [extract["op"], merge["op"]] == ["extract", "merge"]
    for entry in (extract, merge):
        assert entry["x1"]["rc"] == entry["x2"]["rc"] == 0 and entry["speedup"] > 0
    assert extract["reports"]["extract.json"]["non_float_differences"] == []  # ranks, names, shapes agree
    assert merge["verdict"] == "identical"  # W + s·BA in row blocks: the same bytes from any split
    assert set(merge["files"].values()) == {"same bytes"} and any(n.startswith("merged/") for n in merge["files"])
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["extract-x1"]  # the rest removed (merge read it)


@pytest.mark.parametrize("argv, message", [
    (["--pair", "{missing}"], "needs the folders base/ and ft/"),
    (["--pair", "{pair}", "--processes", "1"], "--processes must be 2 or more"),
    (["--pair", "{pair}", "--ops", "merge,extract"], "put extract before them"),
    (["--ops", "rank,nope"], "unknown --ops"),
    ([], "is not empty"),
])
def test_torchrun_compare_refuses_bad_arguments_in_one_line(tmp_path, argv, message):
    import subprocess

    pair = tmp_path / "pair"
    for side in ("base", "ft"):
        (pair / side).mkdir(parents=True)
    work = tmp_path / "work"
    (work / "old").mkdir(parents=True)  # a used folder: the demo run needs a new one
    argv = [a.format(missing=tmp_path / "missing", pair=pair) for a in argv]
    done = subprocess.run([sys.executable, "-m", "bench.torchrun_compare", "--workdir", str(work), *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and message in done.stderr.splitlines()[-1]


def test_worker_lines_are_read_by_rank_and_a_missing_one_leaves_the_gpu_peak_unknown():
    from bench import runner

    stdout = "\n".join([
        'log line', json.dumps({"bench_measure": 1, "worker": 1, "gpu_peak_mb": 300.0, "gpu_peak_allocated_mb": 200.0}),
        json.dumps({"bench_measure": 1, "worker": 0, "gpu_peak_mb": 500.0, "gpu_peak_allocated_mb": 400.0}),
        '{"bench_measure": 1, "broken', json.dumps({"bench_measure": 1, "rc": 0, "wall_s": 1.0}),
    ])
    lines = runner.marker_lines(stdout)
    assert [line.get("worker") for line in lines] == [1, 0, None]
    workers = runner.worker_lines(lines)
    assert [w["worker"] for w in workers] == [0, 1]
    job = run_bench.Job(key="deltakit-rank-x2", label="rank", tool="deltakit", op="rank", argv=[], reads=[], outputs=[],
                        processes=2)
    row: dict = {"notes": []}
    run_bench.describe_processes(job, row, runner.ChildResult(rc=0, wall_s=1.0, workers=workers))
    assert (row["gpu_peak_mb"], row["gpu_peak_allocated_mb"], row["gpu_peak_per_process_mb"]) == (800.0, 600.0,
                                                                                                 [500.0, 300.0])
    row = {"notes": []}
    run_bench.describe_processes(job, row, runner.ChildResult(rc=0, wall_s=1.0, workers=workers[:1]))
    assert row["gpu_peak_mb"] is None and any("1 of 2 workers reported" in note for note in row["notes"])
