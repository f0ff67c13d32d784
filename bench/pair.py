"""The synthetic base / fine-tune pair the suite measures, and the truth it is checked against.

Presets are Llama-shaped models (the tensor names, shapes, bf16 dtype, ~5 GB shards with an
index and config.json of a published checkpoint), diffusers UNet folders (``unet``: SDXL's UNet2DConditionModel,
2.6B parameters, ``diffusion_pytorch_model-*.safetensors``; a convolution's ΔW is that of its
(out, in·kh·kw) matrix) or, for ``tall``, single files of tall-thin matrices. Base weights are N(0, 0.02) (norm gains are ones); each fine-tuned matrix is W + ΔW:

    ΔW = U diag(σ) Vᵀ + N,   σ_i ∝ i^-decay (i ≤ width),   ‖ΔW‖_F = scale·‖W‖_F,
    N dense Gaussian holding ``noise`` of ‖ΔW‖²,  U, V orthonormal (QR of a Gaussian),

then both sides are rounded to bf16, as a real bf16 fine-tune is. The truth of every check is
computed from the stored tensors in float64 (:func:`energies`), so it holds after the rounding.
Files are written with plain safetensors framing, one tensor at a time: the bench does not use
deltakit to make its input.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


@dataclass(frozen=True)
class Preset:
    """A pair's shapes: Llama-shaped (hidden, intermediate, layers, vocab), or ``layers`` matrices of
    ``tall_rows`` × ``hidden`` in one file per side when ``tall_rows`` > 0."""

    hidden: int
    intermediate: int = 0
    layers: int = 1
    vocab: int = 0
    tall_rows: int = 0
    unet: tuple[tuple[int, ...], tuple[int, ...], int, int] = ()  # (channels, attention depths, resnets, cross dim)
    extract_rank: int = 64  # extract --rank, merge's adapter rank
    calibration: tuple[int, int] = (64, 512)  # sequences × tokens of extract --calibration (random ids)
    sample: int = 0         # matrices each check reads against the truth (0: all)
    targets: tuple[str, ...] = ("rank", "rank-full", "extract", "merge", "compare", "intruders")
    shard_bytes: int = 5 * 1000**3


PRESETS = {
    "tiny": Preset(hidden=128, intermediate=344, layers=2, vocab=1024, extract_rank=16, shard_bytes=400_000,
                   calibration=(4, 32), targets=(*Preset.targets, "extract-aware")),
    "7b": Preset(hidden=4096, intermediate=11008, layers=32, vocab=32000, sample=8),  # Llama-2-7B, 13.5 GB
    "tall": Preset(hidden=256, layers=4, tall_rows=524288, targets=("rank",)),  # 2 × 1.07 GB, issue 28
    # SDXL's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json): 2.57B parameters, 2 × 5.1 GB
    "sdxl-unet": Preset(hidden=320, unet=((320, 640, 1280), (0, 2, 10), 2, 2048), sample=16,
                        targets=("rank", "extract-kohya")),
    "tiny-unet": Preset(hidden=32, unet=((32, 64), (0, 1), 1, 48), extract_rank=4, shard_bytes=400_000,
                        targets=("rank", "extract-kohya")),
}


@dataclass(frozen=True)
class DeltaSpec:
    scale: float = 0.01
    decay: float = 0.8
    width: int = 512
    noise: float = 0.02
    seed: int = 0


def layout(preset: Preset) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the order Hugging Face's Llama checkpoints store them."""
    h, i = preset.hidden, preset.intermediate
    if preset.unet:
        return unet_layout(*preset.unet)
    if preset.tall_rows:
        return [(f"tall.{n}.weight", (preset.tall_rows, h)) for n in range(preset.layers)]
    names = [("model.embed_tokens.weight", (preset.vocab, h))]
    for n in range(preset.layers):
        p = f"model.layers.{n}"
        names += [(f"{p}.input_layernorm.weight", (h,)), *((f"{p}.self_attn.{m}_proj.weight", (h, h)) for m in "qkvo"),
                  (f"{p}.post_attention_layernorm.weight", (h,)), (f"{p}.mlp.gate_proj.weight", (i, h)),
                  (f"{p}.mlp.up_proj.weight", (i, h)), (f"{p}.mlp.down_proj.weight", (h, i))]
    return names + [("model.norm.weight", (h,)), ("lm_head.weight", (preset.vocab, h))]


