"""A small base / fine-tune pair with deltas of known rank, for `deltakit demo` and the quickstart.

The pair is Llama-shaped (bf16, sharded with an index, a ``config.json``) and its deltas
are built so the right answers are known in advance:

* q_proj and v_proj: a merged rank-8 LoRA, so `rank` must report 8;
* gate_proj, up_proj, down_proj: a dense update with a decaying spectrum (a "full fine-tune");
* k_proj, o_proj, the embeddings and the norms: unchanged (rank 0).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from deltakit.errors import DeltakitError
from deltakit.io.atomic import atomic_directory
from deltakit.io.writer import ShardedWriter

DEMO_LORA_RANK = 8
DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 344,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def demo_tensor_shapes(config: dict = DEMO_CONFIG) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama checkpoint as transformers stores it."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (h, h)
        shapes[f"{p}mlp.gate_proj.weight"] = (i, h)
        shapes[f"{p}mlp.up_proj.weight"] = (i, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, i)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def demo_delta(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor | None:
    """The known update of one tensor (fp32), or None when it is left unchanged."""
    if len(shape) != 2:
        return None
    out_dim, in_dim = shape
    if name.endswith(("q_proj.weight", "v_proj.weight")):
        b = torch.randn(out_dim, DEMO_LORA_RANK, generator=generator) * 0.02
        a = torch.randn(DEMO_LORA_RANK, in_dim, generator=generator) * 0.1
        return b @ a
    if ".mlp." in name:
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(out_dim, k, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(in_dim, k, generator=generator))
        sigma = 0.2 * torch.arange(1, k + 1, dtype=torch.float32) ** -1.0
        return (u * sigma) @ v.T
    return None


def write_demo_pair(folder: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    force: bool = False) -> tuple[Path, Path]:
    """Write ``folder/base`` and ``folder/ft`` (sharded safetensors + index + config); return both paths.

    ``folder`` must be new or empty: a stray weights file beside the pair would be read as part
    of it. With ``force`` an existing ``base`` / ``ft`` is replaced whole (other entries stay).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DeltakitError(f"{folder} is a file; the demo pair needs a folder")
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if present and not force:
        shown = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise DeltakitError(f"{folder} is not empty ({shown}); choose a new folder, or pass force=True (--force) "
                            "to replace its base/ and ft/")
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shapes = demo_tensor_shapes()
    base = {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=generator) * 0.02) for n, s in shapes.items()}
    ft = {}
    for name, weight in base.items():
        delta = demo_delta(name, tuple(weight.shape), generator)
        ft[name] = weight if delta is None else weight + delta
    for label, tensors in (("base", base), ("ft", ft)):
        with atomic_directory(folder / label, force=force) as out:
            plan = [(n, tuple(t.shape), dtype) for n, t in tensors.items()]
            writer = ShardedWriter(out, plan, max_shard_bytes=512 * 1024)
            for name, tensor in tensors.items():
                writer.write(name, tensor.to(dtype))
            writer.finish()
            (out / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2) + "\n")
    return folder / "base", folder / "ft"
