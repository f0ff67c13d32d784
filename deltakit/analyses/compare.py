"""`deltakit compare`: do two (or more) fine-tunes of one base change the same directions?

Per weight matrix present in every fine-tune, and per pair of fine-tunes (A, B):

* ``cosine``: cos(vec ΔW_A, vec ΔW_B), the task-vector similarity (Ilharco et al., ICLR 2023);
* ``overlap_at[k]``: φ = ‖U_A,iᵀ U_B,j‖²_F / min(i, j) of the top-k **left** singular subspaces
  (Hu et al. 2021, §7.2), with i = min(k, directions of ΔW_A), j likewise: a k beyond a
  matrix's shape or ΔW's rank is capped there (a rank-8 LoRA has 8 directions); ``right_overlap_at``
  the same for the right singular vectors; beside each, the expected φ of random subspaces,
  max(i, j)/m (left, m rows) and max(i, j)/n (right);
* ``norm_ratio``: ‖ΔW_A‖_F / ‖ΔW_B‖_F.

Matrices are analysed as [out, in] (GPT-2 Conv1D weights are transposed), embeddings as
[vocab, dim]. The base is read once per matrix and each fine-tune's tensor once
(:func:`deltakit.delta.stream_many`).

Example::

    report = compare("base", ["ft-task-a", "ft-task-b"], top=(8,))
    for m in report.matrices:
        print(m.name, m.cosine, m.overlap_at[8], m.random_overlap_at[8])
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from deltakit.analyses.meta import ReportMeta, by_layer, by_module_type
from deltakit.delta import DeltaSource, MultiDeltaItem, Selection, open_delta_source, stream_many
from deltakit.distributed import Parallel, matrix_cost, process_device, reported_device
from deltakit.errors import DeltakitError
from deltakit.pairing import TensorPair
from deltakit.pipeline import ProgressFn, run
from deltakit.spectral.noise import storage_noise
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.spectrum import STORAGE_FLOOR_SAFETY
from deltakit.spectral.subspace import delta_cosine, random_overlap, subspace_overlap, top_directions

DEFAULT_TOP = (1, 8, 64)


def check_top(top: int | Sequence[int]) -> tuple[int, ...]:
    """Subspace sizes k: positive integers, at least one; sorted, duplicates dropped."""
    values = (top,) if isinstance(top, int) else tuple(top)
    if not values:
        raise DeltakitError("give at least one --top K (the size of the singular subspaces compared)")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise DeltakitError(f"--top {k} must be a positive integer (the number of top singular vectors compared)")
    return tuple(sorted({int(k) for k in values}))


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def storage_floor(base: torch.Tensor, delta: torch.Tensor, pair: TensorPair, rounding: str) -> float:
    """The storage rounding's floor in one stored ΔW (``Spectrum.storage_floor``: 2 × its spectral edge)."""
    if not bool(torch.any(delta != 0)):
        return 0.0
    noise = storage_noise(base, delta, pair.base_dtype, pair.ft_dtype, rounding=rounding)
    return STORAGE_FLOOR_SAFETY * noise.spectral_edge


@dataclass
class PairResult:
    """One matrix compared between fine-tunes ``a`` and ``b`` (indices into the report's ``fts``)."""

    name: str
    shape: tuple[int, int]  # analysed [out, in]
    module_type: str
    layer: int | None
    layout: str
    a: int
    b: int
    delta_fro_a: float
    delta_fro_b: float
    norm_ratio: float | None  # ‖ΔW_a‖_F / ‖ΔW_b‖_F
    cosine: float | None
    directions_a: int  # top singular directions of ΔW_a above the noise floor (≤ max k)
    directions_b: int
    overlap_at: dict[int, float | None]
    right_overlap_at: dict[int, float | None]
    random_overlap_at: dict[int, float]
    random_right_overlap_at: dict[int, float]

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["shape"] = list(self.shape)
        for key in ("overlap_at", "right_overlap_at", "random_overlap_at", "random_right_overlap_at"):
            out[key] = {str(k): v for k, v in getattr(self, key).items()}
        return out


