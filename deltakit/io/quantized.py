"""Quantized checkpoints read as their logical tensors: fp8 with scales and MXFP4, dequantized on the fly.

Formats read (the dequantization their inference code does):

- **fp8** (``float8_e4m3fn``, ``float8_e5m2``) with a scale companion ``<name>_scale_inv``
  (DeepSeek-V3 / transformers "fp8" ``quantization_config: {quant_method: "fp8",
  weight_block_size: [128, 128]}``) or ``<name>_scale`` (compressed-tensors, fbgemm):
  w = q · s, with s broadcast per block (its last two dimensions are ceil(out/128) ×
  ceil(in/128) for 128×128 blocks), per output channel (out × 1 or out) or per tensor (one value).
- **MXFP4** as gpt-oss stores its experts: ``<name>_blocks`` uint8 (..., out, G, 16), two FP4
  e2m1 values per byte (low nibble first), and ``<name>_scales`` uint8 (..., out, G), one e8m0
  exponent (bias 127) per 32 values: w = fp4 · 2^(scale − 127). A 3-D (E, out, G, 16) tensor is
  read as transformers' gpt-oss layout (E, in = 32·G, out); a 2-D one as (out, in).

Everything else that is quantized (GPTQ/AWQ packed ints, bitsandbytes, ...) is refused with
one :class:`DeltakitError` naming the format: a quantized tensor is never read raw.

The dequantization runs on the device the stored bytes are sent to (the GPU when there is one),
in fp32, and the result is cast to the logical dtype (the config's dtype, else bfloat16).

Example::

    infos, quantized = logical_tensors(stored_infos, config)
    w = dequantize(quantized["model.layers.0.mlp.down_proj.weight"], read, "cuda")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from deltakit.errors import DeltakitError
from deltakit.io.tensor_info import TensorInfo


FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)
DEFAULT_FP8_BLOCK = (128, 128)
MXFP4_BLOCK = 32  # values per e8m0 scale
E8M0_BIAS = 127
# FP4 e2m1 code -> value: sign bit 3, then the grid 0, 0.5, 1, 1.5, 2, 3, 4, 6.
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_VALUES = FP4_GRID + tuple(-v for v in FP4_GRID)
# Spacing of the FP4 grid at each code: the distance to the next value of larger magnitude (6: as below it).
FP4_STEPS = (0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0) * 2

# quant_method values (config.json quantization_config) of formats deltakit reads from their tensors.
READ_METHODS = {"fp8", "fbgemm_fp8", "compressed-tensors", "mxfp4"}
# Companion tensor names that betray a packed format deltakit does not read -> the format's name.
_PACKED_MARKERS = (
    (".qweight", "GPTQ/AWQ packed int weights"),
    (".qzeros", "GPTQ/AWQ packed int weights"),
    (".g_idx", "GPTQ packed int weights"),
    (".weight_packed", "compressed-tensors packed int weights"),
    (".absmax", "bitsandbytes 4-bit"),
    (".quant_map", "bitsandbytes 4-bit"),
    ("quant_state.bitsandbytes", "bitsandbytes 4-bit"),
    (".SCB", "bitsandbytes 8-bit"),
)
# Activation / cache scales of fp8 checkpoints: not weights, hidden with the weight scales.
_ACTIVATION_SCALES = (".input_scale", ".input_scale_inv", ".k_scale", ".v_scale", ".activation_scale")


@dataclass(frozen=True)
class QuantizedTensor:
    """One logical tensor stored quantized: its data and scale tensors and how to combine them."""

    name: str  # the logical name (``...weight``, ``...experts.gate_up_proj``)
    format: str  # "fp8" | "mxfp4"
    shape: tuple[int, ...]  # logical shape
    dtype: torch.dtype  # logical dtype (what dequantize returns)
    data: TensorInfo  # fp8 values, or MXFP4 blocks
    scale: TensorInfo  # fp8 scale (multiplied), or MXFP4 e8m0 exponents
    block: tuple[int, int] = DEFAULT_FP8_BLOCK  # fp8 block (rows, cols) when the scale is per block

    @property
    def description(self) -> str:
        if self.format == "mxfp4":
            return "MXFP4 (FP4 e2m1, 32-value blocks, e8m0 scales)"
        kind = str(self.data.dtype).removeprefix("torch.")
        return f"{kind} with {scale_granularity(self)} scales"


ReadFn = Callable[[TensorInfo, int | None, int | None, bool], torch.Tensor]  # (info, start, stop, pin)


def quant_method(config: Mapping[str, Any] | None) -> str | None:
    """The config's ``quantization_config.quant_method`` (lower case), or None."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, Mapping):
        return None
    method = qc.get("quant_method")
    if method is None and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        method = "bitsandbytes"
    return str(method).lower() if method is not None else None


