"""`deltakit intruders`: intruder dimensions of a fine-tune, and scaling them down.

Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (NeurIPS 2025,
arXiv 2410.21228), Algorithm 1: take the top-k left singular vectors of W_ft; one whose
largest absolute cosine similarity with every left singular vector of W_base is below ε is an
*intruder dimension*. LoRA creates them, full fine-tuning does not, and multiplying their
singular values by λ < 1 after training recovers pre-training behaviour (their Section 5).
See docs/intruders.md for the exact conventions.

Example::

    report = intruders("base-model", "lora-merged", k=10, epsilon=(0.5, 0.3))
    for m in report.matrices:
        print(m.name, m.count(0.5), [d.rank for d in m.intruders[0.5]])
    scale_intruders("base-model", "lora-merged", "out-model", scale=0.0)   # removes them
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from deltakit.analysis import by_layer, by_module_type, check_fractions, energy_key
from deltakit.spectral.options import SpectralOptions
from deltakit.delta import DeltaItem, DeltaSource, ProgressFn, open_delta_source, resolve_device
from deltakit.distributed import (
    Parallel, exchange, fail_together, gather_in_order, matrix_cost, shared_directory, shared_writer,
)
from deltakit.errors import DeltakitError
from deltakit.io.atomic import check_output_path
from deltakit.io.checkpoint import Checkpoint
from deltakit.io.model_files import copy_model_files
from deltakit.io.peft import is_peft_adapter
from deltakit.io.writer import DEFAULT_SHARD_BYTES
from deltakit.pairing import TensorPair
from deltakit.report import format_table
from deltakit.spectral.noise import storage_noise
from deltakit.spectral.spectrum import STORAGE_FLOOR_SAFETY
from deltakit.spectral.svd import METHODS, method_noise_floor, singular_values, spectral_norm, top_singular_triplets

DEFAULT_K = 10  # the paper's k (find_intruder_dimensions.py, k=10)
DEFAULT_EPSILON = 0.5  # the paper's default threshold (--intruder_dimension_threshold=0.5)


# ---------------------------------------------------------------- numerics of one matrix (no files)

def left_singular_basis(
    matrix: torch.Tensor, method: str = "gram", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The p = min(m, n) left singular vectors U (m×p, orthonormal) and values S (p,) of an m×n matrix.

    These are the reduced SVD's U (``full_matrices=False``, as in the paper's code): when m > n
    the remaining m − n directions span the null space of Mᵀ, carry no singular value, and are
    not singular vectors of M for this purpose. Gram path: m ≤ n takes U straight from
    eigh(M Mᵀ) (m×m); m > n takes V from eigh(MᵀM) (n×n) and orthonormalises M V by QR (its
    columns are σᵢuᵢ, already orthogonal in exact arithmetic). Descending order.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    matrix = matrix.to(dtype)
    m, n = matrix.shape
    if method == "exact":
        u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
        return u, s
    if method != "gram":
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    if m <= n:
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix @ matrix.T)
        return eigenvectors.flip(1), eigenvalues.flip(0).clamp_min(0).sqrt()
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix.T @ matrix)
    q, _ = torch.linalg.qr(matrix @ eigenvectors.flip(1))
    return q, eigenvalues.flip(0).clamp_min(0).sqrt()


def max_abs_cosine(vectors: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each column of ``vectors`` (m×k), its largest |cos| with any column of the orthonormal
    ``basis`` (m×p), and the index of that column: max over |basisᵀ v̂|, one matmul."""
    unit = vectors / torch.linalg.vector_norm(vectors, dim=0).clamp_min(torch.finfo(vectors.dtype).tiny)
    return (basis.T @ unit).abs().max(dim=0)


