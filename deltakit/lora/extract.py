"""`deltakit extract`: a PEFT LoRA adapter from a fine-tune, or from adapters, by truncated SVD of every ΔW.

Each changed matrix ΔW = W_ft − W_base gets factors B = U_r √S_r, A = √S_r V_rᵀ (lora_alpha = r,
so PEFT's scaling α/r is 1 and B @ A is the rank-r truncated SVD of ΔW). The rank comes from
a :class:`~deltakit.lora.ranks.RankChoice`: fixed, per-matrix energy or σ ratio, or a global budget.

Instead of a fine-tune, one or more PEFT adapters (with weights) give ΔW = Σ_i w_i·ΔW_i: this
converts an adapter to a plain LoRA, resizes one, or merges several into one. Plain LoRA inputs
are factored in factor space (:mod:`deltakit.lora.resize`: exact, no dense ΔW, the base's
weights never read); other adapter types go through their dense ΔW like a fine-tune's.

Fused MoE expert tensors (experts × a × b, gpt-oss ``mlp.experts.gate_up_proj``) are factored
expert by expert and written as PEFT's LoRA on parameters (``target_parameters``): each
expert's slice gets its own truncated SVD, and the experts' factors are laid out as PEFT's
ParamWrapper reads them (:mod:`deltakit.lora.expert_params`); ``experts=False`` leaves them out.

Passes and memory. Host and device memory hold one ΔW (plus ``prefetch`` pairs being read)
at any time, whatever the model size:

* ``rank=R``: one pass over the model. Each ΔW is factored as it streams by and its factors
  are parked on disk inside the output's temporary folder; the adapter file is assembled
  from them at the end (its layout must be known before it is written).
* ``energy`` / ``budget``: two passes. Pass 1 keeps only the singular values of each ΔW
  (min(m, n) numbers per matrix) and ‖ΔW‖; the ranks are chosen from all of them; pass 2
  re-reads the model and factors each ΔW at its rank. Reading twice was preferred to keeping
  factors up to --max-rank from one pass, which can hold min(m, n) × (m + n) numbers per
  matrix when no --max-rank is given.

Example::

    report = extract_lora("base", "ft", "my-adapter", rank=16)
    report.matrices[0].rel_error        # ‖ΔW − BA‖_F / ‖ΔW‖_F
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from deltakit.spectral.options import SpectralOptions
from deltakit.delta import ProgressFn, stream_deltas, tensor_metas, zip_released
from deltakit.distributed import (
    Parallel, fail_together, gather_in_order, matrix_cost, process_device, reported_device, shared_directory
)
from deltakit.errors import DeltakitError
from deltakit.io.atomic import check_output_path
from deltakit.io.inputs import footprints
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.io.hub import base_model_fields
from deltakit.io.peft import adapter_config, adapter_keys, is_peft_adapter, whole_tensor_key
from deltakit.lora.adapter_files import AdapterTensor, FactorStage, write_adapter
from deltakit.lora.adapter_sum import AdapterSum, open_adapter_sum
from deltakit.lora.expert_params import parameter_keys, stack_factors, with_target_parameters
from deltakit.lora.factors import peft_orientation, reconstruction_error, svd_factors
from deltakit.lora.model_card import model_card
from deltakit.lora.ranks import RankChoice, allocate_budget, energy_rank, ratio_rank
from deltakit.lora.resize import LowRankDelta
from deltakit.lora.targets import WORD_EMBEDDING, ExtractionTargets, LoraTarget, module_of, plan_extraction
from deltakit.pairing import TensorPair, pair_tensors
from deltakit.spectral.metrics import as_sorted_spectrum
from deltakit.spectral.norms import frobenius_norm
from deltakit.spectral.spectrum import build_spectrum, compute_spectrum
from deltakit.spectral.svd import method_noise_floor

OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExtractedMatrix:
    """One changed matrix: the rank it got and what that rank keeps."""

    name: str  # fine-tune tensor name
    module: str  # PEFT module path (base naming)
    shape: tuple[int, int]  # as stored
    kind: str  # linear | conv1d | embedding
    rank: int
    delta_fro: float  # ‖ΔW‖_F
    kept_energy: float  # Σ_{i≤r} σ_i² / ‖ΔW‖_F²
    rel_error: float  # ‖ΔW − BA‖_F / ‖ΔW‖_F, with B and A as stored
    parameters: int  # r · (m + n)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


@dataclass
class ExtractReport:
    """What `extract` wrote and what it could not; ``to_dict()`` is the JSON report."""

    base: str
    ft: str  # the fine-tune, or the input adapters joined by " + "
    adapter: str
    selection: dict[str, Any]
    method: str  # randomized | exact | factor-space: how factors were computed
    spectrum_method: str | None  # gram | exact | factor-space for energy / budget / ratio (pass 1), else None
    device: str
    precision: str
    passes: int
    matrices: list[ExtractedMatrix] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    carried_whole: list[dict[str, str]] = field(default_factory=list)
    not_carried: list[dict[str, str]] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    lora_bias: bool = False
    whole_parameters: int = 0
    elapsed_s: float = 0.0
    adapters: list[str] = field(default_factory=list)  # input adapters (empty for a fine-tune)
    weights: list[float] = field(default_factory=list)  # their weights w_i
    # Fused expert tensors written as LoRA on parameters: name, experts, rank (the largest
    # expert's), the experts with factors, and the parameters in the file (zero-padded to that rank).
    expert_parameters: list[dict[str, Any]] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        """LoRA parameters in the adapter file, Σ r·(m + n) (whole tensors not included); a fused
        expert tensor counts as written, every expert at the tensor's rank."""
        experts = {e["name"] for e in self.expert_parameters}
        return (sum(m.parameters for m in self.matrices if m.module.rsplit("[", 1)[0] not in experts)
                + sum(int(e["parameters"]) for e in self.expert_parameters))

    @property
    def total_squared_error(self) -> float:
        """Σ ‖ΔW − BA‖_F² over the changed matrices."""
        return sum((m.rel_error * m.delta_fro) ** 2 for m in self.matrices)

    @property
    def relative_error(self) -> float:
        """sqrt(Σ ‖ΔW − BA‖_F² / Σ ‖ΔW‖_F²) over the changed matrices (0 when none changed)."""
        total = sum(m.delta_fro ** 2 for m in self.matrices)
        return math.sqrt(self.total_squared_error / total) if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base, "ft": self.ft, "adapter": self.adapter, "selection": self.selection,
            "method": self.method, "spectrum_method": self.spectrum_method, "device": self.device,
            "precision": self.precision, "passes": self.passes, "elapsed_s": round(self.elapsed_s, 3),
            "parameters": self.parameters, "whole_parameters": self.whole_parameters,
            "total_squared_error": self.total_squared_error, "relative_error": self.relative_error,
            "matrices": [m.to_dict() for m in self.matrices], "unchanged": list(self.unchanged),
            "carried_whole": list(self.carried_whole), "not_carried": list(self.not_carried),
            "modules_to_save": list(self.modules_to_save), "lora_bias": self.lora_bias,
            "adapters": list(self.adapters), "weights": list(self.weights),
            "expert_parameters": [dict(entry) for entry in self.expert_parameters],
        }


