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
See bench/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
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
        jobs.append(Job(key, label, tool, "merge", argv, weight_files(base), [merged], merged=merged,
                        merge_adapter=adapter))
    keys = {job.key for job in jobs}
    for name in (args.only or []) + (args.skip or []):
        if name not in keys:
            raise SystemExit(f"unknown row {name!r}; rows are: {', '.join(sorted(keys))}")
    if args.only:
        jobs = [job for job in jobs if job.key in args.only]
    return [job for job in jobs if job.key not in (args.skip or [])]


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
    available, reason = runner.check_available(job.argv, args.python)
    if not available:
        row["status"] = "not available"
        row["notes"].append(f"not available: {reason}")
        log(f"[{job.key}] not available: {reason}")
        return row
    if job.merge_adapter is not None and not (job.merge_adapter / "adapter_config.json").is_file():
        fallback = work / "runs" / "plain-adapter"
        if job.tool == "deltakit" and (fallback / "adapter_config.json").is_file():
            job.argv = [str(fallback) if a == str(job.merge_adapter) else a for a in job.argv]
            job.merge_adapter = fallback
            row["argv"] = shlex.join(job.argv)
            row["notes"].append("merged the plain loop's adapter: deltakit extract made none")
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
    result = runner.run_measured(job.argv, work / "logs" / job.key, args.timeout, args.python)
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
    if result.timed_out:
        row["status"] = f"timeout > {args.timeout:g} s"
    elif result.rc == 127 and result.measure.get("error"):
        row["status"] = "not available"
        row["notes"].append(f"not available: {result.measure['error']}")
    elif result.rc != 0:
        row["status"] = f"failed (rc {result.rc})"
        last = [line for line in result.stderr_tail.splitlines() if line.strip()]
        row["notes"].append(f"failed: {last[-1] if last else 'no output'} (log: {work / 'logs' / job.key}.err)")
    else:
        row["status"] = "ok"
    log(f"[{job.key}] {row['status']} in {result.wall_s:.2f} s (floor {row['floor_s']:.3f} s)")
    return row


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
    if job.key == "plain-rank":
        records = json.loads((work / "runs" / "plain-rank.json").read_text())["matrices"]
        ranks = sorted(r["rank_90"] for r in records if report.PROJECTION.search(r["name"]))
        if ranks:
            row["rank_90"] = {"median": ranks[len(ranks) // 2], "min": ranks[0], "max": ranks[-1]}
            row["notes"].append(f"rank@90% of the projections' ΔW: median {ranks[len(ranks) // 2]} "
                                f"(min {ranks[0]}, max {ranks[-1]}, {len(ranks)} matrices)")


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
    return parser.parse_args(argv)


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
            return {
                "preset": args.preset, "device": args.device, "rank": args.rank, "cache": args.cache,
                "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": machine.describe(), "bandwidth": bandwidth, "spec": spec,
                "pair": {"shape": dataclasses.asdict(shape), "base_bytes": generated["base"]["bytes"],
                         "base_files": generated["base"]["files"], "ft_bytes": generated["ft"]["bytes"],
                         "generate_s": generated.get("seconds"), "reused": generated.get("reused"),
                         "generate_device": generated.get("device")},
                "rows": merge_earlier(args, spec, rows),
            }

        rows = []
        for job in plan_jobs(work, args):
            row = run_job(job, work, args, bandwidth)
            score(job, row, work, args)
            rows.append(row)
            write_outputs(args.out, result_of(rows))  # a run cut short still leaves what it measured
        cross_check_rank(work, rows)
        result = result_of(rows)
        write_outputs(args.out, result)
        print(report.markdown_report(result))
        return 0
    finally:
        if temporary and not args.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif (work / SPEC_FILE).exists() and not args.keep_outputs:
            for merged in (work / "runs").glob("*-merged"):
                remove(merged)


ROW_ORDER = ["deltakit-rank", "plain-rank", "deltakit-extract", "plain-extract", "mergekit-extract",
             "deltakit-merge", "plain-merge"]


def combine_rows(earlier: list[dict], later: list[dict]) -> list[dict]:
    """Rows of both, a later row replacing an earlier one with the same key, in the table's order."""
    by_key = {row["key"]: row for row in earlier}
    by_key.update({row["key"]: row for row in later})
    return sorted(by_key.values(), key=lambda r: ROW_ORDER.index(r["key"]) if r["key"] in ROW_ORDER else len(ROW_ORDER))


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
