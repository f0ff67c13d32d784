"""The two runs of a calibration: the fine-tune (covariances and reference outputs), then the base
with and without an adapter (the fidelity), one model held at a time.

Example::

    calibration = calibrate("ft", tokens, ["model.layers.0.mlp.down_proj"], device, scratch, "kl")
    kl_base, kl = measure_fidelity("base", calibration, device, lambda: edits)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from deltakit.calibration.covariances import COVARIANCE_BYTES, Covariances, Progress, record_covariances
from deltakit.calibration.model_run import Edit, edit_parameters, find_modules, free_memory, is_causal_lm, load_model
from deltakit.calibration.outputs import METRICS, ReferenceOutputs, divergence, output_of
from deltakit.calibration.tokens import CalibrationTokens
from deltakit.errors import DeltakitError


@dataclass
class Calibration:
    """What the fine-tune's run left: its layer inputs' covariances and its outputs on the tokens."""

    tokens: CalibrationTokens
    metric: str  # "kl" | "hidden"
    covariances: Covariances
    reference: ReferenceOutputs
    missing: list[str] = field(default_factory=list)  # target modules the model has not (or never ran)


def choose_metric(config: Mapping[str, Any] | None, metric: str = "auto", model: str = "the model") -> str:
    """``kl`` for a causal language model, ``hidden`` otherwise; ``kl`` asked of another model is refused."""
    if metric not in ("auto", *METRICS):
        raise DeltakitError(f"unknown fidelity metric {metric!r}; use auto, kl or hidden")
    causal = is_causal_lm(config)
    if metric == "auto":
        return "kl" if causal else "hidden"
    if metric == "kl" and not causal:
        names = ", ".join(str(a) for a in (config or {}).get("architectures") or []) or "no architecture"
        raise DeltakitError(f"KL needs a causal language model (a *ForCausalLM class), but {model}'s config names "
                            f"{names}; measure the final hidden states instead (metric hidden)")
    return metric


def forward(model: torch.nn.Module, metric: str) -> Callable[[torch.Tensor], Any]:
    """One batch of token ids through ``model`` on its device, without gradients or a KV cache."""
    device = next(model.parameters()).device
    extra = {"use_cache": False} if metric == "kl" else {}

    @torch.no_grad()
    def run(batch: torch.Tensor) -> Any:
        return model(input_ids=batch.to(device), **extra)
    return run


def calibrate(ft: str | os.PathLike, tokens: CalibrationTokens, modules: Sequence[str], device: torch.device,
              scratch: Path, metric: str, budget_bytes: int = COVARIANCE_BYTES,
              progress: Progress | None = None, host_bytes: int | None = None) -> Calibration:
    """Run the fine-tune on ``tokens``: C = XᵀX of each of ``modules``' inputs and the reference outputs.

    ``budget_bytes`` / ``host_bytes``: see :func:`~deltakit.calibration.covariances.record_covariances`.
    The model is gone (host and device memory returned) when this returns or raises.
    """
    try:
        return _record(ft, tokens, modules, device, scratch, metric, budget_bytes, progress, host_bytes)
    finally:
        free_memory()


def _record(ft: str | os.PathLike, tokens: CalibrationTokens, modules: Sequence[str], device: torch.device,
            scratch: Path, metric: str, budget_bytes: int, progress: Progress | None,
            host_bytes: int | None) -> Calibration:
    model = load_model(ft, device, causal=metric == "kl")
    found = {name: module for name, module in find_modules(model, modules).items()
             if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"}
    if modules and not found:
        raise DeltakitError(f"none of the {len(modules)} adapted modules (first: {modules[0]}) is a linear layer "
                            f"of the model transformers builds from {ft}")
    reference = ReferenceOutputs(scratch / "reference", metric)
    covariances = record_covariances(
        model, found, tokens.batches, scratch / "covariances", forward(model, metric),
        observe=lambda index, output: reference.save(index, output_of(output, metric)),
        budget_bytes=budget_bytes, progress=progress, host_bytes=host_bytes)
    missing = [name for name in modules if name not in covariances.files]
    return Calibration(tokens, metric, covariances, reference, missing)


def measure_fidelity(base: str | os.PathLike, calibration: Calibration, device: torch.device,
                     edits: Callable[[], Iterable[tuple[str, Edit]]]) -> tuple[float, float]:
    """(the base's metric, the base's after ``edits()``) against the fine-tune's outputs; the model is gone
    when this returns or raises."""
    try:
        return _measure(base, calibration, device, edits)
    finally:
        free_memory()


def _measure(base: str | os.PathLike, calibration: Calibration, device: torch.device,
             edits: Callable[[], Iterable[tuple[str, Edit]]]) -> tuple[float, float]:
    model = load_model(base, device, causal=calibration.metric == "kl")
    run = forward(model, calibration.metric)
    batches = calibration.tokens.batches
    before = divergence(run, batches, calibration.reference, device)
    edit_parameters(model, edits())
    return before, divergence(run, batches, calibration.reference, device)
