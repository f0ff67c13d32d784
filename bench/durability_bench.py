"""What durability costs: outputs fsynced before the rename that publishes them, or not.

deltakit fsyncs every output file and folder before renaming the output into place, and the
parent folder after (see deltakit/io/atomic.py); ``DELTAKIT_FSYNC=0`` turns that off. This
script measures both ways, alternating the order, in two settings:

- ``merge``: `deltakit merge` of a synthetic model and a LoRA adapter (the library call the
  command makes, in this process, so interpreter start-up does not blur the difference);
- ``write``: the write path alone, in this process (the model's tensors from memory through
  atomic_directory + ShardedWriter + BackgroundWriter, as merge writes them): nothing to hide
  the write-back behind, the worst case for fsync's share.

After each run it times a sync of the output's file system (syncfs): without fsync the output's
bytes may still be in the page cache when the command returns, and that sync is the write-back
it left behind (the time until the output would survive a crash). It also sums the time spent
inside deltakit's fsync calls, which does not depend on how busy the rest of the machine is. The model is a synthetic
Llama-shaped base (bench/synth.py shapes, bf16, N(0, 0.02)) and a random rank-``--rank`` LoRA
on q/k/v/o/gate/up/down, written once into ``--workdir`` and reused; they are read once before
the runs so that every run finds its inputs in the page cache. Results go to
``--out``/durability.json, and a table to stdout.

    python bench/durability_bench.py --preset tiny --device cpu --out /tmp/dk-durability-out   # any machine
    python bench/durability_bench.py --preset 7b --device auto --workdir /tmp/dk-durability --out OUT --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import machine, synth  # noqa: E402
from bench.lora_files import write_adapter  # noqa: E402
from deltakit.io import ShardedWriter  # noqa: E402

SPEC_FILE = "durability_inputs.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_inputs(workdir: Path, shape: synth.ModelShape, rank: int, device: str, log=print) -> dict[str, object]:
    """``workdir/base`` (sharded like a published model) and ``workdir/adapter``; reused when already there."""
    spec = {"shape": dataclasses.asdict(shape), "rank": rank, "shard_bytes": synth.default_shard_bytes(shape)}
    if (workdir / SPEC_FILE).is_file() and json.loads((workdir / SPEC_FILE).read_text()) == spec:
        log(f"reusing the inputs already in {workdir}")
        return spec
    for old in ("base", "adapter"):
        shutil.rmtree(workdir / old, ignore_errors=True)
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    layout = synth.llama_layout(shape)
    base = workdir / "base"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps(synth.llama_config(shape), indent=2) + "\n")
    writer = ShardedWriter(base, [(n, d, torch.bfloat16) for n, d in layout], max_shard_bytes=spec["shard_bytes"])
    generator = torch.Generator(device=dev)
    factors: dict[str, torch.Tensor] = {}
    for index, (name, dims) in enumerate(layout):
        generator.manual_seed(index)
        weight = (torch.ones(dims, device=dev) if len(dims) == 1
                  else torch.randn(dims, generator=generator, device=dev) * 0.02)
        writer.write(name, weight.to(torch.bfloat16))
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out_features, in_features = dims
            key = f"base_model.model.{module}"
            factors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator, device=dev)
                                               / in_features ** 0.5).to(torch.bfloat16).cpu()
            factors[f"{key}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator, device=dev)
                                               * 1e-3).to(torch.bfloat16).cpu()
    writer.finish()
    write_adapter(workdir / "adapter", factors, rank, list(TARGETS), str(base))
    (workdir / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return spec


def read_all(paths: list[Path]) -> None:
    """Read every file once, so that each run finds its inputs in the page cache."""
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.read(machine.CHUNK_BYTES):
                pass


def timed_sync(folder: Path) -> float:
    """Seconds to write back everything dirty on the file system holding ``folder`` (syncfs; sync where absent)."""
    start = time.perf_counter()
    try:
        import ctypes

        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
        fd = os.open(folder, os.O_RDONLY)
        try:
            if syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        os.sync()
    return time.perf_counter() - start


@contextlib.contextmanager
def fsync_env(fsync: bool) -> Iterator[list[float]]:
    """Set DELTAKIT_FSYNC for the block; yield a list that collects the seconds of every fsync deltakit makes.

    The sum is an upper bound on what fsync adds to the wall time: calls made by writer threads
    overlap the rest of the work, the ones at publication do not.
    """
    import deltakit.io.atomic as atomic
    import deltakit.io.writer as writer

    seconds: list[float] = []
    real = atomic.fsync_path

    def timed(path: str | os.PathLike) -> None:
        start = time.perf_counter()
        try:
            real(path)
        finally:
            seconds.append(time.perf_counter() - start)

    previous = os.environ.get("DELTAKIT_FSYNC")
    os.environ["DELTAKIT_FSYNC"] = "1" if fsync else "0"
    atomic.fsync_path = writer.fsync_path = timed
    try:
        yield seconds
    finally:
        atomic.fsync_path = writer.fsync_path = real
        if previous is None:
            os.environ.pop("DELTAKIT_FSYNC", None)
        else:
            os.environ["DELTAKIT_FSYNC"] = previous


def run_merge(workdir: Path, out: Path, device: str, fsync: bool) -> dict[str, object]:
    """One `deltakit merge` (the library call the command makes, in this process): wall time, time in
    fsync, and the write-back left behind (a sync of the file system right after)."""
    from deltakit.lora import merge

    shutil.rmtree(out, ignore_errors=True)
    sync_before = timed_sync(workdir)  # start from a clean state: no earlier run's write-back pending
    with fsync_env(fsync) as fsyncs:
        start = time.perf_counter()
        merge(workdir / "base", workdir / "adapter", out, device=device)
        wall = time.perf_counter() - start
    sync_after = timed_sync(workdir)
    written = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    shutil.rmtree(out)
    return {"fsync": fsync, "wall_s": wall, "fsync_s": sum(fsyncs), "fsync_calls": len(fsyncs),
            "sync_after_s": sync_after, "durable_s": wall + (0.0 if fsync else sync_after),
            "sync_before_s": sync_before, "written_bytes": written}


def run_write(workdir: Path, layout: list[tuple[str, tuple[int, ...]]], shard_bytes: int, fsync: bool) -> dict[str, object]:
    """The write path alone, in this process: the model's layout written from memory through
    atomic_directory + ShardedWriter + BackgroundWriter, as merge writes it, with no reads or
    arithmetic to hide the write-back behind: the worst case for fsync's share of the time."""
    from deltakit.io import atomic_directory
    from deltakit.io.writer import IO_THREADS, BackgroundWriter

    out = workdir / "written"
    shutil.rmtree(out, ignore_errors=True)
    largest = max(_numel(dims) for _, dims in layout)
    pool = torch.randn(largest, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    sync_before = timed_sync(workdir)
    with fsync_env(fsync) as fsyncs:
        start = time.perf_counter()
        with atomic_directory(out) as tmp:
            sharded = ShardedWriter(tmp, [(n, d, torch.bfloat16) for n, d in layout], max_shard_bytes=shard_bytes)
            background = BackgroundWriter(sharded, depth=IO_THREADS, workers=IO_THREADS)
            shapes = dict(layout)
            for name in sharded.interleaved([n for n, _ in layout]):
                background.write(name, pool[:_numel(shapes[name])].view(shapes[name]))
            background.finish()
        wall = time.perf_counter() - start
    sync_after = timed_sync(workdir)
    written = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out)
    return {"fsync": fsync, "wall_s": wall, "fsync_s": sum(fsyncs), "fsync_calls": len(fsyncs),
            "sync_after_s": sync_after, "durable_s": wall + (0.0 if fsync else sync_after),
            "sync_before_s": sync_before, "written_bytes": written}


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def filesystem_of(path: Path) -> dict[str, object]:
    """The mount holding ``path`` (device, type, options) from /proc/mounts; empty where there is none."""
    best: dict[str, object] = {}
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    resolved = str(path.resolve())
    for line in mounts:
        device, mount_point, fs_type, options = line.split()[:4]
        if (resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")) and \
                len(mount_point) >= len(str(best.get("mount_point", ""))):
            best = {"device": device, "mount_point": mount_point, "type": fs_type, "options": options}
    return best


def vm_writeback_settings() -> dict[str, str]:
    """The kernel's dirty-page limits: how much a run without fsync can leave unwritten."""
    values = {}
    for name in ("dirty_ratio", "dirty_background_ratio", "dirty_bytes", "dirty_background_bytes",
                 "dirty_expire_centisecs"):
        try:
            values[name] = Path(f"/proc/sys/vm/{name}").read_text().strip()
        except OSError:
            pass
    return values


def summarise(runs: list[dict[str, object]]) -> dict[str, object]:
    """Medians per mode, and the cost of fsync in wall time (on − off)."""
    def median(fsync: bool, key: str) -> float | None:
        values = [float(r[key]) for r in runs if r["fsync"] is fsync and r.get(key) is not None]
        return statistics.median(values) if values else None

    summary: dict[str, object] = {}
    for key in ("wall_s", "fsync_s", "sync_after_s", "durable_s"):
        on, off = median(True, key), median(False, key)
        if on is None or off is None:
            continue
        summary[key] = {"fsync": on, "no_fsync": off}
        if key == "wall_s":
            summary[key].update(cost_s=on - off, cost_fraction=(on - off) / off if off > 0 else None)
    return summary


def _table(kind: str, runs: list[dict[str, object]], summary: dict[str, object]) -> str:
    written = int(runs[0]["written_bytes"])
    wall = summary["wall_s"]
    lines = [f"{kind}: {written / 1e9:.2f} GB written, median of {sum(r['fsync'] for r in runs)} runs per mode",
             "| fsync | wall (s) | in fsync calls (s) | sync after (s) |", "| --- | --- | --- | --- |"]
    for label, mode in (("on (default)", "fsync"), ("off (DELTAKIT_FSYNC=0)", "no_fsync")):
        lines.append(f"| {label} | {wall[mode]:.2f} | {summary['fsync_s'][mode]:.2f} | "
                     f"{summary['sync_after_s'][mode]:.2f} |")
    lines.append(f"cost of fsync: {wall['cost_s']:+.2f} s ({100 * (wall['cost_fraction'] or 0):+.1f}%) in wall time; "
                 f"{summary['fsync_s']['fsync']:.2f} s inside fsync calls")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/durability_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(synth.PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of the adapter")
    parser.add_argument("--device", default="auto", help="merge device: auto, cpu, cuda")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (alternating order)")
    parser.add_argument("--only", choices=("both", "write", "merge"), default="both",
                        help="the write path alone (in this process), the merge command, or both")
    parser.add_argument("--workdir", type=Path, default=None, help="inputs and outputs (default: --out/work)")
    parser.add_argument("--out", type=Path, required=True, help="folder for durability.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    shape = synth.PRESETS[args.preset]
    if args.layers:
        shape = dataclasses.replace(shape, layers=args.layers)
    workdir = args.workdir or args.out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    spec: dict[str, object] = {"shape": dataclasses.asdict(shape), "shard_bytes": synth.default_shard_bytes(shape)}
    if args.only != "write":
        spec = write_inputs(workdir, shape, args.rank, args.device, log)
        read_all(sorted((workdir / "base").iterdir()) + sorted((workdir / "adapter").iterdir()))
    layout = synth.llama_layout(shape)
    runs: dict[str, list[dict[str, object]]] = {"write": [], "merge": []}
    if args.only != "write":  # untimed: the first merge in a process also pays for imports and first-use set-up
        run_merge(workdir, workdir / "merged", args.device, False)
    for repeat in range(args.repeats):
        for fsync in ((True, False) if repeat % 2 == 0 else (False, True)):
            for kind in ("write", "merge") if args.only == "both" else (args.only,):
                run = (run_write(workdir, layout, int(spec["shard_bytes"]), fsync) if kind == "write"
                       else run_merge(workdir, workdir / "merged", args.device, fsync))
                run["repeat"] = repeat
                runs[kind].append(run)
                log(f"{kind} repeat {repeat} fsync={'on ' if fsync else 'off'}: wall {run['wall_s']:.2f} s, "
                    f"sync after {run['sync_after_s']:.2f} s")
    runs = {kind: rows for kind, rows in runs.items() if rows}
    result = {
        "bench": "durability", "preset": args.preset, "shape": dataclasses.asdict(shape), "rank": args.rank,
        "device": args.device, "repeats": args.repeats, "inputs": spec,
        "filesystem": filesystem_of(workdir), "vm": vm_writeback_settings(), "machine": machine.describe(),
        "write_probe": machine.write_bandwidth(workdir, min(sum(_numel(d) for _, d in layout) * 2, 4 * 1024**3)),
        "runs": runs, "summary": {kind: summarise(rows) for kind, rows in runs.items()}, "command": " ".join(sys.argv),
    }
    (args.out / "durability.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.preset} ({shape.layers} layers), {args.device}, file system {result['filesystem'].get('type')}")
    for kind, rows in runs.items():
        print(_table(kind, rows, result["summary"][kind]))
    print(f"results in {args.out / 'durability.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
