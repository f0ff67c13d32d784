"""How close is a torchrun run to a one-process run, and how much faster? docs/guide.md, "Several GPUs".

On the CPU (the default): the demo pair, each command run three times — one process with its
default threads (A), one process with OMP_NUM_THREADS=1 (B), torchrun with 2 gloo processes
(C) — then, for B vs C and A vs C, per JSON report the integers that differ and the worst
relative float difference per field, and per written file whether the bytes match (else how
many tensor elements differ, and by how much).

On GPUs (``--pair DIR --processes N``: N GPUs, NCCL): an existing pair (``--pair``, e.g. the
bench's 7B pair), each command once in one process (A) and once under torchrun (C), timed;
the outputs of both are compared as above and then deleted, so a 7B pair's merged copies never
pile up on the disk. The commands are rank, extract (--rank, --budget), merge, intruders
--scale 0, compare (base, ft and A's extracted adapter) and merge of a DoRA adapter
(bench.adapter_bench.write_adapters).

    python -m bench.torchrun_compare --workdir /tmp/dk-torchrun
    python -m bench.torchrun_compare --workdir /tmp/dk-x2 --pair /tmp/dk-bench --processes 2 \\
        --rank 64 --budget 50000000 --out results/x2

Each command's wall time includes its interpreter's start and torch's import (and, under
torchrun, the rendezvous and NCCL's start); ``elapsed_s`` is the command's own figure from its
JSON report (process 0's), so wall − elapsed is what starting costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SKIP_KEYS = {"elapsed_s", "adapter", "adapters", "out", "output", "model", "models", "fts", "ft", "base"}
OPS = ("rank", "extract", "extract-budget", "merge", "intruders", "compare", "dora-merge")


def commands(base: Path, ft: Path, out: Path, device: str, rank: int, budget: int,
             adapter: Path, dora: Path | None) -> dict[str, list[str]]:
    """Each operation's deltakit arguments; ``adapter`` is the one merge and compare read (A's)."""
    common = ["--device", device, "-q"]
    found = {
        "rank": ["rank", base, ft, *common, "-e", "0.5", "-e", "0.9", "--json", out / "rank.json"],
        "extract": ["extract", base, ft, "-o", out / "adapter", "--rank", rank, *common, "--json", out / "extract.json"],
        "extract-budget": ["extract", base, ft, "-o", out / "budget", "--budget", budget, *common,
                           "--json", out / "budget.json"],
        "merge": ["merge", base, adapter, "-o", out / "merged", *common, "--json", out / "merge.json"],
        "intruders": ["intruders", base, ft, *common, "--scale", "0", "-o", out / "scaled",
                      "--json", out / "intruders.json"],
        "compare": ["compare", base, ft, adapter, *common, "--json", out / "compare.json"],
    }
    if dora is not None:
        found["dora-merge"] = ["merge", base, dora, "-o", out / "dora-merged", *common,
                               "--json", out / "dora-merge.json"]
    return {op: [str(a) for a in args] for op, args in found.items()}


def launcher(processes: int) -> list[str]:
    """One interpreter, or torchrun with ``processes`` workers (--standalone: its store binds a free port itself)."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def run_one(args: list[str], processes: int, env: dict[str, str], check: bool = True) -> tuple[float, int]:
    """Run ``deltakit ARGS`` (under torchrun when ``processes`` > 1) to completion; its wall time and exit status."""
    start = time.perf_counter()
    done = subprocess.run([*launcher(processes), "-m", "deltakit_cli.main", *args], env=env, check=check)
    return time.perf_counter() - start, done.returncode


def float_differences(a, b, path: str, found: dict[str, float], other: list[str]) -> None:
    if isinstance(a, dict):
        for key in a.keys() - SKIP_KEYS:
            float_differences(a[key], b.get(key), f"{path}.{key}", found, other)
    elif isinstance(a, list):
        if len(a) != len(b):
            other.append(f"{path}: length {len(a)} vs {len(b)}")
            return
        for x, y in zip(a, b):
            float_differences(x, y, f"{path}[]", found, other)
    elif isinstance(a, float) or isinstance(b, float):
        if a != b:
            rel = abs(a - b) / max(abs(a), abs(b), 1e-30)
            found[path] = max(found.get(path, 0.0), rel)
    elif a != b:
        other.append(f"{path}: {a!r} vs {b!r}")


