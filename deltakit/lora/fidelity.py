"""How close base + adapter is to the fine-tune, measured by what the model does on calibration tokens.

`deltakit check BASE FT ADAPTER --calibration PATH` (:func:`check_adapter`) runs the fine-tune on
the tokens (recording its layer inputs' covariances and its outputs), then the base with and
without the adapter (any type PEFT can merge; tensors it carries whole replace the base's), and
reports, per adapted matrix, the output error ‖(ΔW_ft − ΔW_adapter)·Xᵀ‖_F / ‖ΔW_ft·Xᵀ‖_F on the
fine-tune's inputs X, and the fidelity: the mean per-token KL(ft ‖ base + adapter) beside
KL(ft ‖ base), or for a model without a language model head the relative error of the final
hidden states (:mod:`deltakit.calibration.outputs`). `extract --calibration` reports the same
for the adapter it writes.

The adapter is applied to the base's weights in fp32 and stored in the model's dtype, as
`deltakit merge` writes it (a bf16 model's merged weights carry bf16 rounding, as a merged
deployment's do); KL(ft ‖ base) is measured on the same footing.

Example::

    report = check_adapter("base", "ft", "adapter", "calib.safetensors")
    report.fidelity["kl"], report.fidelity["kl_base"]
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch

from deltakit.adapters import Adapter, AdapterModule, adapter_pairs, base_info, open_adapter
from deltakit.analyses.compare import open_sources
from deltakit.analyses.meta import Displayed
from deltakit.calibration import (
    COVARIANCE_BYTES, Calibration, Edit, calibrate, choose_metric, measure_fidelity, read_calibration,
)
from deltakit.delta import MultiDeltaItem, Selection, stream_many
from deltakit.distributed import Parallel, matrix_cost, process_device, reported_device
from deltakit.errors import DeltakitError
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.io.peft import is_peft_adapter
from deltakit.lora.targets import module_of, ties_embeddings
from deltakit.lora.whitening import RIDGE, relative_output_error
from deltakit.pairing import match_names, module_type
from deltakit.pipeline import ProgressFn, run
from deltakit.spectral.options import SpectralOptions


def adapter_edits(base: Checkpoint, adapter_path: str | os.PathLike, allow_pickle: bool = False
                  ) -> Iterator[tuple[str, Edit]]:
    """(base tensor name, W ↦ W + ΔW) of every tensor the adapter changes, and (name, W ↦ its
    replacement) of every tensor it carries whole; refuses an adapter that does not fit ``base``."""
    adapter = open_adapter(adapter_path, allow_pickle=allow_pickle, base=base_info(base))
    for pair, module in adapter_pairs(adapter, base):
        yield pair.base_name, partial(_applied, adapter, module, pair.transposed)
    mapping = match_names(base.keys(), adapter.whole_tensors.keys())
    for name, key in adapter.whole_tensors.items():
        target = mapping.get(name)
        if target is None:
            if module_type(name) == "lm_head" and ties_embeddings(base.config):
                continue  # PEFT's copy of a tied output layer: the embedding carries it
            raise DeltakitError(f"adapter {adapter.path} carries {name} whole, which {base.path} does not have")
        yield target, partial(_replacement, adapter, key)


def _applied(adapter: Adapter, module: AdapterModule, transposed: bool, weight: torch.Tensor) -> torch.Tensor:
    return module.apply(adapter.load(module, weight.device), weight.clone(), transposed, None, 1.0)


def _replacement(adapter: Adapter, key: str, weight: torch.Tensor) -> torch.Tensor:
    return adapter.checkpoint.get(key, weight.device).to(torch.float32)


def fidelity_entry(calibration: Calibration, base_value: float, value: float) -> dict[str, Any]:
    """The report's ``fidelity``: {"tokens", "kl", "kl_base"} or {"tokens", "hidden_error", "hidden_error_base"}."""
    key = "kl" if calibration.metric == "kl" else "hidden_error"
    return {"tokens": calibration.tokens.tokens, key: value, f"{key}_base": base_value}


def calibration_entry(calibration: Calibration, activation_aware: bool | None = None) -> dict[str, Any]:
    """The report's ``calibration``: what the model ran on and (extraction) how the factors were chosen."""
    entry: dict[str, Any] = {"path": calibration.tokens.path, "tokens": calibration.tokens.tokens,
                             "sequences": calibration.tokens.sequences, "metric": calibration.metric}
    if activation_aware is not None:
        entry.update(activation_aware=activation_aware, ridge=RIDGE if activation_aware else None)
    entry["modules_without_inputs"] = list(calibration.missing)
    return entry


def open_calibration(calibration: str | os.PathLike, ft: Checkpoint, metric: str) -> tuple[Any, str]:
    """(the calibration tokens, the fidelity metric) for the fine-tune ``ft``, whose folder must hold a model."""
    if ft.config is None:
        raise DeltakitError(f"--calibration runs the fine-tune with transformers, but {ft.path} has no config.json "
                            "beside its weights")
    chosen = choose_metric(ft.config, metric, str(ft.path))
    vocab = ft.config.get("vocab_size")
    tokens = read_calibration(calibration, ft.root, int(vocab) if isinstance(vocab, int) else None)
    return tokens, chosen


