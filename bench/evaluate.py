"""Check outputs against the truth, after the timed runs (never timed itself).

    python -m bench.evaluate adapter BASE FT ADAPTER [--device auto] --json OUT.json
    python -m bench.evaluate merge   BASE ADAPTER MERGED [--sample 8] --json OUT.json

``adapter``: for every LoRA module an adapter holds, the relative reconstruction error
‖ΔW − scaling·BA‖_F / ‖ΔW‖_F against the true ΔW = ft − base (fp32 of the stored bf16), the
same measure for deltakit's, the plain loop's and mergekit's adapters. Tensors an adapter
stores whole (``modules_to_save``) are listed, not scored.

``merge``: on ``sample`` evenly spread adapter modules, ‖W_merged − round(W_base + scaling·BA)‖_F /
‖scaling·BA‖_F, where round() is the cast to the merged tensor's dtype: ~0 for a right merge
(a few last-bit flips from a different summation order), ~1 for a missing or wrong delta.
Rounding alone (the distance of the unrounded sum from its bf16 cast) is reported beside it
as ``rounding``: it is ~0.15 at ‖ΔW‖ = 1% ‖W‖, so an unrounded comparison could not tell a
right merge from a slightly wrong one. Also: the merged checkpoint holds every base tensor
with its shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines import Reader, pick_device  # noqa: E402
from bench.lora_files import read_adapter  # noqa: E402


def adapter_errors(base_dir: Path, ft_dir: Path, adapter_dir: Path, device: torch.device) -> dict[str, object]:
    base, ft = Reader(base_dir), Reader(ft_dir)
    config, factors, other = read_adapter(adapter_dir)
    records = []
    for lora in factors.values():
        name = lora.weight_name
        if name not in base.map or name not in ft.map:
            records.append({"name": name, "error": "not in the checkpoints"})
            continue
        delta = ft.get(name).to(device, torch.float32) - base.get(name).to(device, torch.float32)
        approx = lora.delta(device)
        if approx.shape != delta.shape:
            records.append({"name": name, "error": f"adapter gives {list(approx.shape)}, ΔW is {list(delta.shape)}"})
            continue
        norm = float(torch.linalg.vector_norm(delta))
        residual = float(torch.linalg.vector_norm(delta - approx))
        records.append({"name": name, "rank": lora.rank, "scaling": lora.scaling,
                        "rel_error": residual / norm if norm > 0 else None})
    return {"adapter": str(adapter_dir), "r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
            "matrices": records, "stored_whole": other}


def merge_check(base_dir: Path, adapter_dir: Path, merged_dir: Path, sample: int,
                device: torch.device) -> dict[str, object]:
    base, merged = Reader(base_dir), Reader(merged_dir)
    _, factors, _ = read_adapter(adapter_dir)
    missing = [n for n in base.map if n not in merged.map]
    reshaped = [n for n in base.map if n in merged.map and base.shape(n) != merged.shape(n)]
    modules = sorted(factors.values(), key=lambda f: f.module)
    step = max(1, len(modules) // max(sample, 1))
    records = []
    for lora in modules[::step][:sample]:
        name = lora.weight_name
        if name not in merged.map:
            continue
        delta = lora.delta(device)
        expected = base.get(name).to(device, torch.float32) + delta
        stored = merged.get(name).to(device)
        rounded = expected.to(stored.dtype).to(torch.float32)
        norm = torch.linalg.vector_norm(delta)
        records.append({"name": name, "dtype": str(stored.dtype).removeprefix("torch."),
                        "rel_deviation": float(torch.linalg.vector_norm(stored.to(torch.float32) - rounded) / norm),
                        "rounding": float(torch.linalg.vector_norm(rounded - expected) / norm)})
    return {"missing_tensors": missing[:20], "missing_count": len(missing), "reshaped": reshaped[:20],
            "sampled": records,
            "max_rel_deviation": max((r["rel_deviation"] for r in records), default=None)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.evaluate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("adapter")
    p.add_argument("base", type=Path)
    p.add_argument("ft", type=Path)
    p.add_argument("adapter", type=Path)
    p = sub.add_parser("merge")
    p.add_argument("base", type=Path)
    p.add_argument("adapter", type=Path)
    p.add_argument("merged", type=Path)
    p.add_argument("--sample", type=int, default=8)
    for p in sub.choices.values():
        p.add_argument("--device", default="auto")
        p.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.command == "adapter":
        result = adapter_errors(args.base, args.ft, args.adapter, device)
    else:
        result = merge_check(args.base, args.adapter, args.merged, args.sample, device)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
