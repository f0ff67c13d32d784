"""`deltakit trajectory`: how ΔW grows over a training run's saved checkpoints.

For every weight matrix and every checkpoint t (a Trainer's ``output/checkpoint-*`` folders,
sorted by step): the relative change ‖ΔW_t‖_F / ‖W_base‖_F, the numerical rank and rank@energy
of ΔW_t (as `deltakit rank` computes them), the intruder dimensions of W_t (as `deltakit
intruders` finds them), and φ, the overlap of ΔW_t's top-k left singular subspace with the
final checkpoint's (Hu et al. 2021, §7.2). The base tensor is read once per matrix.

Example::

    report = trajectory("base", checkpoint_paths(["output/checkpoint-*"]))
    [p.rank_at[0.9] for p in report.matrices[0].points]
"""

from __future__ import annotations

import glob
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deltakit.analyses.compare import check_fts, check_top, open_sources
from deltakit.analyses.intruders import DEFAULT_EPSILON, DEFAULT_K, check_k, find_intruder_directions
from deltakit.analyses.meta import ReportMeta, by_module_type, check_energies, energy_key
from deltakit.analyses.rank import rank_matrix
from deltakit.delta import DeltaItem, MultiDeltaItem, Selection, stream_many
from deltakit.distributed import Parallel, matrix_cost, process_device, reported_device
from deltakit.errors import DeltakitError
from deltakit.pipeline import ProgressFn, run
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.subspace import subspace_overlap, top_directions

DEFAULT_TRAJECTORY_TOP = (8,)
_GLOB_CHARS = re.compile(r"[*?\[]")
_STEP = re.compile(r"(\d+)(?!.*\d)")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The training step in a checkpoint folder's name: the last number (``checkpoint-500`` -> 500)."""
    match = _STEP.search(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_paths(patterns: Sequence[str | os.PathLike]) -> list[str]:
    """Checkpoint folders from paths and globs (``output/checkpoint-*``), sorted by step number.

    A quoted glob is expanded here; every path must exist. When every name carries a step
    number the list is sorted by it, else the given order is kept.
    """
    paths: list[str] = []
    for pattern in map(str, patterns):
        if _GLOB_CHARS.search(pattern) and not os.path.exists(pattern):
            found = sorted(glob.glob(pattern))
            if not found:
                raise DeltakitError(f"no checkpoint matches {pattern}")
            paths += found
        elif not os.path.exists(pattern):
            raise DeltakitError(f"checkpoint {pattern} does not exist")
        else:
            paths.append(pattern)
    paths = list(dict.fromkeys(paths))
    steps = [checkpoint_step(p) for p in paths]
    if all(s is not None for s in steps):
        paths = [p for _, p in sorted(zip(steps, paths), key=lambda item: item[0])]  # type: ignore[arg-type, return-value]
    return paths


@dataclass
class TrajectoryPoint:
    """One matrix at one checkpoint."""

    delta_fro: float
    rel_delta: float
    rank: int
    rank_at: dict[float, int]
    intruders: int  # top-k directions of W_t with max |cos| < ε to every base direction
    overlap_with_final: dict[int, float | None]  # φ of the top-k left subspaces of ΔW_t and ΔW_final

    def to_dict(self) -> dict[str, Any]:
        return {"delta_fro": self.delta_fro, "rel_delta": self.rel_delta, "rank": self.rank,
                "rank_at": {energy_key(e): v for e, v in self.rank_at.items()}, "intruders": self.intruders,
                "overlap_with_final": {str(k): v for k, v in self.overlap_with_final.items()}}


@dataclass
class MatrixTrajectory:
    name: str
    shape: tuple[int, int]
    module_type: str
    layer: int | None
    layout: str
    points: list[TrajectoryPoint]  # one per checkpoint, in the report's order

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "module_type": self.module_type, "layer": self.layer,
                "layout": self.layout, "points": [p.to_dict() for p in self.points]}


@dataclass(repr=False)
class TrajectoryReport(ReportMeta):
    """Everything `deltakit trajectory` found; ``fts`` are the checkpoints, in step order."""

    steps: list[int | None] = field(default_factory=list)
    energy: tuple[float, ...] = (0.9,)
    top: tuple[int, ...] = DEFAULT_TRAJECTORY_TOP
    intruder_k: int = DEFAULT_K
    epsilon: float = DEFAULT_EPSILON
    matrices: list[MatrixTrajectory] = field(default_factory=list)

    def _series(self, items: list[MatrixTrajectory]) -> list[dict[str, Any]]:
        """Per checkpoint: means over ``items`` (the intruders summed)."""
        series = []
        for t, step in enumerate(self.steps):
            points = [m.points[t] for m in items]
            overlaps = {k: [p.overlap_with_final[k] for p in points if p.overlap_with_final.get(k) is not None]
                        for k in self.top}
            series.append({
                "checkpoint": self.fts[t], "step": step, "count": len(points),
                "mean_rel_delta": float(np.mean([p.rel_delta for p in points])),
                "mean_rank": float(np.mean([p.rank for p in points])),
                "mean_rank_at": {energy_key(e): float(np.mean([p.rank_at[e] for p in points])) for e in self.energy},
                "intruders": int(sum(p.intruders for p in points)),
                "mean_overlap_with_final": {str(k): float(np.mean(v)) if v else None for k, v in overlaps.items()},
            })
        return series

    def summary(self) -> dict[str, Any]:
        return {"overall": self._series(self.matrices),
                "by_module_type": {name: self._series(group) for name, group in by_module_type(self.matrices).items()}}

    def to_dict(self) -> dict[str, Any]:
        return self.report_dict({"steps": list(self.steps), "energy": list(self.energy), "top": list(self.top),
                                 "intruder_k": self.intruder_k, "epsilon": self.epsilon},
                                {"matrices": [m.to_dict() for m in self.matrices]}, {"summary": self.summary()})


