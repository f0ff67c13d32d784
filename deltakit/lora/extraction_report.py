"""What `deltakit extract` reports: per matrix the rank it got and what that keeps, and the run's totals.

Example::

    report.matrices[0].rel_error        # ‖ΔW − BA‖_F / ‖ΔW‖_F, with B and A as stored
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from deltakit.analyses.meta import Displayed
from deltakit.errors import DeltakitError

OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32"}  # sd-scripts' spellings


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
    # ‖(ΔW − BA)·Xᵀ‖_F / ‖ΔW·Xᵀ‖_F on the calibration's layer inputs X (None: no calibration, or
    # no inputs for this matrix: embeddings, fused experts)
    output_error: float | None = None
    unclamped_rel_error: float | None = None  # with clamp_quantile: the error before the clamp (None: no clamp)

    def to_dict(self, calibrated: bool = False) -> dict[str, Any]:
        """The JSON entry; ``output_error`` is there when the extraction had a calibration."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        if not calibrated:
            del out["output_error"]
        if self.unclamped_rel_error is None:
            del out["unclamped_rel_error"]
        return out


@dataclass(repr=False)
class ExtractReport(Displayed):
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
    format: str = "peft"  # peft (a folder) | kohya (one .safetensors file)
    clamp_quantile: float | None = None  # kohya's clamp of the factors (None: none)
    # With a calibration (both only then in the JSON): what the model ran on and how the factors were
    # chosen ({"path", "tokens", "sequences", "activation_aware", "ridge", "metric"}), and how far
    # base + adapter is from the fine-tune: {"tokens", "kl", "kl_base"} for a causal language model,
    # {"tokens", "hidden_error", "hidden_error_base"} otherwise (deltakit.calibration.outputs).
    calibration: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None

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

    @property
    def mean_output_error(self) -> float | None:
        """The mean of the matrices' output errors (those with calibration inputs); None without."""
        measured = [m.output_error for m in self.matrices if m.output_error is not None]
        return sum(measured) / len(measured) if measured else None

    def to_dict(self) -> dict[str, Any]:
        calibrated = self.calibration is not None
        extra = {"calibration": dict(self.calibration), "mean_output_error": self.mean_output_error,  # type: ignore[arg-type]
                 "fidelity": dict(self.fidelity) if self.fidelity else None} if calibrated else {}
        return {
            "base": self.base, "ft": self.ft, "adapter": self.adapter, "selection": self.selection,
            "method": self.method, "spectrum_method": self.spectrum_method, "device": self.device,
            "precision": self.precision, "passes": self.passes, "elapsed_s": round(self.elapsed_s, 3),
            "parameters": self.parameters, "whole_parameters": self.whole_parameters,
            "total_squared_error": self.total_squared_error, "relative_error": self.relative_error,
            **extra, "matrices": [m.to_dict(calibrated) for m in self.matrices], "unchanged": list(self.unchanged),
            "carried_whole": list(self.carried_whole), "not_carried": list(self.not_carried),
            "modules_to_save": list(self.modules_to_save), "lora_bias": self.lora_bias,
            "adapters": list(self.adapters), "weights": list(self.weights),
            "expert_parameters": [dict(entry) for entry in self.expert_parameters],
            **({"format": self.format} if self.format != "peft" else {}),
            **({"clamp_quantile": self.clamp_quantile} if self.clamp_quantile is not None else {}),
        }


def output_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None`` (follow the fine-tune), or float32 | bfloat16 | float16."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in OUTPUT_DTYPES.values():
        return dtype  # type: ignore[return-value]
    name = SHORT_DTYPES.get(str(dtype), str(dtype))
    if name in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[name]
    raise DeltakitError(f"unknown output dtype {dtype!r}; use one of {', '.join(OUTPUT_DTYPES)}")
