"""`deltakit rank`: per-matrix spectra of ΔW = W_ft − W_base and their rank metrics.

One per-matrix function (:func:`rank_matrix`, in two halves for the device's sake) and the report
built from its results; :func:`run_rank` runs it over a checkpoint pair through
:func:`deltakit.pipeline.run`, matrices too large to hold whole through the row-blocked path.

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
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable, Sequence

import torch

from deltakit.analyses.meta import check_energies
from deltakit.analyses.rank_report import MatrixResult, RankReport, VectorResult
from deltakit.delta import DeltaItem, DeltaSource, Selection, delta_row_blocks, open_delta_source, pair_device_bytes
from deltakit.device.placement import current_device
from deltakit.device.workers import MatrixWorkers
from deltakit.distributed import Parallel, matrix_cost, process_device, reported_device
from deltakit.pair_checks import warn_unusual_changes
from deltakit.pairing import TensorPair
from deltakit.pipeline import ProgressFn, run
from deltakit.spectral import metrics
from deltakit.spectral.adaptive import SMALL_OR_ZERO, adaptive_spectrum
from deltakit.spectral.blocked import blocked_spectrum
from deltakit.spectral.noise import exact_noise, storage_noise
from deltakit.spectral.norms import frobenius_norm
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.spectrum import Spectrum, compute_spectrum, method_name, require_finite, zero_spectrum
from deltakit.spectral.subspace import amplification


@dataclass(frozen=True)
class RankOptions:
    """What `rank` computes: energy fractions (rank@X), how spectra are computed, which tensors,
    and whether every spectrum is kept for a spectra file. Validated when made."""

    energy: tuple[float, ...] = (0.9,)
    spectral: SpectralOptions = field(default_factory=SpectralOptions)
    selection: Selection = field(default_factory=Selection)
    keep_spectra: bool = False

    def __post_init__(self) -> None:
        energy = (self.energy,) if isinstance(self.energy, (int, float)) else self.energy
        object.__setattr__(self, "energy", check_energies(energy))


@lru_cache(maxsize=256)
def _random_rank(shape: tuple[int, int], fraction: float) -> int:
    return metrics.random_rank_at_energy(shape, fraction)


ZERO_BASE = "zero base"  # rel_delta_reason when ‖W_base‖ = 0: the ratio is undefined, delta_fro still says the size


def relative_change(delta_norm: float, base_norm: float) -> float | None:
    """‖ΔW‖ / ‖W_base‖, or None for a zero base (never inf or nan: the JSON report must stay finite)."""
    return delta_norm / base_norm if base_norm > 0 else None


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
    where that is cheaper (:func:`~deltakit.spectral.adaptive.adaptive_spectrum`, as far as
    ``options.adaptive_plan`` goes); the second value says why the full path ran instead, when it
    did for a reason other than the matrix being small.
    """
    pair, delta = item.pair, item.delta
    delta_fro = frobenius_norm(delta)
    require_finite(pair.name, delta_fro, frobenius_norm(item.base) if base_fro is None else base_fro)
    noise = (storage_noise(item.base, delta, pair.base_dtype, pair.ft_dtype, steps=steps, rounding=options.rounding)
             if rounding else exact_noise(delta))
    energy = delta_fro ** 2
    if energy == 0.0:
        return zero_spectrum((int(pair.shape[0]), int(pair.shape[1])), method_name(options), noise), None
    fallback = None
    if adaptive:
        spectrum, why = adaptive_spectrum(delta, noise, energy, fractions, options.adaptive_plan)
        if spectrum is not None:
            return spectrum, None
        fallback = why if why not in SMALL_OR_ZERO else None
    return compute_spectrum(delta, options, noise, energy, resolve=True), fallback


