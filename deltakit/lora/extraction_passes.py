"""The passes of one extraction (:func:`deltakit.lora.extraction.extract_lora`) and the adapter they assemble.

Pass 1 factors every changed matrix at a fixed rank, or keeps its singular values where the ranks
depend on every spectrum (``energy``, ``ratio``, ``budget``); pass 2 then re-reads the matrices that
got a rank and factors them. Both run through :func:`deltakit.pipeline.run`; the factors are
parked on disk (:class:`~deltakit.lora.adapter_files.FactorStage`) and the adapter's tensors and
PEFT config assembled from them at the end, with the tensors carried whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from deltakit.distributed import Parallel, matrix_cost
from deltakit.io.checkpoint import Checkpoint
from deltakit.io.peft import adapter_config, adapter_keys, whole_tensor_key
from deltakit.lora.adapter_files import AdapterTensor, FactorStage
from deltakit.lora.adapter_sum import AdapterSum
from deltakit.lora.expert_params import parameter_keys, stack_factors, with_target_parameters
from deltakit.lora.extraction_report import ExtractedMatrix, ExtractReport
from deltakit.lora.factors import LoraFactors, clamp_quantile, reconstruction_error, svd_factors
from deltakit.lora.ranks import RankChoice, allocate_budget
from deltakit.lora.resize import LowRankDelta
from deltakit.lora.targets import WORD_EMBEDDING, ExtractionTargets, LoraTarget, check_budget, module_of
from deltakit.lora.whitening import InputCovariance
from deltakit.calibration import Covariances
from deltakit.delta import stream_deltas
from deltakit.pairing import TensorPair
from deltakit.pipeline import ProgressFn, run
from deltakit.spectral.norms import frobenius_norm
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.spectrum import build_spectrum, compute_spectrum


@dataclass(frozen=True)
class Outcome:
    """What one process found for one pair; gathered so every process knows every pair's."""

    changed_whole: bool = False  # not LoRA material, and changed
    unchanged: bool = False  # a LoRA target with ΔW = 0
    delta_fro: float | None = None
    spectrum: np.ndarray | None = None  # energy / budget, pass 1
    matrix: ExtractedMatrix | None = None  # factored
    staged: tuple[tuple[int, ...], tuple[int, ...], torch.dtype] | None = None  # A shape, B shape, dtype
    owner: int = 0  # the process that staged the factors


@dataclass(frozen=True)
class Activations:
    """The fine-tune's layer-input covariances, as extraction reads them: for output errors, and with
    ``aware`` for the factors themselves (:mod:`deltakit.lora.whitening`)."""

    covariances: Covariances
    aware: bool = False

    def of(self, target: LoraTarget, device: torch.device) -> InputCovariance | None:
        """C of the target's layer input on ``device``; None for embeddings, experts and layers that never ran."""
        if target.parameter is not None or target.kind == "embedding":
            return None
        covariance = self.covariances.get(target.module, device)
        return InputCovariance(covariance) if covariance is not None else None


@dataclass
class Survey:
    """Pass 1: per target, ‖ΔW‖ and its spectrum (energy / budget); whole candidates that changed."""

    delta_fro: dict[str, float] = field(default_factory=dict)
    spectra: dict[str, np.ndarray] = field(default_factory=dict)
    changed_whole: list[TensorPair] = field(default_factory=list)


