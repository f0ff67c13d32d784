"""Scaling intruder dimensions down: the write half of `deltakit intruders --scale λ -o DIR`.

Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (NeurIPS 2025,
arXiv 2410.21228), Section 5: multiplying each intruder's singular value by λ < 1 after
training recovers pre-training behaviour. The intruders are found by :mod:`deltakit.analyses.intruders`
(this module builds on it, never the reverse); the model is written as a sharded safetensors
folder, atomically. See docs/intruders.md.

Example::

    scale_intruders("base-model", "lora-merged", "out-model", scale=0.0)   # removes them
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from deltakit.analyses.intruders import (
    DEFAULT_EPSILON, DEFAULT_K, IntruderOptions, IntruderReport, MatrixIntruders, TopDirections,
    intruders_of_matrix, matrix_costs, new_report, open_source,
)
from deltakit.delta import DeltaItem, Selection, fetch_pair
from deltakit.device.reads import fetch
from deltakit.distributed import Parallel, exchange, process_device, reported_device, shared_directory, shared_writer
from deltakit.errors import DeltakitError
from deltakit.io.atomic import check_output_path
from deltakit.io.inputs import footprints
from deltakit.io.checkpoint import Checkpoint
from deltakit.io.model_files import copy_model_files, drop_quantization_config
from deltakit.io.kohya_files import is_adapter
from deltakit.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter, rows_to_write
from deltakit.lora.merging import dequantized_note
from deltakit.pairing import TensorPair
from deltakit.pipeline import ProgressFn, run, share
from deltakit.spectral.options import SpectralOptions


def intruder_correction(directions: TopDirections, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The change that multiplies each masked singular value by λ: −(1 − λ) Σ σᵢ uᵢ vᵢᵀ (m×n).

    W_ft + correction keeps the singular vectors and every other singular value of W_ft.
    """
    u, s, vh = directions.u[:, mask], directions.s[mask], directions.vh[mask]
    return (u * (s * (scale - 1.0))) @ vh


@dataclass
class ScaledMatrix:
    """What the scaling changed in one matrix."""

    name: str
    ranks: list[int]
    singular_values_before: list[float]
    singular_values_after: list[float]
    change_fro: float  # ‖W_out − W_ft‖_F, before rounding to the stored dtype

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Scaling:
    """The intervention: intruders at ``epsilon`` had their singular values multiplied by ``scale``."""

    scale: float
    epsilon: float
    output: str
    matrices: list[ScaledMatrix] = field(default_factory=list)
    tensors_written: int = 0
    files: list[str] = field(default_factory=list)
    dequantized: str | None = None  # the fine-tune was quantized: what was written instead (never re-quantized)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale, "epsilon": self.epsilon, "output": self.output,
            "changed_matrices": len(self.matrices),
            "scaled_dimensions": sum(len(m.ranks) for m in self.matrices),
            "tensors_written": self.tensors_written, "files": self.files, "dequantized": self.dequantized,
            "matrices": [m.to_dict() for m in self.matrices],
        }


def check_scale(scale: float) -> float:
    scale = float(scale)
    if math.isnan(scale) or math.isinf(scale) or scale < 0:
        raise DeltakitError(f"scale λ = {scale:g} must be a finite number ≥ 0 (0 removes the intruders, "
                            "1 leaves the model unchanged)")
    return scale


