"""deltakit's end-to-end benchmark: one run writes a synthetic Llama-shaped base / fine-tune
pair, measures the machine's read and write bandwidth, times deltakit's commands and the
baselines each in a fresh process, checks their outputs, and writes results.json and
results.md to --out.

    python bench/run_bench.py --preset tiny --device cpu          # a minute on a laptop
    python bench/run_bench.py --preset 7b --workdir /tmp/dk-bench --out $OUT   # the GPU run

Rows: ``deltakit rank|extract|merge`` (the lead's commands, with exactly the flags below),
baseline (a) the plain per-matrix loop (bench/baselines.py) for the same three operations,
baseline (b) ``mergekit-extract-lora`` when mergekit is importable. A command that is not
there (yet), or lacks one of its flags, gets a "not available" row instead of failing the run.
``--processes 2`` (or ``1,2``, ...) adds ``deltakit-rank|extract|merge-x2``: the same deltakit
command in 2 processes under torchrun, scored like its 1-process row, with its speedup over it.
See bench/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import machine, report, runner  # noqa: E402
from bench.synth import (  # noqa: E402
    SPEC_FILE,
    add_pair_arguments,
    default_shard_bytes,
    delta_from_args,
    pair_spec,
    shape_from_args,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
WRITE_PROBE_MAX = 4 * 1024**3


@dataclass
class Job:
    """One timed row: a command line, what it reads, what it writes."""

    key: str
    label: str
    tool: str  # "deltakit", "plain" (baseline a) or "mergekit" (baseline b)
    op: str    # "rank", "extract" or "merge"
    argv: list[str]
    reads: list[Path]
    outputs: list[Path]
    adapter: Path | None = None       # the adapter folder it writes, scored afterwards
    self_report: Path | None = None   # a JSON report with its own rel_error numbers
    merged: Path | None = None        # the merged model it writes, checked afterwards
    merge_adapter: Path | None = None
    notes: list[str] = field(default_factory=list)
    processes: int = 1                # > 1: run under torchrun with this many worker processes
    checks: list[list[str]] | None = None  # command lines to ask "is it there?" (default: argv)
    # adapters to merge instead when merge_adapter is absent, first present wins: (folder, note)
    fallback_adapters: list[tuple[Path, str]] = field(default_factory=list)


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def plan_jobs(work: Path, args: argparse.Namespace) -> list[Job]:
    base, ft, runs = work / "base", work / "ft", work / "runs"
    device, rank = args.device, str(args.rank)
    pair = weight_files(base) + weight_files(ft)
    dk_adapter, plain_adapter, mk_adapter = runs / "deltakit-adapter", runs / "plain-adapter", runs / "mergekit-adapter"
    jobs = [
        Job("deltakit-rank", "deltakit rank", "deltakit", "rank",
            ["deltakit", "rank", str(base), str(ft), "--json", str(runs / "deltakit-rank.json"), "--device", device],
            pair, [runs / "deltakit-rank.json"]),
        Job("deltakit-rank-full", "deltakit rank --full-spectrum", "deltakit", "rank",
            ["deltakit", "rank", str(base), str(ft), "--json", str(runs / "deltakit-rank-full.json"), "--device", device,
             "--full-spectrum"], pair, [runs / "deltakit-rank-full.json"]),
        Job("deltakit-rank-fp64", "deltakit rank --full-spectrum --fp64", "deltakit", "rank",
            ["deltakit", "rank", str(base), str(ft), "--json", str(runs / "deltakit-rank-fp64.json"), "--device", device,
             "--full-spectrum", "--fp64"], pair, [runs / "deltakit-rank-fp64.json"]),
        Job("plain-rank", "(a) plain loop: svdvals", "plain", "rank",
            ["python", "-m", "bench.baselines", "rank", str(base), str(ft), "--json", str(runs / "plain-rank.json"),
             "--device", device], pair, [runs / "plain-rank.json"]),
        Job("deltakit-extract", f"deltakit extract --rank {rank}", "deltakit", "extract",
            ["deltakit", "extract", str(base), str(ft), "-o", str(dk_adapter), "--rank", rank, "--device", device,
             "--json", str(runs / "deltakit-extract.json")],
            pair, [dk_adapter, runs / "deltakit-extract.json"], adapter=dk_adapter,
            self_report=runs / "deltakit-extract.json"),
        Job("plain-extract", f"(a) plain loop: svd → rank {rank}", "plain", "extract",
            ["python", "-m", "bench.baselines", "extract", str(base), str(ft), "-o", str(plain_adapter),
             "--rank", rank, "--device", device, "--json", str(runs / "plain-extract.json")],
            pair, [plain_adapter, runs / "plain-extract.json"], adapter=plain_adapter),
        Job("mergekit-extract", f"(b) mergekit-extract-lora --max-rank {rank}", "mergekit", "extract",
            ["mergekit-extract-lora", "--model", str(ft), "--base-model", str(base), "--out-path", str(mk_adapter),
             "--max-rank", rank, "--device", device, *shlex.split(args.mergekit_args)],
            pair, [mk_adapter], adapter=mk_adapter),
    ]
    for key, label, tool, adapter, merged in (
        ("deltakit-merge", "deltakit merge", "deltakit", dk_adapter, runs / "deltakit-merged"),
        ("plain-merge", "(a) plain loop: merge per shard", "plain", plain_adapter, runs / "plain-merged"),
    ):
        argv = (["deltakit", "merge", str(base), str(adapter), "-o", str(merged), "--device", device]
                if tool == "deltakit" else
                ["python", "-m", "bench.baselines", "merge", str(base), str(adapter), "-o", str(merged),
                 "--device", device])
        fallbacks = ([(plain_adapter, "merged the plain loop's adapter: deltakit extract made none")]
                     if tool == "deltakit" else [])
        jobs.append(Job(key, label, tool, "merge", argv, weight_files(base), [merged], merged=merged,
                        merge_adapter=adapter, fallback_adapters=fallbacks))
    jobs = [variant for job in jobs for variant in [job, *multi_process_jobs(job, runs, args.processes or [])]]
    keys = {job.key for job in jobs}
    for name in (args.only or []) + (args.skip or []):
        if name not in keys:
            hint = " (an -xN row needs --processes N)" if MULTI_KEY.match(name) else ""
            raise SystemExit(f"unknown row {name!r}{hint}; rows are: {', '.join(sorted(keys))}")
    if args.only:  # a deltakit row named there brings its -xN rows along
        jobs = [job for job in jobs if job.key in args.only or MULTI_KEY.sub(r"\1", job.key) in args.only]
    else:  # rows that are references, slow where they matter, run only when named
        jobs = [job for job in jobs if job.key not in ONLY_WHEN_NAMED]
    return [job for job in jobs if job.key not in (args.skip or [])]


ONLY_WHEN_NAMED = {"deltakit-rank-fp64"}  # the fp64 full spectrum: an accuracy reference, slow without a GPU
MULTI_KEY = re.compile(r"^(deltakit-(?:rank|extract|merge))-x(\d+)$")
TORCHRUN = ["python", "-m", "torch.distributed.run", "--standalone"]
WORKER = ["-m", "bench.measure", "--worker", "--"]


def multi_process_jobs(job: Job, runs: Path, processes: list[int]) -> list[Job]:
    """deltakit's rank / extract / merge row again under torchrun, once for each N > 1.

    Outputs go to their own paths (``...-xN``); merge-xN merges the 1-process adapter, else
    extract-xN's, else the plain loop's. The workers run ``python -m bench.measure --worker --
    deltakit ...``, which imports ``deltakit_cli`` from ``cli/`` even when deltakit is not installed.
    """
    if job.tool != "deltakit" or job.key != f"deltakit-{job.op}":
        return []
    variants = []
    for n in (n for n in processes if n > 1):
        tag = f"-x{n}"
        renamed = {path: path.with_name(path.stem + tag + path.suffix) for path in job.outputs}
        argv = [str(renamed[Path(a)]) if Path(a) in renamed else a for a in job.argv]
        moved = lambda path: renamed.get(path, path) if path is not None else None  # noqa: E731
        fallbacks = job.fallback_adapters
        if job.op == "merge":
            own = runs / f"deltakit-adapter{tag}"
            fallbacks = [(own, f"merged its own adapter (deltakit extract, {n} processes): "
                               "the 1-process deltakit extract made none"), *fallbacks]
        variants.append(Job(
            f"{job.key}{tag}", f"{job.label} ({n} processes)", job.tool, job.op,
            [*TORCHRUN, "--nproc_per_node", str(n), *WORKER, *argv], list(job.reads), list(renamed.values()),
            adapter=moved(job.adapter), self_report=moved(job.self_report), merged=moved(job.merged),
            merge_adapter=job.merge_adapter, processes=n, fallback_adapters=fallbacks,
            checks=[argv, ["python", "-m", "torch.distributed.run"]]))
    return variants


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generate(work: Path, args: argparse.Namespace) -> dict[str, object]:
    forwarded = [f"--preset={args.preset}", f"--seed={args.seed}", f"--delta-scale={args.delta_scale}",
                 f"--delta-decay={args.delta_decay}", f"--delta-width={args.delta_width}",
                 f"--delta-noise={args.delta_noise}", f"--shard-bytes={args.shard_bytes}"]
    forwarded += [f"--{k}={getattr(args, k)}" for k in ("hidden", "intermediate", "layers", "vocab")
                  if getattr(args, k)]
    summary_path = work / "generate.json"
    command = [args.python, "-m", "bench.synth", "--workdir", str(work), "--device", args.device,
               "--summary-json", str(summary_path), *forwarded]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=runner.child_env(), stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"generating the pair failed (rc {proc.returncode}): {shlex.join(command)}")
    return json.loads(summary_path.read_text())


def measure_bandwidth(work: Path, files: list[Path], cache: str) -> dict[str, object]:
    if cache == "cold":
        machine.drop_from_cache(files)
        read = machine.read_bandwidth(files)
        machine.drop_from_cache(files)
        first = None
    else:
        first = machine.read_bandwidth(files)  # also pulls everything into the page cache
        resident = first.get("resident_before")
        read = first if resident is not None and resident >= 0.99 else machine.read_bandwidth(files)
    largest = max(p.stat().st_size for p in files)
    write = machine.write_bandwidth(work, min(largest, WRITE_PROBE_MAX))
    return {"read": read, "first_pass": first, "write": write}


def floor_seconds(read_bytes: int, write_bytes: int, bandwidth: dict[str, object]) -> float:
    return read_bytes / bandwidth["read"]["bytes_per_s"] + write_bytes / bandwidth["write"]["bytes_per_s"]


def run_job(job: Job, work: Path, args: argparse.Namespace, bandwidth: dict[str, object]) -> dict[str, object]:
    row: dict[str, object] = {"key": job.key, "label": job.label, "tool": job.tool, "op": job.op,
                              "argv": shlex.join(job.argv), "notes": list(job.notes)}
    for argv in job.checks or [job.argv]:
        available, reason = runner.check_available(argv, args.python)
        if not available:
            row["status"] = "not available"
            row["notes"].append(f"not available: {reason}")
            log(f"[{job.key}] not available: {reason}")
            return row
    if job.merge_adapter is not None and not (job.merge_adapter / "adapter_config.json").is_file():
        fallback, note = next(((f, n) for f, n in job.fallback_adapters if (f / "adapter_config.json").is_file()),
                              (None, ""))
        if fallback is not None:
            job.argv = [str(fallback) if a == str(job.merge_adapter) else a for a in job.argv]
            job.merge_adapter = fallback
            row["argv"] = shlex.join(job.argv)
            row["notes"].append(note)
        else:
            row["status"] = "not available"
            row["notes"].append(f"needs the adapter {job.merge_adapter.name}, which no earlier row produced")
            return row
    if job.merge_adapter is not None:
        job.reads = job.reads + sorted(job.merge_adapter.glob("*.safetensors"))
    for path in job.outputs:
        remove(path)
    if args.cache == "cold":
        machine.drop_from_cache(job.reads)
    row["inputs_resident"] = machine.resident_fraction(job.reads)
    log(f"[{job.key}] {shlex.join(job.argv)}")
    result = runner.run_measured(job.argv, work / "logs" / job.key, args.timeout, args.python,
                                 tree=job.processes > 1)
    read_bytes = sum(p.stat().st_size for p in job.reads)
    write_bytes = sum(tree_bytes(p) for p in job.outputs)
    row.update({
        "wall_s": result.wall_s, "command_s": result.measure.get("wall_s"), "rc": result.rc,
        "max_rss_mb": result.max_rss_mb, "peak_anon_mb": result.peak_anon_mb, "peak_file_mb": result.peak_file_mb,
        "gpu_peak_mb": result.measure.get("gpu_peak_mb"),
        "gpu_peak_allocated_mb": result.measure.get("gpu_peak_allocated_mb"),
        "read_bytes": read_bytes, "write_bytes": write_bytes,
        "floor_s": floor_seconds(read_bytes, write_bytes, bandwidth), "stderr_tail": result.stderr_tail,
        "read_bytes_per_s": bandwidth["read"]["bytes_per_s"], "write_bytes_per_s": bandwidth["write"]["bytes_per_s"],
    })
    if job.processes > 1:
        describe_processes(job, row, result)
    if result.timed_out:
        row["status"] = f"timeout > {args.timeout:g} s"
    elif result.rc == 127 and result.measure.get("error"):
        row["status"] = "not available"
        row["notes"].append(f"not available: {result.measure['error']}")
    elif result.rc != 0:
        row["status"] = f"failed (rc {result.rc})"
        last = [line for line in result.stderr_tail.splitlines() if line.strip()]
        if job.processes > 1:  # torchrun ends with its own long summary: the workers' "Error: ..." says more
            last = worker_errors(work / "logs" / f"{job.key}.err") or last
        row["notes"].append(f"failed: {last[-1] if last else 'no output'} (log: {work / 'logs' / job.key}.err)")
    else:
        row["status"] = "ok"
    log(f"[{job.key}] {row['status']} in {result.wall_s:.2f} s (floor {row['floor_s']:.3f} s)")
    return row


def worker_errors(log_path: Path) -> list[str]:
    """The workers' ``Error: ...`` lines in a torchrun row's log, the cause last (not "process N failed")."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return []
    errors = [line for line in lines if line.startswith("Error: ")]
    return sorted(errors, key=lambda line: bool(re.match(r"Error: process \d+ failed", line)), reverse=True)