def rank_matrix(
    item: DeltaItem, energy: Sequence[float], options: SpectralOptions, rounding: bool = True, adaptive: bool = False,
    steps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[MatrixResult, Spectrum]:
    """Metrics and the spectrum of one ΔW (``rounding``: estimate the storage rounding in it;
    ``adaptive``: compute only the top of the spectrum where that settles the metrics)."""
    finish, spectrum = start_rank_matrix(item, energy, options, rounding, adaptive, steps)
    return finish(), spectrum


def start_rank_matrix(
    item: DeltaItem, energy: Sequence[float], options: SpectralOptions, rounding: bool = True, adaptive: bool = False,
    steps: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Callable[[], MatrixResult], Spectrum]:
    """:func:`rank_matrix` in two halves: everything that needs ΔW now, and ``finish()`` for the
    metrics that may wait for work still running on the device (the adaptive path's tail
    quadrature). Calling ``finish()`` after starting the next matrix keeps the device busy while
    the host solves; ``item`` may be dropped before ``finish()``."""
    base_fro = frobenius_norm(item.base)
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
        spectrum_fallback=fallback, refined=spectrum.refined, note=pair.note,
        rounding=noise.sides or None if noise is not None else None,
        rounding_reason=noise.sides_reason or None if noise is not None else None,
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


def start_kept(item: DeltaItem, energy: Sequence[float], options: SpectralOptions, rounding: bool, adaptive: bool,
               source: DeltaSource, keep: bool) -> tuple[Callable[[], MatrixResult], Any]:
    """:func:`start_rank_matrix` (with the quantization steps of ``source``, read here: on a worker
    thread, not the caller's), and the values a spectra file keeps (None unless ``keep``)."""
    steps = quantization_steps(source, item.pair, item.delta.device) if rounding else None
    finish, spectrum = start_rank_matrix(item, energy, options, rounding, adaptive, steps)
    return finish, kept_values(spectrum) if keep else None


def kept_values(spectrum: Spectrum) -> tuple[Any, Any]:
    """What a spectra file keeps of a matrix: all its values, and its signal values when they differ."""
    return spectrum.all_values, None if spectrum.signal_is_raw else spectrum.signal


def finished(entries: list[Any]) -> list[tuple[Any, Any]]:
    """A pair's entries with every ``finish`` called: (result, kept) each; an entry is that already,
    or a future of (finish, kept) from :func:`start_kept` on a worker."""
    out = []
    for entry in entries:
        if isinstance(entry, Future):
            finish, kept = entry.result()
            entry = (finish(), kept)
        out.append(entry)
    return out


def analyse_vector(item: DeltaItem) -> VectorResult:
    pair = item.pair
    delta_norm, base_norm = frobenius_norm(item.delta), frobenius_norm(item.base)
    require_finite(pair.name, delta_norm, base_norm)
    return VectorResult(
        name=pair.name, shape=tuple(pair.shape), dtype=str(pair.ft_dtype).removeprefix("torch."),
        module_type=pair.module_type, layer=pair.layer, changed=delta_norm > 0, delta_norm=delta_norm,
        rel_delta=relative_change(delta_norm, base_norm), rel_delta_reason=None if base_norm else ZERO_BASE,
        expert=pair.expert, tensor=pair.group,
    )


def read_by_blocks(source: DeltaSource, pair: TensorPair, options: SpectralOptions) -> bool:
    """Whether ``pair`` takes the row-blocked path: its ΔW in the compute dtype is over ``options.blocked_bytes``
    and it is a tall (m ≥ n) matrix of two stored checkpoints, not quantized, not an expert's slice."""
    if source.ft is None or not pair.is_matrix or pair.layout == "vector" or pair.rows is not None:
        return False
    m, n = (int(side) for side in pair.shape)
    if m < n or m * n * options.dtype.itemsize <= options.blocked_bytes:
        return False
    return pair.base_name not in source.base.quantized and pair.ft_tensor not in source.ft.quantized


def rank(
    base: str | os.PathLike,
    ft: str | os.PathLike,
    energy: float | Sequence[float] = (0.9,),
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
    selection = Selection(tuple(include), tuple(exclude), allow_pickle)
    return run_rank(base, ft, RankOptions(energy, options, selection, keep_spectra), progress, parallel)


def run_rank(base: str | os.PathLike, ft: str | os.PathLike, options: RankOptions,
             progress: ProgressFn | None = None, parallel: Parallel = Parallel()) -> RankReport:
    """:func:`rank` with its options made: the pairs streamed through the pipeline, those too large to hold
    whole read by row blocks after the stream has finished (so nothing is read ahead while they run)."""
    spectral, energy = options.spectral, options.energy
    device = process_device(parallel, spectral.device)
    started = time.perf_counter()
    source = open_delta_source(base, ft, options.selection)
    report = RankReport(base=str(base), fts=[str(ft)], energy=energy, device=reported_device(parallel, device),
                        method=spectral.method, precision=spectral.precision, skipped=source.skipped,
                        only_base=source.only_base, only_ft=source.only_ft)
    # saved spectra are whole ones, unless the adaptive path was asked for (then the top values, marked partial)
    adaptive = spectral.adaptive_on(device) and (not options.keep_spectra or spectral.spectrum == "adaptive")
    rounding = not source.is_adapter  # an adapter's ΔW is exact: no storage rounding in it
    keep = options.keep_spectra
    pairs = source.pairs
    blocked = [i for i, pair in enumerate(pairs) if read_by_blocks(source, pair, spectral)]
    streamed = [i for i in range(len(pairs)) if i not in set(blocked)]
    workers = MatrixWorkers(device, spectral.matrix_threads(device, adaptive))

    def read(mine: list[int]) -> Any:
        chosen = [streamed[i] for i in mine]
        stream = source.stream(chosen, device, spectral.dtype, spectral.reads_ahead(device))
        return workers.paced(stream, [pair_device_bytes(pairs[i], spectral.dtype) for i in chosen])

    def analyse(_: int, item: DeltaItem) -> list[Any]:
        return [workers.submit(start_kept, one, energy, spectral, rounding, adaptive, source, keep)
                if one.pair.is_matrix and one.pair.layout != "vector" else (analyse_vector(one), None)
                for one in per_expert(item)]

    def analyse_by_blocks(_: int, pair: TensorPair) -> list[tuple[MatrixResult, Any]]:
        def blocks(rows: int) -> Any:
            return delta_row_blocks(source.base, source.ft, pair, rows, device, spectral.dtype)

        spectrum, base_fro = blocked_spectrum(blocks, pair.shape, pair.base_dtype, pair.ft_dtype, device,
                                              spectral.dtype, pair.name, spectral.block_bytes, spectral.rounding)
        return [(matrix_result(pair, spectrum, base_fro, energy), kept_values(spectrum) if keep else None)]

    with current_device(device), workers:
        found = dict(zip(streamed, run([matrix_cost(pairs[i].shape) for i in streamed], read, analyse,
                                       parallel=parallel, progress=progress, label="ΔW spectra", finish=finished,
                                       behind=FINISH_BEHIND + workers.threads - 1)))
        if blocked:
            found |= dict(zip(blocked, run([matrix_cost(pairs[i].shape) for i in blocked],
                                           lambda mine: (pairs[blocked[i]] for i in mine), analyse_by_blocks,
                                           parallel=parallel, progress=progress, label="ΔW spectra by row blocks")))
    for index in range(len(pairs)):
        change = source.modules[index].change() if source.is_adapter else None
        for result, kept in found[index]:
            result.change = change
            if isinstance(result, MatrixResult):
                report.matrices.append(result)
                if kept is not None:
                    report.spectra[result.name], signal = kept
                    if signal is not None:
                        report.signal_spectra[result.name] = signal
            else:
                report.vectors.append(result)
    report.elapsed_s = time.perf_counter() - started
    if source.ft is not None:  # an adapter's ΔW is what it holds; these checks are about two checkpoints
        changed = [m for m in report.matrices if m.delta_fro > 0]
        warn_unusual_changes([m.rel_delta for m in changed], len(changed) + sum(v.changed for v in report.vectors),
                             len(report.matrices) + len(report.vectors), str(base), str(ft))
    return report
