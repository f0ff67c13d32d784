"""What `deltakit rank` reports: per matrix its spectrum's metrics, per 1-D tensor whether it changed,
and the summaries by module type, depth and expert tensor. ``to_dict()`` is the JSON contract of
docs/json.md.

Example::

    report.matrices[0].rank_at[0.9], report.summary()["by_module_type"]["q"]["median_rank_at"]["0.9"]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deltakit.analyses.meta import (
    PairReportMeta, by_layer, by_module_type, by_tensor, energy_key, mean_known, median_known,
)


@dataclass
class MatrixResult:
    """Metrics of one 2-D ΔW; see docs/metrics.md for each formula."""

    name: str
    shape: tuple[int, int]
    dtype: str
    module_type: str
    layer: int | None
    layout: str
    fused: bool
    added_rows: int
    delta_fro: float
    rel_delta: float | None  # None when the base is zero; rel_delta_reason says so
    spectral_norm: float
    rank: int | None  # None: not settled on the adaptive path (lower_bounds["rank"] holds a bound)
    noise_floor: float
    stable_rank: float
    effective_rank: float
    rank_at: dict[float, int]
    random_rank_at: dict[float, int]
    noise_share: float = 0.0
    unchanged_fraction: float = 0.0
    signal_rank_at: dict[float, int | None] = field(default_factory=dict)
    signal_effective_rank: float | None = 0.0
    signal_rank: int | None = 0
    signal_energy: float = 0.0
    spectrum_method: str = "gram"
    noise_model: str = "exact"
    effective_rank_error: float | None = None  # standard error where the effective rank is estimated (adaptive path)
    lower_bounds: dict[str, int] = field(default_factory=dict)  # counts the adaptive path only bounds from below
    spectrum_fallback: str | None = None  # why the full path ran where the adaptive one was asked for
    refined: bool = False  # the Gram path could not resolve the data's floor: the values are a float64 solve's
    rounding: str | None = None  # which sides were rounded: one-sided, two-sided, between (None: no rounding model)
    rounding_reason: str | None = None  # why (the test's figures, or the option)
    note: str | None = None  # how it was paired where not by name (an untied head against the base's embedding)

    rel_delta_reason: str | None = None
    expert: int | None = None  # expert index of a MoE expert's matrix
    tensor: str | None = None  # the tensor its experts are summarised under (fused: the stored name)
    amplification: dict[str, Any] | None = None  # {"k": r, "value": ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F} (Hu et al. 2021 §7.3)
    change: str | None = None  # how an adapter set it (rows of trainable tokens, a whole replacement); JSON only if set

    def noise_dominated(self, fraction: float) -> bool:
        """True when rounding may account for more than 1 − ``fraction`` of ‖ΔW‖²: rank@fraction then measures rounding."""
        return self.noise_share > 1.0 - fraction

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        for key in ("rank_at", "random_rank_at", "signal_rank_at"):
            out[key] = {energy_key(k): v for k, v in getattr(self, key).items()}
        return _without_unset_change(out)


@dataclass
class VectorResult:
    """A 1-D tensor (norm weight, bias): changed or not, and by how much."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    module_type: str
    layer: int | None
    changed: bool
    delta_norm: float
    rel_delta: float | None  # None when the base is zero; rel_delta_reason says so
    rel_delta_reason: str | None = None
    expert: int | None = None
    tensor: str | None = None
    change: str | None = None  # as MatrixResult.change

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        return _without_unset_change(out)


def _without_unset_change(out: dict[str, Any]) -> dict[str, Any]:
    """``change`` is reported only where an adapter set the tensor rather than adding its ΔW."""
    if out.get("change") is None:
        out.pop("change", None)
    return out


@dataclass(kw_only=True, repr=False)
class RankReport(PairReportMeta):
    """Everything `deltakit rank` found; ``to_dict()`` is the documented JSON contract.

    base, ft (``fts[0]``), device, method, precision, skipped, only_base / only_ft, elapsed_s:
    :class:`~deltakit.analyses.meta.PairReportMeta`."""

    energy: tuple[float, ...]
    matrices: list[MatrixResult] = field(default_factory=list)
    vectors: list[VectorResult] = field(default_factory=list)
    spectra: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    signal_spectra: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # where they differ from spectra

    def summary(self) -> dict[str, Any]:
        """Aggregates by module type and by depth: count, mean / median rank@energy, mean relative change."""
        return {
            "matrices": len(self.matrices),
            "changed_matrices": sum(1 for m in self.matrices if m.delta_fro > 0),
            "vectors": len(self.vectors),
            "changed_vectors": sum(1 for v in self.vectors if v.changed),
            "noise_dominated": self._noise_dominated(self.matrices),
            "refined_matrices": sum(1 for m in self.matrices if m.refined),
            "by_module_type": {name: self._aggregate(items) for name, items in by_module_type(self.matrices).items()},
            "by_layer": {name: self._aggregate(items) for name, items in by_layer(self.matrices).items()},
            "by_tensor": {name: self._aggregate(items) for name, items in by_tensor(self.matrices).items()},
        }

    def _aggregate(self, items: list[MatrixResult]) -> dict[str, Any]:
        return {
            "count": len(items),
            "mean_rank": mean_known(m.rank for m in items),
            "rank_unsettled": sum(1 for m in items if m.rank is None),
            "changed": sum(1 for m in items if m.delta_fro > 0),
            "mean_rel_delta": mean_known(m.rel_delta for m in items),
            "mean_rank_at": {energy_key(e): float(np.mean([m.rank_at[e] for m in items])) for e in self.energy},
            "median_rank_at": {energy_key(e): float(np.median([m.rank_at[e] for m in items])) for e in self.energy},
            "mean_random_rank_at": {
                energy_key(e): float(np.mean([m.random_rank_at[e] for m in items])) for e in self.energy
            },
            "mean_noise_share": float(np.mean([m.noise_share for m in items])),
            "median_signal_rank_at": {energy_key(e): median_known([m.signal_rank_at.get(e) for m in items])
                                      for e in self.energy},
            "noise_dominated": self._noise_dominated(items),
        }

    def _noise_dominated(self, items: list[MatrixResult]) -> dict[str, int]:
        """Per energy fraction X: how many matrices' rank@X may be rounding (noise share > 1 − X)."""
        return {energy_key(e): sum(1 for m in items if m.delta_fro > 0 and m.noise_dominated(e)) for e in self.energy}

    def to_dict(self) -> dict[str, Any]:
        return self.report_dict({"energy": list(self.energy)},
                                {"matrices": [m.to_dict() for m in self.matrices],
                                 "vectors": [v.to_dict() for v in self.vectors]},
                                {"summary": self.summary()})

    def spectra_info(self) -> dict[str, Any]:
        """The ``info`` block of a spectra file (see deltakit.io.spectra)."""
        return {
            "base": self.base, "ft": self.ft, "energy": list(self.energy),
            "matrices": {
                m.name: {"shape": list(m.shape), "module_type": m.module_type, "layer": m.layer,
                         "rank_at": {energy_key(k): v for k, v in m.rank_at.items()},
                         "signal_rank_at": {energy_key(k): v for k, v in m.signal_rank_at.items()},
                         "noise_share": m.noise_share, "signal_energy": m.signal_energy,
                         "energy": m.delta_fro ** 2, "partial": m.spectrum_method.startswith("adaptive")}
                for m in self.matrices
            },
        }
