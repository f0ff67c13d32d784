"""`deltakit rank`: per-matrix spectra of ΔW = W_ft − W_base and their rank metrics.

Example::

    report = rank("base-model", "fine-tuned-model", energy=(0.5, 0.9))
    for m in report.matrices:
        print(m.name, m.rank_at[0.9], m.random_rank_at[0.9])
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from itertools import chain
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
import torch

from deltakit.blocked import blocked_pair, blocked_spectrum
from deltakit.distributed import Parallel, fail_together, gather_in_order, matrix_cost, process_device, reported_device
from deltakit.delta import DeltaItem, DeltaSource, ProgressFn, open_delta_source, zip_released
from deltakit.pairing import TensorPair
from deltakit.errors import DeltakitError
from deltakit.report_meta import PairReportMeta
from deltakit.spectral import metrics
from deltakit.spectral.noise import exact_noise, storage_noise
from deltakit.spectral.norms import frobenius_norm
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.spectrum import (
    SMALL_OR_ZERO, AdaptivePlan, Spectrum, adaptive_spectrum, compute_spectrum, method_name,
)
from deltakit.spectral.subspace import amplification
from deltakit.streams import current_device
from deltakit.workers import MatrixWorkers, pair_device_bytes

ADAPTIVE_PLAN = AdaptivePlan()  # how far `rank`'s adaptive path goes (tests set a smaller one)


def energy_key(fraction: float) -> str:
    """JSON key of an energy fraction: 0.9 -> "0.9"."""
    return f"{fraction:g}"


def check_fractions(values: Sequence[float], label: str, hint: str, missing: str) -> tuple[float, ...]:
    """Fractions each in (0, 1], at least one, duplicates dropped, order kept; else a DeltakitError."""
    fractions = tuple(float(v) for v in values)
    if not fractions:
        raise DeltakitError(f"give at least one {missing}")
    for value in fractions:
        if math.isnan(value) or not 0.0 < value <= 1.0:
            raise DeltakitError(f"{label} {value:g} is outside (0, 1]; {hint}")
    return tuple(dict.fromkeys(fractions))


def check_energies(energy: Sequence[float]) -> tuple[float, ...]:
    """Validate energy fractions: each in (0, 1]; at least one."""
    return check_fractions(energy, "energy fraction", "use e.g. --energy 0.9", "energy fraction")


@dataclass
class MatrixResult:
    """Metrics of one 2-D ΔW; see docs/metrics.md for each formula."""

    name: str
    shape: tuple[int, int]
    dtype: str
    module_type: str
    layer: int | None
    layout: str
    fused: bool
    added_rows: int
    delta_fro: float
    rel_delta: float | None  # None when the base is zero; rel_delta_reason says so
    spectral_norm: float
    rank: int | None  # None: not settled on the adaptive path (lower_bounds["rank"] holds a bound)
    noise_floor: float
    stable_rank: float
    effective_rank: float
    rank_at: dict[float, int]
    random_rank_at: dict[float, int]
    noise_share: float = 0.0
    unchanged_fraction: float = 0.0
    signal_rank_at: dict[float, int | None] = field(default_factory=dict)
    signal_effective_rank: float | None = 0.0
    signal_rank: int | None = 0
    signal_energy: float = 0.0
    spectrum_method: str = "gram"
    noise_model: str = "exact"
    effective_rank_error: float | None = None  # standard error where the effective rank is estimated (adaptive path)
    lower_bounds: dict[str, int] = field(default_factory=dict)  # counts the adaptive path only bounds from below
    spectrum_fallback: str | None = None  # why the full path ran where the adaptive one was asked for

    def noise_dominated(self, fraction: float) -> bool:
        """True when rounding may account for more than 1 − ``fraction`` of ‖ΔW‖²: rank@fraction then measures rounding."""
        return self.noise_share > 1.0 - fraction
    rel_delta_reason: str | None = None
    expert: int | None = None  # expert index of a MoE expert's matrix
    tensor: str | None = None  # the tensor its experts are summarised under (fused: the stored name)
    amplification: dict[str, Any] | None = None  # {"k": r, "value": ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F} (Hu et al. 2021 §7.3)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        for key in ("rank_at", "random_rank_at", "signal_rank_at"):
            out[key] = {energy_key(k): v for k, v in getattr(self, key).items()}
        return out


@dataclass
class VectorResult:
    """A 1-D tensor (norm weight, bias): changed or not, and by how much."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    module_type: str
    layer: int | None
    changed: bool
    delta_norm: float
    rel_delta: float | None  # None when the base is zero; rel_delta_reason says so
    rel_delta_reason: str | None = None
    expert: int | None = None
    tensor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


