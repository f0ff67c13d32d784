"""DoRA merge against LoRA merge on the bench pair's base (issue 12: DoRA within 1.5× of LoRA).

Writes, next to the bench pair's base (bench/synth.py, reused when already there), two PEFT
adapters on every attention and MLP projection with the same rank-r factors: a plain LoRA and
a DoRA whose magnitudes are the base's row norms moved by a few percent. Then times
``deltakit.lora.merge`` of each into the base (the same code path as ``deltakit merge``), best of
``--repeat``, and writes ``adapter_bench.json`` into ``--out``. Merged models are deleted after
each run.

    python -m bench.adapter_bench --preset tiny --workdir /tmp/ab --out /tmp/ab-results --device cpu
    python -m bench.adapter_bench --preset 7b --workdir /data/bench --out results/adapters --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import save_file  # noqa: E402

from bench.synth import PRESETS, DeltaSpec, write_pair  # noqa: E402
from deltakit.io import open_checkpoint  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapters(base: Path, folder: Path, rank: int, seed: int = 0) -> dict[str, Path]:
    """A LoRA and a DoRA adapter (bf16, same factors, lora_alpha = 2r) on every projection of ``base``."""
    ckpt = open_checkpoint(base)
    generator = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    dora: dict[str, torch.Tensor] = {}
    for name in sorted(ckpt.keys()):
        module = name.removesuffix(".weight")
        if len(ckpt.shape(name)) != 2 or not module.endswith(TARGETS):
            continue
        out_dim, in_dim = ckpt.shape(name)
        key = f"base_model.model.{module}"
        a = torch.randn(rank, in_dim, generator=generator) / in_dim**0.5
        b = torch.randn(out_dim, rank, generator=generator) * 1e-3
        lora[f"{key}.lora_A.weight"], lora[f"{key}.lora_B.weight"] = a.bfloat16(), b.bfloat16()
        norms = torch.linalg.vector_norm(ckpt.get(name).float(), dim=1)
        dora[f"{key}.lora_A.weight"], dora[f"{key}.lora_B.weight"] = a.bfloat16(), b.bfloat16()
        moved = norms * (1 + 0.05 * torch.randn(out_dim, generator=generator))  # magnitudes off their init
        dora[f"{key}.lora_magnitude_vector"] = moved.bfloat16()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "lora_dropout": 0.0}
    folders = {}
    for kind, tensors in (("lora", lora), ("dora", dora)):
        target = folder / f"{kind}-r{rank}"
        target.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target / "adapter_model.safetensors"))
        (target / "adapter_config.json").write_text(json.dumps({**config, "use_dora": kind == "dora"}, indent=2))
        folders[kind] = target
    return folders


def time_merge(base: Path, adapter: Path, out: Path, device: str, repeat: int) -> dict[str, object]:
    """Best and all wall times of ``merge(base, adapter, out)``; the output is removed after each run."""
    from deltakit.lora import merge

    times = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        report = merge(base, adapter, out, device=device, force=True)
        times.append(time.perf_counter() - start)
        shutil.rmtree(out, ignore_errors=True)
    return {"best_s": round(min(times), 3), "all_s": [round(t, 3) for t in times], "modules": report.lora_modules,
            "tensors": report.tensors, "device": report.device}


def machine() -> dict[str, object]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__, "gpu": gpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.adapter_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--workdir", type=Path, required=True, help="holds the bench pair (reused) and the adapters")
    parser.add_argument("--out", type=Path, required=True, help="folder for adapter_bench.json")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2, help="runs per adapter; the best is reported")
    args = parser.parse_args(argv)
    shape = PRESETS[args.preset]
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    write_pair(args.workdir, shape, DeltaSpec(), args.device, log=log)
    base = args.workdir / "base"
    adapters = write_adapters(base, args.workdir / "adapters", args.rank)
    results = {}
    for kind in ("lora", "dora"):  # LoRA first: the page cache is warm for both after the pair was read once
        log(f"merging {kind} ...")
        results[kind] = time_merge(base, adapters[kind], args.workdir / f"merged-{kind}", args.device, args.repeat)
    summary = {"preset": args.preset, "shape": shape.__dict__, "rank": args.rank, "repeat": args.repeat,
               "lora": results["lora"], "dora": results["dora"],
               "dora_over_lora": round(results["dora"]["best_s"] / results["lora"]["best_s"], 3),
               "machine": machine(), "command": " ".join(["python -m bench.adapter_bench", *(argv or sys.argv[1:])])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