def describe_processes(job: Job, row: dict[str, object], result: runner.ChildResult) -> None:
    """What a torchrun row's numbers mean. GPU peak: the sum of the workers' own (each measures its
    GPU); unknown (None) unless every worker reported."""
    row["processes"] = job.processes
    peaks = [w.get("gpu_peak_mb") for w in result.workers]
    allocated = [w.get("gpu_peak_allocated_mb") for w in result.workers]
    complete = len(result.workers) == job.processes and all(isinstance(p, (int, float)) for p in peaks + allocated)
    row["gpu_peak_mb"] = sum(peaks) if complete else None  # type: ignore[arg-type]
    row["gpu_peak_allocated_mb"] = sum(allocated) if complete else None  # type: ignore[arg-type]
    row["gpu_peak_per_process_mb"] = peaks if complete else None
    row["peak_anon_total_mb"], row["peak_file_total_mb"] = result.peak_anon_total_mb, result.peak_file_total_mb
    row["max_processes_seen"] = result.max_processes
    memory = (f"peak GPU memory is the sum over the processes (largest {max(peaks):.0f} MiB)" if complete else
              f"peak GPU memory unknown: {len(result.workers)} of {job.processes} workers reported it")
    row["notes"].append(
        f"{job.processes} processes under torchrun (--standalone; each runs `python -m bench.measure --worker -- "
        f"deltakit {job.op} ...`); {memory}")
    if isinstance(result.peak_anon_total_mb, (int, float)):
        row["notes"].append(
            f"peak RSS is the largest single process (wait4); summed over the launcher and its workers "
            f"({result.max_processes} processes seen) anon peaked at {result.peak_anon_total_mb / 1024:.2f} GB")
    if "OMP_NUM_THREADS" not in os.environ:
        row["notes"].append("torchrun set OMP_NUM_THREADS=1 in each worker (it was unset)")


