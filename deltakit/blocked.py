"""`rank`'s row-blocked path: the spectrum of a ΔW too large to hold whole on the device.

A 405B embedding or lm_head (128256×16384) has an 8.4 GB fp32 ΔW; with W_base as stored
that is 12.6 GB before any workspace. Its spectrum needs only the Gram matrix G = ΔWᵀΔW
(n×n, n the smaller side: 1.07 GB in fp32 there), ‖ΔW‖²_F, ‖W_base‖²_F and the storage-noise
sums, and each of these is a sum over rows. So the pair is read ``block_rows`` rows at a
time (:func:`deltakit.delta.delta_row_blocks`), each ΔW block is formed on the device in the
compute dtype, and the sums are accumulated: G in the compute dtype (fp32, or fp64 with
``--precision fp64``) as the whole-matrix Gram path forms it, the norms in fp64. The values
are √eig(G) and go through :func:`~deltakit.spectral.spectrum.build_spectrum` with the Gram
method's floor and the measured ‖ΔW‖²_F, as on the whole-matrix Gram path, so every metric
means the same thing.

The rounding model's update scale (:class:`~deltakit.spectral.noise.UpdateScale`) needs every
row's and column's mean |ΔW| before any entry's variance, so with a shared grid (same dtype on
both sides) the pair is read twice: once for G, the norms and the scale, once for the noise.

Limits: tall matrices only (m ≥ n: embeddings and lm_head); a wide one would need ΔWΔWᵀ
from pairs of row blocks. Quantized pairs, adapters and MoE expert slices take the whole path.
The amplification factor (it projects W_base on ΔW's singular vectors) is not computed here.

Example::

    if blocked_pair(source, pair, torch.float32):
        spectrum, base_fro = blocked_spectrum(source, pair, torch.device("cuda"), torch.float32)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from deltakit.delta import DeltaSource, delta_row_blocks
from deltakit.errors import DeltakitError
from deltakit.pairing import TensorPair
from deltakit.spectral import metrics
from deltakit.spectral.noise import NoiseSums, ScaleSums, StorageNoise
from deltakit.spectral.norms import dim0_blocks
from deltakit.spectral.spectrum import Spectrum, build_spectrum
from deltakit.spectral.svd import gram_singular_values, method_noise_floor

BLOCKED_BYTES = 7 * 2**29
"""A pair whose ΔW in the compute dtype is over this (3.5 GiB) is analysed by row blocks.

Forming a ΔW of X bytes (fp32) from bf16 holds W_base, W_ft and ΔW, 2X: at 3.5 GiB that is
7.5 GB, the most the whole path can take under issue 14's 8 GB. 405B's MLP matrices (53248×16384,
3.25 GiB) stay on the whole path (adaptive spectrum, amplification; 7.45 GB predicted by
``python -m bench.estimate --memory --preset 405b``); its embedding and lm_head (7.8 GiB) do not."""
BLOCK_BYTES = 256 * 1024**2  # ΔW bytes (compute dtype) per row block read
METHOD = "gram-blocked"  # ``spectrum_method`` of a matrix analysed here


def blocked_pair(source: DeltaSource, pair: TensorPair, dtype: torch.dtype) -> bool:
    """Whether ``pair`` takes the row-blocked path: its ΔW in ``dtype`` is over :data:`BLOCKED_BYTES`
    and it is a tall (m ≥ n) matrix of two stored checkpoints, not quantized, not an expert's slice."""
    if source.ft is None or not pair.is_matrix or pair.layout == "vector" or pair.rows is not None:
        return False
    m, n = (int(side) for side in pair.shape)
    if m < n or m * n * dtype.itemsize <= BLOCKED_BYTES:
        return False
    return pair.base_name not in source.base.quantized and pair.ft_tensor not in source.ft.quantized


def block_rows(shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Rows per block: :data:`BLOCK_BYTES` of ΔW in ``dtype`` (at least one row)."""
    return max(1, BLOCK_BYTES // max(1, shape[1] * dtype.itemsize))


def _square_parts(tensor: torch.Tensor) -> torch.Tensor:
    """Squared float64 norms of ``tensor``'s row blocks (no float64 copy of the whole), on its device."""
    return torch.stack([torch.linalg.vector_norm(tensor[rows], dtype=torch.float64)
                        for rows in dim0_blocks(tensor)]).square()


def blocked_spectrum(source: DeltaSource, pair: TensorPair, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> tuple[Spectrum, float]:
    """The :class:`Spectrum` of a tall pair's ΔW (m×n) and ‖W_base‖_F, never holding ΔW whole.

    Device memory: G (n×n, ``dtype``) and two row blocks of the pair (one being worked on, one
    read ahead), plus the storage-noise sums (m + n float64) and their block temporaries.
    """
    assert source.ft is not None
    m, n = (int(side) for side in pair.shape)
    rows = block_rows((m, n), dtype)
    gram = torch.zeros((n, n), dtype=dtype, device=device)
    delta_squares: list[torch.Tensor] = []
    base_squares: list[torch.Tensor] = []
    noise = NoiseSums((m, n), pair.base_dtype, pair.ft_dtype, device)
    scale = ScaleSums((m, n), dtype, device) if noise.shared else None

    def blocks():
        return delta_row_blocks(source.base, source.ft, pair, rows, device, dtype)

    for start, base_block, delta in blocks():
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
    if not (math.isfinite(delta_fro) and math.isfinite(base_fro)):
        raise DeltakitError(f"{pair.name}: the base or the fine-tune holds inf or nan values; its ΔW is not defined")
    if scale is not None:  # second read: every entry's variance needs the whole matrix's update scale
        update = scale.result()
        for start, base_block, delta in blocks():
            noise.add(start, base_block, delta, update)
            del base_block, delta
    return _spectrum(gram, (m, n), noise.result(), delta_fro, dtype), base_fro


def _spectrum(gram: torch.Tensor, shape: tuple[int, int], noise: StorageNoise, delta_fro: float,
              dtype: torch.dtype) -> Spectrum:
    """The spectrum from G as the whole-matrix Gram path takes it: √eig(G), the Gram floor, the measured energy."""
    energy = delta_fro ** 2
    if energy == 0.0:
        zeros = np.zeros(min(shape))
        return Spectrum(zeros, shape, METHOD, 0.0, noise, zeros.copy(), 0.0, 0.0)
    values = metrics.as_sorted_spectrum(gram_singular_values(gram))
    floor = method_noise_floor(float(values[0]), shape, "gram", dtype) if values[0] > 0 else 0.0
    return build_spectrum(values, shape, METHOD, floor, noise, energy, dtype)
