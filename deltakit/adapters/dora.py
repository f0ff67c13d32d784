"""DoRA (Liu et al. 2024): LoRA with a learned magnitude per output unit.

W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖, the norm taken per output unit of the layer's (out, in)
matrix over its inputs (PEFT ``DoraLinearLayer.get_weight_norm``: ``norm(dim=1)`` after
un-transposing a fan-in-fan-out weight; embeddings: per embedding dimension; convolutions: per
output channel over (in, *kernel), a row of the (out, in·∏kernel) matrix, ``_DoraConvNdLayer``), so
ΔW = W' − W0. The magnitude m (``lora_magnitude_vector``, length out) is stored in the adapter.

Rows of an nn.Linear weight are output units, so merge can still work on row blocks; a weight
stored transposed (Conv1D, embedding) needs all its rows for one norm and is merged whole.
ΔW depends on W0 non-linearly, so unmerging needs the original weights.

Example::

    delta = module.delta(tensors, base_weight.float(), transposed=False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from deltakit.adapters.base import AdapterModule, Rows, row_slice
from deltakit.adapters.lora import KINDS as LORA_KINDS
from deltakit.adapters.lora import UNSUPPORTED_SWITCHES, LoraModule, check_switches, lora_module_fields
from deltakit.errors import DeltakitError
from deltakit.io.peft import AdapterFiles

MAGNITUDE = "lora_magnitude_vector"
KINDS = (*LORA_KINDS, MAGNITUDE)


@dataclass(frozen=True)
class DoraModule(LoraModule):
    """A LoRA layer with DoRA's magnitude vector."""

    kind: ClassVar[str] = "base"

    def splits_rows(self, transposed: bool) -> bool:
        return not transposed

    def merged(self, tensors: dict[str, torch.Tensor], base: torch.Tensor, transposed: bool,
               rows: Rows) -> torch.Tensor:
        """W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖ for the stored rows ``rows``, a new tensor as stored."""
        if rows is not None and transposed:
            raise ValueError("DoRA on a transposed weight needs all its rows")
        factors = {k: v.to(base.device, base.dtype) for k, v in tensors.items()}
        combined = LoraModule.math_delta(self, factors, transposed, rows)  # s·BA, (out, in) rows
        combined.add_(base.T if transposed else base)
        magnitude = row_slice(factors["m"].reshape(-1, 1), rows, False).reshape(-1)
        norm = torch.linalg.vector_norm(combined, dim=1)
        combined.mul_((magnitude / norm).unsqueeze(1))  # a zero norm gives inf / nan: refused by merge
        return combined.T if transposed else combined

    def delta(self, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, transposed: bool,
              rows: Rows = None) -> torch.Tensor:
        if base is None:
            raise ValueError("DoRA's ΔW needs the base weight")
        return self.merged(tensors, base, transposed, rows).sub_(base)

    def apply(self, tensors: dict[str, torch.Tensor], base: torch.Tensor, transposed: bool, rows: Rows,
              weight: float) -> torch.Tensor:
        merged = self.merged(tensors, base, transposed, rows)
        return merged if weight == 1 else merged.mul_(weight).add_(base, alpha=1 - weight)


def build(files: AdapterFiles, modules: dict[str, dict[str, str]]) -> list[AdapterModule]:
    """DoRA modules: every LoRA module must carry its magnitude vector."""
    check_switches(files, UNSUPPORTED_SWITCHES)
    built: list[AdapterModule] = []
    for module, kinds in sorted(modules.items()):
        fields = lora_module_fields(files, module, {k: v for k, v in kinds.items() if k != MAGNITUDE})
        if MAGNITUDE not in kinds:
            raise DeltakitError(f"{files.path}: DoRA module {module} has no {MAGNITUDE}")
        length = files.checkpoint.shape(kinds[MAGNITUDE])  # (out,), or with ones around it (a convolution's (1, out, 1, 1))
        if math.prod(length) != fields["out_features"] or fields["out_features"] not in (*length, 1):
            raise DeltakitError(f"{files.path}: {module}'s magnitude has shape {tuple(length)}, expected "
                                f"({fields['out_features']},)")
        fields["keys"] = {**fields["keys"], "m": kinds[MAGNITUDE]}
        built.append(DoraModule(**fields))
    return built
