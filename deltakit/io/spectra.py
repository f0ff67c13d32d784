"""The spectra file written by ``deltakit rank --save-spectra`` and read by ``deltakit plot``.

A safetensors file: one float64 1-D tensor per matrix (all singular values of its ΔW,
descending), keyed by the tensor name as stored in the fine-tune; its ``__metadata__``
holds ``{"deltakit_spectra": "1", "info": <JSON>}`` where the JSON is
``{"base", "ft", "energy": [...], "matrices": {name: {"shape", "module_type", "layer", "rank_at": {...},
"signal_rank_at": {...}, "noise_share", "signal_energy"}}}``. Where storage rounding matters, the
signal spectrum (rounding taken out, see deltakit.spectral.spectrum) is stored beside it as
``signal::<name>``; :func:`load_spectra` returns those in ``info["signal_spectra"]`` (absent when there are none).

Example::

    spectra, info = load_spectra("spectra.safetensors")
    spectra["model.layers.0.self_attn.q_proj.weight"]   # numpy float64, descending
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltakit.errors import DeltakitError
from deltakit.io.atomic import atomic_file
from deltakit.io.inputs import InputFootprint

FORMAT_VERSION = "1"
SIGNAL_PREFIX = "signal::"


def save_spectra(
    path: str | os.PathLike, spectra: dict[str, np.ndarray], info: dict[str, Any], force: bool = False,
    signal_spectra: dict[str, np.ndarray] | None = None, inputs: Iterable[InputFootprint] = (),
) -> None:
    """Write singular values per matrix (and signal spectra where given) plus ``info`` (JSON-able) atomically,
    never over one of ``inputs``."""
    named = dict(spectra) | {SIGNAL_PREFIX + name: s for name, s in (signal_spectra or {}).items()}
    tensors = {name: torch.as_tensor(np.ascontiguousarray(s, dtype=np.float64)) for name, s in named.items()}
    metadata = {"deltakit_spectra": FORMAT_VERSION, "info": json.dumps(info)}
    with atomic_file(path, force=force, inputs=inputs) as tmp:
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
    signal = {name.removeprefix(SIGNAL_PREFIX): t.numpy() for name, t in tensors.items() if name.startswith(SIGNAL_PREFIX)}
    if signal:
        info["signal_spectra"] = signal
    return {name: t.numpy() for name, t in tensors.items() if not name.startswith(SIGNAL_PREFIX)}, info
