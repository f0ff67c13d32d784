"""The runner: a pair, its I/O floor, each named target in a fresh process per tree, checked, tabled.

    python -m bench run --preset tiny --device cpu --out bench/results/tiny
    python -m bench run --preset 7b --target rank,rank-full,extract,merge --baseline REV --out $OUT/7b
    python -m bench run --preset tall --target rank --out $OUT/tall

Each row is ``python bench/child.py deltakit COMMAND ...`` in a fresh process (under ``/usr/bin/time -v``
when it exists, else the rusage of ``wait4``): wall time end to end (interpreter start and imports
included, as a user sees it), peak RSS (and the anonymous part, sampled from /proc: safetensors pages
mapped from the page cache count in RSS too), peak GPU memory (read by the child at its exit). With
``--baseline REV|DIR`` every target runs twice, interleaved, on that tree and this one: before and
after in the same run, same machine, same page cache. Writes results.json and results.md to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench import machine
from bench.pair import PRESETS, Checkpoint, DeltaSpec, weight_files, write_calibration, write_pair
from bench.targets import PEERS, TARGETS, Run, Target, Truth

REPO = Path(__file__).resolve().parents[1]
CHILD = REPO / "bench" / "child.py"
TIME = shutil.which("time", path="/usr/bin")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tree_env(tree: Path, scratch: Path) -> dict[str, str]:
    """The environment that imports ``deltakit`` from ``tree`` and ``deltakit_cli`` from its cli/ (as pip's
    package-dir mapping does), ahead of any installed deltakit."""
    shim = scratch / f"shim-{abs(hash(str(tree)))}"
    shim.mkdir(parents=True, exist_ok=True)
    if not (shim / "deltakit_cli").exists():
        (shim / "deltakit_cli").symlink_to(tree / "cli", target_is_directory=True)
    paths = [str(shim), str(tree), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def baseline_tree(spec: str, scratch: Path) -> tuple[Path, str]:
    """A directory as it is (named by its REVISION file, if any), else ``git archive REV`` of this repository
    unpacked into ``scratch``."""
    if Path(spec).is_dir():
        named = Path(spec) / "REVISION"
        return Path(spec).resolve(), named.read_text().strip() if named.is_file() else spec
    rev = subprocess.run(["git", "rev-parse", "--short", spec], cwd=REPO, capture_output=True, text=True)
    if rev.returncode != 0:
        raise SystemExit(f"--baseline {spec}: not a folder, and git cannot resolve it: {rev.stderr.strip()}")
    folder = scratch / f"tree-{rev.stdout.strip()}"
    if not (folder / "cli").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.Popen(["git", "archive", spec], cwd=REPO, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(folder)], stdin=archive.stdout, check=True)
        archive.wait()
    return folder, rev.stdout.strip()


def this_revision() -> str:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc/PID/task/TID/children."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _anon_mb(pids: list[int]) -> float:
    """RssAnon summed over ``pids``, MiB."""
    total = 0.0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) / 1024 for line in lines if line.startswith("RssAnon:"))
    return total


def measure(argv: list[str], env: dict[str, str], logs: Path, timeout: float | None, processes: int) -> dict:
    """Run ``bench/child.py ARGV`` in a fresh process and return what it cost (module docstring)."""
    report, rusage = logs.with_suffix(".child.json"), logs.with_suffix(".time.txt")
    for stale in [report, *logs.parent.glob(report.name + ".*"), rusage]:
        stale.unlink(missing_ok=True)
    command = [sys.executable, str(CHILD), *argv]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    if TIME:
        command = [TIME, "-v", "-o", str(rusage), *command]
    peak_anon = [0.0]
    with open(logs.with_suffix(".out"), "wb") as out, open(logs.with_suffix(".err"), "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, env={**env, "BENCH_CHILD_REPORT": str(report)}, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        done, timed_out = threading.Event(), threading.Event()

        def watch() -> None:
            while not done.wait(0.1):
                pids = _process_tree(proc.pid)
                peak_anon[0] = max(peak_anon[0], _anon_mb(pids))
                if timeout and time.perf_counter() - start > timeout and not timed_out.is_set():
                    timed_out.set()
                    for pid in pids:  # torchrun's workers lead sessions of their own
                        try:
                            os.kill(pid, 9)
                        except ProcessLookupError:
                            pass

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
    row = {"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "timed_out": timed_out.is_set(),
           "peak_anon_mb": peak_anon[0] or None}
    text = rusage.read_text(errors="replace") if rusage.is_file() else ""
    if found := re.search(r"Maximum resident set size \(kbytes\): (\d+)", text):
        row.update(peak_rss_mb=int(found[1]) / 1024, rss_source="/usr/bin/time -v")
    else:  # per child: RUSAGE_CHILDREN would hold the largest of every row run so far
        row.update(peak_rss_mb=usage.ru_maxrss / 1024, rss_source="wait4 rusage (ru_maxrss)")
    reports = [report, *sorted(logs.parent.glob(report.name + ".*"))]
    children = [json.loads(path.read_text()) for path in reports if path.is_file()]
    if children:
        row["gpu_peak_reserved_mb"] = sum(c["gpu_peak_reserved_mb"] for c in children)
        row["gpu_peak_allocated_mb"] = sum(c["gpu_peak_allocated_mb"] for c in children)
        row["deltakit_file"] = next((c["deltakit_file"] for c in children if c["deltakit_file"]), None)
    return row


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_target(target: Target, run: Run, tree: tuple[str, Path, dict], truth: Truth, args, bandwidth: dict,
               peer: bool = False) -> dict:
    """One row: prepare (an adapter for merge / compare), measure, check, and the floor of its bytes."""
    label, folder, env = tree
    processes = 1 if peer else args.processes
    row = {"target": target.name, "label": target.label.format(rank=run.rank), "tree": label, "peer": peer,
           "processes": processes}
    if processes > 1:
        row["label"] += f" ({processes} processes, torchrun)"
    if peer and (reason := target.missing(run)):
        return {**row, "status": f"skipped: {reason}"}
    run.folder.mkdir(parents=True, exist_ok=True)
    if target.needs_adapter and not (run.out("adapter") / "adapter_config.json").is_file():
        log(f"[{label}] {target.name} needs an adapter: running extract first (untimed)")
        measure([str(a) for a in TARGETS["extract"].argv(run)], env, run.folder / "prepare-extract", None, 1)
        if not (run.out("adapter") / "adapter_config.json").is_file():
            return {**row, "status": "skipped: extract made no adapter"}
    output, argv = target.output(run), [str(a) for a in target.argv(run)]
    for flag, path in zip(argv, argv[1:]):  # what the command writes, so that it writes it anew
        if flag in ("-o", "--json", "--out-path"):
            shutil.rmtree(path, ignore_errors=True) if Path(path).is_dir() else Path(path).unlink(missing_ok=True)
    reads = weight_files(run.base) + (weight_files(run.ft) if target.reads_ft else []) + target.extra_reads(run)
    if args.cache == "cold":
        machine.drop_from_cache(reads)
    row.update(argv=shlex.join(argv), inputs_resident=machine.resident_fraction(reads))
    log(f"[{label}] {row['label']}: {row['argv']}")
    name = f"{slug(label)}-{target.name}{'-peer' if peer else ''}"
    row.update(measure(argv, env, run.folder / name, args.timeout, processes), log=str(run.folder / name))
    read_bytes = sum(p.stat().st_size for p in reads)
    write_bytes = tree_bytes(output) if output.exists() else 0
    floor = read_bytes / bandwidth["read"]["bytes_per_s"] + write_bytes / bandwidth["write"]["bytes_per_s"]
    row.update(read_bytes=read_bytes, write_bytes=write_bytes, floor_s=floor, wall_over_floor=row["wall_s"] / floor)
    if row["timed_out"]:
        row["status"] = f"timeout > {args.timeout:g} s"
    elif row["rc"] != 0 or not output.exists():
        tail = [x for x in (run.folder / f"{name}.err").read_text(errors="replace").splitlines() if x.strip()][-1:]
        row["status"] = f"failed (rc {row['rc']}): {tail[0] if tail else 'no output'}"
    elif not peer and not str(row.get("deltakit_file") or "").startswith(str(folder)):
        row["status"] = f"failed: deltakit was imported from {row.get('deltakit_file')}, not from {folder}"
    else:
        try:
            row["check"] = target.check(truth, run, output)
        except (KeyError, TypeError, ValueError, OSError, RuntimeError) as error:  # an output of another shape
            row["check"] = {"ok": False, "summary": f"could not check the output: {type(error).__name__}: {error}"}
        row["status"] = "ok" if row["check"]["ok"] else "check failed"
        log(f"[{label}] {target.name}: {row['status']}: {row['check']['summary']}")
    log(f"[{label}] {target.name}: {row['wall_s']:.2f} s (floor {row['floor_s']:.2f} s)")
    if output.is_dir() and "merged" in output.name and not args.keep_outputs:
        shutil.rmtree(output)  # as large as the model
    return row


def spectra_agree(adaptive: Path, full: Path) -> dict:
    """Per matrix, rank's report against --full-spectrum's: rank_at and signal_rank_at equal, stable rank
    within 1e-4 and effective rank within 1 % (relative)."""
    ours = {m["name"]: m for m in json.loads(adaptive.read_text())["matrices"]}
    counts = dict.fromkeys(("matrices", "rank_at", "signal_rank_at", "stable_rank", "effective_rank"), 0)
    worst = 0.0
    for ref in json.loads(full.read_text())["matrices"]:
        if (m := ours.get(ref["name"])) is None:
            continue
        relative = lambda key: abs(m[key] - ref[key]) / ref[key] if ref[key] else abs(m[key])  # noqa: E731
        counts["matrices"] += 1
        counts["rank_at"] += m["rank_at"] == ref["rank_at"]
        counts["signal_rank_at"] += m.get("signal_rank_at") == ref.get("signal_rank_at")
        counts["stable_rank"] += relative("stable_rank") <= 1e-4
        counts["effective_rank"] += relative("effective_rank") <= 0.01
        worst = max(worst, relative("effective_rank"))
    return {**counts, "effective_rank_worst": worst}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--target", type=lambda s: s.split(","), help=f"comma list of {', '.join(TARGETS)} "
                        "(default: the preset's)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--workdir", type=Path, help="where the pair and outputs go; a pair there is reused "
                        "(default: a temporary folder, removed)")
    parser.add_argument("--device", default="auto", help="passed to every command (auto|cpu|cuda)")
    parser.add_argument("--peers", action="store_true", help="add the peer rows (svdvals loop, mergekit, PEFT)")
    parser.add_argument("--baseline", metavar="REV|DIR", help="also run every target on this revision (before/after)")
    parser.add_argument("--processes", type=int, default=1, help="run deltakit under torchrun with N processes")
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm", help="page cache before each row")
    parser.add_argument("--timeout", type=float, help="kill a row after this many seconds")
    parser.add_argument("--check-sample", type=int, help="matrices each check reads (0: all; default: the preset's)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep merged models (as large as the base)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = set(args.target or ()) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target {', '.join(sorted(unknown))}; targets: {', '.join(TARGETS)}")
    return args


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench run " + shlex.join(sys.argv[2:] if argv is None else argv)
    preset = PRESETS[args.preset]
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="deltakit-bench-"))
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        log(f"pair: preset {args.preset} in {work / 'pair'}")
        pair = write_pair(work / "pair", preset, DeltaSpec(seed=args.seed), str(device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        base, ft = Path(pair["base"]), Path(pair["ft"])
        bandwidth = machine.bandwidth(weight_files(base) + weight_files(ft), work, args.cache)
        log(f"read {bandwidth['read']['bytes_per_s'] / 1e9:.2f} GB/s, "
            f"write {bandwidth['write']['bytes_per_s'] / 1e9:.2f} GB/s")
        revision = this_revision()
        trees = [("this tree", REPO, tree_env(REPO, work))]
        if args.baseline:
            folder, name = baseline_tree(args.baseline, work)
            trees = [(f"before: {name}", folder, tree_env(folder, work)), (f"after: {revision}", REPO, trees[0][2])]
            for _, folder, env in trees:  # each tree's bytecode written before its first row, as pip's install does
                subprocess.run([sys.executable, "-m", "compileall", "-q", str(folder / "deltakit"),
                                str(folder / "cli")], env=env, check=False, stdout=subprocess.DEVNULL)
        count = preset.sample if args.check_sample is None else args.check_sample
        truth = Truth(Checkpoint(base), Checkpoint(ft), count, device)
        calibration = write_calibration(work / "pair", preset, args.seed) if not preset.tall_rows else None
        runs = {label: Run(work / "runs" / slug(label), base, ft, preset.extract_rank, args.device, calibration)
                for label, _, _ in trees}
        result = {"command": command, "revision": revision, "preset": args.preset, "device": args.device,
                  "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine.describe(), "pair": pair, "bandwidth": bandwidth, "rows": []}
        for name in args.target or preset.targets:
            jobs = [(TARGETS[name], tree, False) for tree in trees]
            jobs += [(PEERS[name], trees[-1], True)] if args.peers and name in PEERS else []
            for target, tree, peer in jobs:
                result["rows"].append(run_target(target, runs[tree[0]], tree, truth, args, bandwidth, peer))
                write_results(args.out, result)
        for label, run in runs.items():  # adaptive against full, where both ran
            done = {r["target"]: r for r in result["rows"]
                    if r["tree"] == label and not r["peer"] and r["status"] == "ok"}
            if "rank" in done and "rank-full" in done:
                done["rank"]["agreement_with_full"] = spectra_agree(run.out("rank.json"), run.out("rank-full.json"))
        write_results(args.out, result)
        print(markdown(result))
        return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in result["rows"]) else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def write_results(out: Path, result: dict) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(result))


def _num(value, pattern: str = "{:.2f}") -> str:
    return pattern.format(value) if isinstance(value, (int, float)) else "—"


def _gb(mb) -> str:
    return _num(mb / 1024 if isinstance(mb, (int, float)) else None)


def markdown(result: dict) -> str:
    """The table of a run, with the command, machine, pair and bandwidth it was measured with."""
    m, pair, read, write = result["machine"], result["pair"], *result["bandwidth"].values()
    rows = result["rows"]
    lines = [f"# deltakit bench: preset {result['preset']}, {result['timestamp']}", "",
             f"Command: `{result['command']}` at {result['revision']}", "",
             f"Machine: {', '.join(m.get('gpus') or ['no GPU'])}; {m.get('cpus')} × {m.get('cpu')}; "
             f"{m.get('memory_gb')} GB; torch {m.get('torch')}, CUDA {m.get('cuda')}", "",
             f"Pair: {pair['bytes']['base'] / 1e9:.2f} + {pair['bytes']['ft'] / 1e9:.2f} GB in "
             f"{len(pair['files']['base'])} + {len(pair['files']['ft'])} files; largest tensor in fp32 "
             f"{pair['largest_fp32_bytes'] / 2**30:.2f} GiB. Read {read['bytes_per_s'] / 1e9:.2f} GB/s (one stream, "
             f"{_num(read['resident_before'], '{:.0%}')} resident before), write {write['bytes_per_s'] / 1e9:.2f} "
             "GB/s buffered; floor = bytes read ÷ read + bytes written ÷ write.", "",
             "| target | tree | status | wall s | floor s | wall/floor | peak RSS GiB (anon) "
             "| RSS ÷ largest fp32 tensor | peak GPU GiB | vs deltakit | check |", "|" + " --- |" * 11]
    for row in rows:
        own = next((r for r in rows if r["target"] == row["target"] and r["tree"] == row["tree"] and not r["peer"]), {})
        ok = row["status"] == own.get("status") == "ok"
        rss = row.get("peak_rss_mb")
        cells = [row["label"] + (" (peer)" if row["peer"] else ""), row["tree"], row["status"], _num(row.get("wall_s")),
                 _num(row.get("floor_s")), _num(row.get("wall_over_floor"), "{:.1f}"),
                 f"{_gb(rss)} ({_gb(row.get('peak_anon_mb'))})",
                 _num(rss and rss * 2**20 / pair["largest_fp32_bytes"]), _gb(row.get("gpu_peak_reserved_mb")),
                 f"{row['wall_s'] / own['wall_s']:.1f}× slower" if row["peer"] and ok else "",
                 row.get("check", {}).get("summary", "")]
        lines.append("| " + " | ".join(cells) + " |")
    sources = sorted({r["rss_source"] for r in rows if "rss_source" in r})
    lines += ["", f"Peak RSS from {', '.join(sources) or '—'}; anon: RssAnon of the process and its children, "
              "sampled every 0.1 s; GPU: torch.cuda.max_memory_reserved at the child's exit."]
    for row in rows:
        if agree := row.get("agreement_with_full"):
            lines.append(f"rank against --full-spectrum ({row['tree']}), {agree['matrices']} matrices: rank_at equal "
                         f"on {agree['rank_at']}, signal_rank_at on {agree['signal_rank_at']}, stable rank to 1e-4 on "
                         f"{agree['stable_rank']}, effective rank within 1 % on {agree['effective_rank']} (worst "
                         f"{agree['effective_rank_worst']:.2%}).")
    trees = list(dict.fromkeys(r["tree"] for r in rows))
    if len(trees) == 2:
        lines += ["", f"| target | {trees[0]} s | {trees[1]} s | after ÷ before | peak GPU GiB before → after |",
                  "| --- | --- | --- | --- | --- |"]
        for name in dict.fromkeys(r["target"] for r in rows):
            before, after = (next((r for r in rows if r["target"] == name and r["tree"] == tree and not r["peer"]), {})
                             for tree in trees)
            ratio = after["wall_s"] / before["wall_s"] if "wall_s" in before and "wall_s" in after else None
            lines.append(f"| {name} | {_num(before.get('wall_s'))} | {_num(after.get('wall_s'))} | {_num(ratio)} "
                         f"| {_gb(before.get('gpu_peak_reserved_mb'))} → {_gb(after.get('gpu_peak_reserved_mb'))} |")
    return "\n".join(lines) + "\n"
