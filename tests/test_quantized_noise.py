"""The storage-noise model of a fine-tune re-quantized to its base's fp8 format ("quantized" model).

Ground truth by construction: an fp8 e4m3 block-scaled base (written here with known codes and
scales, read back by deltakit's dequantization), a fine-tune made from its dequantized weights
plus a rank-4 change with equal singular values, re-quantized to e4m3 with the base's block
scales or with scales recomputed from the new amax. The actual rounding part N = ΔW_stored − L
is known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltakit.io.checkpoint import open_checkpoint
from deltakit.spectral.noise import requantization_variance, storage_noise
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.spectrum import compute_spectrum

E4M3 = torch.float8_e4m3fn
BLOCK = 128
CONFIG = {"model_type": "llama", "torch_dtype": "bfloat16",
          "quantization_config": {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}}
NAME = "model.layers.0.mlp.down_proj.weight"


def _expand(scale: torch.Tensor) -> torch.Tensor:
    return scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)


def _quantize(weight: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes and 128×128 block scales (amax / 448 unless given), as fp8 releases store them."""
    rows, cols = weight.shape
    if scale is None:
        scale = weight.reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK).abs().amax(dim=(1, 3)) / 448.0
    return (weight / _expand(scale)).to(E4M3), scale


def _write(folder: Path, codes: torch.Tensor, scale: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    save_file({NAME: codes, f"{NAME}_scale_inv": scale}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


@pytest.mark.parametrize("scales", ["kept", "recomputed"])
def test_requantized_fp8_pair_reads_rank_4_with_the_rounding_as_noise(tmp_path, scales):
    g = torch.Generator().manual_seed(0)
    base_codes, base_scale = _quantize(torch.randn(256, 384, generator=g) * 0.02)
    base_values = base_codes.float() * _expand(base_scale)
    u, _ = torch.linalg.qr(torch.randn(256, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(384, 4, generator=g))
    change = 0.2 * u @ v.T  # rank 4, σ = 0.2 each: rank@0.9 of the change is 4
    ft_codes, ft_scale = _quantize(base_values + change, base_scale if scales == "kept" else None)
    base = open_checkpoint(_write(tmp_path / "base", base_codes, base_scale))
    ft = open_checkpoint(_write(tmp_path / "ft", ft_codes, ft_scale))
    base_w, ft_w = base.get(NAME).float(), ft.get(NAME).float()
    delta = ft_w - base_w
    energy = float(delta.double().square().sum())
    actual_share = float((delta.double() - change.double()).square().sum()) / energy
    assert actual_share > 0.1  # fp8 rounding is a large part of this ΔW

    steps = (base.quantization_step(NAME), ft.quantization_step(NAME))
    noise = storage_noise(base_w, delta, base.dtype(NAME), ft.dtype(NAME), steps=steps)
    spectrum = compute_spectrum(delta, SpectralOptions(device="cpu"), noise, energy)
    assert noise.model == "quantized"
    assert 0.75 * actual_share < spectrum.noise_share < 1.25 * actual_share
    assert spectrum.rank == 4 and spectrum.signal_rank_at(0.9) == 4

    # The dequantized dtype's grid (bf16) alone misses the fp8 rounding: hundreds of "directions".
    dtype_only = compute_spectrum(delta, SpectralOptions(device="cpu"),
                                  storage_noise(base_w, delta, base.dtype(NAME), ft.dtype(NAME)), energy)
    assert dtype_only.noise_share < 0.1 * actual_share and dtype_only.rank > 100
    assert dtype_only.signal_rank_at(0.9) > 10

    # `deltakit rank` reads the steps of both sides itself and applies the same model
    from deltakit.analyses.rank import rank

    for threads in (1, 2):  # on several threads the steps are read on the worker threads
        matrix = rank(tmp_path / "base", tmp_path / "ft", (0.9,),
                      SpectralOptions(device="cpu", workers=threads)).matrices[0]
        assert matrix.noise_model == "quantized"
        assert matrix.noise_share == pytest.approx(spectrum.noise_share, rel=1e-6)
        assert matrix.rank == 4 and matrix.signal_rank_at[0.9] == 4


def test_requantization_variance_is_the_mean_squared_rounding_of_a_gaussian_update():
    """E[(t − round t)²], t = c + N(0, s²), against a seeded Monte Carlo on both sides of the
    small-spread switch and at offsets 0 (start on the grid), 0.2, ½ and 0.8."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(400_000, generator=g, dtype=torch.float64)
    spreads = [0.0, 0.05, 0.149, 0.151, 0.4, 2.0]
    offsets = [0.0, 0.2, 0.5, 0.8]
    for s in spreads:
        for c in offsets:
            t = c + s * z
            sampled = float(((t - torch.round(t)) ** 2).mean())
            model = float(requantization_variance(torch.tensor([s], dtype=torch.float64),
                                                  torch.tensor([c], dtype=torch.float64)))
            assert model == pytest.approx(sampled, abs=1e-3), (s, c)
    # on the grid and an update far below a step: erased, variance s²; far above: 1/12
    tiny = torch.tensor([0.01], dtype=torch.float64)
    assert float(requantization_variance(tiny)) == pytest.approx(1e-4, rel=1e-6)
    assert float(requantization_variance(torch.tensor([5.0]))) == pytest.approx(1 / 12, rel=1e-6)