def compare_matrix(
    pair: TensorPair, deltas: Sequence[torch.Tensor], top: Sequence[int], exact: bool = False,
    dtype: torch.dtype = torch.float32, storage_floors: Sequence[float] | None = None,
) -> list[PairResult]:
    """Every pair (a < b) of the fine-tunes' ΔW of one matrix (``deltas`` as stored, analysed [out, in]);
    ``storage_floors``: per ΔW the storage rounding's floor its directions must clear (as `rank` counts)."""
    deltas = [pair.analysed(d) for d in deltas]
    shape = (int(deltas[0].shape[0]), int(deltas[0].shape[1]))
    ks = sorted(top)
    fro = [float(torch.linalg.vector_norm(d, dtype=torch.float64)) for d in deltas]
    floors = storage_floors or [0.0] * len(deltas)
    factors = [top_directions(d, ks[-1], exact, dtype, storage_floor=floor) if f > 0 else None
               for d, f, floor in zip(deltas, fro, floors)]
    results = []
    for a in range(len(deltas)):
        for b in range(a + 1, len(deltas)):
            fa, fb = factors[a], factors[b]
            da, db = (f[0].shape[1] if f is not None else 0 for f in (fa, fb))
            left, right, rand_left, rand_right = {}, {}, {}, {}
            for k in ks:
                i, j = min(k, da), min(k, db)
                both = fa is not None and fb is not None
                left[k] = subspace_overlap(fa[0][:, :i], fb[0][:, :j]) if both else None  # type: ignore[index]
                right[k] = subspace_overlap(fa[2][:i].T, fb[2][:j].T) if both else None  # type: ignore[index]
                rand_left[k] = random_overlap(i, j, shape[0]) if both else min(k, shape[0]) / shape[0]
                rand_right[k] = random_overlap(i, j, shape[1]) if both else min(k, shape[1]) / shape[1]
            results.append(PairResult(
                name=pair.name, shape=shape, module_type=pair.module_type, layer=pair.layer, layout=pair.layout,
                a=a, b=b, delta_fro_a=fro[a], delta_fro_b=fro[b],
                norm_ratio=fro[a] / fro[b] if fro[b] > 0 else None, cosine=delta_cosine(deltas[a], deltas[b]),
                directions_a=da, directions_b=db, overlap_at=left, right_overlap_at=right,
                random_overlap_at=rand_left, random_right_overlap_at=rand_right,
            ))
    return results


@dataclass(repr=False)
class CompareReport(ReportMeta):
    """Everything `deltakit compare` found; ``to_dict()`` is the JSON contract (docs/json.md)."""

    top: tuple[int, ...] = DEFAULT_TOP
    matrices: list[PairResult] = field(default_factory=list)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        n = len(self.fts)
        return [(a, b) for a in range(n) for b in range(a + 1, n)]

    def of_pair(self, a: int, b: int) -> list[PairResult]:
        return [m for m in self.matrices if (m.a, m.b) == (a, b)]

    @staticmethod
    def aggregate(items: list[PairResult]) -> dict[str, Any]:
        """Means over matrices (over those where the value exists)."""
        ks = sorted({k for m in items for k in m.overlap_at})

        def mean_at(key: str, k: int) -> float | None:
            return _mean([getattr(m, key).get(k) for m in items if k in getattr(m, key)])

        return {
            "count": len(items),
            "mean_cosine": _mean([m.cosine for m in items]),
            "mean_norm_ratio": _mean([m.norm_ratio for m in items]),
            **{f"mean_{key}": {str(k): mean_at(key, k) for k in ks}
               for key in ("overlap_at", "right_overlap_at", "random_overlap_at", "random_right_overlap_at")},
        }

    def summary(self) -> dict[str, Any]:
        """Per pair of fine-tunes: overall means, and by module type and by depth."""
        pairs = []
        for a, b in self.pairs:
            items = self.of_pair(a, b)
            pairs.append({
                "a": a, "b": b, **self.aggregate(items),
                "by_module_type": {name: self.aggregate(group) for name, group in by_module_type(items).items()},
                "by_layer": {name: self.aggregate(group) for name, group in by_layer(items).items()},
            })
        return {"matrices": len({m.name for m in self.matrices}), "pairs": pairs}

    def to_dict(self) -> dict[str, Any]:
        return self.report_dict({"top": list(self.top), "pairs": [list(p) for p in self.pairs]},
                                {"matrices": [m.to_dict() for m in self.matrices]}, {"summary": self.summary()})