@dataclass(kw_only=True)
class RankReport(PairReportMeta):
    """Everything `deltakit rank` found; ``to_dict()`` is the documented JSON contract.

    base, ft (``fts[0]``), device, method, precision, skipped, only_base / only_ft, elapsed_s:
    :class:`~deltakit.report_meta.PairReportMeta`."""

    energy: tuple[float, ...]
    matrices: list[MatrixResult] = field(default_factory=list)
    vectors: list[VectorResult] = field(default_factory=list)
    spectra: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    signal_spectra: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # where they differ from spectra

    def summary(self) -> dict[str, Any]:
        """Aggregates by module type and by depth: count, mean / median rank@energy, mean relative change."""
        return {
            "matrices": len(self.matrices),
            "changed_matrices": sum(1 for m in self.matrices if m.delta_fro > 0),
            "vectors": len(self.vectors),
            "changed_vectors": sum(1 for v in self.vectors if v.changed),
            "noise_dominated": self._noise_dominated(self.matrices),
            "by_module_type": {name: self._aggregate(items) for name, items in by_module_type(self.matrices).items()},
            "by_layer": {name: self._aggregate(items) for name, items in by_layer(self.matrices).items()},
            "by_tensor": {name: self._aggregate(items) for name, items in by_tensor(self.matrices).items()},
        }

    def _aggregate(self, items: list[MatrixResult]) -> dict[str, Any]:
        return {
            "count": len(items),
            "mean_rank": _mean_known(m.rank for m in items),
            "rank_unsettled": sum(1 for m in items if m.rank is None),
            "changed": sum(1 for m in items if m.delta_fro > 0),
            "mean_rel_delta": _mean_known(m.rel_delta for m in items),
            "mean_rank_at": {energy_key(e): float(np.mean([m.rank_at[e] for m in items])) for e in self.energy},
            "median_rank_at": {energy_key(e): float(np.median([m.rank_at[e] for m in items])) for e in self.energy},
            "mean_random_rank_at": {
                energy_key(e): float(np.mean([m.random_rank_at[e] for m in items])) for e in self.energy
            },
            "mean_noise_share": float(np.mean([m.noise_share for m in items])),
            "median_signal_rank_at": {energy_key(e): _median_known([m.signal_rank_at.get(e) for m in items])
                                      for e in self.energy},
            "noise_dominated": self._noise_dominated(items),
        }

    def _noise_dominated(self, items: list[MatrixResult]) -> dict[str, int]:
        """Per energy fraction X: how many matrices' rank@X may be rounding (noise share > 1 − X)."""
        return {energy_key(e): sum(1 for m in items if m.delta_fro > 0 and m.noise_dominated(e)) for e in self.energy}

    def to_dict(self) -> dict[str, Any]:
        return self.report_dict({"energy": list(self.energy)},
                                {"matrices": [m.to_dict() for m in self.matrices],
                                 "vectors": [v.to_dict() for v in self.vectors]},
                                {"summary": self.summary()})

    def spectra_info(self) -> dict[str, Any]:
        """The ``info`` block of a spectra file (see deltakit.io.spectra)."""
        return {
            "base": self.base, "ft": self.ft, "energy": list(self.energy),
            "matrices": {
                m.name: {"shape": list(m.shape), "module_type": m.module_type, "layer": m.layer,
                         "rank_at": {energy_key(k): v for k, v in m.rank_at.items()},
                         "signal_rank_at": {energy_key(k): v for k, v in m.signal_rank_at.items()},
                         "noise_share": m.noise_share, "signal_energy": m.signal_energy,
                         "energy": m.delta_fro ** 2, "partial": m.spectrum_method.startswith("adaptive")}
                for m in self.matrices
            },
        }