def trajectory_matrix(
    item: MultiDeltaItem, energy: Sequence[float], top: Sequence[int], intruder_k: int, epsilon: float,
    options: SpectralOptions, rounding: bool | Sequence[bool] = True,
) -> MatrixTrajectory:
    """The trajectory of one matrix over the checkpoints of ``item`` (the last one is the final); ``rounding``
    per checkpoint (or for all): its ΔW is of two stored checkpoints, not an adapter's exact one."""
    rounded = [rounding] * len(item.deltas) if isinstance(rounding, bool) else list(rounding)
    pair = item.pairs[0]
    base = pair.analysed(item.base)
    ks = sorted(top)
    final = item.pairs[-1].analysed(item.deltas[-1])
    final_u = top_directions(final, ks[-1], options.exact, options.dtype)[0] if final.any() else None
    points = []
    for t, (ckpt_pair, delta) in enumerate(zip(item.pairs, item.deltas)):
        result, _ = rank_matrix(DeltaItem(ckpt_pair, item.base, delta), energy, options, rounded[t])
        delta = ckpt_pair.analysed(delta)
        if result.delta_fro > 0:
            directions = find_intruder_directions(base, base + delta, intruder_k, options.method, options.dtype)
            intruders = int(directions.intruder_mask(epsilon).sum())
            last = t == len(item.deltas) - 1
            u = final_u if last else top_directions(delta, ks[-1], options.exact, options.dtype)[0]
        else:
            intruders, u = 0, None
        overlap = {k: subspace_overlap(u[:, :k], final_u[:, :k]) if u is not None and final_u is not None else None
                   for k in ks}
        points.append(TrajectoryPoint(delta_fro=result.delta_fro, rel_delta=result.rel_delta, rank=result.rank,
                                      rank_at=dict(result.rank_at), intruders=intruders, overlap_with_final=overlap))
    return MatrixTrajectory(name=pair.name, shape=(int(base.shape[0]), int(base.shape[1])),
                            module_type=pair.module_type, layer=pair.layer, layout=pair.layout, points=points)


@dataclass(frozen=True)
class TrajectoryOptions:
    """What `trajectory` follows: energy fractions, subspace sizes, the intruder count and threshold, how
    spectra are computed and which tensors. Validated when made."""

    energy: tuple[float, ...] = (0.9,)
    top: tuple[int, ...] = DEFAULT_TRAJECTORY_TOP
    intruder_k: int = DEFAULT_K
    epsilon: float = DEFAULT_EPSILON
    spectral: SpectralOptions = field(default_factory=SpectralOptions)
    selection: Selection = field(default_factory=Selection)

    def __post_init__(self) -> None:
        energy = (self.energy,) if isinstance(self.energy, (int, float)) else self.energy
        object.__setattr__(self, "energy", check_energies(energy))
        object.__setattr__(self, "top", check_top(self.top))
        object.__setattr__(self, "intruder_k", check_k(self.intruder_k))
        if not 0.0 < float(self.epsilon) <= 1.0:
            raise DeltakitError(f"epsilon = {self.epsilon} must be in (0, 1] (a cosine-similarity threshold)")
        object.__setattr__(self, "epsilon", float(self.epsilon))


def trajectory(
    base: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    energy: float | Sequence[float] = (0.9,),
    top: Sequence[int] = DEFAULT_TRAJECTORY_TOP,
    intruder_k: int = DEFAULT_K,
    epsilon: float = DEFAULT_EPSILON,
    options: SpectralOptions = SpectralOptions(),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    parallel: Parallel = Parallel(),
) -> TrajectoryReport:
    """rel ΔW, rank, rank@energy, intruders and overlap with the final checkpoint, per checkpoint and matrix.

    ``checkpoints`` are in training order (see :func:`checkpoint_paths`); the last is the final one.
    """
    paths = check_fts(checkpoints, 1, "trajectory")
    made = TrajectoryOptions(energy, top, intruder_k, epsilon, options,
                             Selection(tuple(include), tuple(exclude), allow_pickle))
    return run_trajectory(base, paths, made, progress, parallel)


def run_trajectory(base: str | os.PathLike, paths: list[str], options: TrajectoryOptions,
                   progress: ProgressFn | None = None, parallel: Parallel = Parallel()) -> TrajectoryReport:
    """:func:`trajectory` with its options made: one row (a matrix in every checkpoint) per unit."""
    device = process_device(parallel, options.spectral.device)
    spectral = replace(options.spectral, device=str(device))
    started = time.perf_counter()
    sources, rows, skipped = open_sources(base, paths, options.selection)
    report = TrajectoryReport(base=str(base), fts=paths, device=reported_device(parallel, device),
                              method=spectral.method, precision=spectral.precision, skipped=skipped,
                              steps=[checkpoint_step(p) for p in paths], energy=options.energy, top=options.top,
                              intruder_k=options.intruder_k, epsilon=options.epsilon)
    costs = [len(paths) * matrix_cost(sources[0].pairs[row[0]].shape) for row in rows]
    rounding = [not s.is_adapter for s in sources]  # per checkpoint: an adapter's ΔW is exact

    def read(mine: list[int]) -> Any:
        return stream_many([rows[i] for i in mine], sources, device, spectral.dtype, spectral.reads_ahead(device))

    def follow(_: int, item: MultiDeltaItem) -> MatrixTrajectory:
        return trajectory_matrix(item, options.energy, options.top, options.intruder_k, options.epsilon, spectral,
                                 rounding)

    report.matrices = run(costs, read, follow, parallel=parallel, progress=progress, label="checkpoints")
    report.elapsed_s = time.perf_counter() - started
    return report
