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
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from deltakit.calibration import COVARIANCE_BYTES, CalibrationTokens, calibrate, measure_fidelity
from deltakit.distributed import Parallel, process_device, reported_device, shared_directory
from deltakit.errors import DeltakitError
from deltakit.io.atomic import check_output_path
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.io.hub import base_model_fields
from deltakit.io.inputs import footprints
from deltakit.io.kohya_files import is_adapter as is_adapter_path
from deltakit.lora.adapter_files import FactorStage, write_adapter
from deltakit.lora.adapter_sum import AdapterSum, open_adapter_sum
from deltakit.lora.extraction_passes import Activations, Extraction, Survey
from deltakit.lora.diffusion_files import (
    alpha_tensors, check_format, check_targets, diffusers_keys, diffusers_metadata, file_output, kohya_keys,
    kohya_metadata, write_lora_file,
)
from deltakit.lora.extraction_report import ExtractedMatrix, ExtractReport, output_dtype
from deltakit.lora.fidelity import adapter_edits, calibration_entry, fidelity_entry, open_calibration
from deltakit.lora.model_card import model_card
from deltakit.lora.ranks import RankChoice
from deltakit.lora.targets import check_budget, plan_extraction, unpaired, unpaired_message
from deltakit.pair_checks import floating, warn_suspicious_pair
from deltakit.pairing import pair_tensors
from deltakit.pipeline import ProgressFn
from deltakit.spectral.options import SpectralOptions