def logical_dtype(config: Mapping[str, Any] | None) -> torch.dtype:
    """The dtype dequantized tensors come out in: the config's (b)float16/float32, else bfloat16."""
    name = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(str(name),
                                                                                                torch.bfloat16)


def refuse_unreadable(names: list[str], config: Mapping[str, Any] | None, where: object) -> None:
    """One DeltakitError naming the format when the checkpoint is quantized in a way deltakit does not read."""
    method = quant_method(config)
    if method is not None and method not in READ_METHODS:
        raise DeltakitError(
            f"{where} is quantized with {method} (config.json quantization_config); deltakit reads fp8 "
            "(with scales) and MXFP4 checkpoints only. Dequantize it to bf16 first")
    for name in names:
        for marker, fmt in _PACKED_MARKERS:
            if marker in name:
                raise DeltakitError(
                    f"{where} holds {fmt} ({name}); deltakit reads fp8 (with scales) and MXFP4 checkpoints only. "
                    "Dequantize it to bf16 first")


def logical_tensors(
    infos: Mapping[str, TensorInfo], config: Mapping[str, Any] | None, where: object = "checkpoint",
) -> tuple[dict[str, TensorInfo], dict[str, QuantizedTensor]]:
    """The checkpoint as its logical tensors: quantized ones under their logical names, companions hidden.

    Returns (name -> info with the logical shape and dtype, logical name -> QuantizedTensor).
    Refuses an fp8 tensor without a scale, MXFP4 blocks without scales, and unreadable formats.
    """
    refuse_unreadable(list(infos), config, where)
    dtype = logical_dtype(config)
    block = fp8_block(config)
    quantized: dict[str, QuantizedTensor] = {}
    hidden: set[str] = set()
    for name, info in infos.items():
        if info.dtype in FP8_DTYPES:
            scale = next((infos[name + s] for s in ("_scale_inv", "_scale") if name + s in infos), None)
            if scale is None:
                raise DeltakitError(f"{where}: {name} is {str(info.dtype).removeprefix('torch.')} without a scale "
                                    f"({name}_scale_inv or {name}_scale); deltakit never reads fp8 values raw")
            spec = QuantizedTensor(name, "fp8", info.shape, dtype, info, scale, block)
            scale_granularity(spec)  # refuse a scale whose shape fits no known layout, before any read
            quantized[name] = spec
            hidden.add(scale.name)
        elif name.endswith("_blocks") and info.dtype == torch.uint8:
            logical = name.removesuffix("_blocks")
            scale = infos.get(logical + "_scales")
            if scale is None or len(info.shape) < 3 or tuple(scale.shape) != tuple(info.shape[:-1]):
                raise DeltakitError(f"{where}: {name} looks like MXFP4 blocks but has no matching {logical}_scales")
            *lead, out, groups, half = info.shape
            if half * 2 != MXFP4_BLOCK:
                raise DeltakitError(f"{where}: {name} has blocks of {2 * half} values; MXFP4 uses {MXFP4_BLOCK}")
            width = groups * MXFP4_BLOCK
            shape = (*lead, width, out) if lead else (out, width)
            quantized[logical] = QuantizedTensor(logical, "mxfp4", tuple(shape), dtype, info, scale)
            hidden |= {name, scale.name}
    if quantized:
        hidden |= {n for n in infos if n.endswith(_ACTIVATION_SCALES)}
    out: dict[str, TensorInfo] = {}
    for name, info in infos.items():
        if name in hidden:
            continue
        spec = quantized.get(name)
        out[name] = info if spec is None else TensorInfo(name, spec.shape, spec.dtype, info.file)
    for logical, spec in quantized.items():
        if logical not in out:
            out[logical] = TensorInfo(logical, spec.shape, spec.dtype, spec.data.file)
    return out, quantized