def open_sources(
    base: str | os.PathLike, fts: Sequence[str | os.PathLike], selection: Selection = Selection(),
) -> tuple[list[DeltaSource], list[list[int]], list[dict[str, str]]]:
    """Open and pair every fine-tune (weight matrices only) against ``base``.

    Returns the sources, the rows (for each matrix present in every fine-tune, its index in
    each source's ``pairs``) and what was skipped, and why. Raises :class:`DeltakitError` when
    a fine-tune does not fit the base or no matrix is present in all.
    """
    sources, skipped = [], []
    for index, ft in enumerate(fts):
        try:
            source = open_delta_source(base, ft, selection, matrices_only=True)
        except DeltakitError as exc:
            raise DeltakitError(f"fine-tune {index} ({ft}): {exc}") from None
        sources.append(source)
        skipped += [{"name": s["name"], "reason": f"fine-tune {index}: {s['reason']}"} for s in source.skipped]
    positions = [{p.base_name: i for i, p in enumerate(s.pairs)} for s in sources]
    rows = []
    for name, first in positions[0].items():
        missing = [i for i, where in enumerate(positions) if name not in where]
        if missing:
            skipped.append({"name": name, "reason": f"not in fine-tune {', '.join(map(str, missing))}"})
            continue
        row = [where[name] for where in positions]
        shapes = {tuple(s.pairs[i].shape) for s, i in zip(sources, row)}
        if len(shapes) > 1:
            skipped.append({"name": name, "reason": f"analysed shapes differ between fine-tunes: {sorted(shapes)}"})
            continue
        rows.append(row)
    elsewhere = dict.fromkeys(name for where in positions[1:] for name in where if name not in positions[0])
    skipped += [{"name": name, "reason": "not in fine-tune 0"} for name in elsewhere]
    if not rows:
        raise DeltakitError("no weight matrix is present in every fine-tune; "
                            f"first of fine-tune 0: {next(iter(positions[0]), '(none)')}")
    return sources, rows, skipped


def check_fts(fts: Sequence[str | os.PathLike], least: int, what: str) -> list[str]:
    paths = [str(f) for f in fts]
    if len(paths) < least:
        raise DeltakitError(f"{what} needs at least {least} fine-tunes after BASE; got {len(paths)}"
                            + (f" ({paths[0]})" if paths else ""))
    return paths


@dataclass(frozen=True)
class CompareOptions:
    """What `compare` measures: the sizes k of the top subspaces, how they are computed (randomized SVD, or
    exact with ``spectral.exact``) and which tensors. Validated when made."""

    top: tuple[int, ...] = DEFAULT_TOP
    spectral: SpectralOptions = field(default_factory=SpectralOptions)
    selection: Selection = field(default_factory=Selection)

    def __post_init__(self) -> None:
        object.__setattr__(self, "top", check_top(self.top))


def compare(
    base: str | os.PathLike,
    fts: Sequence[str | os.PathLike],
    top: Sequence[int] = DEFAULT_TOP,
    options: SpectralOptions = SpectralOptions(),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    parallel: Parallel = Parallel(),
) -> CompareReport:
    """Cosine, left/right top-k subspace overlap and norm ratio of ΔW for every pair of ``fts``.

    ``fts`` are two or more models or PEFT adapters of ``base``. Top-k subspaces come from the
    randomized SVD, or the exact SVD with ``options.exact``. Under torchrun (``parallel``) each
    process takes its share of matrices and every process returns the whole report.
    Example: ``compare("base", ["a", "b"]).summary()["pairs"][0]["mean_overlap_at"]["8"]``.
    """
    made = CompareOptions(top, options, Selection(tuple(include), tuple(exclude), allow_pickle))
    return run_compare(base, check_fts(fts, 2, "compare"), made, progress, parallel)


def run_compare(base: str | os.PathLike, fts: list[str], options: CompareOptions,
                progress: ProgressFn | None = None, parallel: Parallel = Parallel()) -> CompareReport:
    """:func:`compare` with its options made: one row (the same matrix in every fine-tune) per unit."""
    spectral = options.spectral
    device = process_device(parallel, spectral.device)
    started = time.perf_counter()
    sources, rows, skipped = open_sources(base, fts, options.selection)
    report = CompareReport(base=str(base), fts=fts, device=reported_device(parallel, device),
                           method="exact" if spectral.exact else "randomized", precision=spectral.precision,
                           skipped=skipped, top=options.top)
    costs = [len(fts) * matrix_cost(sources[0].pairs[row[0]].shape) for row in rows]

    def read(mine: list[int]) -> Any:
        return stream_many([rows[i] for i in mine], sources, device, spectral.dtype, spectral.reads_ahead(device))

    stored = [not s.is_adapter for s in sources]  # an adapter's ΔW is exact: no storage rounding in it

    def measure(_: int, item: MultiDeltaItem) -> list[PairResult]:
        floors = [storage_floor(item.base, delta, pair, spectral.rounding) if rounded else 0.0
                  for pair, delta, rounded in zip(item.pairs, item.deltas, stored)]
        return compare_matrix(item.pairs[0], item.deltas, options.top, spectral.exact, spectral.dtype, floors)

    everything = run(costs, read, measure, parallel=parallel, progress=progress, label="ΔW subspaces")
    report.matrices = [result for results in everything for result in results]
    report.elapsed_s = time.perf_counter() - started
    return report
