"""A synthetic base / fine-tune pair shaped like a published Llama checkpoint.

Base weights are N(0, 0.02) (norms are ones); each fine-tune tensor is base + ΔW with

    ΔW = U diag(σ) Vᵀ + noise,     σ_i ∝ i^(-decay),  i = 1..width,
    ‖ΔW‖_F = scale · ‖W‖_F,        noise holds `noise` of ‖ΔW‖²,

U (out, width) and V (in, width) orthonormal (QR of a Gaussian), so the spectrum decays
like a real full fine-tune's and rank@90% lands in the tens to hundreds. Both files are
stored in bf16, so the ΔW every tool sees also carries bf16 rounding, as real ones do.

Tensors are generated one at a time (on the GPU when there is one, from a seeded
torch.Generator per tensor) and streamed into shards by deltakit's ShardedWriter, so host
memory stays at one tensor whatever the model size. Example::

    python -m bench.synth --preset tiny --workdir /tmp/pair      # writes /tmp/pair/{base,ft}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deltakit.io import ShardedWriter  # noqa: E402

DEFAULT_SHARD_BYTES = 5 * 1000**3  # "~5 GB" shards, as published models use
SPEC_FILE = "bench_pair.json"


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder (MHA, untied embeddings)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return 128 if self.hidden % 128 == 0 and self.hidden >= 512 else 16

    @property
    def heads(self) -> int:
        return self.hidden // self.head_dim


PRESETS = {
    "tiny": ModelShape(hidden=128, intermediate=344, layers=2, vocab=1024),
    "small": ModelShape(hidden=1024, intermediate=2752, layers=4, vocab=8000),
    "7b": ModelShape(hidden=4096, intermediate=11008, layers=32, vocab=32000),
    "13b": ModelShape(hidden=5120, intermediate=13824, layers=40, vocab=32000),
}


@dataclass(frozen=True)
class DeltaSpec:
    """How the fine-tune differs from the base (see the module docstring)."""

    scale: float = 0.01   # ‖ΔW‖_F / ‖W‖_F per matrix
    decay: float = 0.8    # σ_i ∝ i^-decay over the structured part
    width: int = 512      # columns of U and V (capped at min(out, in))
    noise: float = 0.02   # fraction of ‖ΔW‖² that is dense Gaussian noise
    init_std: float = 0.02
    seed: int = 0


def llama_layout(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the order Hugging Face's Llama checkpoints store them."""
    h, i = shape.hidden, shape.intermediate
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}"
        names += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (h, h)),
            (f"{p}.self_attn.v_proj.weight", (h, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]
    return names


def llama_config(shape: ModelShape) -> dict[str, object]:
    """A config.json that transformers (and mergekit) accept for this shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def make_delta(weight: torch.Tensor, spec: DeltaSpec, gen: torch.Generator) -> torch.Tensor:
    """ΔW (out, in) fp32 for one matrix ``weight``: decaying spectrum plus dense noise."""
    out_dim, in_dim = weight.shape
    target = spec.scale * float(torch.linalg.vector_norm(weight))
    width = min(spec.width, out_dim, in_dim)
    dev = weight.device
    left, _ = torch.linalg.qr(torch.randn(out_dim, width, generator=gen, device=dev))
    right, _ = torch.linalg.qr(torch.randn(in_dim, width, generator=gen, device=dev))
    sigma = torch.arange(1, width + 1, device=dev, dtype=torch.float32).pow(-spec.decay)
    sigma *= (1.0 - spec.noise) ** 0.5 * target / torch.linalg.vector_norm(sigma)
    delta = (left * sigma) @ right.T
    if spec.noise > 0:
        noise = torch.randn(out_dim, in_dim, generator=gen, device=dev)
        delta += noise * (spec.noise**0.5 * target / float(torch.linalg.vector_norm(noise)))
    return delta


def pair_tensors(dims: tuple[int, ...], index: int, spec: DeltaSpec, gen: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and fine-tuned fp32 values of the ``index``-th tensor of a layout (seeded by its index).

    A 1-D tensor (RMSNorm gains) is ones nudged by the fine-tune; a matrix is a Gaussian init
    plus :func:`make_delta`.
    """
    gen.manual_seed(spec.seed * 1_000_003 + index)
    if len(dims) == 1:
        weight = torch.ones(dims, device=device)
        return weight, weight + torch.randn(dims, generator=gen, device=device) * (spec.scale * 0.1)
    weight = torch.randn(dims, generator=gen, device=device) * spec.init_std
    return weight, weight + make_delta(weight, spec, gen)


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pair_spec(shape: ModelShape, delta: DeltaSpec, shard_bytes: int) -> dict[str, object]:
    return {"shape": dataclasses.asdict(shape), "delta": dataclasses.asdict(delta), "shard_bytes": shard_bytes,
            "dtype": "bfloat16", "format": 1}


def default_shard_bytes(shape: ModelShape) -> int:
    """~5 GB shards; small models get about three shards so the index path is exercised too."""
    total = sum(_numel(s) for _, s in llama_layout(shape)) * 2
    return min(DEFAULT_SHARD_BYTES, max(total // 3 + 1, 1 << 16))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def existing_pair_matches(workdir: Path, spec: dict[str, object]) -> bool:
    path = workdir / SPEC_FILE
    try:
        return json.loads(path.read_text()) == spec and (workdir / "base").is_dir() and (workdir / "ft").is_dir()
    except (OSError, json.JSONDecodeError):
        return False


def write_pair(workdir: Path, shape: ModelShape, delta: DeltaSpec, device: str = "auto",
               shard_bytes: int | None = None, log=print) -> dict[str, object]:
    """Write ``workdir/base`` and ``workdir/ft`` (sharded safetensors + index + config.json).

    Returns a summary (bytes, seconds, device). Reuses a pair already there with the same spec.
    """
    shard_bytes = shard_bytes or default_shard_bytes(shape)
    spec = pair_spec(shape, delta, shard_bytes)
    if existing_pair_matches(workdir, spec):
        log(f"reusing the pair already in {workdir}")
        return {"reused": True, **_sizes(workdir)}
    dev = _pick_device(device)
    (workdir / SPEC_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    write_layout(workdir, llama_layout(shape), llama_config(shape), delta, dev, shard_bytes, log)
    seconds = time.perf_counter() - start
    (workdir / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return {"reused": False, "seconds": seconds, "device": str(dev), **_sizes(workdir)}


def write_layout(workdir: Path, layout: list[tuple[str, tuple[int, ...]]], config: dict[str, object],
                 delta: DeltaSpec, device: torch.device, shard_bytes: int, log=None) -> None:
    """``workdir/base`` and ``workdir/ft``: every tensor of ``layout`` (:func:`pair_tensors`) in bf16,
    sharded at ``shard_bytes``, with ``config`` as config.json; progress to ``log`` every 50 tensors."""
    plan = [(name, dims, torch.bfloat16) for name, dims in layout]
    writers = {}
    for kind in ("base", "ft"):
        (workdir / kind).mkdir(parents=True, exist_ok=True)
        (workdir / kind / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        writers[kind] = ShardedWriter(workdir / kind, plan, max_shard_bytes=shard_bytes)
    start = time.perf_counter()
    gen = torch.Generator(device=device)
    for index, (name, dims) in enumerate(layout):
        weight, tuned = pair_tensors(dims, index, delta, gen, device)
        writers["base"].write(name, weight.to(torch.bfloat16))
        writers["ft"].write(name, tuned.to(torch.bfloat16))
        del weight, tuned
        if log is not None and (index + 1) % 50 == 0:
            log(f"  generated {index + 1}/{len(layout)} tensors ({time.perf_counter() - start:.1f} s)")
    for writer in writers.values():
        writer.finish()


def _sizes(workdir: Path) -> dict[str, object]:
    return {kind: {"bytes": sum(p.stat().st_size for p in (workdir / kind).glob("*.safetensors")),
                   "files": len(list((workdir / kind).glob("*.safetensors")))} for kind in ("base", "ft")}


def shape_from_args(args: argparse.Namespace) -> ModelShape:
    base = PRESETS[args.preset]
    overrides = {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "vocab") if getattr(args, k)}
    return dataclasses.replace(base, **overrides)


def delta_from_args(args: argparse.Namespace) -> DeltaSpec:
    return DeltaSpec(scale=args.delta_scale, decay=args.delta_decay, width=args.delta_width,
                     noise=args.delta_noise, seed=args.seed)


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that define a pair (shared with run_bench.py)."""
    defaults = DeltaSpec()
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape (default tiny)")
    for name in ("hidden", "intermediate", "layers", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    parser.add_argument("--shard-bytes", type=int, default=None, help="max bytes per shard (default ~5 GB, "
                        "or a third of the model when smaller)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--delta-scale", type=float, default=defaults.scale, help="‖ΔW‖/‖W‖ per matrix")
    parser.add_argument("--delta-decay", type=float, default=defaults.decay, help="σ_i ∝ i^-decay")
    parser.add_argument("--delta-width", type=int, default=defaults.width, help="rank of the structured part")
    parser.add_argument("--delta-noise", type=float, default=defaults.noise, help="fraction of ‖ΔW‖² as noise")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synth", description=__doc__.split("\n\n")[0])
    add_pair_arguments(parser)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--summary-json", type=Path, default=None, help="write the summary here too")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    shape = shape_from_args(args)
    summary = write_pair(args.workdir, shape, delta_from_args(args), args.device, args.shard_bytes,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    summary["shape"] = dataclasses.asdict(shape)
    text = json.dumps(summary)
    if args.summary_json:
        args.summary_json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
