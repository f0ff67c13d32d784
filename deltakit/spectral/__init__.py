"""Spectra of one matrix (svd), rank metrics as pure functions of a spectrum (metrics), storage rounding in ΔW
(noise) and the one Spectrum object every command reads (spectrum)."""

from deltakit.spectral.metrics import (
    effective_rank, energy_curve, lowrank_error_curve, marchenko_pastur_spectrum, numerical_rank, random_rank_at_energy,
    rank_at_energy, stable_rank, unit_roundoff,
)
from deltakit.spectral.noise import StorageNoise, storage_noise
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.svd import (
    method_noise_floor, randomized_svd, singular_values, top_singular_triplets, truncated_svd,
)
from deltakit.spectral.spectrum import Spectrum, compute_spectrum

__all__ = [
    "SpectralOptions",
    "effective_rank", "energy_curve", "lowrank_error_curve", "marchenko_pastur_spectrum", "numerical_rank", "random_rank_at_energy",
    "rank_at_energy", "stable_rank", "unit_roundoff", "StorageNoise", "storage_noise", "Spectrum", "compute_spectrum",
    "method_noise_floor", "randomized_svd", "singular_values", "top_singular_triplets", "truncated_svd",
]