def fp8_block(config: Mapping[str, Any] | None) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` (rows, cols), default 128×128."""
    qc = (config or {}).get("quantization_config")
    size = qc.get("weight_block_size") if isinstance(qc, Mapping) else None
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return int(size[0]), int(size[1])
    return DEFAULT_FP8_BLOCK


def scale_granularity(spec: QuantizedTensor) -> str:
    """"block" | "channel" | "tensor" for an fp8 scale, from its shape against the weight's; else refuse.

    The last two dimensions of the weight are (out, in); leading ones (experts) must match.
    """
    shape, scale = tuple(spec.data.shape), tuple(spec.scale.shape)
    numel = math.prod(scale)
    if numel == 1:
        return "tensor"
    if len(shape) >= 2:
        out, width = shape[-2:]
        lead = shape[:-2]
        blocks = (math.ceil(out / spec.block[0]), math.ceil(width / spec.block[1]))
        if scale == (*lead, *blocks):
            return "block"
        if scale in ((*lead, out, 1), (*lead, out)):
            return "channel"
        if lead and scale in (lead, (*lead, 1), (*lead, 1, 1)):
            return "tensor"  # one scale per expert
    raise DeltakitError(f"{spec.data.name} {shape}: cannot tell how its scale {spec.scale.name} {scale} applies "
                        f"(expected {spec.block[0]}×{spec.block[1]} blocks, one per output channel, or one in all)")


def _expanded_fp8_scale(spec: QuantizedTensor, read: ReadFn, rows: tuple[int, int] | None, pin: bool,
                        device: torch.device) -> torch.Tensor:
    """The scale of the rows read, shaped to broadcast against the weight's values (fp32 on ``device``)."""
    kind = scale_granularity(spec)
    shape = spec.data.shape
    start, stop = rows if rows is not None else (0, shape[0])
    scale_shape = tuple(spec.scale.shape)
    if kind == "tensor":
        if len(shape) >= 3 and math.prod(scale_shape) == shape[0] and shape[0] > 1:  # one per expert
            scale = read(spec.scale, start, stop, pin).reshape(stop - start, *([1] * (len(shape) - 1)))
        else:
            scale = read(spec.scale, None, None, pin).reshape(())
        return scale.to(device, torch.float32)
    if len(shape) >= 3:  # experts along dim 0: their scales along dim 0 too
        scale = read(spec.scale, start, stop, pin).to(device, torch.float32)
        offset, count = 0, None
    elif kind == "channel":
        scale = read(spec.scale, start, stop, pin).to(device, torch.float32)
        offset, count = 0, None
    else:  # 2-D blocks: the block rows covering start:stop
        first, last = start // spec.block[0], math.ceil(stop / spec.block[0])
        scale = read(spec.scale, first, last, pin).to(device, torch.float32)
        offset, count = start - first * spec.block[0], stop - start
    if kind == "channel":
        return scale.reshape(*scale.shape[: len(shape) - 1], 1) if scale.dim() < len(shape) else scale
    out, width = shape[-2:]
    scale = scale.repeat_interleave(spec.block[0], dim=-2)
    scale = scale.narrow(-2, offset, count) if count is not None else scale.narrow(-2, 0, out)
    return scale.repeat_interleave(spec.block[1], dim=-1).narrow(-1, 0, width)


def dequantize(spec: QuantizedTensor, read: ReadFn, device: str | torch.device = "cpu",
               rows: tuple[int, int] | None = None, pin: bool = False) -> torch.Tensor:
    """The logical tensor (or its dim-0 ``rows``) in ``spec.dtype`` on ``device``; the math runs there.

    ``read(info, start, stop, pin)`` returns dim-0 rows start:stop (None: all) of a stored tensor.
    """
    return _values_and_steps(spec, read, torch.device(device), rows, pin, steps=False)[0].to(spec.dtype)


def quantization_step(spec: QuantizedTensor, read: ReadFn, device: str | torch.device = "cpu",
                      rows: tuple[int, int] | None = None, pin: bool = False) -> torch.Tensor:
    """Per-entry quantization step of the dequantized tensor (fp32, logical shape), for a noise model.

    The step is the spacing of the format's grid at the stored value, times its scale: for fp8,
    2^(e − m) with e the value's binary exponent (clamped to the format's smallest normal) and m
    its mantissa bits (3 for e4m3, 2 for e5m2); for FP4 e2m1, 0.5 below 2, 1 below 4, 2 above,
    times 2^(scale − 127). Rounding to the grid moves an entry by at most half its step.
    """
    return _values_and_steps(spec, read, torch.device(device), rows, pin, steps=True)[1]


def _values_and_steps(spec: QuantizedTensor, read: ReadFn, device: torch.device, rows: tuple[int, int] | None,
                      pin: bool, steps: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    start, stop = rows if rows is not None else (None, None)
    if spec.format == "fp8":
        stored = read(spec.data, start, stop, pin).to(device)
        values = stored.to(torch.float32)
        scale = _expanded_fp8_scale(spec, read, rows, pin, device)
        step = fp8_spacing(values, stored.dtype) * scale if steps else None
        return values.mul_(scale), step
    blocks = read(spec.data, start, stop, pin).to(device)
    exponents = read(spec.scale, start, stop, pin).to(device).to(torch.int32) - E8M0_BIAS
    return _mxfp4(blocks, exponents, steps)


def _mxfp4(blocks: torch.Tensor, exponents: torch.Tensor, steps: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(..., out, G, 16) uint8 + (..., out, G) exponents -> (..., in, out) for 3-D, (out, in) for 2-D, fp32."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).to(torch.int64)  # low nibble first
    lead = blocks.shape[:-1]
    codes = codes.reshape(*lead, MXFP4_BLOCK)
    grid = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    factor = torch.ldexp(torch.ones((), device=blocks.device), exponents.to(torch.float32)).unsqueeze(-1)
    values = (grid[codes] * factor).flatten(-2)
    step = None
    if steps:
        spacing = torch.tensor(FP4_STEPS, dtype=torch.float32, device=blocks.device)
        step = (spacing[codes] * factor).flatten(-2)
    if blocks.dim() >= 4:  # experts: stored (E, out, in), used as (E, in, out) like the bf16 gpt-oss layout
        values = values.transpose(-1, -2).contiguous()
        step = step.transpose(-1, -2).contiguous() if step is not None else None
    return values, step


def fp8_spacing(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Grid spacing of an fp8 format at each (unscaled) value: 2^(max(e, e_min) − mantissa bits)."""
    info = torch.finfo(dtype)
    mantissa = 3 if dtype == getattr(torch, "float8_e4m3fn", None) else 2
    smallest_normal = math.log2(info.tiny)
    exponent = torch.floor(torch.log2(values.abs().clamp_min(info.tiny))).clamp_min(smallest_normal)
    return torch.exp2(exponent - mantissa)
