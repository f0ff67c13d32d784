"""`deltakit rank` on a gpt-oss-shaped MoE slice, against its I/O floor.

Writes a base / fine-tune pair in gpt-oss's transformers layout (per layer: fused experts
``mlp.experts.gate_up_proj`` (E, hidden, 2·inter) and ``down_proj`` (E, inter, hidden), their
biases, the router), one safetensors shard per layer plus an index. The fine-tune adds a
rank-``--delta-rank`` change to every fourth expert's gate_up slice and leaves the rest as is,
so the check is exact: those experts read that rank, every other expert 0. With ``--base mxfp4``
the base stores its experts as gpt-oss ships them (MXFP4 blocks + e8m0 scales) and the
fine-tune is bf16, made from the dequantized weights.

Then it times, in this process: reading every byte of both checkpoints once (the I/O floor,
64 MiB sequential reads, page-cache state reported) and ``deltakit.rank`` on the pair.
Results go to ``--out``/moe_results.json with the machine's description.

CPU check (seconds):  python -m bench.moe_bench --preset tiny --device cpu --out /tmp/moe-bench
GPU (gpt-oss-20b shapes, 4 layers, 32 experts, hidden 2880, intermediate 2880):
    python -m bench.moe_bench --preset gpt-oss-20b --device cuda --workdir /tmp/dk-moe --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import machine  # noqa: E402


@dataclass(frozen=True)
class MoeShape:
    layers: int
    experts: int
    hidden: int
    intermediate: int


PRESETS = {
    "tiny": MoeShape(layers=1, experts=4, hidden=64, intermediate=32),
    "gpt-oss-20b": MoeShape(layers=4, experts=32, hidden=2880, intermediate=2880),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, help="Override the preset's number of layers.")
    parser.add_argument("--base", choices=("bf16", "mxfp4"), default="bf16", help="How the base stores its experts.")
    parser.add_argument("--delta-rank", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, help="Where the pair is written (default: OUT/pair).")
    parser.add_argument("--out", type=Path, required=True, help="Folder for moe_results.json.")
    return parser.parse_args(argv)


def changed_experts(shape: MoeShape) -> list[int]:
    return list(range(0, shape.experts, 4))


def _layer_tensors(shape: MoeShape, layer: int, base_format: str, gen: torch.Generator,
                   delta_rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, fine-tune) tensors of one layer; the fine-tune differs in the changed experts' gate_up."""
    e, h, i = shape.experts, shape.hidden, shape.intermediate
    prefix = f"model.layers.{layer}.mlp."
    base: dict[str, torch.Tensor] = {
        prefix + "router.weight": (torch.randn(e, h, generator=gen) * 0.02).to(torch.bfloat16),
        prefix + "router.bias": torch.zeros(e, dtype=torch.bfloat16),
        prefix + "experts.gate_up_proj_bias": torch.zeros(e, 2 * i, dtype=torch.bfloat16),
        prefix + "experts.down_proj_bias": torch.zeros(e, h, dtype=torch.bfloat16),
    }
    ft = dict(base)
    for proj, (rows, cols) in (("gate_up_proj", (h, 2 * i)), ("down_proj", (i, h))):  # (E, in, out)
        name = prefix + "experts." + proj
        if base_format == "mxfp4":  # stored (E, out, in/32, 16) uint8 + (E, out, in/32) exponents
            blocks = torch.randint(0, 256, (e, cols, rows // 32, 16), generator=gen, dtype=torch.uint8)
            scales = torch.randint(118, 122, (e, cols, rows // 32), generator=gen, dtype=torch.uint8)
            base[name + "_blocks"], base[name + "_scales"] = blocks, scales
            weight = _dequantize_mxfp4(blocks, scales)
        else:
            weight = (torch.randn(e, rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
            base[name] = weight
        if proj == "gate_up_proj":
            weight = weight.clone()
            for expert in changed_experts(shape):
                u = torch.randn(rows, delta_rank, generator=gen)
                v = torch.randn(delta_rank, cols, generator=gen)
                weight[expert] = (weight[expert].float() + 0.01 * (u @ v) / delta_rank ** 0.5).to(torch.bfloat16)
        ft[name] = weight
    return base, ft


def _dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The bf16 (E, in, out) weights of MXFP4 experts, through deltakit's own decoder."""
    from deltakit.io.quantized import _mxfp4

    values, _ = _mxfp4(blocks, scales.to(torch.int32) - 127, steps=False)
    return values.to(torch.bfloat16)


def write_pair(workdir: Path, shape: MoeShape, base_format: str, delta_rank: int) -> tuple[Path, Path]:
    """Both checkpoints, one shard per layer and an index each, seeded (the same pair every time)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    base_dir, ft_dir = workdir / "base", workdir / "ft"
    maps: dict[Path, dict[str, str]] = {base_dir: {}, ft_dir: {}}
    for folder in maps:
        folder.mkdir(parents=True, exist_ok=True)
    for layer in range(shape.layers):
        shard = f"model-{layer + 1:05d}-of-{shape.layers:05d}.safetensors"
        for folder, tensors in zip((base_dir, ft_dir), _layer_tensors(shape, layer, base_format, gen, delta_rank)):
            save_file({k: v.contiguous() for k, v in tensors.items()}, folder / shard, metadata={"format": "pt"})
            maps[folder].update({name: shard for name in tensors})
    config = {"model_type": "gpt_oss", "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
              "num_local_experts": shape.experts, "num_hidden_layers": shape.layers, "torch_dtype": "bfloat16"}
    for folder, weight_map in maps.items():
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        folder_config = dict(config)
        if folder == base_dir and base_format == "mxfp4":
            folder_config["quantization_config"] = {"quant_method": "mxfp4"}
        (folder / "config.json").write_text(json.dumps(folder_config))
    return base_dir, ft_dir


def run(args: argparse.Namespace) -> dict[str, object]:
    import deltakit
    from deltakit.spectral.options import SpectralOptions

    shape = PRESETS[args.preset]
    if args.layers:
        shape = MoeShape(args.layers, shape.experts, shape.hidden, shape.intermediate)
    workdir = args.workdir or args.out / "pair"
    started = time.perf_counter()
    base, ft = write_pair(workdir, shape, args.base, args.delta_rank)
    write_s = time.perf_counter() - started
    files = sorted(base.glob("*.safetensors")) + sorted(ft.glob("*.safetensors"))
    floor = machine.read_bandwidth(files)
    device = deltakit.delta.resolve_device(args.device)
    if device.type == "cuda":  # CUDA start-up is not part of the command's work
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    report = deltakit.rank(base, ft, options=SpectralOptions(device=str(device)))
    rank_s = time.perf_counter() - started
    changed = set(changed_experts(shape))
    wrong = [m.name for m in report.matrices if m.expert is not None
             and m.rank != (args.delta_rank if m.expert in changed and m.module_type == "experts.gate_up" else 0)]
    matrices = [m for m in report.matrices if m.expert is not None]
    return {
        "bench": "moe_rank", "preset": args.preset, "shape": asdict(shape), "base_format": args.base,
        "delta_rank": args.delta_rank, "device": str(device), "expert_matrices": len(matrices),
        "bytes_read": floor["bytes"], "io_floor_s": floor["seconds"], "read_bytes_per_s": floor["bytes_per_s"],
        "page_cache_resident_before": floor["resident_before"], "rank_s": rank_s,
        "rank_over_floor": rank_s / floor["seconds"] if floor["seconds"] else None,
        "check": "pass" if not wrong else f"fail: {len(wrong)} experts with the wrong rank, first {wrong[0]}",
        "write_pair_s": write_s, "machine": machine.describe(),
        "command": "python -m bench.moe_bench " + " ".join(sys.argv[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "moe_results.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(json.dumps({k: result[k] for k in ("preset", "base_format", "io_floor_s", "rank_s", "rank_over_floor",
                                             "check")}))
    return 0 if result["check"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