def scale_intruders(
    base: str | os.PathLike,
    ft: str | os.PathLike,
    output: str | os.PathLike,
    scale: float,
    k: int = DEFAULT_K,
    epsilon: float | Sequence[float] = (DEFAULT_EPSILON,),
    options: SpectralOptions = SpectralOptions(),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    allow_pickle: bool = False,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: ProgressFn | None = None,
    parallel: Parallel = Parallel(),
) -> IntruderReport:
    """Write ``ft`` to ``output`` with each intruder's singular value multiplied by ``scale`` (λ).

    W_out = W_ft − (1 − λ)·σ·u·vᵀ for every intruder at the first ε (Shuttleworth et al., Sec. 5),
    in the fine-tune's dtype; every other tensor is copied byte for byte, with config and
    tokenizer files, as a sharded safetensors model folder written atomically. A fused MoE
    expert tensor is scaled slice by slice: each expert's rows are its own matrix's. λ = 1 returns the
    fine-tune unchanged; λ = 0 removes the intruders. Returns the analysis with ``scaling`` set.
    With ``parallel`` (under torchrun) each process analyses and writes its share of the matrices.
    Example: ``scale_intruders("base", "ft", "ft-scaled", scale=0.75)``.
    """
    options = IntruderOptions(k, epsilon, options, Selection(tuple(include), tuple(exclude), allow_pickle))
    scale = check_scale(scale)
    if max_shard_bytes <= 0:
        raise DeltakitError("the maximum shard size must be positive")
    inputs = footprints([("base", base), ("fine-tune", ft)])
    check_output_path(output, force, inputs)
    spectral = options.spectral
    device = process_device(parallel, spectral.device)
    started = time.perf_counter()
    report = new_report(base, ft, options, reported_device(parallel, device))
    if is_adapter(ft):
        raise DeltakitError(f"{ft} is a LoRA adapter; scaling intruders writes a full model, so give the "
                            "merged fine-tune (W_base + B·A) as FT")
    source = open_source(base, ft, options.selection, report)
    base_ckpt, ft_ckpt, pairs = source.base, source.ft, source.pairs
    assert ft_ckpt is not None
    scaling = report.scaling = Scaling(scale=scale, epsilon=options.epsilon[0], output=str(output),
                                       dequantized=dequantized_note(ft_ckpt, None))
    plan = [(name, ft_ckpt.shape(name), ft_ckpt.dtype(name)) for name in ft_ckpt.keys()]
    costs = matrix_costs(source)
    # What is not analysed is copied as it is, shared out by size: whole tensors (norms, biases, ...)
    # and any expert slice of a fused tensor that no pair covers.
    copies = _copies(plan, pairs)
    my_copies = [copies[i] for i in parallel.share([cost for _, _, cost in copies])]
    with shared_directory(output, force, parallel, inputs) as tmp:
        writer = shared_writer(parallel, tmp, plan, max_shard_bytes=max_shard_bytes,
                               metadata={"deltakit": "intruders"})

        def read(mine: list[int]) -> Any:
            return source.stream(mine, device, spectral.dtype, spectral.reads_ahead(device))

        def scale_matrix(_: int, item: DeltaItem) -> tuple[MatrixIntruders, ScaledMatrix | None]:
            result, directions = intruders_of_matrix(item, options.k, options.epsilon, spectral)
            scaled = None
            if directions is not None and scale != 1.0 and result.count(scaling.epsilon):
                mask = directions.intruder_mask(scaling.epsilon)
                tensor, change_fro = _scaled_tensor(ft_ckpt, item.pair, directions, mask, scale, device,
                                                    spectral.dtype)
                ranks = [d.rank for d in result.intruders[scaling.epsilon]]
                before = [d.singular_value for d in result.intruders[scaling.epsilon]]
                scaled = ScaledMatrix(item.pair.name, ranks, before, [scale * s for s in before], change_fro)
            else:
                tensor = fetch_pair(ft_ckpt, item.pair.ft_tensor, item.pair, torch.device("cpu"))
            _write_stored(writer, ft_ckpt, item.pair.ft_tensor, tensor, item.pair.rows)
            return result, scaled

        everything = run(costs, read, scale_matrix, parallel=parallel, progress=progress, label="intruders")
        for name, rows, _ in my_copies:
            _write_stored(writer, ft_ckpt, name, fetch(ft_ckpt, name, torch.device("cpu"), rows), rows)
        expected = rows_to_write([(pairs[i].ft_tensor, pairs[i].rows) for i in share(costs, parallel)]
                                 + [(name, rows) for name, rows, _ in my_copies],
                                 {name: shape for name, shape, _ in plan})
        files = writer.finish(expected=expected, write_index=parallel.is_main)
        copied: list[str] = []
        if parallel.is_main:
            copied = copy_model_files(ft_ckpt, tmp)
            if "config.json" not in copied:  # a bare weights file: the base's config describes the same model
                copied += copy_model_files(base_ckpt, tmp, only_config=True)
            if ft_ckpt.quantized:  # the weights were read dequantized and are written so
                drop_quantization_config(tmp)
        for result, scaled in everything:
            report.matrices.append(result)
            if scaled is not None:
                scaling.matrices.append(scaled)
        copied = exchange(parallel, copied)[0]
        scaling.tensors_written = len(plan)
        scaling.files = sorted(p.name for p in files) + sorted(copied) + (
            ["model.safetensors.index.json"] if len(files) > 1 else [])
    report.elapsed_s = time.perf_counter() - started
    return report


def _copies(plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]], pairs: Sequence[TensorPair]
            ) -> list[tuple[str, tuple[int, int] | None, float]]:
    """(tensor, rows or None for all of it, size) of what no pair writes: the tensors no pair reads,
    and the slices of a fused expert tensor that no pair covers, should pairing leave any out (it
    pairs every expert today), so that no row of the output is left unwritten."""
    covered: dict[str, set[int]] = {}
    for pair in pairs:
        covered.setdefault(pair.ft_tensor, set()).update(range(*pair.rows) if pair.rows else ())
    copies: list[tuple[str, tuple[int, int] | None, float]] = []
    for name, shape, _ in plan:
        if name not in covered:
            copies.append((name, None, float(math.prod(shape))))
        elif covered[name]:  # a fused tensor: the expert slices no pair covers
            slice_size = float(math.prod(shape[1:]))
            copies += [(name, (e, e + 1), slice_size) for e in range(shape[0]) if e not in covered[name]]
    return copies


def _write_stored(writer: ShardedWriter, ft_ckpt: Checkpoint, name: str, tensor: torch.Tensor,
                  rows: tuple[int, int] | None) -> None:
    """Write ``tensor`` as the stored tensor ``name``, or as its rows ``rows`` (an expert's slice)."""
    if rows is None:
        writer.write(name, tensor.reshape(ft_ckpt.shape(name)))  # a convolution's matrix as stored
    else:
        writer.write(name, tensor.reshape(rows[1] - rows[0], *ft_ckpt.shape(name)[1:]), start_row=rows[0])


def _scaled_tensor(ft_ckpt: Checkpoint, pair: TensorPair, directions: TopDirections, mask: torch.Tensor,
                   scale: float, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """The stored fine-tune tensor (an expert's slice: that slice) plus the correction, back in its
    stored layout and dtype."""
    stored = fetch_pair(ft_ckpt, pair.ft_tensor, pair, torch.device("cpu"))
    correction = pair.analysed(intruder_correction(directions, mask, scale))
    updated = stored.to(device=device, dtype=dtype, copy=True)
    rows = correction.shape[0]
    updated[:rows] += correction  # the shared rows only, when the fine-tune added vocabulary
    if not bool(torch.isfinite(updated).all()):
        raise DeltakitError(f"{pair.name}: scaling produced non-finite values; nothing was written")
    change = float(torch.linalg.vector_norm(correction, dtype=torch.float64))
    return updated.to(stored.dtype).cpu(), change
