"""How spectra are computed: one frozen dataclass shared by rank, extract and intruders."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltakit.errors import DeltakitError

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class SpectralOptions:
    """How spectra are computed; shared by rank, extract and intruders."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | fp64: the dtype of ΔW and of the decomposition
    exact: bool = False  # full SVD instead of the Gram/eigh fast path
    prefetch: int = 2  # tensor pairs read ahead on a background thread

    @property
    def dtype(self) -> torch.dtype:
        if self.precision not in PRECISIONS:
            raise DeltakitError(f"unknown precision {self.precision!r}; use fp32 or fp64")
        return PRECISIONS[self.precision]

    @property
    def method(self) -> str:
        return "exact" if self.exact else "gram"
