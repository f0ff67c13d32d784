"""How far a model's outputs are from the fine-tune's on the calibration tokens.

For a causal language model, the mean per-token KL divergence of the next-token distributions,

    kl = (1/T) Σ_t Σ_v p_ft(v | t) · (log p_ft(v | t) − log q(v | t)),

over every position t of every calibration sequence (T of them). For a model without a language
model head, the relative error of the final hidden states over all tokens,

    hidden_error = ‖H_ft − H_q‖_F / ‖H_ft‖_F.

The fine-tune's outputs (log-probabilities or hidden states, fp32) are parked on disk one batch
at a time while it runs, so that only one model is held at once; each is read back beside the
same batch of the model measured. Sums are accumulated in float64.

Example::

    reference = ReferenceOutputs(folder, "kl")
    reference.save(0, output_of(model_ft(ids), "kl"))
    divergence(run_q, batches, reference, device)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from deltakit.errors import DeltakitError

METRICS = ("kl", "hidden")


def output_of(output: Any, metric: str) -> torch.Tensor:
    """What the metric compares of one forward's output, in fp32: log-probabilities [batch, seq, vocab]
    (``kl``) or final hidden states [batch, seq, hidden] (``hidden``)."""
    if metric == "kl":
        return torch.log_softmax(output.logits.to(torch.float32), dim=-1)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return hidden.to(torch.float32)


@dataclass
class ReferenceOutputs:
    """The fine-tune's :func:`output_of` per calibration batch, one safetensors file each under ``folder``."""

    folder: Path
    metric: str

    def path(self, index: int) -> Path:
        return self.folder / f"reference-{index:05d}.safetensors"

    def save(self, index: int, values: torch.Tensor) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        save_file({"values": values.contiguous().cpu()}, str(self.path(index)))

    def load(self, index: int, device: torch.device | str) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.path(index)), device=str(device))["values"]


def token_kl(reference: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """Σ_v p (log p − log q) per token, from log-probabilities (fp32) [..., vocab]; p = 0 terms count 0."""
    p = reference.exp()
    terms = torch.where(p > 0, p * (reference - measured), torch.zeros((), dtype=p.dtype, device=p.device))
    return terms.sum(dim=-1)


def divergence(run: Callable[[torch.Tensor], Any], batches: Sequence[torch.Tensor], reference: ReferenceOutputs,
               device: torch.device | str) -> float:
    """The metric (module docstring) of the model ``run`` runs, against ``reference``, over ``batches``."""
    numerator, denominator = 0.0, 0.0
    for index, batch in enumerate(batches):
        measured = output_of(run(batch), reference.metric)
        expected = reference.load(index, device)
        if measured.shape != expected.shape:
            raise DeltakitError(f"the fine-tune's outputs are {tuple(expected.shape)} per batch, this model's "
                                f"{tuple(measured.shape)}: they must have the same vocabulary and width to be compared")
        if reference.metric == "kl":
            numerator += float(token_kl(expected, measured).sum(dtype=torch.float64))
            denominator += float(batch.numel())
        else:
            numerator += float(torch.linalg.vector_norm(expected - measured, dtype=torch.float64)) ** 2
            denominator += float(torch.linalg.vector_norm(expected, dtype=torch.float64)) ** 2
        del measured, expected
    if reference.metric == "kl":
        return numerator / denominator if denominator else 0.0
    return math.sqrt(numerator / denominator) if denominator else 0.0