class Extraction:
    """The passes of one extraction; holds what they share."""

    def __init__(self, choice: RankChoice, targets: ExtractionTargets, pairs: list[TensorPair], base: Checkpoint,
                 ft: Checkpoint | None, device: torch.device, compute_dtype: torch.dtype, out_dtype: torch.dtype | None,
                 options: SpectralOptions, seed: int, progress: ProgressFn | None, parallel: Parallel,
                 adapters: AdapterSum | None = None, factored: bool = False,
                 activations: Activations | None = None, clamp: float | None = None) -> None:
        self.choice, self.targets, self.base, self.ft = choice, targets, base, ft
        self.activations = activations
        self.clamp = clamp  # kohya's clamp_quantile of the factors (None: no clamp)
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

    def _groups(self, pairs: list[TensorPair]) -> list[list[int]]:
        """Indices into ``pairs`` one process takes together: the experts of one fused tensor (its file
        tensors are assembled there); every other pair alone."""
        units: dict[str, list[int]] = {}
        for index, pair in enumerate(pairs):
            target = self.by_name.get(pair.name)
            units.setdefault(target.parameter if target and target.parameter else pair.name, []).append(index)
        return list(units.values())

    def _run(self, stage: FactorStage, pairs: list[TensorPair], work: Any, label: str) -> list[Outcome]:
        """``work(pair, delta)`` on every pair through the pipeline: every process's outcomes in plan order,
        the shapes of factors staged elsewhere noted."""
        def read(mine: list[int]) -> Any:
            chosen = [pairs[i] for i in mine]
            ahead = self.options.reads_ahead(self.device)
            if self.adapters is not None:
                return self.adapters.stream(chosen, self.device, self.compute_dtype, ahead, self.factored)
            assert self.ft is not None
            return stream_deltas(chosen, self.base, self.ft, self.device, self.compute_dtype, ahead)

        everything = run([matrix_cost(p.shape) for p in pairs], read, lambda _, item: work(item.pair, item.delta),
                         parallel=self.parallel, progress=self.progress, label=label, groups=self._groups(pairs))
        for outcome in everything:
            if outcome.staged is not None and outcome.matrix is not None:
                stage.note(outcome.matrix.module, outcome.staged)
        return everything

    def _factor(self, stage: FactorStage, target: LoraTarget, matrix: torch.Tensor | LowRankDelta, rank: int,
                delta_fro: float, spectrum: np.ndarray | None) -> ExtractedMatrix:
        """Factor one oriented ΔW at ``rank``, park the factors, measure what they keep.

        With activation-aware extraction the factors are the whitened SVD's and the kept energy is
        that of ΔW·L (the output's); with a calibration the output error is measured either way.
        """
        dtype = self.dtype_of(target.pair)
        inputs = self._inputs(target)
        norm = delta_fro
        if isinstance(matrix, LowRankDelta):  # exact, from the factors
            factors = matrix.factors(rank)
        else:
            if inputs is not None and self.activations.aware:  # type: ignore[union-attr]
                whitened = inputs.whiten(matrix, self.compute_dtype)
                norm = frobenius_norm(whitened)
                factors = inputs.factors(matrix, rank, exact=self.options.exact, seed=self.seed,
                                         dtype=self.compute_dtype, whitened=whitened)
                del whitened
            else:
                factors = svd_factors(matrix, rank, exact=self.options.exact, seed=self.seed, dtype=self.compute_dtype)
        error = self._error(matrix, factors, dtype)
        unclamped = None
        if self.clamp is not None:
            factors, unclamped = clamp_quantile(factors, self.clamp), error / delta_fro
            error = self._error(matrix, factors, dtype)
        a, b = factors.a.to(dtype), factors.b.to(dtype)
        stage.put(target.module, *target.pair.stored_factors(a, b))
        # Σ_{i≤r} σ_i² over the exact ‖ΔW‖_F², so that kept ≈ 1 − rel_error² also when the
        # spectrum could not resolve the smallest values (see _spectrum).
        if spectrum is None:  # fixed rank: the factorisation's own singular values
            top = factors.singular_values.to("cpu", torch.float64).numpy()
        else:
            top = spectrum[: factors.rank]
        kept = float(np.sum(top * top)) / norm ** 2 if norm > 0 else 1.0
        output_error = inputs.output_error(matrix, b, a) if inputs is not None else None  # type: ignore[arg-type]
        return ExtractedMatrix(
            name=target.pair.name, module=target.module, shape=tuple(target.pair.shape), kind=target.kind,
            rank=factors.rank, delta_fro=delta_fro, kept_energy=min(kept, 1.0), rel_error=error / delta_fro,
            parameters=factors.rank * target.cost, output_error=output_error, unclamped_rel_error=unclamped,
        )

    def _error(self, matrix: torch.Tensor | LowRankDelta, factors: LoraFactors, dtype: torch.dtype) -> float:
        """‖ΔW − BA‖_F with B and A rounded to ``dtype`` (in factor space for a LowRankDelta)."""
        if isinstance(matrix, LowRankDelta):
            return matrix.residual_norm(factors, dtype)
        return reconstruction_error(matrix.to(self.compute_dtype), factors, dtype)

    def _inputs(self, target: LoraTarget) -> InputCovariance | None:
        return self.activations.of(target, self.device) if self.activations is not None else None

    def _has_inputs(self, target: LoraTarget) -> bool:
        return (self.activations is not None and target.parameter is None and target.kind != "embedding"
                and target.module in self.activations.covariances.files)

    def _factored(self, stage: FactorStage, matrix: ExtractedMatrix) -> Outcome:
        return Outcome(matrix=matrix, staged=stage.shapes(matrix.module), owner=self.parallel.rank)

    def first_pass(self, stage: FactorStage, report: ExtractReport) -> Survey:
        """Fixed rank: factor every changed target. Energy / budget: keep every spectrum."""
        label = "factors" if not self.choice.needs_spectra else "pass 1/2: spectra"
        everything = self._run(stage, self.pairs, lambda pair, delta: self._survey_one(stage, pair, delta), label)
        survey = Survey()
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

    def _survey_one(self, stage: FactorStage, pair: TensorPair, delta: torch.Tensor | LowRankDelta) -> Outcome:
        """Pass 1 for one pair: is it changed; its spectrum (energy / budget / ratio) or factors (fixed rank)."""
        if isinstance(delta, LowRankDelta):
            delta_fro = delta.frobenius()
        else:
            delta_fro = frobenius_norm(delta)  # no float64 copy of a large ΔW
        target = self.by_name.get(pair.name)
        if target is None:
            return Outcome(changed_whole=delta_fro > 0 or bool(pair.added_rows))
        if delta_fro == 0.0:
            return Outcome(unchanged=True)
        matrix = target.pair.to_out_in(delta)
        choice = self.choice.of(target.spatial)
        if choice.needs_spectra:
            return Outcome(delta_fro=delta_fro, spectrum=self._spectrum(matrix, target))
        rank = min(choice.rank, choice.cap(target.out_in))  # type: ignore[type-var]
        return replace(self._factored(stage, self._factor(stage, target, matrix, rank, delta_fro, None)),
                       delta_fro=delta_fro)

    def _spectrum(self, matrix: torch.Tensor | LowRankDelta, target: LoraTarget) -> np.ndarray:
        """The resolved singular values of :class:`~deltakit.spectral.spectrum.Spectrum`, as `rank` reads them.

        Values below the method's own rounding floor are 0 there (without this, energy 1.0 of
        an exactly rank-8 ΔW would ask for full rank); energy fractions are of the energy
        resolved above that floor, the same fractions `rank` reports. In factor space (exact
        SVD of the factors) only the k singular values a product of rank k can have are listed.
        Activation-aware: the values of ΔW·L, whose truncation error is the output's.
        """
        if isinstance(matrix, LowRankDelta):
            shape = (int(matrix.shape[0]), int(matrix.shape[1]))
            return build_spectrum(matrix.singular_values(), shape, "factor-space", "exact",
                                  dtype=self.compute_dtype).values
        inputs = self._inputs(target) if self.activations is not None and self.activations.aware else None
        if inputs is not None:
            matrix = inputs.whiten(matrix, self.compute_dtype)
        return compute_spectrum(matrix, self.options).values

    def choose_ranks(self, survey: Survey) -> dict[str, int]:
        """Energy, ratio and the kohya / LyCORIS rules: per matrix, by the rule of its kind (convolutions may have
        their own, :meth:`RankChoice.of`). Budget: the spectra it governs at once (see :func:`allocate_budget`)."""
        rules = {name: self.choice.of(self.by_name[name].spatial) for name in survey.spectra}
        budgeted = [name for name, rule in rules.items() if rule.mode == "budget"]
        ranks = self._budget_ranks(budgeted, survey) if budgeted else {}
        return {name: ranks[name] if name in ranks else rule.matrix_rank(survey.spectra[name],
                                                                          rule.cap(self.by_name[name].out_in))
                for name, rule in rules.items()}

    def _budget_ranks(self, names: list[str], survey: Survey) -> dict[str, int]:
        """The ranks of the matrices ``names`` under the global budget."""
        caps = [self.choice.cap(self.by_name[n].out_in) for n in names]
        changed = [self.by_name[n] for n in names]
        check_budget(self.choice.budget, changed, "changed ")  # type: ignore[arg-type]
        cap_of = dict(zip(names, caps))
        units = self._budget_units(names, survey)
        ranks = allocate_budget([u[1] for u in units], [u[2] for u in units], self.choice.budget,  # type: ignore[arg-type]
                                [min(cap_of[n] for n in u[0]) for u in units])
        # An expert takes its tensor's rank, up to the values its own resolved spectrum has.
        return {name: min(rank, cap_of[name]) if self.by_name[name].parameter is None
                else min(rank, cap_of[name], int(np.count_nonzero(survey.spectra[name])))
                for unit, rank in zip(units, ranks) for name in unit[0]}

    def _budget_units(self, names: list[str], survey: Survey) -> list[tuple[list[str], np.ndarray, int]]:
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

    def second_pass(self, stage: FactorStage, survey: Survey, ranks: dict[str, int], report: ExtractReport) -> None:
        """Re-read the matrices that got a rank and factor them; the others are reported at rank 0."""
        for name, r in ranks.items():
            if r == 0:
                target = self.by_name[name]
                report.matrices.append(ExtractedMatrix(
                    name=name, module=target.module, shape=tuple(target.pair.shape), kind=target.kind, rank=0,
                    delta_fro=survey.delta_fro[name], kept_energy=0.0, rel_error=1.0, parameters=0,
                    output_error=1.0 if self._has_inputs(target) else None))
        pairs = [self.by_name[n].pair for n, r in ranks.items() if r > 0]

        def factor(pair: TensorPair, delta: torch.Tensor | LowRankDelta) -> Outcome:
            target = self.by_name[pair.name]
            matrix = target.pair.to_out_in(delta)
            name = target.pair.name
            return self._factored(stage, self._factor(stage, target, matrix, ranks[name], survey.delta_fro[name],
                                                      survey.spectra[name]))

        everything = self._run(stage, pairs, factor, "pass 2/2: factors")
        for outcome in everything:
            assert outcome.matrix is not None
            report.matrices.append(outcome.matrix)
            self.owners[outcome.matrix.module] = outcome.owner

    def assemble(self, stage: FactorStage, survey: Survey, report: ExtractReport, save_modules: bool,
                 base_name: str, keys: Callable[[str, bool], tuple[str, str]] = adapter_keys
                 ) -> tuple[list[AdapterTensor], dict[str, Any]]:
        """The adapter's tensors (LoRA factors, then whole tensors) and its PEFT config; ``keys`` names a
        module's (A, B) in the file (PEFT's keys by default)."""
        factored = [self.by_name[m.name] for m in report.matrices if m.rank > 0]
        lora = [t for t in factored if t.parameter is None]
        tensors: list[AdapterTensor] = []
        for target in lora:
            a_shape, b_shape, dtype = stage.shapes(target.module)
            a_key, b_key = keys(target.module, target.kind == "embedding")
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
            task_type=task_type((self.ft.config if self.ft else None) or self.base.config),
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
            owner = self.owners[members[0].module]  # _groups keeps one tensor's experts on one process
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

    def _whole_tensors(self, survey: Survey, report: ExtractReport, lora_modules: set[str],
                       save_modules: bool) -> list[AdapterTensor]:
        """Changed tensors that are not LoRA material: carried whole, or reported as not carried."""
        # Slices of fused expert tensors left whole (biases, --no-experts) belong to the experts
        # module, which modules_to_save would replace entirely: never carried.
        report.not_carried += [{"name": p.name, "reason": self.targets.whole_reasons[p.name]}
                               for p in survey.changed_whole if p.expert_slice]
        changed_whole = [p for p in survey.changed_whole if not p.expert_slice]
        if not save_modules:
            report.not_carried += [{"name": p.name, "reason": with_hint(self.targets.whole_reasons[p.name])}
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


def with_hint(reason: str) -> str:
    """A not-carried reason that tells how to carry the tensor, once."""
    return reason if "--save-modules" in reason else f"{reason} (--save-modules carries it whole)"


def task_type(config: dict[str, Any] | None) -> str | None:
    architectures = [str(a) for a in (config or {}).get("architectures") or []]
    return "CAUSAL_LM" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) else None
