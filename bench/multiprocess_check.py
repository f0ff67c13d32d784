"""Do rank / extract / merge / intruders on N processes write what one process writes, on the GPU too?

On a machine with one GPU NCCL cannot run two processes (it refuses two ranks on one device),
so this check joins the processes with gloo and lets all of them compute on the same GPU: it
covers the multi-process code paths with CUDA compute (pinned copies, asynchronous writes,
shared output folders), not NCCL itself.

    python -m bench.synth --preset small --workdir /tmp/mp --shard-bytes 20000000
    python -m bench.multiprocess_check --pair /tmp/mp --out /tmp/mp/x1
    torchrun --standalone --nproc_per_node 2 -m bench.multiprocess_check --pair /tmp/mp --out /tmp/mp/x2
    python -m bench.multiprocess_check --compare /tmp/mp/x1 /tmp/mp/x2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def run(pair: Path, out: Path, device: str) -> None:
    from deltakit.analysis import rank
    from deltakit.distributed import Parallel
    from deltakit.lora.scale_intruders import scale_intruders
    from deltakit.lora import extract_lora, merge
    from deltakit.spectral.options import SpectralOptions

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = Parallel()
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        parallel = Parallel(rank=dist.get_rank(), world_size=world_size, device=device)
    base, ft = pair / "base", pair / "ft"
    out.mkdir(parents=True, exist_ok=True)
    options = SpectralOptions(device=device)
    reports = {
        "rank": rank(base, ft, options=options, parallel=parallel).to_dict(),
        "extract": extract_lora(base, ft, out / "adapter", rank=16, options=options, force=True,
                                parallel=parallel).to_dict(),
        "extract-budget": extract_lora(base, ft, out / "budget", budget=2_000_000, options=options, force=True,
                                       parallel=parallel).to_dict(),
        "merge": merge(base, out / "adapter", out / "merged", device=device, force=True, parallel=parallel).to_dict(),
        "intruders": scale_intruders(base, ft, out / "scaled", 0.0, options=options, force=True,
                                     max_shard_bytes=20_000_000, parallel=parallel).to_dict(),
    }
    if parallel.is_main:
        (out / "reports.json").write_text(json.dumps(reports, indent=1, default=str))
    if parallel.active:
        import torch.distributed as dist

        dist.destroy_process_group()


def _without_paths_and_times(value):
    if isinstance(value, dict):
        return {k: _without_paths_and_times(v) for k, v in value.items()
                if k not in ("elapsed_s", "adapter", "out", "output", "model")}
    if isinstance(value, list):
        return [_without_paths_and_times(v) for v in value]
    return value


def compare(one: Path, two: Path) -> int:
    """Print what differs between two runs' files and reports; exit 0 when nothing does."""
    differences = []
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    others = sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    if files != others:
        differences.append(f"file lists differ: {sorted(set(files) ^ set(others))}")
    compared = 0
    for path in files:
        if path.name == "reports.json" or not (two / path).is_file():
            continue
        compared += 1
        if (one / path).read_bytes() != (two / path).read_bytes():
            differences.append(f"bytes differ: {path}")
    a = _without_paths_and_times(json.loads((one / "reports.json").read_text()))
    b = _without_paths_and_times(json.loads((two / "reports.json").read_text()))
    for key in a:
        if a[key] != b.get(key):
            differences.append(f"report differs: {key}")
    print(json.dumps({"files_compared": compared, "reports_compared": sorted(a), "differences": differences}))
    return 1 if differences else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("ONE", "TWO"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    run(args.pair, args.out, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