MODULE_ORDER = ("embed", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "mlp_in", "mlp_out", "router",
                "experts.gate", "experts.up", "experts.gate_up", "experts.down", "lm_head")


def group_order(group: str) -> tuple[int, int, str]:
    """Layers numerically, module types in transformer order, anything else last."""
    if group.isdigit():
        return (0, int(group), "")
    return (1, MODULE_ORDER.index(group) if group in MODULE_ORDER else len(MODULE_ORDER), group)


T = TypeVar("T")


def _grouped(items: Iterable[T], key: Callable[[T], str]) -> dict[str, list[T]]:
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return {name: groups[name] for name in sorted(groups, key=group_order)}


def by_module_type(items: Iterable[T]) -> dict[str, list[T]]:
    """Per-matrix results grouped by ``module_type``, in transformer order (q, k, v, o, gate, ...)."""
    return _grouped(items, lambda m: m.module_type)  # type: ignore[attr-defined]


def by_layer(items: Iterable[T]) -> dict[str, list[T]]:
    """Per-matrix results grouped by layer index ("0", "1", ..., "none" for embeddings and heads)."""
    return _grouped(items, lambda m: "none" if m.layer is None else str(m.layer))  # type: ignore[attr-defined]


def _median_known(values: Iterable[float | None]) -> float | None:
    """Median of the values that are known (not None); None when none is."""
    return _of_known(values, np.median)


def _of_known(values: Iterable[float | None], reduce: Callable[[list[float]], Any]) -> float | None:
    """``reduce`` (np.mean, np.median) of the values that are not None; None when there are none."""
    known = [v for v in values if v is not None]
    return float(reduce(known)) if known else None


def by_tensor(items: Iterable[T]) -> dict[str, list[T]]:
    """MoE experts' matrices grouped by the tensor they belong to (a fused 3-D tensor, or
    ``...experts.*.gate_proj.weight`` for one expert per tensor); other matrices are left out."""
    experts = [m for m in items if getattr(m, "expert", None) is not None]
    groups: dict[str, list[T]] = {}
    for m in experts:
        groups.setdefault(m.tensor, []).append(m)  # type: ignore[attr-defined]
    return groups


@lru_cache(maxsize=256)
def _random_rank(shape: tuple[int, int], fraction: float) -> int:
    return metrics.random_rank_at_energy(shape, fraction)


ZERO_BASE = "zero base"  # rel_delta_reason when ‖W_base‖ = 0: the ratio is undefined, delta_fro still says the size


def relative_change(delta_norm: float, base_norm: float) -> float | None:
    """‖ΔW‖ / ‖W_base‖, or None for a zero base (never inf or nan: the JSON report must stay finite)."""
    return delta_norm / base_norm if base_norm > 0 else None


def _require_finite(name: str, delta_norm: float, base_norm: float) -> None:
    """A tensor holding inf / nan has no defined ΔW: one clear error, not a failed SVD or a nan in the report."""
    if not (math.isfinite(delta_norm) and math.isfinite(base_norm)):
        raise DeltakitError(f"{name}: the base or the fine-tune holds inf or nan values; its ΔW is not defined")


