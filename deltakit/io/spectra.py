"""The spectra file written by ``deltakit rank --save-spectra`` and read by ``deltakit plot``.

A safetensors file: one float64 1-D tensor per matrix (all singular values of its ΔW,
descending), keyed by the tensor name as stored in the fine-tune; its ``__metadata__``
holds ``{"deltakit_spectra": "1", "info": <JSON>}`` where the JSON is
``{"base", "ft", "energy": [...], "matrices": {name: {"shape", "module_type", "layer", "rank_at": {...}}}}``.

Example::

    spectra, info = load_spectra("spectra.safetensors")
    spectra["model.layers.0.self_attn.q_proj.weight"]   # numpy float64, descending
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltakit.errors import DeltakitError
from deltakit.io.atomic import atomic_file

FORMAT_VERSION = "1"


def save_spectra(
    path: str | os.PathLike, spectra: dict[str, np.ndarray], info: dict[str, Any], force: bool = False
) -> None:
    """Write singular values per matrix plus ``info`` (JSON-able) atomically to ``path``."""
    tensors = {name: torch.as_tensor(np.ascontiguousarray(s, dtype=np.float64)) for name, s in spectra.items()}
    metadata = {"deltakit_spectra": FORMAT_VERSION, "info": json.dumps(info)}
    with atomic_file(path, force=force) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_spectra(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a spectra file: (name -> descending float64 singular values, info dict)."""
    path = Path(path)
    if not path.is_file():
        raise DeltakitError(f"{path}: no such spectra file")
    with open(path, "rb") as handle:
        head = handle.read(64).lstrip()
    if head.startswith((b"{", b"[")):  # the JSON report written beside the spectra file: the likeliest mix-up
        raise DeltakitError(f"{path} is a JSON report, not a spectra file; plot the file that "
                            "`deltakit rank --save-spectra PATH` wrote (a .safetensors file)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise DeltakitError(f"{path} is not a readable spectra file ({str(exc).splitlines()[0]}); "
                            "write one with `deltakit rank --save-spectra PATH`") from None
    if metadata.get("deltakit_spectra") != FORMAT_VERSION:
        raise DeltakitError(f"{path} is not a deltakit spectra file (write one with `deltakit rank --save-spectra`)")
    info = json.loads(metadata.get("info", "{}"))
    return {name: t.numpy() for name, t in tensors.items()}, info