def same_bytes(a: Path, b: Path, chunk: int = 64 << 20) -> bool:
    """Whether two files hold the same bytes, read in pieces (merged 7B shards are GBs)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def compare(one: Path, two: Path) -> dict:
    """Reports (JSON files directly in the folders) and written files (in their subfolders) of two runs."""
    from safetensors.torch import load_file

    result: dict = {"reports": {}, "files": {}}
    for report in sorted(p.name for p in one.glob("*.json")):
        floats: dict[str, float] = {}
        other: list[str] = []
        float_differences(json.loads((one / report).read_text()), json.loads((two / report).read_text()),
                          report, floats, other)
        result["reports"][report] = {"non_float_differences": other[:5],
                                     "worst_relative": {k.removeprefix(report + "."): float(f"{v:.2g}")
                                                        for k, v in sorted(floats.items(), key=lambda kv: -kv[1])[:8]}}
    for path in sorted(p for p in one.rglob("*") if p.is_file() and p.parent != one):
        name = str(path.relative_to(one))
        other_path = two / name
        if not other_path.is_file():
            result["files"][name] = "missing in the second run"
        elif same_bytes(path, other_path):
            result["files"][name] = "same bytes"
        elif path.suffix == ".safetensors":
            a, b = load_file(str(path)), load_file(str(other_path))
            differ = sum(int((a[k] != b[k]).sum()) for k in a)
            total = sum(a[k].numel() for k in a)
            worst = max(((a[k].double() - b[k].double()).abs().max()
                         / a[k].double().abs().max().clamp_min(1e-30)).item() for k in a)
            result["files"][name] = f"{differ} of {total} elements differ; worst max|Δ|/max|W| {worst:.2e}"
        else:
            result["files"][name] = "bytes differ"
    return result


def verdict(result: dict) -> str:
    """'identical' when every report and file matched exactly, else 'differs'."""
    reports = result["reports"].values()
    exact = all(not r["non_float_differences"] and not r["worst_relative"] for r in reports)
    files = all(v == "same bytes" for v in result["files"].values())
    return "identical" if exact and files else "differs"


def elapsed(folder: Path) -> float | None:
    """The command's own elapsed_s, from the one JSON report in ``folder``."""
    for report in folder.glob("*.json"):
        value = json.loads(report.read_text()).get("elapsed_s")
        if value is not None:
            return round(float(value), 2)
    return None


def cpu_comparison(workdir: Path) -> list[dict]:
    """A, B, C on the demo pair (see the module's docstring)."""
    from deltakit.demo import write_demo_pair

    base, ft = write_demo_pair(workdir / "pair")
    default_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    runs = {"A": (default_env, 1), "B": ({**default_env, "OMP_NUM_THREADS": "1"}, 1), "C": (default_env, 2)}
    for label, (env, processes) in runs.items():
        out = workdir / label
        out.mkdir(parents=True)
        for args in commands(base, ft, out, "cpu", 4, 20000, workdir / "A" / "adapter", None).values():
            run_one(args, processes, env)  # every operation but the DoRA merge: no DoRA adapter here
    return [{"comparison": label, **compare(workdir / one, workdir / "C")}
            for label, one in (("one process, OMP_NUM_THREADS=1 vs torchrun 2", "B"),
                               ("one process, default threads vs torchrun 2", "A"))]


def pair_comparison(args: argparse.Namespace) -> list[dict]:
    """Each operation on ``--pair`` in one process and under torchrun, timed and compared; outputs removed after."""
    from bench.adapter_bench import write_adapters

    base, ft = args.pair / "base", args.pair / "ft"
    dora = write_adapters(base, args.workdir / "adapters", 16)["dora"] if "dora-merge" in args.ops else None
    env = dict(os.environ)
    results = []
    for op in args.ops:
        folders = {n: args.workdir / f"{op}-x{n}" for n in (1, args.processes)}
        entry: dict = {"op": op}
        for n, out in folders.items():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            found = commands(base, ft, out, args.device, args.rank, args.budget,
                             args.workdir / "extract-x1" / "adapter", dora)
            wall, code = run_one(found[op], n, env, check=False)
            entry[f"x{n}"] = {"wall_s": round(wall, 2), "elapsed_s": elapsed(out), "rc": code}
        if all(entry[f"x{n}"]["rc"] == 0 for n in folders):
            entry["speedup"] = round(entry["x1"]["wall_s"] / entry[f"x{args.processes}"]["wall_s"], 3)
            entry.update(compare(folders[1], folders[args.processes]))
            entry["verdict"] = verdict(entry)
        else:
            entry["speedup"], entry["verdict"] = None, "failed"
        print(json.dumps({k: entry[k] for k in ("op", "x1", f"x{args.processes}", "speedup", "verdict")}), flush=True)
        results.append(entry)
        for n, out in folders.items():
            if not (op == "extract" and n == 1):  # merge and compare read A's adapter
                shutil.rmtree(out, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="A new folder for the outputs (and the demo pair).")
    parser.add_argument("--pair", type=Path, help="An existing pair (PAIR/base, PAIR/ft): timed, one process vs "
                        "--processes, on --device (without it: the demo pair, on the CPU, three ways)")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="with --pair")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64, help="extract's --rank on GPUs")
    parser.add_argument("--budget", type=int, default=50_000_000, help="extract's --budget on GPUs")
    parser.add_argument("--ops", type=lambda s: [o for o in s.split(",") if o], default=list(OPS),
                        help=f"comma-separated, in order, from {', '.join(OPS)} (merge and compare need extract)")
    parser.add_argument("--out", type=Path, help="Also write the results here as torchrun_compare.json.")
    args = parser.parse_args()
    unknown = [o for o in args.ops if o not in OPS]
    if unknown:
        parser.error(f"unknown --ops {unknown}; choose from {', '.join(OPS)}")
    if args.pair and not all((args.pair / side).is_dir() for side in ("base", "ft")):
        parser.error(f"--pair {args.pair}: needs the folders base/ and ft/ in it (bench.synth writes them)")
    reader = next((i for i, op in enumerate(args.ops) if op in ("merge", "compare")), None)  # reads A's adapter
    if (args.pair and reader is not None and "extract" not in args.ops[:reader]
            and not (args.workdir / "extract-x1" / "adapter").is_dir()):
        parser.error(f"--ops {args.ops[reader]} reads the adapter extract writes: put extract before them")
    if not args.pair and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty: the demo pair and three runs need a new folder")
    if args.processes < 2:
        parser.error("--processes must be 2 or more: one process is what torchrun is compared with")
    results = pair_comparison(args) if args.pair else cpu_comparison(args.workdir)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "torchrun_compare.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
