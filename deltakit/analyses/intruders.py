"""`deltakit intruders`: intruder dimensions of a fine-tune (detection only).

Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (NeurIPS 2025,
arXiv 2410.21228), Algorithm 1: take the top-k left singular vectors of W_ft; one whose
largest absolute cosine similarity with every left singular vector of W_base is below ε is an
*intruder dimension*. LoRA creates them, full fine-tuning does not, and multiplying their
singular values by λ < 1 after training recovers pre-training behaviour (their Section 5):
that write is :mod:`deltakit.lora.intruder_scaling`; the tables are
:func:`deltakit.report.render_intruders`. See docs/intruders.md for the exact conventions.

Example::

    report = intruders("base-model", "lora-merged", k=10, epsilon=(0.5, 0.3))
    for m in report.matrices:
        print(m.name, m.count(0.5), [d.rank for d in m.intruders[0.5]])
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from deltakit.analyses.meta import PairReportMeta, by_layer, by_module_type, check_fractions, energy_key
from deltakit.delta import DeltaItem, DeltaSource, Selection, open_delta_source
from deltakit.distributed import Parallel, matrix_cost, process_device, reported_device
from deltakit.errors import DeltakitError
from deltakit.pipeline import ProgressFn, run
from deltakit.spectral.noise import storage_noise
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.spectrum import STORAGE_FLOOR_SAFETY, compute_spectrum
from deltakit.spectral.svd import METHODS, method_noise_floor, spectral_norm, top_singular_triplets

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


@dataclass(kw_only=True, repr=False)
class IntruderReport(PairReportMeta):
    """Everything `deltakit intruders` found; ``to_dict()`` is the JSON contract.

    base, ft (``fts[0]``), device, method, precision, skipped, only_base / only_ft, elapsed_s:
    :class:`~deltakit.analyses.meta.PairReportMeta`; ``scaling``: what
    :func:`deltakit.lora.intruder_scaling.scale_intruders` wrote (its ``Scaling``), None otherwise."""

    k: int
    epsilon: tuple[float, ...]
    matrices: list[MatrixIntruders] = field(default_factory=list)
    scaling: Any = None

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
        return self.report_dict({"k": self.k, "epsilon": list(self.epsilon)},
                                {"matrices": [m.to_dict() for m in self.matrices]},
                                {"summary": self.summary(), "scaling": self.scaling.to_dict() if self.scaling else None})


# ---------------------------------------------------------------- validation

def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise DeltakitError(f"k = {k} must be a positive integer (the number of top singular vectors examined; "
                            f"the paper uses {DEFAULT_K})")
    return k


def check_epsilons(epsilon: float | Sequence[float]) -> tuple[float, ...]:
    """Thresholds ε, each in (0, 1]; at least one; order kept (the first is the one --scale uses)."""
    values = (epsilon,) if isinstance(epsilon, (int, float)) else epsilon
    return check_fractions(values, "epsilon", f"it is a cosine-similarity threshold, e.g. epsilon={DEFAULT_EPSILON} "
                           f"(--epsilon {DEFAULT_EPSILON})", "epsilon (--epsilon)")


@dataclass(frozen=True)
class IntruderOptions:
    """What `intruders` examines: the top ``k`` singular vectors of each W_ft, the thresholds ε (the
    first is the one a scaling uses), how spectra are computed and which tensors. Validated when made."""

    k: int = DEFAULT_K
    epsilon: tuple[float, ...] = (DEFAULT_EPSILON,)
    spectral: SpectralOptions = field(default_factory=SpectralOptions)
    selection: Selection = field(default_factory=Selection)

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", check_k(self.k))
        object.__setattr__(self, "epsilon", check_epsilons(self.epsilon))


# ---------------------------------------------------------------- the analysis over a checkpoint pair

def within_rounding(item: DeltaItem) -> bool:
    """Whether ‖ΔW‖₂ is no larger than storage rounding alone can make it (the storage floor of
    :class:`~deltakit.spectral.spectrum.Spectrum`): then any turn of W_ft's singular vectors away
    from W_base's may be rounding, and none can be called an intruder."""
    pair = item.pair
    noise = storage_noise(item.base, item.delta, pair.base_dtype, pair.ft_dtype)
    return spectral_norm(item.delta) <= STORAGE_FLOOR_SAFETY * noise.spectral_edge