@dataclass
class TopDirections:
    """The fine-tune's top singular triplets (W_ft ≈ Σ sᵢ uᵢ vᵢᵀ) and how close each uᵢ is to the base.

    u: m×k, s: (k,), vh: k×n, similarity: (k,) max |cos| with a base left singular vector,
    closest: (k,) index of that base vector (0-based), base_sigma_max: σ₁ of W_base.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    similarity: torch.Tensor
    closest: torch.Tensor
    base_sigma_max: float

    def intruder_mask(self, epsilon: float) -> torch.Tensor:
        """True where the direction is an intruder at threshold ε: max |cos| < ε."""
        return self.similarity < epsilon


def find_intruder_directions(
    base: torch.Tensor, ft: torch.Tensor, k: int = DEFAULT_K, method: str = "gram", dtype: torch.dtype = torch.float32
) -> TopDirections:
    """Top-k left singular vectors of ``ft`` (m×n) and each one's max |cos| with ``base``'s left singular vectors.

    Only directions whose singular value is above the method's noise floor are examined (a
    singular vector of a zero singular value is arbitrary), so k may come back smaller.
    Example::

        d = find_intruder_directions(w_base, w_ft, k=10)
        d.s[d.intruder_mask(0.5)]     # the intruders' singular values
    """
    u, s, vh = top_singular_triplets(ft, k, method=method, dtype=dtype)
    sigma_max = float(s[0]) if s.numel() else 0.0
    floor = method_noise_floor(sigma_max, tuple(ft.shape), method, dtype)
    keep = int((s > floor).sum()) if sigma_max > 0 else 0
    u, s, vh = u[:, :keep], s[:keep], vh[:keep]
    basis, base_s = left_singular_basis(base, method, dtype)
    similarity, closest = max_abs_cosine(u, basis)
    return TopDirections(u, s, vh, similarity, closest, float(base_s[0]) if base_s.numel() else 0.0)


def intruder_correction(directions: TopDirections, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The change that multiplies each masked singular value by λ: −(1 − λ) Σ σᵢ uᵢ vᵢᵀ (m×n).

    W_ft + correction keeps the singular vectors and every other singular value of W_ft.
    """
    u, s, vh = directions.u[:, mask], directions.s[mask], directions.vh[mask]
    return (u * (s * (scale - 1.0))) @ vh


# ---------------------------------------------------------------- report

@dataclass
class Intruder:
    """One intruder dimension: its position among W_ft's singular values (1 = largest)."""

    rank: int
    singular_value: float
    similarity: float

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "singular_value": self.singular_value, "similarity": self.similarity}


@dataclass
class MatrixIntruders:
    """Intruder analysis of one weight matrix (analysed as [out, in]; see docs/intruders.md)."""

    name: str
    shape: tuple[int, int]
    dtype: str
    module_type: str
    layer: int | None
    layout: str
    changed: bool
    k: int
    singular_values: list[float]  # top-k of W_ft
    similarities: list[float]  # max |cos| of each with a base left singular vector
    closest_base_ranks: list[int]  # 1-based rank of that base vector
    base_spectral_norm: float
    intruders: dict[float, list[Intruder]]
    below_rounding: bool = False  # ‖ΔW‖₂ within storage rounding: directions not judged, no intruders counted

    def count(self, epsilon: float) -> int:
        return len(self.intruders[epsilon])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "shape": list(self.shape), "dtype": self.dtype, "module_type": self.module_type,
            "layer": self.layer, "layout": self.layout, "changed": self.changed, "k": self.k,
            "singular_values": self.singular_values, "similarities": self.similarities,
            "closest_base_ranks": self.closest_base_ranks, "base_spectral_norm": self.base_spectral_norm,
            "below_rounding": self.below_rounding,
            "intruder_count": {energy_key(e): len(v) for e, v in self.intruders.items()},
            "intruders": {energy_key(e): [d.to_dict() for d in v] for e, v in self.intruders.items()},
        }


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale, "epsilon": self.epsilon, "output": self.output,
            "changed_matrices": len(self.matrices),
            "scaled_dimensions": sum(len(m.ranks) for m in self.matrices),
            "tensors_written": self.tensors_written, "files": self.files,
            "matrices": [m.to_dict() for m in self.matrices],
        }


