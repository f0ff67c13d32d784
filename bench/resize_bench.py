"""Resizing a rank-64 LoRA of a Llama-shaped model to rank 16, in factor space: timed and checked.

The adapter is shaped like one of the 7B bench pair (bench/synth.py: Llama-2-7B shapes, 32
layers, q/k/v/o/gate/up/down, 224 modules) with seeded random factors whose spectrum decays
(column i of B scaled by i^-0.5), stored in bf16 like the pair. Each row runs
``deltakit.extract_lora(BASE, ADAPTER, OUT, rank=16)`` in this process, ``--repeat`` times
(the first run includes CUDA start-up), and checks a sample of the written modules against
the optimum: ‖ΔW − B'A'‖_F over the Eckart–Young error from an fp64 ``svdvals`` of the dense ΔW.

* ``factor-space``: what extract does for LoRA inputs (QR of B and Aᵀ, SVD of the r×r core).
* ``dense`` (``--dense``, on by default): the same adapter through its dense ΔW and the
  randomized SVD, the route other adapter types take.

The base is only needed for its tensor names and shapes; unless ``--base`` names a real one
(e.g. the pair run_bench.py wrote), a safetensors file whose data is a sparse hole (it reads
as zeros and takes no disk) stands in. The factor-space route never reads the base's weights;
the dense route reads them (zeros from the hole, so its time is compute, not disk).

    python bench/resize_bench.py --preset tiny --device cpu --workdir /tmp/rz --out /tmp/rz-out
    python bench/resize_bench.py --preset 7b --workdir /tmp/dk-resize --out $OUT      # a GPU machine

Writes ``OUT/resize_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lora_files import module_scaling  # noqa: E402
from bench.machine import describe  # noqa: E402
from bench.synth import PRESETS, ModelShape, llama_config, llama_layout  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."


def adapted_modules(shape: ModelShape) -> list[tuple[str, tuple[int, int]]]:
    """(module path, (out, in)) of every q/k/v/o/gate/up/down weight, in checkpoint order."""
    return [(name[: -len(".weight")], dims) for name, dims in llama_layout(shape)  # type: ignore[misc]
            if name.endswith(".weight") and name.split(".")[-2] in TARGETS]


def write_sparse_base(folder: Path, shape: ModelShape) -> Path:
    """A bf16 safetensors model with the layout's names and shapes whose data is a hole (reads as zeros)."""
    folder.mkdir(parents=True, exist_ok=True)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in llama_layout(shape):
        size = 2
        for d in dims:
            size *= d
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        handle.truncate(8 + len(text) + offset)
    (folder / "config.json").write_text(json.dumps(llama_config(shape), indent=2) + "\n")
    return folder


def write_lora(folder: Path, shape: ModelShape, rank: int, device: torch.device, seed: int = 0) -> dict[str, object]:
    """A rank-``rank`` PEFT LoRA (lora_alpha = 2r) on every target module, bf16, decaying spectrum."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    decay = torch.arange(1, rank + 1, device=device, dtype=torch.float32).pow(-0.5)
    for index, (module, (out_dim, in_dim)) in enumerate(adapted_modules(shape)):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
        lora_a = torch.randn(rank, in_dim, generator=gen, device=device) / in_dim ** 0.5
        lora_b = torch.randn(out_dim, rank, generator=gen, device=device) * decay * 0.01
        tensors[f"{PREFIX}{module}.lora_A.weight"] = lora_a.to(torch.bfloat16).cpu()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = lora_b.to(torch.bfloat16).cpu()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(TARGETS), "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none",
              "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"modules": len(tensors) // 2, "bytes": (folder / "adapter_model.safetensors").stat().st_size}


def factors_of(folder: Path, module: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scaling) of one module of an adapter folder, A and B in fp64 on ``device``."""
    from safetensors import safe_open

    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        lora_a = handle.get_tensor(f"{PREFIX}{module}.lora_A.weight").to(device, torch.float64)
        lora_b = handle.get_tensor(f"{PREFIX}{module}.lora_B.weight").to(device, torch.float64)
    return lora_a, lora_b, module_scaling(config, module)


