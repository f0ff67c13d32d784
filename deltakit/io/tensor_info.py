"""What a stored tensor is, known from a header without reading its data.

Example::

    info = TensorInfo("w", (4, 8), torch.bfloat16, Path("model.safetensors"), offset=128)
    info.nbytes        # 64
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype strings -> torch dtypes (what the header says, before any read).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = -1  # byte offset of the data in a safetensors file; -1 for pickles

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()