__all__ = ["extract_lora", "ExtractReport", "ExtractedMatrix", "output_dtype"]


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
    skip_mismatched: bool = False,
    calibration: str | os.PathLike | None = None,
    activation_aware: bool = False,
    metric: str = "auto",
    covariance_bytes: int = COVARIANCE_BYTES,
    format: str = "peft",
    clamp_quantile: float | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    sv_cumulative: float | None = None,
    quantile: float | None = None,
    conv_rank: int | None = None,
    conv_energy: float | None = None,
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
    ``dtype`` (float32 | bfloat16 | float16, or fp32 | bf16 | fp16) overrides the fine-tune's dtype. A tensor
    the two checkpoints do not pair (another shape, on one side only) is refused, since the adapter would
    silently lack it; ``skip_mismatched`` writes the adapter without it (``report.not_carried`` lists it).
    ``sv_ratio``, ``sv_fro``, ``sv_cumulative`` (kohya-ss sd-scripts) and ``quantile`` (LyCORIS) choose
    per-matrix ranks by those tools' rules (:func:`deltakit.lora.ranks.kohya_rank`). Convolutions are factored
    as their (out, in·∏kernel) matrix (LoCon) by the same rule, unless ``conv_rank`` (a fixed rank, kohya's
    conv_dim) or ``conv_energy`` gives those with a kernel larger than 1×1 their own; 1×1 ones follow the linear rule.
    ``format="kohya"`` writes one kohya-ss ``.safetensors`` file at ``out`` instead of a PEFT folder,
    ``format="diffusers"`` a diffusers LoRA folder (:mod:`deltakit.lora.diffusion_files`); ``clamp_quantile``
    clamps the factors as sd-scripts' ``--clamp_quantile`` does (:func:`deltakit.lora.factors.clamp_quantile`),
    each matrix reporting its error before the clamp too. With
    ``parallel`` (under torchrun) each process factors its share of the matrices and writes
    them into the adapter file; every process returns the whole report.

    ``calibration`` (token ids in a .safetensors file, or text): the fine-tune is run on it
    (transformers) and every matrix's ``output_error`` on its layer inputs is reported, with the
    ``fidelity`` of base + adapter (KL, or the hidden states' error: ``metric``); with
    ``activation_aware`` the factors minimise that output error instead of the weight error
    (:mod:`deltakit.lora.whitening`; the rank selectors then read the whitened spectra).
    ``covariance_bytes`` bounds the device memory the covariances take at once.

    Example: ``extract_lora("base", "ft", "adapter", rank=16).relative_error``.
    """
    started = time.perf_counter()
    choice = RankChoice(rank=rank, energy=energy, budget=budget, max_rank=max_rank, ratio=ratio, sv_ratio=sv_ratio,
                        sv_fro=sv_fro, sv_cumulative=sv_cumulative, quantile=quantile, conv_rank=conv_rank,
                        conv_energy=conv_energy)
    check_format(format, str(out), save_modules, embeddings, parallel.active)
    check_clamp(clamp_quantile)
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
        plan = pair_tensors(base_ckpt.metas(), ft_ckpt.metas(), config, include, exclude)
        targets = plan_extraction(plan, config, embeddings, experts)
        pairs = plan.pairs
        warn_suspicious_pair(base_ckpt, ft_ckpt, base, ft_path, plan)
        weights = set(floating([e["name"] for e in targets.not_carried], base_ckpt, ft_ckpt))
        mismatched = [e for e in unpaired(targets.not_carried) if e["name"] in weights]  # integer buffers aside
        if mismatched and not skip_mismatched:
            raise DeltakitError(unpaired_message(mismatched, "the adapter"))
    factored = factor_space and adapters is not None and adapters.factored
    if not targets.lora and not targets.whole:
        raise DeltakitError("no tensor pairs left to extract (check --include / --exclude)")
    if format != "peft":
        check_targets(targets.lora, format)
    if choice.mode == "budget":  # fail before reading anything
        check_budget(choice.budget, [t for t in targets.lora if choice.of(t.spatial).mode == "budget"], "")
    if calibration is not None and format != "peft":
        raise DeltakitError(f"--calibration runs the fine-tune with transformers and measures a PEFT adapter; "
                            f"it cannot be used with --format {format}")
    tokens, metric = _calibration_inputs(calibration, activation_aware, metric, ft_ckpt, parallel)
    method = "factor-space" if factored else "exact" if options.exact else "randomized"
    report = ExtractReport(
        base=str(base), ft=" + ".join(adapter_paths) if adapter_paths else str(ft_path), adapter=str(out),
        selection=choice.to_dict(), method=method,
        spectrum_method=(method if factored else options.method) if choice.needs_spectra else None,
        device=reported_device(parallel, device), precision=options.precision, passes=2 if choice.needs_spectra else 1,
        adapters=list(adapter_paths or []), weights=list(adapters.weights) if adapters else [],
        format=format, clamp_quantile=clamp_quantile,
    )
    extraction = Extraction(choice, targets, pairs, base_ckpt, ft_ckpt, device, compute_dtype, out_dtype, options,
                      seed, progress, parallel, adapters=adapters, factored=factored, clamp=clamp_quantile)
    if format != "peft":
        with file_output(out, format, force, inputs) as (tmp, file):
            stage = FactorStage(tmp / ".staging-0")
            survey = _passes(extraction, choice, stage, report)
            weights, folder = base_ckpt.keys(), base_ckpt.root.name
            keys = kohya_keys(weights, folder) if format == "kohya" else diffusers_keys(weights, folder)
            tensors, _ = extraction.assemble(stage, survey, report, False, str(base), keys)
            if not tensors:
                raise DeltakitError(_nothing_to_write(report))
            ranks = {m.module: m.rank for m in report.matrices if m.rank > 0}
            if format == "kohya":
                tensors += alpha_tensors(ranks, weights, folder, tensors[0].dtype)
                spatial = {t.module for t in targets.lora if t.spatial}  # what kohya's conv_dim ranks
                metadata = kohya_metadata(ranks, spatial, report.selection, str(base), report.ft)
            else:
                metadata = diffusers_metadata(ranks, weights, folder)
            write_lora_file(file, tensors, metadata, progress)
            stage.remove()
    else:
        with shared_directory(out, force, parallel, inputs) as tmp:
            stage = FactorStage(Path(tmp) / f".staging-{parallel.rank}")
            scratch = Path(tmp) / ".calibration"
            made = None
            if tokens is not None:
                assert ft_ckpt is not None
                modules = [t.module for t in targets.lora if t.parameter is None and t.kind != "embedding"]
                made = calibrate(ft_ckpt.root, tokens, modules, device, scratch, metric, covariance_bytes, progress)
                extraction.activations = Activations(made.covariances, activation_aware)
                report.calibration = calibration_entry(made, activation_aware)
            survey = _passes(extraction, choice, stage, report)
            tensors, lora_config = extraction.assemble(stage, survey, report, save_modules, base_name=str(base))
            lora_config.update(base_model_fields(base))  # the Hub id (and revision) when the base came from the Hub
            if not tensors:
                raise DeltakitError(_nothing_to_write(report))
            write_adapter(Path(tmp), lora_config, tensors, progress, parallel, card=model_card(report, lora_config))
            stage.remove()
            if made is not None:
                before, after = measure_fidelity(base_ckpt.root, made, device,
                                                 lambda: adapter_edits(base_ckpt, tmp, allow_pickle))
                report.fidelity = fidelity_entry(made, before, after)
                shutil.rmtree(scratch)
    report.elapsed_s = time.perf_counter() - started
    return report


def _passes(extraction: Extraction, choice: RankChoice, stage: FactorStage, report: ExtractReport) -> Survey:
    """Pass 1, and pass 2 where the ranks depend on the spectra; the report's matrices in plan order."""
    survey = extraction.first_pass(stage, report)
    if choice.needs_spectra:
        ranks = extraction.choose_ranks(survey)
        extraction.second_pass(stage, survey, ranks, report)
    report.matrices.sort(key=lambda m: extraction.order[m.name])
    return survey


def check_clamp(clamp: float | None) -> None:
    """A clamp quantile is a fraction in (0, 1]: sd-scripts' default is 0.99."""
    if clamp is not None and (math.isnan(float(clamp)) or not 0.0 < float(clamp) <= 1.0):
        raise DeltakitError(f"clamp quantile {clamp:g} is outside (0, 1]; sd-scripts' default is 0.99")


def _inputs(base: str | os.PathLike, ft: str | os.PathLike | Sequence[str | os.PathLike],
            weights: Sequence[float] | None, save_modules: bool) -> tuple[list[str] | None, str | os.PathLike | None]:
    """(adapter paths, None) when ``ft`` names PEFT adapters, (None, the fine-tune) for one model; refuse mixtures."""
    given = [ft] if isinstance(ft, (str, os.PathLike)) else list(ft)
    if not given:
        raise DeltakitError("give a fine-tuned model or at least one adapter to extract from")
    if is_adapter_path(base):
        raise DeltakitError(f"BASE {base} is a PEFT adapter; extract needs the full base model as BASE "
                            f"(adapters go after it: deltakit extract BASE {base} -o OUT --rank R)")
    is_adapter = [is_adapter_path(path) for path in given]
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


def _calibration_inputs(calibration: str | os.PathLike | None, activation_aware: bool, metric: str,
                        ft: Checkpoint | None, parallel: Parallel) -> tuple[CalibrationTokens | None, str]:
    """The calibration tokens and fidelity metric, or (None, metric) without a calibration; refuse what cannot run."""
    if calibration is None:
        if activation_aware:
            raise DeltakitError("activation-aware extraction needs calibration tokens (--calibration PATH) to "
                                "measure the layers' inputs on")
        return None, metric
    if ft is None:
        raise DeltakitError("--calibration runs the fine-tuned model; it cannot be used when extracting from adapters")
    if parallel.world_size > 1:
        raise DeltakitError("--calibration runs the model on one device; run extract with it outside torchrun")
    return open_calibration(calibration, ft, metric)


def _nothing_to_write(report: ExtractReport) -> str:
    if report.not_carried:
        first = report.not_carried[0]
        return f"nothing to extract: no matrix changed, and what did cannot be a LoRA (first: {first['name']}: {first['reason']})"
    return "nothing to extract: the fine-tune does not differ from the base in any selected tensor"