@dataclass
class CheckedMatrix:
    """One adapted matrix: how far the adapter's ΔW is from the fine-tune's, in weights and in outputs."""

    name: str
    module: str
    shape: tuple[int, int]  # (out, in)
    delta_fro: float  # ‖ΔW_ft‖_F
    rel_error: float | None  # ‖ΔW_ft − ΔW_adapter‖_F / ‖ΔW_ft‖_F (None when ΔW_ft = 0)
    output_error: float | None  # ‖(ΔW_ft − ΔW_adapter)·Xᵀ‖_F / ‖ΔW_ft·Xᵀ‖_F; None without inputs

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


@dataclass(repr=False)
class CheckReport(Displayed):
    """What `check` measured; ``to_dict()`` is the JSON report; ``print`` shows `check`'s text, a notebook its
    table (``_repr_html_``)."""

    base: str
    ft: str
    adapter: str
    device: str
    calibration: dict[str, Any]
    fidelity: dict[str, Any]
    matrices: list[CheckedMatrix] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def mean_output_error(self) -> float | None:
        measured = [m.output_error for m in self.matrices if m.output_error is not None]
        return sum(measured) / len(measured) if measured else None

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "ft": self.ft, "adapter": self.adapter, "device": self.device,
                "elapsed_s": round(self.elapsed_s, 3), "calibration": dict(self.calibration),
                "fidelity": dict(self.fidelity), "mean_output_error": self.mean_output_error,
                "matrices": [m.to_dict() for m in self.matrices]}


def check_adapter(base: str | os.PathLike, ft: str | os.PathLike, adapter: str | os.PathLike,
                  calibration: str | os.PathLike, metric: str = "auto", options: SpectralOptions = SpectralOptions(),
                  allow_pickle: bool = False, progress: ProgressFn | None = None,
                  covariance_bytes: int = COVARIANCE_BYTES) -> CheckReport:
    """The fidelity of ``adapter`` (any PEFT adapter of ``base``) to the fine-tune ``ft`` on ``calibration``.

    ``metric``: ``auto`` (KL for a causal language model, else the hidden states), ``kl`` or ``hidden``.
    Example: ``check_adapter("base", "ft", "lora", "calib.txt").fidelity``.
    """
    started = time.perf_counter()
    if is_peft_adapter(ft):
        raise DeltakitError(f"FT {ft} is a PEFT adapter; check compares an adapter (third) with a fine-tuned model")
    if not is_peft_adapter(adapter):
        raise DeltakitError(f"ADAPTER {adapter} is not a PEFT adapter folder (no adapter_config.json)")
    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle)
    ft_ckpt = open_checkpoint(ft, allow_pickle=allow_pickle)
    if base_ckpt.config is None:
        raise DeltakitError(f"check runs BASE with transformers, but {base_ckpt.path} has no config.json")
    tokens, chosen = open_calibration(calibration, ft_ckpt, metric)
    sources, rows, _ = open_sources(base, [ft, adapter], Selection(allow_pickle=allow_pickle))
    rows = [row for row in rows if sources[0].pairs[row[0]].is_matrix and sources[0].pairs[row[0]].layout != "embedding"]
    modules = [module_of(sources[0].pairs[row[0]].base_name) for row in rows]
    device = process_device(Parallel(), options.device)
    with tempfile.TemporaryDirectory(prefix="deltakit-check-") as scratch:
        made = calibrate(ft_ckpt.root, tokens, modules, device, Path(scratch), chosen, covariance_bytes, progress)

        def read(mine: list[int]) -> Any:
            return stream_many([rows[i] for i in mine], sources, device, options.dtype, options.reads_ahead(device))

        def measure(index: int, item: MultiDeltaItem) -> CheckedMatrix:
            return _checked(item, modules[index], made, device)

        matrices = run([matrix_cost(sources[0].pairs[r[0]].shape) for r in rows], read, measure, progress=progress,
                       label="output errors")
        before, after = measure_fidelity(base_ckpt.root, made, device,
                                         lambda: adapter_edits(base_ckpt, adapter, allow_pickle))
    report = CheckReport(base=str(base), ft=str(ft), adapter=str(adapter), device=reported_device(Parallel(), device),
                         calibration=calibration_entry(made), fidelity=fidelity_entry(made, before, after),
                         matrices=matrices)
    report.elapsed_s = time.perf_counter() - started
    return report


def _checked(item: MultiDeltaItem, module: str, calibration: Calibration, device: torch.device) -> CheckedMatrix:
    pair = item.pairs[0]
    ft_delta = pair.to_out_in(item.deltas[0]).to(torch.float64)
    adapter_delta = item.pairs[1].to_out_in(item.deltas[1]).to(torch.float64)
    error = ft_delta - adapter_delta
    delta_fro = float(torch.linalg.vector_norm(ft_delta))
    error_fro = float(torch.linalg.vector_norm(error))
    covariance = calibration.covariances.get(module, device)
    output_error = relative_output_error(error, ft_delta, covariance) if covariance is not None else None
    return CheckedMatrix(name=pair.name, module=module, shape=(int(ft_delta.shape[0]), int(ft_delta.shape[1])),
                         delta_fro=delta_fro, rel_error=error_fro / delta_fro if delta_fro > 0 else None,
                         output_error=output_error)