@dataclass
class IntruderReport:
    """Everything `deltakit intruders` found; ``to_dict()`` is the JSON contract."""

    base: str
    ft: str
    k: int
    epsilon: tuple[float, ...]
    matrices: list[MatrixIntruders] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    only_base: list[str] = field(default_factory=list)
    only_ft: list[str] = field(default_factory=list)
    scaling: Scaling | None = None
    device: str = "cpu"
    method: str = "gram"
    precision: str = "fp32"
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "matrices": len(self.matrices),
            "changed_matrices": sum(1 for m in self.matrices if m.changed),
            "matrices_with_intruders": {energy_key(e): sum(1 for m in self.matrices if m.count(e)) for e in self.epsilon},
            "intruders": {energy_key(e): sum(m.count(e) for m in self.matrices) for e in self.epsilon},
            "below_rounding": sum(1 for m in self.matrices if m.below_rounding),
            "by_module_type": {name: self._aggregate(items) for name, items in by_module_type(self.matrices).items()},
            "by_layer": {name: self._aggregate(items) for name, items in by_layer(self.matrices).items()},
        }

    def _aggregate(self, items: list[MatrixIntruders]) -> dict[str, Any]:
        return {
            "count": len(items),
            "matrices_with_intruders": {energy_key(e): sum(1 for m in items if m.count(e)) for e in self.epsilon},
            "intruders": {energy_key(e): sum(m.count(e) for m in items) for e in self.epsilon},
            "mean_intruders": {energy_key(e): float(np.mean([m.count(e) for m in items])) for e in self.epsilon},
            "mean_min_similarity": float(np.mean([min(m.similarities, default=1.0) for m in items])),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base, "ft": self.ft, "k": self.k, "epsilon": list(self.epsilon),
            "device": self.device, "method": self.method, "precision": self.precision,
            "elapsed_s": round(self.elapsed_s, 3),
            "matrices": [m.to_dict() for m in self.matrices],
            "skipped": list(self.skipped), "only_base": list(self.only_base), "only_ft": list(self.only_ft),
            "summary": self.summary(),
            "scaling": self.scaling.to_dict() if self.scaling else None,
        }


# ---------------------------------------------------------------- validation

def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise DeltakitError(f"k = {k} must be a positive integer (the number of top singular vectors examined; "
                            f"the paper uses {DEFAULT_K})")
    return k


def check_epsilons(epsilon: float | Sequence[float]) -> tuple[float, ...]:
    """Thresholds ε, each in (0, 1]; at least one; order kept (the first is the one --scale uses)."""
    values = (epsilon,) if isinstance(epsilon, (int, float)) else epsilon
    return check_fractions(values, "epsilon", f"it is a cosine-similarity threshold, e.g. --epsilon {DEFAULT_EPSILON}",
                           "--epsilon")


def check_scale(scale: float) -> float:
    scale = float(scale)
    if math.isnan(scale) or math.isinf(scale) or scale < 0:
        raise DeltakitError(f"scale λ = {scale:g} must be a finite number ≥ 0 (0 removes the intruders, "
                            "1 leaves the model unchanged)")
    return scale


# ---------------------------------------------------------------- the analysis over a checkpoint pair

def _oriented(tensor: torch.Tensor, pair: TensorPair) -> torch.Tensor:
    """[out, in]: GPT-2 Conv1D weights are stored [in, out] and are transposed to mean what Linear's do."""
    return tensor.T if pair.layout == "conv1d" else tensor


def within_rounding(item: DeltaItem) -> bool:
    """Whether ‖ΔW‖₂ is no larger than storage rounding alone can make it (the storage floor of
    :class:`~deltakit.spectral.spectrum.Spectrum`): then any turn of W_ft's singular vectors away
    from W_base's may be rounding, and none can be called an intruder."""
    pair = item.pair
    noise = storage_noise(item.base, item.delta, pair.base_dtype, pair.ft_dtype)
    return spectral_norm(item.delta) <= STORAGE_FLOOR_SAFETY * noise.spectral_edge