def unet_layout(channels: tuple[int, ...], depths: tuple[int, ...], layers: int,
                cross: int) -> list[tuple[str, tuple[int, ...]]]:
    """diffusers UNet2DConditionModel's tensors with SDXL's options (linear projections, GEGLU, text_time
    added embedding, 4 latent channels): down block b has ``depths[b]`` transformer blocks per attention
    (0: a DownBlock2D), the mid block ``depths[-1]``, up blocks the reverse."""
    temb, added = 4 * channels[0], 6 * 256 + 1280 if cross == 2048 else 6 * 8 + cross
    out: list[tuple[str, tuple[int, ...]]] = [("conv_in.weight", (channels[0], 4, 3, 3)), ("conv_in.bias", (channels[0],))]
    for name, shape in (("time_embedding.linear_1", (temb, channels[0])), ("time_embedding.linear_2", (temb, temb)),
                        ("add_embedding.linear_1", (temb, added)), ("add_embedding.linear_2", (temb, temb))):
        out += [(f"{name}.weight", shape), (f"{name}.bias", (shape[0],))]

    def resnet(p: str, cin: int, cout: int) -> None:
        out.extend([(f"{p}.norm1.weight", (cin,)), (f"{p}.norm1.bias", (cin,)), (f"{p}.conv1.weight", (cout, cin, 3, 3)),
                    (f"{p}.conv1.bias", (cout,)), (f"{p}.time_emb_proj.weight", (cout, temb)),
                    (f"{p}.time_emb_proj.bias", (cout,)), (f"{p}.norm2.weight", (cout,)), (f"{p}.norm2.bias", (cout,)),
                    (f"{p}.conv2.weight", (cout, cout, 3, 3)), (f"{p}.conv2.bias", (cout,))])
        if cin != cout:
            out.extend([(f"{p}.conv_shortcut.weight", (cout, cin, 1, 1)), (f"{p}.conv_shortcut.bias", (cout,))])

    def attention(p: str, c: int, depth: int) -> None:
        out.extend([(f"{p}.norm.weight", (c,)), (f"{p}.norm.bias", (c,)), (f"{p}.proj_in.weight", (c, c)),
                    (f"{p}.proj_in.bias", (c,))])
        for t in range(depth):
            q = f"{p}.transformer_blocks.{t}"
            for n, kv in (("attn1", c), ("attn2", cross)):
                out.extend([(f"{q}.{n}.to_q.weight", (c, c)), (f"{q}.{n}.to_k.weight", (c, kv)),
                            (f"{q}.{n}.to_v.weight", (c, kv)), (f"{q}.{n}.to_out.0.weight", (c, c)),
                            (f"{q}.{n}.to_out.0.bias", (c,))])
            out.extend([(f"{q}.norm{k}.{w}", (c,)) for k in (1, 2, 3) for w in ("weight", "bias")])
            out.extend([(f"{q}.ff.net.0.proj.weight", (8 * c, c)), (f"{q}.ff.net.0.proj.bias", (8 * c,)),
                        (f"{q}.ff.net.2.weight", (c, 4 * c)), (f"{q}.ff.net.2.bias", (c,))])
        out.extend([(f"{p}.proj_out.weight", (c, c)), (f"{p}.proj_out.bias", (c,))])

    last = len(channels) - 1
    for b, c in enumerate(channels):
        for n in range(layers):
            resnet(f"down_blocks.{b}.resnets.{n}", channels[max(b - 1, 0)] if n == 0 else c, c)
            if depths[b]:
                attention(f"down_blocks.{b}.attentions.{n}", c, depths[b])
        if b < last:
            out.extend([(f"down_blocks.{b}.downsamplers.0.conv.weight", (c, c, 3, 3)),
                        (f"down_blocks.{b}.downsamplers.0.conv.bias", (c,))])
    resnet("mid_block.resnets.0", channels[-1], channels[-1])
    attention("mid_block.attentions.0", channels[-1], depths[-1])
    resnet("mid_block.resnets.1", channels[-1], channels[-1])
    reverse, up_depths = channels[::-1], depths[::-1]
    for b, c in enumerate(reverse):
        previous, skip = reverse[max(b - 1, 0)], reverse[min(b + 1, last)]
        for n in range(layers + 1):
            resnet(f"up_blocks.{b}.resnets.{n}", (previous if n == 0 else c) + (skip if n == layers else c), c)
            if up_depths[b]:
                attention(f"up_blocks.{b}.attentions.{n}", c, up_depths[b])
        if b < last:
            out.extend([(f"up_blocks.{b}.upsamplers.0.conv.weight", (c, c, 3, 3)),
                        (f"up_blocks.{b}.upsamplers.0.conv.bias", (c,))])
    return out + [("conv_norm_out.weight", (channels[0],)), ("conv_norm_out.bias", (channels[0],)),
                  ("conv_out.weight", (4, channels[0], 3, 3)), ("conv_out.bias", (4,))]


