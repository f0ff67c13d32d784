"""The numerical rank is the data's, on the default path: refined where the fp32 Gram path cannot resolve it.

Ground truth by construction: ΔW = U diag(σ) Vᵀ with orthonormal U, V (QR of a float64 Gaussian) and the
spectrum chosen (a spike over 95 small values; a geometric decay 1 … 1e-4), stored in fp32 beside a base;
the truth is len(σ), which the float64 SVD of the stored ΔW confirms above the fp32 data's floor
max(m, n)·eps₃₂·σ₁. The fp32 Gram path alone resolves only 16·√eps₃₂·σ₁ ≈ 0.55 % of σ₁ (it read 1 and 11).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import deltakit
from deltakit.report import render_report
from deltakit.spectral.adaptive import adaptive_spectrum
from deltakit.spectral.noise import exact_noise
from deltakit.spectral.options import AdaptivePlan, SpectralOptions
from deltakit.spectral.spectrum import compute_spectrum

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N = 256
SPECTRA = {
    "spike": [1.0] + [1e-3] * 95,  # rank 96
    "geometric": list(np.logspace(0, -4, 20)),  # rank 20
    "lora": [1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02],  # rank 8, all above the Gram floor: nothing to refine
}
NAMES = {kind: f"model.layers.{i}.self_attn.q_proj.weight" for i, kind in enumerate(SPECTRA)}


def constructed(values: list[float], n: int = N, seed: int = 0) -> torch.Tensor:
    """U diag(values) Vᵀ (n×n, float64) with Haar-random orthonormal U, V."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    k = len(values)
    return (u[:, :k] * torch.tensor(values, dtype=torch.float64)) @ v[:, :k].T


def fp64_rank(delta: torch.Tensor) -> int:
    s = torch.linalg.svdvals(delta.double())
    return int((s > max(delta.shape) * torch.finfo(torch.float32).eps * s[0]).sum())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An fp32 base and fine-tune differing by each constructed ΔW; returns (base, ft, stored ΔW by name)."""
    root = tmp_path_factory.mktemp("spectra")
    generator = torch.Generator().manual_seed(7)
    base = {name: torch.randn(N, N, generator=generator) * 0.02 for name in NAMES.values()}
    ft = {NAMES[kind]: (base[NAMES[kind]].double() + constructed(values, seed=i)).float()
          for i, (kind, values) in enumerate(SPECTRA.items())}
    for side, tensors in (("base", base), ("ft", ft)):
        (root / side).mkdir()
        save_file(tensors, root / side / "model.safetensors")
    stored = {name: ft[name].double() - base[name].double() for name in NAMES.values()}
    return root / "base", root / "ft", stored


@pytest.mark.parametrize("device", DEVICES)
def test_constructed_spectra_read_their_rank_on_the_default_path(pair, device):
    base, ft, stored = pair
    report = deltakit.rank(base, ft, energy=(0.9,), options=SpectralOptions(device=device))
    found = {m.name: m for m in report.matrices}
    for kind, values in SPECTRA.items():
        name = NAMES[kind]
        assert fp64_rank(stored[name]) == len(values)  # the construction survives fp32 storage
        assert found[name].rank == len(values), (kind, found[name].rank)
    assert found[NAMES["spike"]].refined and found[NAMES["geometric"]].refined
    assert not found[NAMES["lora"]].refined  # certified: nothing under the Gram floor (tail_below)
    assert report.summary()["refined_matrices"] == 2
    assert "2 of 3 spectra refined" in render_report(report)


@pytest.mark.parametrize("device", DEVICES)
def test_rank_trajectory_and_compare_read_one_rank(pair, device):
    base, ft, _ = pair
    options = SpectralOptions(device=device)
    ranks = {m.name: m.rank for m in deltakit.rank(base, ft, options=options).matrices}
    followed = deltakit.trajectory(base, [ft], options=options)
    assert {m.name: m.points[-1].rank for m in followed.matrices} == ranks
    compared = deltakit.compare(base, [ft, ft], top=(128,), options=options)
    assert {m.name: m.directions_a for m in compared.matrices} == {name: min(128, r) for name, r in ranks.items()}


def test_adaptive_path_counts_at_the_datas_floor_or_marks_a_bound():
    """The adaptive path's Ritz values are resolved to the data's floor: it counts there, and a count past its
    block is a lower bound (``rank`` None, ``lower_bounds["rank"]``), shown ≥k."""
    plan = AdaptivePlan(min_side=64, start_width=32, crossover=0.5)
    for values, settled in ((SPECTRA["geometric"], True), (SPECTRA["spike"], False)):
        delta = constructed(values).float()
        spectrum, why = adaptive_spectrum(delta, exact_noise(delta), float(delta.double().square().sum()), (0.9,),
                                          plan)
        assert spectrum is not None, why
        if settled:
            assert spectrum.rank == len(values)
        else:
            assert spectrum.rank is None and 0 < spectrum.lower_bounds["rank"] <= len(values)


def test_refinement_is_paid_only_where_the_band_is_unresolved():
    """A value at 1e-4·σ₁ hides under the Gram path's own noise (no band value, no measured energy): the tail
    certificate fails and the refinement finds it; an exact rank-8 ΔW is certified without refining."""
    hidden = compute_spectrum(constructed([1.0, 1e-4]).float(), SpectralOptions(), resolve=True)
    assert hidden.rank == 2 and hidden.refined
    exact = compute_spectrum(constructed(SPECTRA["lora"]).float(), SpectralOptions(), resolve=True)
    assert exact.rank == 8 and not exact.refined
    unrefined = compute_spectrum(constructed(SPECTRA["spike"]).float(), SpectralOptions())
    assert unrefined.rank == 1  # what the Gram path alone resolves: the reason for refining


def test_rank_and_trajectory_agree_on_the_demo_pair(tmp_path):
    from deltakit.demo import DEMO_LORA_RANK, write_demo_pair

    base, ft = write_demo_pair(tmp_path / "demo")
    options = SpectralOptions(device="cpu")
    ranked = {m.name: m for m in deltakit.rank(base, ft, options=options).matrices}
    followed = {m.name: m.points[-1] for m in deltakit.trajectory(base, [ft], options=options).matrices}
    assert {name: point.rank for name, point in followed.items()} == {name: ranked[name].rank for name in followed}
    assert {name: point.rank_at for name, point in followed.items()} == {name: ranked[name].rank_at for name in followed}
    assert all(m.rank == DEMO_LORA_RANK for name, m in ranked.items() if name.endswith(("q_proj.weight", "v_proj.weight")))