def output_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` (follow the fine-tune), or float32 | bfloat16 | float16."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in OUTPUT_DTYPES.values():
        return dtype  # type: ignore[return-value]
    if str(dtype) in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[str(dtype)]
    raise DeltakitError(f"unknown output dtype {dtype!r}; use one of {', '.join(OUTPUT_DTYPES)}")


@dataclass(frozen=True)
class _Outcome:
    """What one process found for one pair; gathered so every process knows every pair's."""

    changed_whole: bool = False  # not LoRA material, and changed
    unchanged: bool = False  # a LoRA target with ΔW = 0
    delta_fro: float | None = None
    spectrum: np.ndarray | None = None  # energy / budget, pass 1
    matrix: ExtractedMatrix | None = None  # factored
    staged: tuple[tuple[int, ...], tuple[int, ...], torch.dtype] | None = None  # A shape, B shape, dtype
    owner: int = 0  # the process that staged the factors


@dataclass
class _Survey:
    """Pass 1: per target, ‖ΔW‖ and its spectrum (energy / budget); whole candidates that changed."""

    delta_fro: dict[str, float] = field(default_factory=dict)
    spectra: dict[str, np.ndarray] = field(default_factory=dict)
    changed_whole: list[TensorPair] = field(default_factory=list)


def extract_lora(
    base: str | os.PathLike,
    ft: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    budget: int | None = None,
    max_rank: int | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    save_modules: bool = False,
    embeddings: bool = False,
    dtype: str | torch.dtype | None = None,
    options: SpectralOptions = SpectralOptions(),
    seed: int = 0,
    force: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    parallel: Parallel = Parallel(),
    ratio: float | None = None,
    weights: Sequence[float] | None = None,
    factor_space: bool = True,
    experts: bool = True,
) -> ExtractReport:
    """Write a PEFT LoRA adapter at ``out`` that turns ``base`` into (a rank-limited) ``ft``.

    ``ft`` is a fine-tuned model, or one or more PEFT adapters of ``base`` (a path or a list)
    whose deltas, times ``weights`` (default all 1), are summed. Plain LoRA inputs are resized
    in factor space (exact); ``factor_space=False`` forms their dense ΔW instead, as for other
    adapter types (for comparison). Give one of ``rank`` (every changed matrix), ``energy``
    (per matrix, the smallest rank keeping that fraction of ‖ΔW‖_F²), ``ratio`` (per matrix,
    every σ_i ≥ ratio·σ_1) or ``budget`` (total LoRA parameters, allocated to minimise the
    total squared error); ``max_rank`` clamps them. ``save_modules`` carries
    changed tensors that are not LoRA material whole (PEFT ``modules_to_save``; biases of LoRA
    layers as ``bias="lora_only"``). ``embeddings`` adds PEFT embedding LoRA for embedding
    tables. Fused MoE expert tensors that changed become LoRA on parameters (PEFT
    ``target_parameters``), one rank per expert; ``experts=False`` leaves them out.
    ``dtype`` (float32 | bfloat16 | float16) overrides the fine-tune's dtype. With
    ``parallel`` (under torchrun) each process factors its share of the matrices and writes
    them into the adapter file; every process returns the whole report.

    Example: ``extract_lora("base", "ft", "adapter", rank=16).relative_error``.
    """
    started = time.perf_counter()
    choice = RankChoice(rank=rank, energy=energy, budget=budget, max_rank=max_rank, ratio=ratio)
    out_dtype = output_dtype(dtype)
    device = process_device(parallel, options.device)
    compute_dtype = options.dtype
    sources = [ft] if isinstance(ft, (str, os.PathLike)) else list(ft)
    inputs = footprints([("base", base)] + [("fine-tune", source) for source in sources])
    check_output_path(out, force, inputs)
    adapter_paths, ft_path = _inputs(base, ft, weights, save_modules)
    adapters: AdapterSum | None = None
    ft_ckpt: Checkpoint | None = None
    if adapter_paths:
        adapters = open_adapter_sum(base, adapter_paths, weights, include, exclude, allow_pickle)
        base_ckpt = adapters.base
        # An adapter's embedding LoRA stays one (--embeddings is for fine-tunes' tables).
        targets = plan_extraction(adapters.plan(), base_ckpt.config, embeddings=True)
        targets.not_carried += adapters.not_carried()
        out_dtype = out_dtype or adapters.dtype
        pairs = adapters.pairs
    else:
        base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle)
        ft_ckpt = open_checkpoint(ft_path, allow_pickle=allow_pickle)  # type: ignore[arg-type]
        config = ft_ckpt.config or base_ckpt.config
        plan = pair_tensors(tensor_metas(base_ckpt), tensor_metas(ft_ckpt), config, include, exclude)
        targets = plan_extraction(plan, config, embeddings, experts)
        pairs = plan.pairs
    factored = factor_space and adapters is not None and adapters.factored
    if not targets.lora and not targets.whole:
        raise DeltakitError("no tensor pairs left to extract (check --include / --exclude)")
    if choice.mode == "budget":
        _check_budget(choice.budget, targets.lora, "")  # fail before reading anything
    method = "factor-space" if factored else "exact" if options.exact else "randomized"
    report = ExtractReport(
        base=str(base), ft=" + ".join(adapter_paths) if adapter_paths else str(ft_path), adapter=str(out),
        selection=choice.to_dict(), method=method,
        spectrum_method=(method if factored else options.method) if choice.needs_spectra else None,
        device=reported_device(parallel, device), precision=options.precision, passes=2 if choice.needs_spectra else 1,
        adapters=list(adapter_paths or []), weights=list(adapters.weights) if adapters else [],
    )
    run = _Extraction(choice, targets, pairs, base_ckpt, ft_ckpt, device, compute_dtype, out_dtype, options,
                      seed, progress, parallel, adapters=adapters, factored=factored)
    with shared_directory(out, force, parallel, inputs) as tmp:
        stage = FactorStage(Path(tmp) / f".staging-{parallel.rank}")
        survey = run.first_pass(stage, report)
        if choice.needs_spectra:
            ranks = run.choose_ranks(survey)
            run.second_pass(stage, survey, ranks, report)
        report.matrices.sort(key=lambda m: run.order[m.name])
        tensors, lora_config = run.assemble(stage, survey, report, save_modules, base_name=str(base))
        lora_config.update(base_model_fields(base))  # the Hub id (and revision) when the base came from the Hub
        if not tensors:
            raise DeltakitError(_nothing_to_write(report))
        write_adapter(Path(tmp), lora_config, tensors, progress, parallel, card=model_card(report, lora_config))
        stage.remove()
    report.elapsed_s = time.perf_counter() - started
    return report


class _Extraction:
    """The passes of one extraction; holds what they share."""

    def __init__(self, choice: RankChoice, targets: ExtractionTargets, pairs: list[TensorPair], base: Checkpoint,
                 ft: Checkpoint | None, device: torch.device, compute_dtype: torch.dtype, out_dtype: torch.dtype | None,
                 options: SpectralOptions, seed: int, progress: ProgressFn | None, parallel: Parallel,
                 adapters: AdapterSum | None = None, factored: bool = False) -> None:
        self.choice, self.targets, self.base, self.ft = choice, targets, base, ft
        self.adapters, self.factored = adapters, factored  # ΔW from adapters (factored: as LowRankDelta)
        self.device, self.compute_dtype, self.out_dtype = device, compute_dtype, out_dtype
        self.options, self.seed, self.progress, self.parallel = options, seed, progress, parallel
        self.by_name = {t.pair.name: t for t in targets.lora}
        wanted = set(self.by_name) | {p.name for p in targets.whole}
        self.pairs = [p for p in pairs if p.name in wanted]  # checkpoint order: reads stay sequential
        self.order = {p.name: i for i, p in enumerate(self.pairs)}
        self.owners: dict[str, int] = {}  # module -> the process holding its staged factors

    def dtype_of(self, pair: TensorPair) -> torch.dtype:
        return self.out_dtype or pair.ft_dtype

    def _share(self, pairs: list[TensorPair]) -> list[int]:
        """Indices into ``pairs`` this process works on (all of them without torchrun).

        The experts of one fused tensor go to one process: its file tensors are assembled there.
        """
        units: dict[str, list[int]] = {}
        for index, pair in enumerate(pairs):
            target = self.by_name.get(pair.name)
            units.setdefault(target.parameter if target and target.parameter else pair.name, []).append(index)
        groups = list(units.values())
        costs = [sum(matrix_cost(pairs[i].shape) for i in group) for group in groups]
        return sorted(i for unit in self.parallel.share(costs) for i in groups[unit])

    def _stream(self, pairs: list[TensorPair], label: str):
        if self.adapters is not None:
            items = self.adapters.stream(pairs, self.device, self.compute_dtype, self.options.reads_ahead(self.device), self.factored)
        else:
            assert self.ft is not None
            items = stream_deltas(pairs, self.base, self.ft, self.device, self.compute_dtype, self.options.reads_ahead(self.device))
        return self.progress(items, len(pairs), label) if self.progress else items

    def _gather(self, stage: FactorStage, local: list[tuple[int, _Outcome]]) -> list[_Outcome]:
        """Every process's outcomes in plan order; learn the shapes of factors staged elsewhere."""
        everything = gather_in_order(local, self.parallel)
        for outcome in everything:
            if outcome.staged is not None and outcome.matrix is not None:
                stage.note(outcome.matrix.module, outcome.staged)
        return everything

    def _factor(self, stage: FactorStage, target: LoraTarget, matrix: torch.Tensor | LowRankDelta, rank: int,
                delta_fro: float, spectrum: np.ndarray | None) -> ExtractedMatrix:
        """Factor one oriented ΔW at ``rank``, park the factors, measure what they keep."""
        dtype = self.dtype_of(target.pair)
        if isinstance(matrix, LowRankDelta):  # exact, from the factors
            factors = matrix.factors(rank)
            error = matrix.residual_norm(factors, dtype)
        else:
            factors = svd_factors(matrix, rank, exact=self.options.exact, seed=self.seed, dtype=self.compute_dtype)
            error = reconstruction_error(matrix.to(self.compute_dtype), factors, dtype)
        stage.put(target.module, factors.a.to(dtype), factors.b.to(dtype))
        # Σ_{i≤r} σ_i² over the exact ‖ΔW‖_F², so that kept ≈ 1 − rel_error² also when the
        # spectrum could not resolve the smallest values (see _spectrum).
        if spectrum is None:  # fixed rank: the factorisation's own singular values
            top = factors.singular_values.to("cpu", torch.float64).numpy()
        else:
            top = spectrum[: factors.rank]
        kept = float(np.sum(top * top)) / delta_fro ** 2
        return ExtractedMatrix(
            name=target.pair.name, module=target.module, shape=tuple(target.pair.shape), kind=target.kind,
            rank=factors.rank, delta_fro=delta_fro, kept_energy=min(kept, 1.0), rel_error=error / delta_fro,
            parameters=factors.rank * target.cost,
        )

    def _factored(self, stage: FactorStage, matrix: ExtractedMatrix) -> _Outcome:
        return _Outcome(matrix=matrix, staged=stage.shapes(matrix.module), owner=self.parallel.rank)

    def first_pass(self, stage: FactorStage, report: ExtractReport) -> _Survey:
        """Fixed rank: factor every changed target. Energy / budget: keep every spectrum."""
        label = "factors" if not self.choice.needs_spectra else "pass 1/2: spectra"
        mine = self._share(self.pairs)
        local: list[tuple[int, _Outcome]] = []
        with fail_together(self.parallel):
            for index, item in zip_released(mine, self._stream([self.pairs[i] for i in mine], label)):
                local.append((index, self._survey_one(stage, item.pair, item.delta)))
                del item  # before the next read (see deltakit.delta)
            everything = self._gather(stage, local)
        survey = _Survey()
        for pair, outcome in zip(self.pairs, everything):
            if outcome.changed_whole:
                survey.changed_whole.append(pair)
            elif outcome.unchanged:
                report.unchanged.append(pair.name)
            elif outcome.delta_fro is not None:
                survey.delta_fro[pair.name] = outcome.delta_fro
                if outcome.spectrum is not None:
                    survey.spectra[pair.name] = outcome.spectrum
                if outcome.matrix is not None:
                    report.matrices.append(outcome.matrix)
                    self.owners[outcome.matrix.module] = outcome.owner
        return survey

    def _survey_one(self, stage: FactorStage, pair: TensorPair, delta: torch.Tensor | LowRankDelta) -> _Outcome:
        """Pass 1 for one pair: is it changed; its spectrum (energy / budget / ratio) or factors (fixed rank)."""
        if isinstance(delta, LowRankDelta):
            delta_fro = delta.frobenius()
        else:
            delta_fro = frobenius_norm(delta)  # no float64 copy of a large ΔW
        target = self.by_name.get(pair.name)
        if target is None:
            return _Outcome(changed_whole=delta_fro > 0 or bool(pair.added_rows))
        if delta_fro == 0.0:
            return _Outcome(unchanged=True)
        matrix = peft_orientation(delta, target.kind)
        if self.choice.needs_spectra:
            return _Outcome(delta_fro=delta_fro, spectrum=self._spectrum(matrix))
        rank = min(self.choice.rank, self.choice.cap(target.out_in))  # type: ignore[type-var]
        return replace(self._factored(stage, self._factor(stage, target, matrix, rank, delta_fro, None)),
                       delta_fro=delta_fro)

    def _spectrum(self, matrix: torch.Tensor | LowRankDelta) -> np.ndarray:
        """The resolved singular values of :class:`~deltakit.spectral.spectrum.Spectrum`, as `rank` reads them.

        Values below the method's own rounding floor are 0 there (without this, energy 1.0 of
        an exactly rank-8 ΔW would ask for full rank); energy fractions are of the energy
        resolved above that floor, the same fractions `rank` reports. In factor space (exact
        SVD of the factors) only the k singular values a product of rank k can have are listed.
        """
        if isinstance(matrix, LowRankDelta):
            values = as_sorted_spectrum(matrix.singular_values())
            shape = (int(matrix.shape[0]), int(matrix.shape[1]))
            floor = method_noise_floor(float(values[0]), shape, "exact", self.compute_dtype) if values.size else 0.0
            return build_spectrum(values, shape, "factor-space", floor).values
        return compute_spectrum(matrix, self.options).values

    def choose_ranks(self, survey: _Survey) -> dict[str, int]:
        """Energy and ratio: per matrix. Budget: all spectra at once (see :func:`allocate_budget`)."""
        names = list(survey.spectra)
        caps = [self.choice.cap(self.by_name[n].out_in) for n in names]
        if self.choice.mode == "energy":
            return {n: energy_rank(survey.spectra[n], self.choice.energy, cap)  # type: ignore[arg-type]
                    for n, cap in zip(names, caps)}
        if self.choice.mode == "ratio":
            return {n: ratio_rank(survey.spectra[n], self.choice.ratio, cap)  # type: ignore[arg-type]
                    for n, cap in zip(names, caps)}
        changed = [self.by_name[n] for n in names]
        _check_budget(self.choice.budget, changed, "changed ")  # type: ignore[arg-type]
        cap_of = dict(zip(names, caps))
        units = self._budget_units(names, survey)
        ranks = allocate_budget([u[1] for u in units], [u[2] for u in units], self.choice.budget,  # type: ignore[arg-type]
                                [min(cap_of[n] for n in u[0]) for u in units])
        # An expert takes its tensor's rank, up to the values its own resolved spectrum has.
        return {name: min(rank, cap_of[name]) if self.by_name[name].parameter is None
                else min(rank, cap_of[name], int(np.count_nonzero(survey.spectra[name])))
                for unit, rank in zip(units, ranks) for name in unit[0]}

    def _budget_units(self, names: list[str], survey: _Survey) -> list[tuple[list[str], np.ndarray, int]]:
        """(matrix names, spectrum, cost per rank) of what a budget allocates ranks to.

        A plain matrix is one unit. The experts of one fused tensor share PEFT's rank r, so they
        are one unit: rank k costs every expert's (m + n), E·(m + n), and gains the k-th squared
        singular value of every expert, so the unit's k-th value is √(Σ_e σ_ek²) (non-increasing
        in k, as the greedy allocation needs). The budget then bounds the file's parameters.
        """
        units: dict[str, tuple[list[str], list[np.ndarray]]] = {}
        for name in names:
            target = self.by_name[name]
            key = target.parameter or name
            units.setdefault(key, ([], []))[0].append(name)
            units[key][1].append(np.asarray(survey.spectra[name], dtype=np.float64))
        out: list[tuple[list[str], np.ndarray, int]] = []
        for key, (members, spectra) in units.items():
            target = self.by_name[members[0]]
            if target.parameter is None:
                out.append((members, spectra[0], target.cost))
                continue
            energy = np.zeros(max(len(v) for v in spectra))
            for values in spectra:
                energy[: len(values)] += values * values
            out.append((members, np.sqrt(energy), self.base.shape(key)[0] * target.cost))
        return out

    def second_pass(self, stage: FactorStage, survey: _Survey, ranks: dict[str, int], report: ExtractReport) -> None:
        """Re-read the matrices that got a rank and factor them; the others are reported at rank 0."""
        for name, r in ranks.items():
            if r == 0:
                target = self.by_name[name]
                report.matrices.append(ExtractedMatrix(
                    name=name, module=target.module, shape=tuple(target.pair.shape), kind=target.kind, rank=0,
                    delta_fro=survey.delta_fro[name], kept_energy=0.0, rel_error=1.0, parameters=0))
        pairs = [self.by_name[n].pair for n, r in ranks.items() if r > 0]
        mine = self._share(pairs)
        local: list[tuple[int, _Outcome]] = []
        with fail_together(self.parallel):
            for index, item in zip_released(mine, self._stream([pairs[i] for i in mine], "pass 2/2: factors")):
                target = self.by_name[item.pair.name]
                name = target.pair.name
                matrix = peft_orientation(item.delta, target.kind)
                factored = self._factor(stage, target, matrix, ranks[name], survey.delta_fro[name], survey.spectra[name])
                local.append((index, self._factored(stage, factored)))
                del item, matrix  # before the next read (see deltakit.delta)
            everything = self._gather(stage, local)
        for outcome in everything:
            assert outcome.matrix is not None
            report.matrices.append(outcome.matrix)
            self.owners[outcome.matrix.module] = outcome.owner

    def assemble(self, stage: FactorStage, survey: _Survey, report: ExtractReport, save_modules: bool,
                 base_name: str) -> tuple[list[AdapterTensor], dict[str, Any]]:
        """The adapter's tensors (LoRA factors, then whole tensors) and its PEFT config."""
        factored = [self.by_name[m.name] for m in report.matrices if m.rank > 0]
        lora = [t for t in factored if t.parameter is None]
        tensors: list[AdapterTensor] = []
        for target in lora:
            a_shape, b_shape, dtype = stage.shapes(target.module)
            a_key, b_key = adapter_keys(target.module, embedding=target.kind == "embedding")
            owner = self.owners[target.module]
            tensors.append(AdapterTensor(a_key, a_shape, dtype, lambda m=target.module: stage.get(m, "A"), owner))
            tensors.append(AdapterTensor(b_key, b_shape, dtype, lambda m=target.module: stage.get(m, "B"), owner))
        parameter_ranks = self._expert_tensors(stage, [t for t in factored if t.parameter], report, tensors)
        whole = self._whole_tensors(survey, report, {t.module for t in lora}, save_modules)
        tensors += whole
        report.whole_parameters = sum(math.prod(t.shape) for t in whole)
        module_ranks = {t.module: stage.shapes(t.module)[0][0] for t in lora}
        config = adapter_config(
            {**module_ranks, **parameter_ranks},
            fan_in_fan_out=any(t.kind == "conv1d" for t in lora),
            base_model_name_or_path=base_name,
            modules_to_save=report.modules_to_save,
            task_type=_task_type((self.ft.config if self.ft else None) or self.base.config),
        )
        config = with_target_parameters(config, module_ranks, parameter_ranks)
        if report.lora_bias:
            config["bias"] = "lora_only"
        if any(entry.get("tied_to") for entry in report.carried_whole):
            config["ensure_weight_tying"] = True
        return tensors, config

    def _expert_tensors(self, stage: FactorStage, targets: list[LoraTarget], report: ExtractReport,
                        tensors: list[AdapterTensor]) -> dict[str, int]:
        """Append each fused expert tensor's (A, B) in PEFT's ParamWrapper layout; its rank per parameter path."""
        by_parameter: dict[str, list[LoraTarget]] = {}
        for target in targets:
            by_parameter.setdefault(target.parameter, []).append(target)  # type: ignore[arg-type]
        keys = parameter_keys(list(by_parameter))
        ranks: dict[str, int] = {}
        for parameter, members in by_parameter.items():
            experts = self.base.shape(parameter)[0]
            rank = max(stage.shapes(t.module)[0][0] for t in members)
            out_features, in_features = members[0].out_in
            dtype = stage.shapes(members[0].module)[2]
            owner = self.owners[members[0].module]  # _share keeps one tensor's experts on one process
            a_key, b_key = keys[parameter]

            def stacked(which: int, members: list[LoraTarget] = members, experts: int = experts,
                        rank: int = rank) -> torch.Tensor:
                factors = {t.pair.expert: (stage.get(t.module, "A"), stage.get(t.module, "B")) for t in members}
                return stack_factors(factors, experts, rank)[which]  # type: ignore[arg-type]

            tensors.append(AdapterTensor(a_key, (experts * rank, in_features), dtype, lambda f=stacked: f(0), owner))
            tensors.append(AdapterTensor(b_key, (out_features, rank * experts), dtype, lambda f=stacked: f(1), owner))
            ranks[parameter] = rank
            report.expert_parameters.append({
                "name": parameter, "experts": experts, "rank": rank,
                "factored_experts": sorted(int(t.pair.expert) for t in members),  # type: ignore[arg-type]
                "parameters": experts * rank * (in_features + out_features)})
        return ranks

    def _whole_tensors(self, survey: _Survey, report: ExtractReport, lora_modules: set[str],
                       save_modules: bool) -> list[AdapterTensor]:
        """Changed tensors that are not LoRA material: carried whole, or reported as not carried."""
        # Slices of fused expert tensors left whole (biases, --no-experts) belong to the experts
        # module, which modules_to_save would replace entirely: never carried.
        report.not_carried += [{"name": p.name, "reason": self.targets.whole_reasons[p.name]}
                               for p in survey.changed_whole if p.expert_slice]
        changed_whole = [p for p in survey.changed_whole if not p.expert_slice]
        if not save_modules:
            report.not_carried += [{"name": p.name, "reason": _with_hint(self.targets.whole_reasons[p.name])}
                                   for p in changed_whole]
            report.not_carried += self.targets.not_carried
            return []
        # Biases of LoRA layers travel as PEFT bias="lora_only"; any other changed tensor takes
        # its whole module into modules_to_save (PEFT replaces modules, not single tensors).
        lora_bias = any(p.name.endswith(".bias") and module_of(p.base_name) in lora_modules
                        for p in changed_whole)
        saved_modules: dict[str, str] = {}  # base module path -> fine-tune module path
        for pair in changed_whole:
            module = module_of(pair.base_name)
            if module in lora_modules:
                if not pair.name.endswith(".bias"):
                    report.not_carried.append({"name": pair.name, "reason": "belongs to a LoRA layer; PEFT carries "
                                               "only the bias of a LoRA layer whole"})
                continue
            saved_modules[module] = module_of(pair.name)
        tensors: list[AdapterTensor] = []
        why = {p.name: self.targets.whole_reasons[p.name] for p in changed_whole}
        if lora_bias:
            report.lora_bias = True
            for target in (self.by_name[m.name] for m in report.matrices if m.rank > 0):
                ft_bias = f"{module_of(target.pair.name)}.bias"
                if ft_bias in self.ft:  # PEFT saves the bias of every LoRA layer that has one
                    key = whole_tensor_key(f"{target.module}.bias", lora_bias=True)
                    tensors.append(self._whole(ft_bias, key))
                    report.carried_whole.append({"name": ft_bias, "key": key,
                                                 "reason": why.get(ft_bias, "bias of a LoRA layer (bias=lora_only)")})
        report.modules_to_save = sorted(saved_modules)
        for module, ft_module in saved_modules.items():
            for ft_name in (n for n in self.ft.keys() if module_of(n) == ft_module):
                key = whole_tensor_key(f"{module}.{ft_name.rsplit('.', 1)[1]}")
                tensors.append(self._whole(ft_name, key))
                report.carried_whole.append({"name": ft_name, "key": key,
                                             "reason": why.get(ft_name, f"part of module {module}")})
                if self.targets.tied_output and WORD_EMBEDDING.search(ft_name):
                    # PEFT (ensure_weight_tying) keeps the tied output layer's copy under its own key.
                    tied_key = whole_tensor_key(f"{self.targets.tied_output}.weight")
                    tensors.append(self._whole(ft_name, tied_key))
                    report.carried_whole.append({"name": ft_name, "key": tied_key, "tied_to": module,
                                                 "reason": "output layer tied to the embedding"})
        report.not_carried += self.targets.not_carried
        return tensors

    def _whole(self, ft_name: str, key: str) -> AdapterTensor:
        dtype = self.out_dtype if self.out_dtype and self.ft.dtype(ft_name).is_floating_point else self.ft.dtype(ft_name)
        return AdapterTensor(key, self.ft.shape(ft_name), dtype, lambda: self.ft.get(ft_name))


def _inputs(base: str | os.PathLike, ft: str | os.PathLike | Sequence[str | os.PathLike],
            weights: Sequence[float] | None, save_modules: bool) -> tuple[list[str] | None, str | os.PathLike | None]:
    """(adapter paths, None) when ``ft`` names PEFT adapters, (None, the fine-tune) for one model; refuse mixtures."""
    given = [ft] if isinstance(ft, (str, os.PathLike)) else list(ft)
    if not given:
        raise DeltakitError("give a fine-tuned model or at least one adapter to extract from")
    if is_peft_adapter(base):
        raise DeltakitError(f"BASE {base} is a PEFT adapter; extract needs the full base model as BASE "
                            f"(adapters go after it: deltakit extract BASE {base} -o OUT --rank R)")
    is_adapter = [is_peft_adapter(path) for path in given]
    if not any(is_adapter):
        if len(given) > 1:
            raise DeltakitError(f"{len(given)} fine-tuned models given; extract compares BASE with one fine-tune, "
                                "or sums one or more PEFT adapters")
        if weights is not None:
            raise DeltakitError(f"--weights weighs adapters; {given[0]} is a full model")
        return None, given[0]
    if not all(is_adapter):
        model = given[is_adapter.index(False)]
        raise DeltakitError(f"{model} is not a PEFT adapter; extract takes one fine-tuned model, "
                            "or one or more adapters, not both")
    if save_modules:
        raise DeltakitError("--save-modules carries tensors of a fine-tuned model; from adapters extract writes "
                            "LoRA factors only")
    return [str(path) for path in given], None


def _check_budget(budget: int | None, targets: Sequence[LoraTarget], which: str) -> None:
    """Refuse a budget that cannot pay for rank 1 of any matrix."""
    if budget is None or not targets:
        return
    cheapest = min(targets, key=lambda t: t.cost)
    if budget < cheapest.cost:
        rows, cols = cheapest.pair.shape
        raise DeltakitError(
            f"budget {budget} is too small for rank 1 anywhere: the cheapest {which}matrix, {cheapest.pair.name} "
            f"({rows}×{cols}), needs {cheapest.cost} parameters per rank")


def _nothing_to_write(report: ExtractReport) -> str:
    if report.not_carried:
        first = report.not_carried[0]
        return f"nothing to extract: no matrix changed, and what did cannot be a LoRA (first: {first['name']}: {first['reason']})"
    return "nothing to extract: the fine-tune does not differ from the base in any selected tensor"


def _with_hint(reason: str) -> str:
    """A not-carried reason that tells how to carry the tensor, once."""
    return reason if "--save-modules" in reason else f"{reason} (--save-modules carries it whole)"


def _task_type(config: dict[str, Any] | None) -> str | None:
    architectures = [str(a) for a in (config or {}).get("architectures") or []]
    return "CAUSAL_LM" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) else None
