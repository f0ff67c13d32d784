"""Spectra of one matrix (svd) and rank metrics as pure functions of a spectrum (metrics)."""

from deltakit.spectral.metrics import (
    effective_rank, energy_curve, lowrank_error_curve, marchenko_pastur_spectrum, numerical_rank, random_rank_at_energy,
    rank_at_energy, rounding_noise_floor, stable_rank, unit_roundoff,
)
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.svd import (
    method_noise_floor, randomized_svd, singular_values, top_singular_triplets, truncated_svd,
)

__all__ = [
    "SpectralOptions",
    "effective_rank", "energy_curve", "lowrank_error_curve", "marchenko_pastur_spectrum", "numerical_rank", "random_rank_at_energy",
    "rank_at_energy", "rounding_noise_floor", "stable_rank", "unit_roundoff",
    "method_noise_floor", "randomized_svd", "singular_values", "top_singular_triplets", "truncated_svd",
]