def score(job: Job, row: dict[str, object], work: Path, args: argparse.Namespace) -> None:
    """Untimed checks: adapter error against the true ΔW, merge correctness, baseline spectra."""
    if row.get("status") != "ok":
        return
    base, ft = work / "base", work / "ft"
    checks = work / "checks"
    checks.mkdir(exist_ok=True)
    if job.adapter is not None:
        out = checks / f"{job.key}.json"
        rc, tail = runner.run_helper(["-m", "bench.evaluate", "adapter", str(base), str(ft), str(job.adapter),
                                      "--device", args.device, "--json", str(out)], args.python)
        if rc != 0:
            row["notes"].append(f"could not score its adapter: {tail.splitlines()[-1] if tail else rc}")
        else:
            scored = json.loads(out.read_text())
            row["rel_error"] = report.summarize_errors(scored["matrices"])
            row["adapter_r"] = scored.get("r")
            if scored["stored_whole"]:
                row["notes"].append(f"stores {len(scored['stored_whole'])} tensors whole (modules_to_save), "
                                    f"e.g. {scored['stored_whole'][0]}")
    if job.self_report is not None:
        values = report.self_reported_errors(job.self_report)
        if values:
            row["self_reported_rel_error_mean"] = sum(values) / len(values)
            row["notes"].append(f"its own report: mean rel_error {row['self_reported_rel_error_mean']:.4f} "
                                f"over {len(values)} matrices")
    if job.merged is not None:
        out = checks / f"{job.key}.json"
        rc, tail = runner.run_helper(["-m", "bench.evaluate", "merge", str(base), str(job.merge_adapter),
                                      str(job.merged), "--device", args.device, "--json", str(out)], args.python)
        if rc != 0:
            row["notes"].append(f"could not check the merged model: {tail.splitlines()[-1] if tail else rc}")
        else:
            check = json.loads(out.read_text())
            row["merge_check"] = check
            rounding = check["sampled"][0]["rounding"] if check["sampled"] else None
            row["notes"].append(
                f"merge check: {check['missing_count']} base tensors missing, max ‖W_merged − round(W + ΔW_lora)‖"
                f"/‖ΔW_lora‖ = {report.fmt(check['max_rel_deviation'], '{:.2e}')} on {len(check['sampled'])} "
                f"sampled matrices (rounding alone: {report.fmt(rounding, '{:.2e}')})")
        if not args.keep_outputs:
            remove(job.merged)
    if job.key == "plain-extract":
        records = json.loads((work / "runs" / "plain-extract.json").read_text())["matrices"]
        optimum = report.summarize_errors(records)
        if optimum:
            row["optimum_rel_error"] = optimum
            row["notes"].append(f"truncated-SVD optimum in fp32 (before storing the factors in bf16): mean "
                                f"{optimum['mean']:.4f}, max {optimum['max']:.4f}")
    if job.key == "deltakit-rank":
        matrices = json.loads((work / "runs" / "deltakit-rank.json").read_text())["matrices"]
        shares = sorted(m["noise_share"] for m in matrices if "noise_share" in m and m["delta_fro"] > 0)
        if shares:
            signal = sorted(m["signal_rank_at"]["0.9"] for m in matrices
                            if m.get("signal_rank_at", {}).get("0.9") is not None and m["delta_fro"] > 0)
            row["noise_share"] = {"median": shares[len(shares) // 2], "min": shares[0], "max": shares[-1]}
            row["notes"].append(
                f"storage rounding's share of ‖ΔW‖²: median {shares[len(shares) // 2]:.4f} (min {shares[0]:.4f}, "
                f"max {shares[-1]:.4f}); noise-dominated at r@0.9: {sum(1 for x in shares if x > 0.1)} matrices; "
                f"signal_rank_at[0.9] median {signal[len(signal) // 2] if signal else None}")
    if job.key == "plain-rank":
        records = json.loads((work / "runs" / "plain-rank.json").read_text())["matrices"]
        ranks = sorted(r["rank_90"] for r in records if report.PROJECTION.search(r["name"]))
        if ranks:
            row["rank_90"] = {"median": ranks[len(ranks) // 2], "min": ranks[0], "max": ranks[-1]}
            row["notes"].append(f"rank@90% of the projections' ΔW: median {ranks[len(ranks) // 2]} "
                                f"(min {ranks[0]}, max {ranks[-1]}, {len(ranks)} matrices)")


def spectrum_paths_agree(adaptive: list[dict], full: list[dict], tolerance: float = 0.01) -> dict[str, object]:
    """Per matrix, the adaptive report against --full-spectrum's, by issue 17's definition of equal:
    rank_at the same (±1 counted apart), stable rank to 1e-4 relative, effective rank to ``tolerance``,
    signal_rank_at the same, numerical rank the same or a lower bound at most it."""
    by_name = {m["name"]: m for m in full}
    counts = {"matrices": 0, "adaptive": 0, "rank_at_equal": 0, "rank_at_within_1": 0, "stable_rank_1e-4": 0,
              "effective_rank_1pct": 0, "effective_rank_within_2_errors": 0, "signal_rank_at_equal": 0,
              "rank_equal": 0, "rank_bounded": 0}
    worst = {"effective_rank_rel": 0.0, "stable_rank_rel": 0.0}
    signed = []  # effective rank: ours / reference − 1, per matrix (a bias shows where |worst| does not)
    for ours in adaptive:
        ref = by_name.get(ours["name"])
        if ref is None:
            continue
        counts["matrices"] += 1
        counts["adaptive"] += str(ours.get("spectrum_method", "")).startswith("adaptive")
        same = ours["rank_at"] == ref["rank_at"]
        counts["rank_at_equal"] += same
        counts["rank_at_within_1"] += all(abs(ours["rank_at"][k] - ref["rank_at"][k]) <= 1 for k in ref["rank_at"])
        stable = abs(ours["stable_rank"] - ref["stable_rank"]) / ref["stable_rank"] if ref["stable_rank"] else 0.0
        eff = abs(ours["effective_rank"] - ref["effective_rank"]) / ref["effective_rank"] if ref["effective_rank"] else 0.0
        if ref["effective_rank"]:
            signed.append(ours["effective_rank"] / ref["effective_rank"] - 1.0)
        counts["stable_rank_1e-4"] += stable <= 1e-4
        counts["effective_rank_1pct"] += eff <= tolerance
        error = ours.get("effective_rank_error") or 0.0
        counts["effective_rank_within_2_errors"] += abs(ours["effective_rank"] - ref["effective_rank"]) <= 2 * error + 1e-9
        counts["signal_rank_at_equal"] += ours.get("signal_rank_at") == ref.get("signal_rank_at")
        if ours["rank"] is None:
            counts["rank_bounded"] += ours.get("lower_bounds", {}).get("rank", 0) <= ref["rank"]
        else:
            counts["rank_equal"] += ours["rank"] == ref["rank"]
        worst = {"effective_rank_rel": max(worst["effective_rank_rel"], eff),
                 "stable_rank_rel": max(worst["stable_rank_rel"], stable)}
    return {**counts, "worst": worst, "effective_rank_mean_rel": sum(signed) / len(signed) if signed else 0.0}


SPECTRUM_CHECKS = (  # (row checked, reference row, what the note calls the reference)
    ("deltakit-rank", "deltakit-rank-full", "--full-spectrum"),
    ("deltakit-rank", "deltakit-rank-fp64", "the fp64 full spectrum"),
    ("deltakit-rank-full", "deltakit-rank-fp64", "the fp64 full spectrum"),
)


def cross_check_full_spectrum(work: Path, rows: list[dict[str, object]]) -> None:
    """The deltakit-rank row (adaptive on a GPU) against deltakit-rank-full, matrix by matrix, and both
    against the fp64 full spectrum where that row ran (the reference closest to the truth)."""
    by_key = {row["key"]: row for row in rows}
    for checked, reference, called in SPECTRUM_CHECKS:
        if any(by_key.get(key, {}).get("status") != "ok" for key in (checked, reference)):
            continue
        ours = json.loads((work / "runs" / f"{checked}.json").read_text())["matrices"]
        ref = json.loads((work / "runs" / f"{reference}.json").read_text())["matrices"]
        check = spectrum_paths_agree(ours, ref)
        row = by_key[checked]
        row["full_spectrum_check" if reference == "deltakit-rank-full" else "fp64_check"] = check
        row["notes"].append(
            f"against {called} on {check['matrices']} matrices ({check['adaptive']} adaptive): rank_at equal on "
            f"{check['rank_at_equal']} (±1 on {check['rank_at_within_1']}), stable rank to 1e-4 on {check['stable_rank_1e-4']}, "
            f"effective rank to 1% on {check['effective_rank_1pct']} (worst {check['worst']['effective_rank_rel']:.4f}, "
            f"signed mean {check['effective_rank_mean_rel']:+.4f}), signal_rank_at equal on {check['signal_rank_at_equal']}, "
            f"numerical rank equal on {check['rank_equal']} and a true lower bound on {check['rank_bounded']}")


def cross_check_multi_rank(work: Path, rows: list[dict[str, object]]) -> None:
    """Each deltakit-rank-xN report's rank_at against the 1-process deltakit rank's, per matrix."""
    by_key = {row["key"]: row for row in rows}
    if by_key.get("deltakit-rank", {}).get("status") != "ok":
        return
    for row in rows:
        match = MULTI_KEY.match(row["key"])
        if not match or match.group(1) != "deltakit-rank" or row.get("status") != "ok":
            continue
        try:
            def rank_at(name: str) -> dict[str, object]:
                matrices = json.loads((work / "runs" / name).read_text())["matrices"]
                return {m["name"]: m.get("rank_at") for m in matrices}

            ours, single = rank_at(f"{row['key']}.json"), rank_at("deltakit-rank.json")
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            row["notes"].append(f"not compared with the 1-process report (unexpected JSON: {exc!r})")
            continue
        equal = sum(ours.get(name) == value for name, value in single.items())
        row["rank_check"] = {"matrices": len(single), "equal_to_one_process": equal,
                             "names_equal": sorted(ours) == sorted(single)}
        row["notes"].append(f"its rank_at equals the 1-process report's on {equal} of {len(single)} matrices"
                            + ("" if sorted(ours) == sorted(single) else "; the matrix names differ"))


def add_scaling(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """speedup = the 1-process row's wall time ÷ the -xN row's, in each -xN row and as a list."""
    by_key = {row["key"]: row for row in rows}
    scaling = []
    for row in rows:
        match = MULTI_KEY.match(row["key"])
        if not match:
            continue
        row["notes"] = [n for n in row.get("notes", []) if not n.startswith("scaling:")]
        row.pop("scaling", None)
        one = by_key.get(match.group(1), {})
        n = int(match.group(2))
        if row.get("status") != "ok" or one.get("status") != "ok" or not row.get("wall_s"):
            row["notes"].append(f"scaling: no speedup (this row {row.get('status')}, "
                                f"the 1-process row {one.get('status', 'not run')})")
            continue
        entry = {"op": row["op"], "processes": n, "key": row["key"], "wall_s": row["wall_s"],
                 "one_process_wall_s": one["wall_s"], "speedup": one["wall_s"] / row["wall_s"]}
        row["scaling"] = entry
        scaling.append(entry)
        row["notes"].append(f"scaling: 1 process {one['wall_s']:.2f} s, {n} processes {row['wall_s']:.2f} s: "
                            f"speedup {entry['speedup']:.2f}× (ideal {n}×)")
    return scaling


def cross_check_rank(work: Path, rows: list[dict[str, object]]) -> None:
    """deltakit rank's rank_at["0.9"] (docs/json.md) against the plain loop's exact svdvals, per matrix."""
    by_key = {row["key"]: row for row in rows}
    if any(by_key.get(k, {}).get("status") != "ok" for k in ("deltakit-rank", "plain-rank")):
        return
    try:
        ours = json.loads((work / "runs" / "deltakit-rank.json").read_text())["matrices"]
        ours = {m["name"]: m["rank_at"]["0.9"] for m in ours if "0.9" in m.get("rank_at", {})}
        exact = json.loads((work / "runs" / "plain-rank.json").read_text())["matrices"]
        exact = {m["name"]: m["rank_90"] for m in exact}
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        by_key["deltakit-rank"]["notes"].append(f"rank@90% not compared (unexpected JSON: {exc!r})")
        return
    common = sorted(set(ours) & set(exact))
    if not common:
        return
    diffs = [abs(ours[n] - exact[n]) for n in common]
    by_key["deltakit-rank"]["rank_check"] = {"matrices": len(common), "equal": diffs.count(0),
                                             "max_abs_diff": max(diffs)}
    by_key["deltakit-rank"]["notes"].append(
        f"rank@90% equals the plain loop's (exact svdvals) on {diffs.count(0)} of {len(common)} matrices, "
        f"max |difference| {max(diffs)}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/run_bench.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_pair_arguments(parser)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the pair and outputs go (default: a temp dir, removed at the end); "
                             "a pair already there with the same spec is reused")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results.json / results.md / logs.txt go here")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda, passed to every command")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank for extract (default 64)")
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm",
                        help="warm: inputs in the page cache for every row (default); cold: evicted before each")
    parser.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma list of row keys to run")
    parser.add_argument("--skip", type=lambda s: s.split(","), default=None, help="comma list of row keys to skip")
    parser.add_argument("--timeout", type=float, default=None, help="kill a row after this many seconds")
    parser.add_argument("--append", action="store_true",
                        help="keep rows of an earlier results.json in --out for the same pair (to split a run)")
    parser.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-extract-lora")
    parser.add_argument("--keep-workdir", action="store_true", help="keep a temp workdir")
    parser.add_argument("--keep-outputs", action="store_true", help="keep merged models (they are as big as the base)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the child processes")
    parser.add_argument("--processes", type=process_counts, default=None, metavar="N[,N...]",
                        help="also time deltakit rank/extract/merge in N processes under torchrun "
                             "(rows deltakit-OP-xN, one GPU per process; gloo with --device cpu); 1 is the plain rows")
    return parser.parse_args(argv)


def process_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(word) for word in text.split(",") if word.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of process counts: {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"process counts must be ≥ 1: {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = shape_from_args(args)
    args.shard_bytes = args.shard_bytes or default_shard_bytes(shape)
    temporary = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="deltakit-bench-")) if temporary else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "runs").mkdir(exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        log(f"pair: {dataclasses.asdict(shape)} in {work}")
        generated = generate(work, args)
        if not generated.get("reused"):  # outputs of an earlier pair would be stale
            shutil.rmtree(work / "runs", ignore_errors=True)
            (work / "runs").mkdir()
        files = weight_files(work / "base") + weight_files(work / "ft")
        log("measuring bandwidth ...")
        bandwidth = measure_bandwidth(work, files, args.cache)
        log(f"read {bandwidth['read']['bytes_per_s'] / 1e9:.2f} GB/s, "
            f"write {bandwidth['write']['bytes_per_s'] / 1e9:.2f} GB/s")
        spec = pair_spec(shape, delta_from_args(args), args.shard_bytes)

        def result_of(rows: list[dict]) -> dict[str, object]:
            rows = merge_earlier(args, spec, rows)
            extra = {"processes": args.processes, "scaling": add_scaling(rows)} if args.processes else {}
            return {
                "preset": args.preset, "device": args.device, "rank": args.rank, "cache": args.cache,
                "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine.describe(), "bandwidth": bandwidth, "spec": spec,
                "pair": {"shape": dataclasses.asdict(shape), "base_bytes": generated["base"]["bytes"],
                         "base_files": generated["base"]["files"], "ft_bytes": generated["ft"]["bytes"],
                         "generate_s": generated.get("seconds"), "reused": generated.get("reused"),
                         "generate_device": generated.get("device")},
                "rows": rows, **extra,
            }

        rows = []
        for job in plan_jobs(work, args):
            row = run_job(job, work, args, bandwidth)
            score(job, row, work, args)
            rows.append(row)
            write_outputs(args.out, result_of(rows))  # a run cut short still leaves what it measured
        cross_check_rank(work, rows)
        cross_check_multi_rank(work, rows)
        cross_check_full_spectrum(work, rows)
        result = result_of(rows)
        write_outputs(args.out, result)
        print(report.markdown_report(result))
        return 0
    finally:
        if temporary and not args.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif (work / SPEC_FILE).exists() and not args.keep_outputs:
            for merged in [*(work / "runs").glob("*-merged"), *(work / "runs").glob("*-merged-x*")]:
                remove(merged)


ROW_ORDER = ["deltakit-rank", "plain-rank", "deltakit-extract", "plain-extract", "mergekit-extract",
             "deltakit-merge", "plain-merge"]


def combine_rows(earlier: list[dict], later: list[dict]) -> list[dict]:
    """Rows of both, a later row replacing an earlier one with the same key, in the table's order."""
    by_key = {row["key"]: row for row in earlier}
    by_key.update({row["key"]: row for row in later})
    return sorted(by_key.values(), key=lambda r: _row_position(r["key"]))


def _row_position(key: str) -> tuple[int, int]:
    """A row's place in the table: ROW_ORDER, each deltakit-OP-xN right after deltakit-OP, by N."""
    match = MULTI_KEY.match(key)
    base, n = (match.group(1), int(match.group(2))) if match else (key, 0)
    return (ROW_ORDER.index(base) if base in ROW_ORDER else len(ROW_ORDER), n)


def merge_earlier(args: argparse.Namespace, spec: dict[str, object], rows: list[dict]) -> list[dict]:
    """With --append, earlier rows for the same pair stay unless this run redid them."""
    earlier_path = args.out / "results.json"
    if not args.append or not earlier_path.is_file():
        return rows
    earlier = json.loads(earlier_path.read_text())
    if earlier.get("spec") != spec:
        log("--append: results.json in --out is for another pair; starting afresh")
        return rows
    return combine_rows(earlier["rows"], rows)


def write_outputs(out: Path, result: dict[str, object]) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "results.md").write_text(report.markdown_report(result))
    logs = []
    for row in result["rows"]:
        logs += [f"=== {row['key']}: {row.get('status')}", f"$ {row.get('argv')}", row.get("stderr_tail", ""), ""]
    (out / "logs.txt").write_text("\n".join(logs))


if __name__ == "__main__":
    sys.exit(main())