def intruders_of_matrix(
    item: DeltaItem, k: int, epsilons: Sequence[float], options: SpectralOptions, rounding: bool = True
) -> tuple[MatrixIntruders, TopDirections | None]:
    """Intruders of one pair; the directions too when W_ft differs from W_base (for the scaling).

    ``rounding``: the pair is two stored checkpoints (not an adapter's exact ΔW), so a ΔW within
    storage rounding is reported as ``below_rounding`` with no intruders counted.
    """
    pair = item.pair
    base = pair.analysed(item.base)
    shape = (int(base.shape[0]), int(base.shape[1]))
    changed = bool(torch.any(item.delta != 0))
    below = changed and rounding and within_rounding(item)
    if changed:
        directions: TopDirections | None = find_intruder_directions(
            base, pair.analysed(item.ft), k, options.method, options.dtype)
        sigma = directions.s.tolist()
        similarities = directions.similarity.tolist()
        closest = [int(i) + 1 for i in directions.closest.tolist()]
        base_norm = directions.base_sigma_max
    else:  # W_ft = W_base: each top vector is the base's own (|cos| = 1); only the values are needed
        directions = None
        values = compute_spectrum(base, options).values
        sigma = [float(v) for v in values[:k] if v > 0]
        similarities, closest = [1.0] * len(sigma), list(range(1, len(sigma) + 1))
        base_norm = float(values[0]) if values.size else 0.0
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


def open_source(base: str | os.PathLike, ft: str | os.PathLike, selection: Selection,
                report: IntruderReport) -> DeltaSource:
    """Open and pair both sides (weight matrices only); record what was left out in ``report``."""
    source = open_delta_source(base, ft, selection, matrices_only=True)
    report.skipped, report.only_base, report.only_ft = source.skipped, source.only_base, source.only_ft
    return source


def new_report(base: Any, ft: Any, options: IntruderOptions, device: str) -> IntruderReport:
    """An empty report of this run: its inputs and how it is computed."""
    return IntruderReport(base=str(base), fts=[str(ft)], k=options.k, epsilon=options.epsilon, device=device,
                          method=options.spectral.method, precision=options.spectral.precision)


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
    made = IntruderOptions(k, epsilon, options, Selection(tuple(include), tuple(exclude), allow_pickle))
    return run_intruders(base, ft, made, progress, parallel)


def run_intruders(base: str | os.PathLike, ft: str | os.PathLike, options: IntruderOptions,
                  progress: ProgressFn | None = None, parallel: Parallel = Parallel()) -> IntruderReport:
    """:func:`intruders` with its options made: every matrix through the pipeline."""
    spectral = options.spectral
    device = process_device(parallel, spectral.device)
    started = time.perf_counter()
    report = new_report(base, ft, options, reported_device(parallel, device))
    source = open_source(base, ft, options.selection, report)
    rounding = not source.is_adapter

    def read(mine: list[int]) -> Any:
        return source.stream(mine, device, spectral.dtype, spectral.reads_ahead(device))

    def analyse(_: int, item: DeltaItem) -> MatrixIntruders:
        return intruders_of_matrix(item, options.k, options.epsilon, spectral, rounding)[0]

    report.matrices = run(matrix_costs(source), read, analyse, parallel=parallel, progress=progress, label="intruders")
    report.elapsed_s = time.perf_counter() - started
    return report


def matrix_costs(source: DeltaSource) -> list[float]:
    """What each pair costs: two reduced SVDs per matrix."""
    return [matrix_cost(p.shape) for p in source.pairs]