def analyse_matrix(
    item: DeltaItem, k: int, epsilons: Sequence[float], options: SpectralOptions, rounding: bool = True
) -> tuple[MatrixIntruders, TopDirections | None]:
    """Intruders of one pair; the directions too when W_ft differs from W_base (for the scaling).

    ``rounding``: the pair is two stored checkpoints (not an adapter's exact ΔW), so a ΔW within
    storage rounding is reported as ``below_rounding`` with no intruders counted.
    """
    pair = item.pair
    base = _oriented(item.base, pair)
    shape = (int(base.shape[0]), int(base.shape[1]))
    changed = bool(torch.any(item.delta != 0))
    below = changed and rounding and within_rounding(item)
    if changed:
        directions: TopDirections | None = find_intruder_directions(
            base, _oriented(item.ft, pair), k, options.method, options.dtype)
        sigma = directions.s.tolist()
        similarities = directions.similarity.tolist()
        closest = [int(i) + 1 for i in directions.closest.tolist()]
        base_norm = directions.base_sigma_max
    else:  # W_ft = W_base: each top vector is the base's own (|cos| = 1); only the values are needed
        directions = None
        spectrum = singular_values(base, options.method, options.dtype)
        floor = method_noise_floor(float(spectrum[0]), shape, options.method, options.dtype)
        sigma = [float(v) for v in spectrum[:k] if v > floor]
        similarities, closest = [1.0] * len(sigma), list(range(1, len(sigma) + 1))
        base_norm = float(spectrum[0])
    intruders = {
        e: [Intruder(rank=j + 1, singular_value=sigma[j], similarity=similarities[j])
            for j in range(len(sigma)) if similarities[j] < e and not below]
        for e in epsilons
    }
    result = MatrixIntruders(
        name=pair.name, shape=shape, dtype=str(pair.ft_dtype).removeprefix("torch."), module_type=pair.module_type,
        layer=pair.layer, layout=pair.layout, changed=changed, k=len(sigma), singular_values=sigma,
        similarities=similarities, closest_base_ranks=closest, base_spectral_norm=base_norm, intruders=intruders,
        below_rounding=below,
    )
    return result, directions


def _open_source(base: str | os.PathLike, ft: str | os.PathLike, include: Sequence[str], exclude: Sequence[str],
                 allow_pickle: bool, report: IntruderReport) -> DeltaSource:
    """Open and pair both sides (weight matrices only); record what was left out in ``report``."""
    source = open_delta_source(base, ft, include, exclude, allow_pickle, matrices_only=True)
    report.skipped, report.only_base, report.only_ft = source.skipped, source.only_base, source.only_ft
    return source


def _new_report(base: Any, ft: Any, k: int, epsilons: tuple[float, ...], device: torch.device,
                options: SpectralOptions) -> IntruderReport:
    return IntruderReport(base=str(base), ft=str(ft), k=k, epsilon=epsilons, device=str(device),
                          method=options.method, precision=options.precision)


def intruders(
    base: str | os.PathLike,
    ft: str | os.PathLike,
    k: int = DEFAULT_K,
    epsilon: float | Sequence[float] = (DEFAULT_EPSILON,),
    options: SpectralOptions = SpectralOptions(),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    parallel: Parallel = Parallel(),
) -> IntruderReport:
    """Intruder dimensions of every weight matrix of ``ft`` (a model, or a PEFT adapter on ``base``).

    With ``parallel`` (under torchrun) each process analyses its share of the matrices and
    every process returns the whole report.
    Example: ``intruders("base", "ft", epsilon=(0.5, 0.3)).summary()["intruders"]["0.5"]``.
    """
    k, epsilons = check_k(k), check_epsilons(epsilon)
    device = resolve_device(parallel.device if parallel.active else options.device)
    _ = options.dtype
    started = time.perf_counter()
    report = _new_report(base, ft, k, epsilons, device, options)
    source = _open_source(base, ft, include, exclude, allow_pickle, report)
    mine = _share(source, parallel)
    items = source.stream(mine, device, options.dtype, options.prefetch)
    if progress is not None:
        items = progress(items, len(mine), "intruders")
    with fail_together(parallel):
        local = [(index, analyse_matrix(item, k, epsilons, options, not source.is_adapter)[0])
                 for index, item in zip(mine, items)]
        report.matrices = gather_in_order(local, parallel)
    report.elapsed_s = time.perf_counter() - started
    return report


