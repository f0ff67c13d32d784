"""The row-blocked path: the spectrum of a ΔW too large to hold whole on the device.

A 405B embedding or lm_head (128256×16384) has an 8.4 GB fp32 ΔW; with W_base as stored
that is 12.6 GB before any workspace. Its spectrum needs only the Gram matrix G = ΔWᵀΔW
(n×n, n the smaller side: 1.07 GB in fp32 there), ‖ΔW‖²_F, ‖W_base‖²_F and the storage-noise
sums, and each of these is a sum over rows. So the pair is read ``block_rows`` rows at a
time (:func:`deltakit.delta.delta_row_blocks`), each ΔW block is formed on the device in the
compute dtype, and the sums are accumulated: G in the compute dtype (fp32, or fp64 with
``--precision fp64``) as the whole-matrix Gram path forms it, the norms in fp64. G goes through
:func:`~deltakit.spectral.spectrum.build_spectrum` with the Gram method's floor and the measured
‖ΔW‖²_F, as on the whole-matrix Gram path, so every metric means the same thing.

The rounding model's update scale (:class:`~deltakit.spectral.noise.UpdateScale`) needs every
row's and column's mean |ΔW| before any entry's variance, so with a shared grid (same dtype on
both sides) the pair is read twice: once for G, the norms and the scale, once for the noise.

Where the Gram path's floor lies above the data's (:func:`~deltakit.spectral.spectrum.unresolved_band`),
the pair is read once more for G in float64, as the whole path refines (no certificate of an empty band:
that needs ΔW whole).

Limits: tall matrices only (m ≥ n: embeddings and lm_head); a wide one would need ΔWΔWᵀ
from pairs of row blocks. Quantized pairs, adapters and MoE expert slices take the whole path.
The amplification factor (it projects W_base on ΔW's singular vectors) is not computed here.

Example::

    blocks = lambda rows: delta_row_blocks(base, ft, pair, rows, device, dtype)
    spectrum, base_fro = blocked_spectrum(blocks, pair.shape, pair.base_dtype, pair.ft_dtype, device, dtype)
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterable

import torch

from deltakit.spectral.noise import NoiseSums, ScaleSums, StorageNoise, declared_sides, rounding_evidence
from deltakit.spectral.rounding import RoundingSums, between, decide_rounding
from deltakit.spectral.options import BLOCK_BYTES
from deltakit.spectral.norms import dim0_blocks
from deltakit.spectral.spectrum import Spectrum, build_spectrum, require_finite, unresolved_band

METHOD = "gram-blocked"  # ``spectrum_method`` of a matrix analysed here


def block_rows(shape: tuple[int, int], dtype: torch.dtype, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows per block: ``block_bytes`` of ΔW in ``dtype`` (at least one row)."""
    return max(1, block_bytes // max(1, shape[1] * dtype.itemsize))


def _square_parts(tensor: torch.Tensor) -> torch.Tensor:
    """Squared float64 norms of ``tensor``'s row blocks (no float64 copy of the whole), on its device."""
    return torch.stack([torch.linalg.vector_norm(tensor[rows], dtype=torch.float64)
                        for rows in dim0_blocks(tensor)]).square()


def blocked_spectrum(read_blocks: Callable[[int], Iterable[tuple[int, torch.Tensor, torch.Tensor]]],
                     shape: tuple[int, int], base_dtype: torch.dtype, ft_dtype: torch.dtype, device: torch.device,
                     dtype: torch.dtype = torch.float32, name: str = "ΔW",
                     block_bytes: int = BLOCK_BYTES, rounding: str = "auto") -> tuple[Spectrum, float]:
    """The :class:`Spectrum` of a tall ΔW (m×n) and ‖W_base‖_F, never holding ΔW whole.

    ``read_blocks(rows)`` yields (first row, W_base rows as stored, ΔW rows in ``dtype``) on ``device``,
    ``rows`` at a time (``block_bytes`` of ΔW); it is called twice where the rounding model needs the whole matrix's update
    scale first (same dtype on both sides). Device memory: G (n×n, ``dtype``) and the blocks the
    reader holds, plus the storage-noise sums (m + n float64) and their block temporaries.
    """
    m, n = (int(side) for side in shape)
    rows = block_rows((m, n), dtype, block_bytes)
    gram = torch.zeros((n, n), dtype=dtype, device=device)
    delta_squares: list[torch.Tensor] = []
    base_squares: list[torch.Tensor] = []
    noise = NoiseSums((m, n), base_dtype, ft_dtype, device, 
                      sides=declared_sides(base_dtype, ft_dtype, rounding) or ("two-sided", ""))
    scale = ScaleSums((m, n), dtype, device) if noise.shared else None
    for start, base_block, delta in read_blocks(rows):
        gram.addmm_(delta.T, delta)
        delta_squares.append(_square_parts(delta))
        base_squares.append(_square_parts(base_block))
        if scale is None:
            noise.add(start, base_block, delta, None)
        else:
            scale.add(start, delta)
        del base_block, delta
    delta_fro = math.sqrt(float(torch.cat(delta_squares).sum())) if delta_squares else 0.0
    base_fro = math.sqrt(float(torch.cat(base_squares).sum())) if base_squares else 0.0
    require_finite(name, delta_fro, base_fro)
    if scale is not None:  # second read: every entry's variance needs the whole matrix's update scale; with
        # "auto" rounding both models' sums are gathered beside the evidence that decides between them
        update = scale.result()
        models = {sides: NoiseSums((m, n), base_dtype, ft_dtype, device, sides=(sides, ""))
                  for sides in (("one-sided", "two-sided") if rounding == "auto" else (rounding,))}
        evidence = RoundingSums(device)
        for start, base_block, delta in read_blocks(rows):
            for sums in models.values():
                sums.add(start, base_block, delta, update)
            if rounding == "auto":
                rounding_evidence(evidence, start, base_block, delta, base_dtype, update)
            del base_block, delta
        noise = chosen_noise(models, decide_rounding(evidence, rounding))
    else:
        noise = noise.result()
    spectrum = build_spectrum(None, (m, n), METHOD, "gram", noise, delta_fro ** 2, dtype, gram=gram)
    if dtype == torch.float32 and unresolved_band(spectrum, dtype):  # one more read: G in float64 (refined_values)
        del gram
        wide = torch.zeros((n, n), dtype=torch.float64, device=device)
        for _, base_block, delta in read_blocks(rows):
            block = delta.double()
            wide.addmm_(block.T, block)
            del base_block, delta, block
        spectrum = build_spectrum(None, (m, n), METHOD, "exact", spectrum.noise, delta_fro ** 2, dtype, gram=wide,
                                  refined=True)
    return spectrum, base_fro


def chosen_noise(models: dict[str, NoiseSums], decision: tuple[str, str]) -> StorageNoise:
    """The :class:`StorageNoise` of the model decided, from the sums gathered for each; "between" as the geometric
    mean of both models' energies and row / column maxima (a bound, by Cauchy–Schwarz, on the per-entry one)."""
    sides, why = decision
    if sides in models:
        return replace(models[sides].result(), sides=sides, sides_reason=why)
    one, two = models["one-sided"].result(), models["two-sided"].result()
    return replace(two, energy=between(one.energy, two.energy),
                   row_energy_max=between(one.row_energy_max, two.row_energy_max),
                   col_energy_max=between(one.col_energy_max, two.col_energy_max), sides=sides, sides_reason=why)
