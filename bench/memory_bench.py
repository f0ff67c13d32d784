"""Peak device memory and wall time of `rank` and `extract` on a 70B-shaped slice, beside the model's prediction.

    python bench/memory_bench.py --preset tiny --device cpu --workdir /tmp/mem --out /tmp/mem-out   # seconds
    python bench/memory_bench.py --preset 70b --workdir /tmp/mem --out $OUT                        # one GPU

Writes a base / fine-tune pair shaped like ``--layers`` layers of Llama 3 70B (hidden 8192,
intermediate 28672, grouped-query k/v of 1024 rows; bf16; no embedding or lm_head unless
``--vocab`` is given) into ``--workdir``: base N(0, 0.02), fine-tune = base + a decaying
low-rank ΔW plus dense noise (:func:`bench.synth.make_delta`). Then runs deltakit's ``rank``
and ``extract --rank R`` on it in this process, each after resetting the CUDA peak counters,
and writes ``memory_bench.json`` to ``--out``: per command the wall time,
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (GPU), the process's peak RSS,
and the peak that ``bench/estimate.py --memory`` predicts for the same shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.estimate import LlamaShapes, memory_layout, memory_model  # noqa: E402
from bench.synth import DeltaSpec, write_layout  # noqa: E402

PRESETS = {
    "tiny": LlamaShapes(hidden=128, intermediate=344, kv=32, vocab=0, layers=2),
    "70b": LlamaShapes(hidden=8192, intermediate=28672, kv=1024, vocab=0, layers=2),
}
SHARD_BYTES = 2 * 10**9


def config(shapes: LlamaShapes) -> dict[str, object]:
    head_dim = 128 if shapes.hidden >= 1024 else 16
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shapes.hidden,
            "intermediate_size": shapes.intermediate, "num_hidden_layers": shapes.layers,
            "num_attention_heads": shapes.hidden // head_dim, "num_key_value_heads": shapes.kv // head_dim,
            "head_dim": head_dim, "vocab_size": shapes.vocab or 128256, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


def write_slice(workdir: Path, shapes: LlamaShapes, device: torch.device, spec: DeltaSpec) -> dict[str, object]:
    """``workdir/base`` and ``workdir/ft`` (bf16 safetensors); reused when ``workdir/spec.json`` matches."""
    wanted = {"shapes": dataclasses.asdict(shapes), "delta": dataclasses.asdict(spec)}
    marker = workdir / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return {"reused": True}
    started = time.perf_counter()
    write_layout(workdir, memory_layout(shapes), config(shapes), spec, device, SHARD_BYTES)
    marker.write_text(json.dumps(wanted, indent=1) + "\n")
    return {"reused": False, "seconds": time.perf_counter() - started}


def measured(device: torch.device, run) -> dict[str, object]:
    """Wall time and peak memory of ``run()`` (GPU counters reset first)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out: dict[str, object] = {"seconds": time.perf_counter() - started, "result": result}
    if device.type == "cuda":
        out.update(allocated_before=before, max_allocated=torch.cuda.max_memory_allocated(device),
                   max_reserved=torch.cuda.max_memory_reserved(device))
    out["host_max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak so far (Linux: KiB)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/memory_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layers (default 2)")
    parser.add_argument("--vocab", type=int, default=None, help="add embed_tokens and lm_head of this vocabulary")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=64, help="extract's LoRA rank")
    args = parser.parse_args(argv)
    from deltakit.analysis import rank
    from deltakit.delta import PREFETCH_BYTES, resolve_device
    from deltakit.lora.extract import extract_lora
    from deltakit.spectral.options import SpectralOptions

    device = resolve_device(args.device)
    shapes = PRESETS[args.preset]
    shapes = dataclasses.replace(shapes, **{k: v for k, v in (("layers", args.layers), ("vocab", args.vocab))
                                            if v is not None})
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    written = write_slice(args.workdir, shapes, device, DeltaSpec())
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base, ft = args.workdir / "base", args.workdir / "ft"
    options = SpectralOptions(device=str(device))
    commands = {
        "rank": (lambda: len(rank(base, ft, options=options).matrices), "rank"),
        "extract": (lambda: len(extract_lora(base, ft, args.out / "adapter", rank=args.rank, options=options,
                                             force=True).matrices), "extract"),
    }
    results: dict[str, object] = {}
    for name, (run, command) in commands.items():
        entry = measured(device, run)
        model = memory_model(shapes, command, rank=args.rank, layers=None)
        entry["predicted_peak"] = model["peak"]
        entry["predicted_peak_tensor"] = model["peak_tensor"]
        if "max_allocated" in entry:
            entry["measured_over_predicted"] = entry["max_allocated"] / model["peak"]
        results[name] = entry
        print(f"{name}: {entry['seconds']:.2f} s, " + (f"max allocated {entry['max_allocated'] / 1e9:.2f} GB, "
              f"reserved {entry['max_reserved'] / 1e9:.2f} GB, " if "max_allocated" in entry else "")
              + f"predicted {model['peak'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
    payload = {"preset": args.preset, "shapes": dataclasses.asdict(shapes), "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "prefetch_bytes": PREFETCH_BYTES, "rank": args.rank,
               "pair": written, "commands": results}
    (args.out / "memory_bench.json").write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
