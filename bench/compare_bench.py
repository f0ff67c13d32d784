"""Is `deltakit compare` on two fine-tunes within 1.5× of `deltakit rank` on one pair?

Makes (or reuses) a synthetic Llama-shaped base and two fine-tunes of it (bench/synth.py: the
first is synth's own pair; the second adds a ΔW drawn with another seed to the same base), then,
in one warm process, times ``rank(base, ft_a)`` and ``compare(base, [ft_a, ft_b])`` alternately,
``--repeats`` times each after one untimed pass of each (which fills the page cache and
compiles the GPU kernels). compare reads three models where rank reads two, so with reads from
the page cache its floor is about 1.5× rank's reading time.

    python -m bench.compare_bench --preset tiny --device cpu --workdir /tmp/dk-cmp --out /tmp/dk-cmp-results
    python -m bench.compare_bench --preset 7b --device cuda --workdir /scratch/dk-cmp --out bench/measured/NEW

Writes ``compare_bench.json`` into ``--out``: the machine, the settings, every timing, the
medians and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe  # noqa: E402
from bench.synth import (  # noqa: E402
    DeltaSpec, PRESETS, default_shard_bytes, llama_config, llama_layout, make_delta, write_pair,
)
from deltakit.analysis import rank  # noqa: E402
from deltakit.compare import compare  # noqa: E402
from deltakit.io import ShardedWriter, open_checkpoint  # noqa: E402
from deltakit.spectral.options import SpectralOptions  # noqa: E402

TARGET_RATIO = 1.5


def write_second_ft(workdir: Path, preset: str, delta: DeltaSpec, device: str = "cpu") -> Path:
    """``workdir/ft_b``: the base of ``workdir/base`` plus a ΔW of the same kind from another seed."""
    folder = workdir / "ft_b"
    marker = folder / "bench_second_ft.json"
    spec = {"preset": preset, "delta": dataclasses.asdict(delta)}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder
    shape = PRESETS[preset]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config(shape), indent=2) + "\n")
    layout = llama_layout(shape)
    writer = ShardedWriter(folder, [(n, d, torch.bfloat16) for n, d in layout], max_shard_bytes=default_shard_bytes(shape))
    base = open_checkpoint(workdir / "base")
    gen = torch.Generator(device=device)
    for index, (name, dims) in enumerate(layout):
        gen.manual_seed(delta.seed * 1_000_003 + index)
        weight = base.get(name).to(device, torch.float32)
        tuned = weight + (make_delta(weight, delta, gen) if len(dims) == 2 else 0.0)
        writer.write(name, tuned.to(torch.bfloat16))
    writer.finish()
    marker.write_text(json.dumps(spec) + "\n")
    return folder


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--workdir", type=Path, required=True, help="where the three models are written (reused)")
    parser.add_argument("--out", type=Path, required=True, help="folder for compare_bench.json")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, action="append", help="compare's --top (default 1, 8, 64)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    made = time.perf_counter()
    write_pair(args.workdir, PRESETS[args.preset], DeltaSpec(seed=0), args.device, log=log)
    generator_device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    ft_b = write_second_ft(args.workdir, args.preset, DeltaSpec(seed=1), generator_device)
    made = time.perf_counter() - made
    base, ft_a = args.workdir / "base", args.workdir / "ft"
    options = SpectralOptions(device=args.device)
    top = tuple(args.top or (1, 8, 64))
    run_rank = lambda: rank(base, ft_a, options=options)  # noqa: E731
    run_compare = lambda: compare(base, [ft_a, ft_b], top=top, options=options)  # noqa: E731
    log("warm-up: one untimed pass of each")
    run_rank()
    report = run_compare()
    times: dict[str, list[float]] = {"rank": [], "compare": []}
    for repeat in range(args.repeats):
        times["rank"].append(timed(run_rank))
        times["compare"].append(timed(run_compare))
        log(f"repeat {repeat + 1}: rank {times['rank'][-1]:.2f} s, compare {times['compare'][-1]:.2f} s")
    medians = {key: statistics.median(values) for key, values in times.items()}
    result = {
        "bench": "compare_bench", "preset": args.preset, "shape": dataclasses.asdict(PRESETS[args.preset]),
        "device": report.device, "top": list(top), "repeats": args.repeats, "seconds_making_models": round(made, 1),
        "machine": describe(), "rank_seconds": times["rank"], "compare_seconds": times["compare"],
        "rank_median_s": medians["rank"], "compare_median_s": medians["compare"],
        "ratio": medians["compare"] / medians["rank"] if medians["rank"] > 0 else None,
        "target_ratio": TARGET_RATIO, "matrices_compared": report.summary()["matrices"],
        "mean_overlap_at": report.summary()["pairs"][0]["mean_overlap_at"],
    }
    result["within_target"] = result["ratio"] is not None and result["ratio"] <= TARGET_RATIO
    (args.out / "compare_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("preset", "device", "rank_median_s", "compare_median_s", "ratio")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
