"""The spectra of one weight, its fine-tune and their difference, side by side (`deltakit plot --kind spectrum`).

Example::

    spectra = weight_spectra("base", "ft", "model.layers.0.self_attn.q_proj.weight")
    spectra["ΔW"][:8]
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from deltakit.delta import open_delta_source
from deltakit.device.placement import resolve_device
from deltakit.errors import DeltakitError
from deltakit.pairing import check_names
from deltakit.pipeline import run
from deltakit.spectral.svd import singular_values


def weight_spectra(base: str | os.PathLike, ft: str | os.PathLike, name: str, *,
                   device: str = "cpu") -> dict[str, np.ndarray]:
    """Singular values of W_base, W_ft and ΔW for one tensor ``name`` (as the fine-tune names it): the
    spectra `deltakit plot --kind spectrum` draws.

    Exact SVD, in float64 up to 1M entries and float32 above. For an embedding that gained
    vocabulary rows, ΔW covers the shared rows only, W_ft all of its rows. Returns
    {"W_base", "W_ft", "ΔW"} -> descending float64 values.
    """
    source = open_delta_source(base, ft)
    names = [pair.name for pair in source.pairs]
    if name in source.only_ft:
        raise DeltakitError(f"{name} has no counterpart in the base checkpoint {base}")
    check_names(names + [s["name"] for s in source.skipped], [name], where=f"the fine-tune {ft}")
    index = names.index(name) if name in names else None
    pair = source.pairs[index] if index is not None else None
    if pair is None or len(pair.shape) != 2 or pair.layout == "vector":
        shape = tuple(pair.shape) if pair is not None else "its"
        raise DeltakitError(f"{name} has shape {shape}; only 2-D matrices have a spectrum")
    dtype = torch.float64 if math.prod(pair.shape) <= 1 << 20 else torch.float32
    compute_device = resolve_device(device)

    def spectra_of(_: int, item) -> dict[str, np.ndarray]:
        w_base = item.base.to(dtype)
        w_ft = (source.ft.get(pair.ft_tensor, compute_device).to(dtype) if pair.added_rows and source.ft is not None
                else w_base + item.delta)
        matrices = {"W_base": w_base, "W_ft": w_ft, "ΔW": item.delta}
        return {label: singular_values(m, method="exact", dtype=dtype).cpu().double().numpy()
                for label, m in matrices.items()}

    [spectra] = run([1.0], lambda _: source.stream([index], compute_device, dtype), spectra_of)
    return spectra