def optimal_errors(adapter: Path, modules: list[str], rank: int, device: torch.device) -> dict[str, float]:
    """Eckart–Young: ‖ΔW − ΔW_rank‖_F of each module, from an fp64 ``svdvals`` of its dense ΔW."""
    optimal = {}
    for module in modules:
        a, b, scaling = factors_of(adapter, module, device)
        values = torch.linalg.svdvals((b @ a) * scaling)
        optimal[module] = float(torch.sqrt(torch.sum(values[rank:] ** 2)))
    return optimal


def check(adapter: Path, resized: Path, optimal: dict[str, float], device: torch.device) -> dict[str, object]:
    """Max and mean over the sampled modules of ‖ΔW − B'A'‖_F / optimum, in fp64."""
    ratios = []
    for module, best in optimal.items():
        a, b, scaling = factors_of(adapter, module, device)
        a2, b2, scaling2 = factors_of(resized, module, device)
        ratios.append(float(torch.linalg.matrix_norm((b @ a) * scaling - (b2 @ a2) * scaling2)) / best)
    return {"checked": len(ratios), "max_error_ratio": max(ratios), "mean_error_ratio": sum(ratios) / len(ratios)}


def run_row(label: str, base: Path, adapter: Path, workdir: Path, args: argparse.Namespace, device: torch.device,
            optimal: dict[str, float]) -> dict[str, object]:
    from deltakit import SpectralOptions
    from deltakit.lora import extract_lora

    options = SpectralOptions(device=str(device))
    times = []
    out = workdir / f"resized-{label}"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        report = extract_lora(base, adapter, out, rank=args.to_rank, options=options, force=True,
                              factor_space=label == "factor-space")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    row: dict[str, object] = {
        "status": "ok", "method": report.method, "wall_s": min(times), "runs_s": [round(t, 4) for t in times],
        "modules": len(report.matrices), "relative_error": report.relative_error,
        "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
    }
    if device.type == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    row.update(check(adapter, out, optimal, device))
    print(f"{label}: {min(times):.3f} s best of {times}, max error / optimal {row['max_error_ratio']:.6f} "
          f"over {row['checked']} modules", flush=True)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--workdir", type=Path, required=True, help="Where the base, adapter and results go.")
    parser.add_argument("--out", type=Path, required=True, help="Folder for resize_bench.json.")
    parser.add_argument("--base", type=Path, help="A real base model with the preset's shapes (default: a sparse stand-in).")
    parser.add_argument("--from-rank", type=int, default=64)
    parser.add_argument("--to-rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="Runs per row; the best is wall_s (default 2).")
    parser.add_argument("--check", type=int, default=8, help="Modules checked against an fp64 SVD (0: all; default 8).")
    parser.add_argument("--no-dense", dest="dense", action="store_false", help="Skip the dense-ΔW row.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    shape = PRESETS[args.preset]
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = args.base or write_sparse_base(args.workdir / "base", shape)
    adapter = args.workdir / f"lora-r{args.from_rank}"
    shutil.rmtree(adapter, ignore_errors=True)
    started = time.perf_counter()
    made = write_lora(adapter, shape, args.from_rank, device)
    print(f"wrote {adapter} ({made['modules']} modules, {made['bytes'] / 1e6:.1f} MB) in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    modules = [m for m, _ in adapted_modules(shape)]
    count = len(modules) if args.check <= 0 else min(args.check, len(modules))
    sample = [modules[round(i * (len(modules) - 1) / max(count - 1, 1))] for i in range(count)]
    started = time.perf_counter()
    optimal = optimal_errors(adapter, sample, args.to_rank, device)
    print(f"fp64 SVD of {len(sample)} modules for the check: {time.perf_counter() - started:.1f} s", flush=True)
    rows = {"factor-space": run_row("factor-space", base, adapter, args.workdir, args, device, optimal)}
    if args.dense:
        rows["dense"] = run_row("dense", base, adapter, args.workdir, args, device, optimal)
    result = {
        "bench": "resize", "preset": args.preset, "device": str(device), "from_rank": args.from_rank,
        "to_rank": args.to_rank, "modules": made["modules"], "input_adapter_bytes": made["bytes"],
        "base": str(base), "sparse_base": args.base is None, "repeat": args.repeat, "rows": rows,
        "host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "command": " ".join(["python", "bench/resize_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": describe(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resize_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"results in {args.out / 'resize_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
