"""How close is a torchrun run to a one-process run on the CPU? The figures in docs/guide.md, "Several GPUs".

Runs rank, extract (--rank 4, --budget 20000), merge and intruders --scale 0 on the demo pair
three times — one process with its default threads (A), one process with OMP_NUM_THREADS=1 (B),
torchrun with 2 gloo processes (C) — and prints, for B vs C and A vs C, per JSON report the
integers that differ and the worst relative float difference per field, and per written file
whether the bytes match (else how many tensor elements differ, and by how much).

Run: python -m bench.torchrun_compare --workdir /tmp/dk-torchrun
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SKIP_KEYS = {"elapsed_s", "adapter", "out", "output", "model"}


def commands(pair: Path, out: Path) -> list[list[str]]:
    base, ft = str(pair / "base"), str(pair / "ft")
    return [
        ["rank", base, ft, "-q", "--device", "cpu", "-e", "0.5", "-e", "0.9", "--json", f"{out}/rank.json"],
        ["extract", base, ft, "-o", f"{out}/adapter", "--rank", "4", "--device", "cpu", "-q",
         "--json", f"{out}/extract.json"],
        ["extract", base, ft, "-o", f"{out}/budget", "--budget", "20000", "--device", "cpu", "-q",
         "--json", f"{out}/budget.json"],
        ["merge", base, f"{out}/adapter", "-o", f"{out}/merged", "--device", "cpu", "-q"],
        ["intruders", base, ft, "--device", "cpu", "-q", "--scale", "0", "-o", f"{out}/scaled",
         "--json", f"{out}/intruders.json"],
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_all(pair: Path, out: Path, launcher: list[str], env: dict[str, str]) -> None:
    out.mkdir(parents=True)
    for args in commands(pair, out):
        launch = [*launcher, "--master_port", str(free_port())] if "torch.distributed.run" in launcher else launcher
        subprocess.run([*launch, "-m", "deltakit_cli.main", *args], env=env, check=True)


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


def compare(one: Path, two: Path) -> dict:
    from safetensors.torch import load_file

    result: dict = {"reports": {}, "files": {}}
    for report in sorted(p.name for p in one.glob("*.json")):
        floats: dict[str, float] = {}
        other: list[str] = []
        float_differences(json.loads((one / report).read_text()), json.loads((two / report).read_text()),
                          report, floats, other)
        result["reports"][report] = {"non_float_differences": other[:5],
                                     "worst_relative": {k.removeprefix(report + "."): float(f"{v:.2g}")
                                                        for k, v in sorted(floats.items(), key=lambda kv: -kv[1])}}
    for path in sorted(p for p in one.rglob("*") if p.is_file() and p.parent != one):
        name = str(path.relative_to(one))
        other_path = two / name
        if path.read_bytes() == other_path.read_bytes():
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="A new folder for the pair and the outputs.")
    args = parser.parse_args()
    from deltakit.demo import write_demo_pair

    pair = args.workdir / "pair"
    write_demo_pair(pair)
    default_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run_all(pair, args.workdir / "A", [sys.executable], default_env)
    run_all(pair, args.workdir / "B", [sys.executable], {**default_env, "OMP_NUM_THREADS": "1"})
    run_all(pair, args.workdir / "C", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
            default_env)
    for label, one in (("one process, OMP_NUM_THREADS=1 vs torchrun 2", "B"),
                       ("one process, default threads vs torchrun 2", "A")):
        print(json.dumps({"comparison": label, **compare(args.workdir / one, args.workdir / "C")}, indent=1))


if __name__ == "__main__":
    main()