def unet_config(preset: Preset) -> dict[str, object]:
    """The diffusers config.json of a ``unet`` preset (UNet2DConditionModel builds this layout from it)."""
    channels, depths, layers, cross = preset.unet
    return {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "sample_size": 128,
            "block_out_channels": list(channels), "layers_per_block": layers, "cross_attention_dim": cross,
            "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
            "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in depths[::-1]],
            "transformer_layers_per_block": [max(d, 1) for d in depths], "use_linear_projection": True,
            "attention_head_dim": [max(1, c // 64) for c in channels], "norm_num_groups": min(32, channels[0]),
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256 if cross == 2048 else 8,
            "projection_class_embeddings_input_dim": 6 * 256 + 1280 if cross == 2048 else 6 * 8 + cross}


def llama_config(preset: Preset) -> dict[str, object]:
    """A config.json transformers, PEFT and mergekit accept for this shape (MHA, untied embeddings)."""
    head_dim = 128 if preset.hidden % 128 == 0 and preset.hidden >= 512 else 16
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": preset.hidden,
            "intermediate_size": preset.intermediate, "num_hidden_layers": preset.layers,
            "num_attention_heads": preset.hidden // head_dim, "num_key_value_heads": preset.hidden // head_dim,
            "head_dim": head_dim, "vocab_size": preset.vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def make_delta(weight: torch.Tensor, spec: DeltaSpec, gen: torch.Generator) -> torch.Tensor:
    """ΔW (out, in) fp32 for ``weight``: a decaying spectrum plus dense noise (module docstring)."""
    m, n = weight.shape
    target = spec.scale * float(torch.linalg.vector_norm(weight))
    width = min(spec.width, m, n)
    left, _ = torch.linalg.qr(torch.randn(m, width, generator=gen, device=weight.device))
    right, _ = torch.linalg.qr(torch.randn(n, width, generator=gen, device=weight.device))
    sigma = torch.arange(1, width + 1, device=weight.device, dtype=torch.float32).pow(-spec.decay)
    sigma *= (1.0 - spec.noise) ** 0.5 * target / torch.linalg.vector_norm(sigma)
    delta = (left * sigma) @ right.T
    noise = torch.randn(m, n, generator=gen, device=weight.device)
    return delta.add_(noise, alpha=spec.noise**0.5 * target / float(torch.linalg.vector_norm(noise)))


def write_pair(work: Path, preset: Preset, spec: DeltaSpec = DeltaSpec(), device: str = "cpu") -> dict[str, object]:
    """``work/base`` and ``work/ft`` (folders; single .safetensors files for a tall preset), reused when
    ``work/pair.json`` records the same preset and spec. Returns that record."""
    record = {"preset": dataclasses.asdict(preset), "delta": dataclasses.asdict(spec), "format": 2}
    record = json.loads(json.dumps(record))  # as pair.json reads back (tuples become lists)
    marker = work / "pair.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == record:
        return json.loads(marker.read_text())
    work.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    tensors = layout(preset)
    gen = torch.Generator(device=device)
    sides = {"base": work / "base", "ft": work / "ft"}
    if preset.tall_rows:
        sides = {side: work / f"{side}.safetensors" for side in sides}
        writers = {side: _ShardWriter([path], [tensors]) for side, path in sides.items()}
    else:
        shards = _plan_shards(tensors, preset.shard_bytes)
        prefix = "diffusion_pytorch_model" if preset.unet else "model"
        config = unet_config(preset) if preset.unet else llama_config(preset)
        for folder in sides.values():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        writers = {side: _ShardWriter([folder / name for name in _shard_names(len(shards), prefix)], shards, prefix)
                   for side, folder in sides.items()}
    for index, (name, shape) in enumerate(tensors):
        gen.manual_seed(spec.seed * 1_000_003 + index)
        if len(shape) == 1:
            weight = torch.ones(shape, device=device)
            tuned = weight + torch.randn(shape, generator=gen, device=device) * (spec.scale * 0.1)
        else:  # a convolution's ΔW is its (out, in·kh·kw) matrix's
            weight = torch.randn(shape, generator=gen, device=device) * 0.02
            tuned = weight + make_delta(weight.reshape(shape[0], -1), spec, gen).reshape(shape)
        writers["base"].write(weight.bfloat16())
        writers["ft"].write(tuned.bfloat16())
        del weight, tuned
    for writer in writers.values():
        writer.close()
    files = {side: [str(p) for p in weight_files(path)] for side, path in sides.items()}
    result = {"spec": record, "base": str(sides["base"]), "ft": str(sides["ft"]), "files": files,
              "bytes": {side: sum(Path(f).stat().st_size for f in fs) for side, fs in files.items()},
              "largest_fp32_bytes": max(4 * _numel(shape) for _, shape in tensors)}
    marker.write_text(json.dumps(result, indent=1) + "\n")
    return result


def write_calibration(work: Path, preset: Preset, seed: int = 0) -> Path:
    """``work/calib.safetensors``: input_ids [sequences, tokens] drawn uniformly from the vocabulary (seeded)."""
    from safetensors.torch import save_file

    path = work / "calib.safetensors"
    gen = torch.Generator().manual_seed(seed)
    save_file({"input_ids": torch.randint(0, max(1, preset.vocab), preset.calibration, generator=gen)}, str(path))
    return path


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _plan_shards(tensors: list[tuple[str, tuple[int, ...]]], limit: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _shard_names(count: int, prefix: str = "model") -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class _ShardWriter:
    """Streams bf16 tensors, in plan order, into safetensors files (header first, then the bytes), and
    writes model.safetensors.index.json beside several shards."""

    def __init__(self, paths: list[Path], shards: list[list[tuple[str, tuple[int, ...]]]], prefix: str = "model") -> None:
        self.prefix = prefix
        self.pending = [(path, shard) for path, shard in zip(paths, shards)]
        self.weight_map = {name: path.name for path, shard in self.pending for name, _ in shard}
        self.total = sum(2 * _numel(shape) for _, shard in self.pending for _, shape in shard)
        self.folder = paths[0].parent
        self.left = 0
        self.file = None

    def write(self, tensor: torch.Tensor) -> None:
        if self.left == 0:
            self._open_next()
        data = tensor.contiguous().view(torch.uint8).cpu().numpy()
        self.file.write(memoryview(data).cast("B"))
        self.left -= 1

    def _open_next(self) -> None:
        if self.file is not None:
            self.file.close()
        path, shard = self.pending.pop(0)
        header, offset = {}, 0
        for name, shape in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * _numel(shape)]}
            offset += 2 * _numel(shape)
        text = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.left = len(shard)

    def close(self) -> None:
        self.file.close()
        if len(self.weight_map) and len(set(self.weight_map.values())) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (or the file itself)."""
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


class Checkpoint:
    """Read access to a safetensors checkpoint (folder with or without index, or one file), one tensor at a time."""

    def __init__(self, path: Path) -> None:
        self.files = {}
        for file in weight_files(Path(path)):
            with safe_open(str(file), framework="pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), file))

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> list[int]:
        with safe_open(str(self.files[name]), framework="pt") as handle:
            return list(handle.get_slice(name).get_shape())


def sample(names: list[str], count: int) -> list[str]:
    """``count`` names spread evenly over ``names`` (all of them for count 0)."""
    if count <= 0 or count >= len(names):
        return list(names)
    return [names[round(i * (len(names) - 1) / (count - 1))] if count > 1 else names[0] for i in range(count)]


def delta(base: Checkpoint, ft: Checkpoint, name: str, device: torch.device) -> torch.Tensor:
    """The stored ΔW = ft − base of ``name`` in float64."""
    return ft.get(name).to(device, torch.float64) - base.get(name).to(device, torch.float64)


def energies(matrix: torch.Tensor) -> torch.Tensor:
    """σ_i² of a float64 matrix, descending: eigenvalues of its Gram matrix on the smaller side."""
    gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def rank_at(squared: torch.Tensor, fraction: float) -> int:
    """Smallest k with σ_1² + … + σ_k² ≥ fraction · Σσ² (0 for a zero matrix)."""
    total = float(squared.sum())
    if total == 0:
        return 0
    return int(torch.searchsorted(torch.cumsum(squared, 0), fraction * total * (1 - 1e-12)).item()) + 1
