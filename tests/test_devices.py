"""Every compute device this machine has gives the CPU's answers: the CUDA paths (pinned reads, side
streams, GPU noise model and eigensolvers) are checked against the CPU wherever a GPU exists.

On a machine without a GPU the device list is just the CPU, and the tests compare the CPU path with
itself through the public API (still a check that it runs); on the GPU machine they cover CUDA.
"""

import pytest
import torch
from safetensors.torch import load_file

import deltakit
from deltakit import SpectralOptions
from deltakit.demo import write_demo_pair
from deltakit.spectral.noise import storage_noise
from deltakit.spectral.spectrum import compute_spectrum

DEVICES = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_pair(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize("device", DEVICES)
def test_rank_report_matches_cpu(demo, device):
    base, ft = demo
    reference = deltakit.rank(base, ft, energy=(0.5, 0.9), options=SpectralOptions(device="cpu"))
    report = deltakit.rank(base, ft, energy=(0.5, 0.9), options=SpectralOptions(device=device))
    assert [m.name for m in report.matrices] == [m.name for m in reference.matrices]
    for got, want in zip(report.matrices, reference.matrices):
        assert got.rank == want.rank and got.rank_at == want.rank_at, got.name
        assert got.signal_rank_at == want.signal_rank_at, got.name
        assert got.noise_share == pytest.approx(want.noise_share, rel=1e-4, abs=1e-9), got.name
        assert got.unchanged_fraction == want.unchanged_fraction
        assert got.stable_rank == pytest.approx(want.stable_rank, rel=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_storage_noise_and_spectrum_match_cpu(device):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(700, 300, generator=generator, dtype=torch.float64) * 0.02
    delta = torch.randn(700, 300, generator=generator, dtype=torch.float64) * 1e-4
    base, ft = w.to(torch.bfloat16).float(), (w + delta).to(torch.bfloat16).float()
    stored = ft - base
    want = storage_noise(base, stored, torch.bfloat16, torch.bfloat16)
    got = storage_noise(base.to(device), stored.to(device), torch.bfloat16, torch.bfloat16)
    assert got.energy == pytest.approx(want.energy, rel=1e-5)
    assert got.spectral_edge == pytest.approx(want.spectral_edge, rel=1e-5)
    assert got.unchanged_fraction == want.unchanged_fraction
    spectrum = compute_spectrum(stored.to(device), SpectralOptions(device=device), got)
    reference = compute_spectrum(stored, SpectralOptions(device="cpu"), want)
    assert spectrum.rank_at(0.9) == reference.rank_at(0.9)
    assert spectrum.signal_rank_at(0.9) == reference.signal_rank_at(0.9)


@pytest.mark.parametrize("device", DEVICES)
def test_extract_then_merge_round_trip(demo, device, tmp_path):
    base, ft = demo
    options = SpectralOptions(device=device)
    report = deltakit.extract_lora(base, ft, tmp_path / "adapter", rank=8, options=options)
    assert report.matrices
    deltakit.merge(base, tmp_path / "adapter", tmp_path / "merged", device=device)
    merged = {}
    for f in sorted((tmp_path / "merged").glob("*.safetensors")):
        merged.update(load_file(f))
    ft_tensors = {}
    for f in sorted(ft.glob("*.safetensors")):
        ft_tensors.update(load_file(f))
    q = "model.layers.0.self_attn.q_proj.weight"  # a rank-8 LoRA: rank 8 reproduces it to bf16 rounding
    error = (merged[q].double() - ft_tensors[q].double()).norm() / ft_tensors[q].double().norm()
    assert error < 1e-2, error


@pytest.mark.parametrize("device", DEVICES)
def test_intruders_match_cpu(demo, device):
    base, ft = demo
    reference = deltakit.intruders(base, ft, k=8, options=SpectralOptions(device="cpu"))
    report = deltakit.intruders(base, ft, k=8, options=SpectralOptions(device=device))
    for got, want in zip(report.matrices, reference.matrices):
        assert got.name == want.name and got.count(0.5) == want.count(0.5) and got.below_rounding == want.below_rounding