def _mean_known(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    return _of_known(values, np.mean)


def _fro(tensor: torch.Tensor) -> float:
    return frobenius_norm(tensor)  # float64 sums by row blocks: no float64 copy of a large W_base or ΔW


def quantization_steps(source: DeltaSource, pair: TensorPair, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-entry quantization steps of both sides when both store ``pair`` quantized (fp8 with scales,
    MXFP4), as stored and analysed alike; None otherwise (the dtype's grid is the noise model then)."""
    if source.ft is None or pair.base_name not in source.base.quantized or pair.ft_tensor not in source.ft.quantized:
        return None
    steps = (source.base.quantization_step(pair.base_name, device, pair.rows),
             source.ft.quantization_step(pair.ft_tensor, device, pair.rows))
    shape = tuple(pair.shape)
    if any(step is None or step.numel() != math.prod(shape) for step in steps) or pair.layout == "conv1d":
        return None
    return steps[0].reshape(shape), steps[1].reshape(shape)


def matrix_spectrum(item: DeltaItem, options: SpectralOptions, rounding: bool = True,
                    base_fro: float | None = None, fractions: Sequence[float] = (),
                    adaptive: bool = False, steps: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[Spectrum, str | None]:
    """The :class:`Spectrum` of one ΔW, with its storage rounding estimated (``rounding``) or known to be absent.

    With ``adaptive``, only the top of the spectrum that settles rank@``fractions`` is computed
    where that is cheaper (:func:`adaptive_spectrum`); the second value says why the full path
    ran instead, when it did for a reason other than the matrix being small.
    """
    pair, delta = item.pair, item.delta
    delta_fro = _fro(delta)
    _require_finite(pair.name, delta_fro, _fro(item.base) if base_fro is None else base_fro)
    noise = (storage_noise(item.base, delta, pair.base_dtype, pair.ft_dtype, steps=steps) if rounding
             else exact_noise(delta))
    energy = delta_fro ** 2
    if energy == 0.0:
        shape = (int(pair.shape[0]), int(pair.shape[1]))
        zeros = np.zeros(min(shape))
        return Spectrum(zeros, shape, method_name(options), 0.0, noise, zeros.copy(), 0.0, 0.0), None
    fallback = None
    if adaptive:
        spectrum, why = adaptive_spectrum(delta, noise, energy, fractions, ADAPTIVE_PLAN)
        if spectrum is not None:
            return spectrum, None
        fallback = why if why not in SMALL_OR_ZERO else None
    return compute_spectrum(delta, options, noise, energy), fallback


def analyse_matrix(
    item: DeltaItem, energy: Sequence[float], options: SpectralOptions, rounding: bool = True, adaptive: bool = False,
    steps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[MatrixResult, Spectrum]:
    """Metrics and the spectrum of one ΔW (``rounding``: estimate the storage rounding in it;
    ``adaptive``: compute only the top of the spectrum where that settles the metrics)."""
    finish, spectrum = start_matrix(item, energy, options, rounding, adaptive, steps)
    return finish(), spectrum


def start_matrix(
    item: DeltaItem, energy: Sequence[float], options: SpectralOptions, rounding: bool = True, adaptive: bool = False,
    steps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Callable[[], MatrixResult], Spectrum]:
    """:func:`analyse_matrix` in two halves: everything that needs ΔW now, and ``finish()`` for the
    metrics that may wait for work still running on the device (the adaptive path's tail
    quadrature). Calling ``finish()`` after starting the next matrix keeps the device busy while
    the host solves; ``item`` may be dropped before ``finish()``."""
    base_fro = _fro(item.base)
    spectrum, fallback = matrix_spectrum(item, options, rounding, base_fro, energy, adaptive, steps)
    known_rank = spectrum.rank if spectrum.rank is not None else spectrum.lower_bounds.get("rank", 0)
    amplified = amplification(item.base, item.delta, math.sqrt(spectrum.total_energy), known_rank,
                              directions=getattr(spectrum, "directions", None))
    pair = item.pair  # the closure must not hold the item's tensors

    def finish() -> MatrixResult:
        result = matrix_result(pair, spectrum, base_fro, energy, fallback)
        result.amplification = amplified
        return result

    return finish, spectrum


def matrix_result(pair: TensorPair, spectrum: Spectrum, base_fro: float, energy: Sequence[float],
                  fallback: str | None = None) -> MatrixResult:
    """The :class:`MatrixResult` of one ΔW from its spectrum and ‖W_base‖_F (amplification left None)."""
    delta_fro = math.sqrt(spectrum.total_energy)
    shape = spectrum.shape
    noise = spectrum.noise
    return MatrixResult(
        name=pair.name, shape=shape, dtype=str(pair.ft_dtype).removeprefix("torch."),
        module_type=pair.module_type, layer=pair.layer, layout=pair.layout, fused=pair.fused,
        added_rows=pair.added_rows, delta_fro=delta_fro, rel_delta=relative_change(delta_fro, base_fro),
        rel_delta_reason=None if base_fro else ZERO_BASE, expert=pair.expert, tensor=pair.group,
        spectral_norm=float(spectrum.values[0]) if spectrum.values.size else 0.0,
        rank=spectrum.rank, noise_floor=spectrum.noise_floor,
        stable_rank=spectrum.stable_rank(), effective_rank=spectrum.effective_rank(),
        rank_at={e: spectrum.rank_at(e) for e in energy},
        random_rank_at={e: _random_rank(shape, e) for e in energy},
        noise_share=spectrum.noise_share,
        unchanged_fraction=noise.unchanged_fraction if noise is not None else 0.0,
        signal_rank_at={e: spectrum.signal_rank_at(e) for e in energy},
        signal_effective_rank=spectrum.signal_effective_rank(), signal_rank=spectrum.signal_rank,
        signal_energy=spectrum.signal_energy,
        spectrum_method=spectrum.method, noise_model=noise.model if noise is not None else "exact",
        effective_rank_error=spectrum.effective_rank_error, lower_bounds=spectrum.lower_bounds,
        spectrum_fallback=fallback,
    )


def per_expert(item: DeltaItem) -> list[DeltaItem]:
    """An adapter's ΔW of fused experts (E, a, b) or (E, n) as one item per expert, named ``name[e]``
    as the pairing names a checkpoint's expert slices; any other item as it is."""
    pair = item.pair
    if len(pair.shape) != 3:
        return [item]
    return [DeltaItem(pair=replace(pair, name=f"{pair.name}[{e}]", shape=tuple(pair.shape[1:]), expert=e,
                                   expert_slice=True),
                      base=item.base[e], delta=item.delta[e])
            for e in range(pair.shape[0])]


FINISH_BEHIND = 2  # items started before the oldest is finished: its tail's Lanczos and quadrature are done by then


def finished(unfinished: list[tuple[int, list[Any]]]) -> list[tuple[int, list[tuple[Any, Any]]]]:
    """The items with every ``finish`` called, in order; ``unfinished`` is emptied. An entry is
    (result, kept), or a future of (finish, kept) from :func:`start_kept` on a worker."""
    def done(entry: Any) -> tuple[Any, Any]:
        if isinstance(entry, Future):
            finish, kept = entry.result()
            return finish(), kept
        return entry

    out = [(index, [done(entry) for entry in found]) for index, found in unfinished]
    unfinished.clear()
    return out


def start_kept(item: DeltaItem, energy: Sequence[float], options: SpectralOptions, rounding: bool, adaptive: bool,
               source: DeltaSource, keep: bool) -> tuple[Callable[[], MatrixResult], Any]:
    """:func:`start_matrix` (with the quantization steps of ``source``, read here: on a worker
    thread, not the caller's), and the values a spectra file keeps (None unless ``keep``)."""
    steps = quantization_steps(source, item.pair, item.delta.device) if rounding else None
    finish, spectrum = start_matrix(item, energy, options, rounding, adaptive, steps)
    return finish, kept_values(spectrum) if keep else None


def kept_values(spectrum: Spectrum) -> tuple[Any, Any]:
    """What a spectra file keeps of a matrix: all its values, and its signal values when they differ."""
    return spectrum.all_values, None if spectrum.signal_is_raw else spectrum.signal


def analyse_vector(item: DeltaItem) -> VectorResult:
    pair = item.pair
    delta_norm, base_norm = _fro(item.delta), _fro(item.base)
    _require_finite(pair.name, delta_norm, base_norm)
    return VectorResult(
        name=pair.name, shape=tuple(pair.shape), dtype=str(pair.ft_dtype).removeprefix("torch."),
        module_type=pair.module_type, layer=pair.layer, changed=delta_norm > 0, delta_norm=delta_norm,
        rel_delta=relative_change(delta_norm, base_norm), rel_delta_reason=None if base_norm else ZERO_BASE,
        expert=pair.expert, tensor=pair.group,
    )


def rank(
    base: str | os.PathLike,
    ft: str | os.PathLike,
    energy: Sequence[float] = (0.9,),
    options: SpectralOptions = SpectralOptions(),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    allow_pickle: bool = False,
    keep_spectra: bool = False,
    progress: ProgressFn | None = None,
    parallel: Parallel = Parallel(),
) -> RankReport:
    """Spectra and rank metrics of every ΔW between ``base`` and ``ft`` (a model or a PEFT adapter).

    ``energy`` fractions give rank@energy (default 0.9, as in Biderman et al. 2024). With
    ``parallel`` (under torchrun) each process analyses its share and every process returns
    the whole report, identical to a single-process run.
    Example: ``rank("base", "ft").matrices[0].rank_at[0.9]``.
    """
    energy = check_energies(energy)
    device = process_device(parallel, options.device)
    _ = options.dtype  # validate precision early
    started = time.perf_counter()
    source = open_delta_source(base, ft, include, exclude, allow_pickle)
    report = RankReport(base=str(base), fts=[str(ft)], energy=energy, device=reported_device(parallel, device),
                        method=options.method, precision=options.precision, skipped=source.skipped, only_base=source.only_base,
                        only_ft=source.only_ft)
    # saved spectra are whole ones, unless the adaptive path was asked for (then the top values, marked partial)
    adaptive = options.adaptive_on(device) and (not keep_spectra or options.spectrum == "adaptive")
    mine = parallel.share([matrix_cost(p.shape) for p in source.pairs])
    blocked = [i for i in mine if blocked_pair(source, source.pairs[i], options.dtype)]  # too large to hold whole
    streamed = [i for i in mine if i not in blocked] if blocked else mine  # blocked: a few (embeddings, lm_head)
    # the blocked pairs come after the stream has finished, so nothing is read ahead while they run
    workers = MatrixWorkers(device, options.matrix_threads(device, adaptive))
    stream = source.stream(streamed, device, options.dtype, options.reads_ahead(device))
    sizes = [pair_device_bytes(source.pairs[i], options.dtype) for i in streamed]
    work = chain(zip_released(streamed, workers.paced(stream, sizes)), ((i, None) for i in blocked))
    rounding = not source.is_adapter  # an adapter's ΔW is exact: no storage rounding in it
    if progress is not None:
        work = progress(work, len(mine), "ΔW spectra")
    local: list[tuple[int, Any]] = []
    unfinished: list[tuple[int, list[Any]]] = []  # items started, not yet finished
    behind = FINISH_BEHIND + workers.threads - 1
    with fail_together(parallel), current_device(device), workers:
        for index, item in work:
            if item is None:
                pair = source.pairs[index]
                local.extend(finished(unfinished))  # the workers' pairs leave the device first
                spectrum, base_fro = blocked_spectrum(source, pair, device, options.dtype)
                kept = kept_values(spectrum) if keep_spectra else None
                local.append((index, [(matrix_result(pair, spectrum, base_fro, energy), kept)]))
                continue
            found: list[Any] = []
            for one in per_expert(item):
                if one.pair.is_matrix and one.pair.layout != "vector":
                    found.append(workers.submit(start_kept, one, energy, options, rounding, adaptive, source,
                                                keep_spectra))
                else:
                    found.append((analyse_vector(one), None))
            item = one = None  # dropped before the next read: a pair too large to read ahead is read only then
            unfinished.append((index, found))
            if len(unfinished) > behind:  # the host work of items started earlier runs beside this one's
                local.extend(finished([unfinished.pop(0)]))
        local.extend(finished(unfinished))
        everything = [entry for found in gather_in_order(local, parallel) for entry in found]
    for result, spectrum in everything:
        if isinstance(result, MatrixResult):
            report.matrices.append(result)
            if spectrum is not None:
                report.spectra[result.name], signal = spectrum
                if signal is not None:
                    report.signal_spectra[result.name] = signal
        else:
            report.vectors.append(result)
    report.elapsed_s = time.perf_counter() - started
    return report