def _share(source: DeltaSource, parallel: Parallel) -> list[int]:
    """This process's pairs: two reduced SVDs per matrix, balanced by their cost."""
    return parallel.share([matrix_cost(p.shape) for p in source.pairs])


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
    tokenizer files, as a sharded safetensors model folder written atomically. λ = 1 returns the
    fine-tune unchanged; λ = 0 removes the intruders. Returns the analysis with ``scaling`` set.
    With ``parallel`` (under torchrun) each process analyses and writes its share of the matrices.
    Example: ``scale_intruders("base", "ft", "ft-scaled", scale=0.75)``.
    """
    k, epsilons, scale = check_k(k), check_epsilons(epsilon), check_scale(scale)
    if max_shard_bytes <= 0:
        raise DeltakitError("the maximum shard size must be positive")
    check_output_path(output, force)
    device = resolve_device(parallel.device if parallel.active else options.device)
    _ = options.dtype
    started = time.perf_counter()
    report = _new_report(base, ft, k, epsilons, device, options)
    if is_peft_adapter(ft):
        raise DeltakitError(f"{ft} is a LoRA adapter; scaling intruders writes a full model, so give the "
                            "merged fine-tune (W_base + B·A) as FT")
    source = _open_source(base, ft, include, exclude, allow_pickle, report)
    base_ckpt, ft_ckpt, pairs = source.base, source.ft, source.pairs
    assert ft_ckpt is not None
    mine = _share(source, parallel)
    items = source.stream(mine, device, options.dtype, options.prefetch)
    scaling = report.scaling = Scaling(scale=scale, epsilon=epsilons[0], output=str(output))
    if progress is not None:
        items = progress(items, len(mine), "intruders")
    plan = [(name, ft_ckpt.shape(name), ft_ckpt.dtype(name)) for name in ft_ckpt.keys()]
    # Tensors that are not analysed (norms, biases, ...) are copied as they are, shared out by size.
    others = [(name, shape, dtype) for name, shape, dtype in plan if name not in {p.name for p in pairs}]
    costs = [float(math.prod(shape)) for _, shape, _ in others]
    my_others = [others[i][0] for i in parallel.share(costs)]
    with shared_directory(output, force, parallel) as tmp:
        writer = shared_writer(parallel, tmp, plan, max_shard_bytes=max_shard_bytes,
                               metadata={"deltakit": "intruders"})
        local: list[tuple[int, tuple[MatrixIntruders, ScaledMatrix | None]]] = []
        written: set[str] = set()
        for index, item in zip(mine, items):
            result, directions = analyse_matrix(item, k, epsilons, options)
            scaled = None
            if directions is not None and scale != 1.0 and result.count(scaling.epsilon):
                mask = directions.intruder_mask(scaling.epsilon)
                tensor, change_fro = _scaled_tensor(ft_ckpt, item.pair, directions, mask, scale, device, options.dtype)
                writer.write(item.pair.name, tensor)
                written.add(item.pair.name)
                ranks = [d.rank for d in result.intruders[scaling.epsilon]]
                before = [d.singular_value for d in result.intruders[scaling.epsilon]]
                scaled = ScaledMatrix(item.pair.name, ranks, before, [scale * s for s in before], change_fro)
            local.append((index, (result, scaled)))
        unchanged = [pairs[i].name for i in mine if pairs[i].name not in written] + my_others
        for name in unchanged:
            writer.write(name, ft_ckpt.get(name))
        files = writer.finish(expected=sorted(written) + unchanged, write_index=parallel.is_main)
        copied: list[str] = []
        if parallel.is_main:
            copied = copy_model_files(ft_ckpt, tmp)
            if "config.json" not in copied:  # a bare weights file: the base's config describes the same model
                copied += copy_model_files(base_ckpt, tmp, only_config=True)
        for result, scaled in gather_in_order(local, parallel):
            report.matrices.append(result)
            if scaled is not None:
                scaling.matrices.append(scaled)
        copied = exchange(parallel, copied)[0]
        scaling.tensors_written = len(plan)
        scaling.files = sorted(p.name for p in files) + sorted(copied) + (
            ["model.safetensors.index.json"] if len(files) > 1 else [])
    report.elapsed_s = time.perf_counter() - started
    return report


def _scaled_tensor(ft_ckpt: Checkpoint, pair: TensorPair, directions: TopDirections, mask: torch.Tensor,
                   scale: float, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """The stored fine-tune tensor plus the correction, back in its stored layout and dtype."""
    stored = ft_ckpt.get(pair.name)
    correction = _oriented(intruder_correction(directions, mask, scale), pair)
    updated = stored.to(device=device, dtype=dtype, copy=True)
    rows = correction.shape[0]
    updated[:rows] += correction  # the shared rows only, when the fine-tune added vocabulary
    if not bool(torch.isfinite(updated).all()):
        raise DeltakitError(f"{pair.name}: scaling produced non-finite values; nothing was written")
    change = float(torch.linalg.vector_norm(correction, dtype=torch.float64))
    return updated.to(stored.dtype).cpu(), change


# ---------------------------------------------------------------- tables

def _ranks(items: list[Intruder]) -> str:
    return ",".join(str(d.rank) for d in items) or "-"


def render_report(report: IntruderReport) -> str:
    """The human-readable output of `deltakit intruders`: per matrix, per module type, totals."""
    eps = report.epsilon
    parts = [f"base: {report.base}", f"ft:   {report.ft}", ""]
    headers = ["matrix", "shape", "σ₁ ft", "σ₁ base", "min sim"] + [f"intr@{energy_key(e)}" for e in eps]
    headers.append(f"ranks@{energy_key(eps[0])}")
    rows = []
    for m in report.matrices:
        name = m.name + (" [conv1d]" if m.layout == "conv1d" else "")
        rows.append([name, "×".join(map(str, m.shape)), m.singular_values[0] if m.singular_values else 0.0,
                     m.base_spectral_norm, min(m.similarities, default=1.0)]
                    + [m.count(e) for e in eps] + [_ranks(m.intruders[eps[0]])])
    if rows:
        parts += [format_table(headers, rows), ""]
    summary = report.summary()
    group_headers = ["type", "matrices"] + [f"with@{energy_key(e)}" for e in eps]
    group_headers += [f"intr@{energy_key(e)}" for e in eps] + ["mean min sim"]
    group_rows = [[name, g["count"]] + [g["matrices_with_intruders"][energy_key(e)] for e in eps]
                  + [g["intruders"][energy_key(e)] for e in eps] + [g["mean_min_similarity"]]
                  for name, g in summary["by_module_type"].items()]
    if group_rows:
        parts += ["by module type", format_table(group_headers, group_rows), ""]
    for e in eps:
        total = summary["intruders"][energy_key(e)]
        parts.append(f"ε={energy_key(e)}: {total} intruder dimension{'' if total == 1 else 's'} in "
                     f"{summary['matrices_with_intruders'][energy_key(e)]} of {summary['matrices']} matrices "
                     f"(top k={report.k} left singular vectors of W_ft vs all of W_base)")
    if report.skipped:
        parts.append(f"skipped {len(report.skipped)}: " + "; ".join(
            f"{s['name']} ({s['reason']})" for s in report.skipped[:5]) + (" ..." if len(report.skipped) > 5 else ""))
    if report.scaling:
        s = report.scaling
        done = sum(len(m.ranks) for m in s.matrices)
        parts.append(f"scaled {done} intruder singular values (ε={energy_key(s.epsilon)}) in {len(s.matrices)} "
                     f"matrices by λ={s.scale:g}; wrote {s.tensors_written} tensors to {s.output}")
    below = summary["below_rounding"]
    if below:
        parts.append(f"{below} matri{'x' if below == 1 else 'ces'} changed by no more than storage rounding: "
                     "their directions were not judged (below_rounding in --json)")
    parts.append(f"{report.method} in {report.precision} on {report.device}, {report.elapsed_s:.2f} s")
    return "\n".join(parts)
