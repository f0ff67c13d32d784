"""Noise-aware spectra: storage rounding in ΔW measured against constructed truth (the unrounded update kept)."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import deltakit
from deltakit import SpectralOptions
from deltakit.spectral.noise import dither_variance, grid_step, storage_noise
from deltakit.spectral.spectrum import build_spectrum, compute_spectrum

from conftest import invoke, low_rank
from test_real_weights import minilm_dir


def rank_at(s: np.ndarray, fraction: float) -> int:
    cumulative = np.cumsum(np.sort(s)[::-1] ** 2)
    return int(np.searchsorted(cumulative / cumulative[-1], fraction - 1e-12) + 1)


def decaying_delta(shape: tuple[int, int], norm: float, seed: int) -> torch.Tensor:
    """An fp64 ΔW with singular values ∝ 1/i over the whole of min(m, n), scaled to Frobenius norm ``norm``."""
    m, n = shape
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=generator, dtype=torch.float64))
    sigma = 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float64)
    delta = (u * sigma) @ v.T
    return delta * (norm / delta.norm())


def test_grid_step_is_the_spacing_to_the_next_number():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        values = (torch.randn(2000, dtype=torch.float64) * torch.logspace(-6, 2, 2000, dtype=torch.float64)).to(dtype)
        values = values[values != 0]
        up = torch.nextafter(values.abs(), torch.tensor(float("inf"), dtype=dtype))
        expected = (up.double() - values.abs().double())
        assert torch.equal(grid_step(values.double(), dtype), expected), dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grid_step_is_exact_at_the_edges_of_the_grid(dtype):
    """Zeros, the smallest subnormal, the smallest normal, powers of two and the largest number, of
    either sign, held in float32 (as rank holds them) and in float64: the spacing up from |v|."""
    info = torch.finfo(dtype)
    edges = [0.0, info.tiny * info.eps, info.tiny * info.eps * 3, info.tiny / 2, info.tiny, info.tiny * 1.5,
             0.5, 1.0, 1.0 + info.eps, 3.0, 2.0 ** 10, info.max]
    values = torch.tensor(edges + [-x for x in edges], dtype=torch.float64).to(dtype)
    up = torch.nextafter(values.abs(), torch.tensor(float("inf"), dtype=dtype))
    expected = up.double() - values.abs().double()
    expected[values.abs().double() == info.max] = info.max - torch.nextafter(
        torch.tensor(info.max, dtype=dtype), torch.tensor(0.0, dtype=dtype)).double()  # past max: the step below
    for held in (torch.float32, torch.float64):
        got = grid_step(values.to(held), dtype)
        assert got.dtype == held
        assert torch.equal(got.double(), expected), (held, got, expected)


def test_dither_variance_matches_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(400_000, generator=generator, dtype=torch.float64)
    for scale in (0.01, 0.05, 0.19, 0.21, 0.5, 1.0, 3.0):
        t = samples * scale
        phi = t - torch.floor(t)
        expected = float((phi * (1 - phi)).mean())
        got = float(dither_variance(torch.tensor([scale], dtype=torch.float64)))
        assert got == pytest.approx(expected, rel=0.01, abs=2e-5), scale
    below, above = dither_variance(torch.tensor([0.2 - 1e-9, 0.2 + 1e-9], dtype=torch.float64))
    assert float(below) == pytest.approx(float(above), rel=1e-6)
    assert float(dither_variance(torch.tensor([50.0], dtype=torch.float64))) == pytest.approx(1 / 6)


# (tensor, relative size ‖ΔW‖/‖W‖) of the real MiniLM pair below: from clearly above the bf16 grid to far below it.
MINILM_CASES = [
    ("encoder.layer.0.attention.self.query.weight", 0.03),
    ("encoder.layer.1.attention.self.query.weight", 0.01),
    ("encoder.layer.2.attention.self.query.weight", 0.005),
    ("encoder.layer.3.attention.self.query.weight", 0.003),
    ("encoder.layer.4.attention.self.query.weight", 0.001),
    ("encoder.layer.5.attention.self.query.weight", 0.0003),
    ("encoder.layer.0.intermediate.dense.weight", 0.01),
    ("encoder.layer.1.output.dense.weight", 0.004),
]


@pytest.fixture(scope="module")
def minilm_bf16_pair(tmp_path_factory):
    """Real MiniLM weights W (fp32) and W + δ with 1/i-spectrum δ, both stored in bf16 (two-sided: a vendor's
    pair cast from fp32 masters, ``ft.safetensors``) and the fine-tune rounded once from the stored bf16 base
    (one-sided: the usual workflow, ``ft_one_sided.safetensors``); the true δ kept."""
    tensors = load_file(minilm_dir() / "model.safetensors")
    base, ft, one_sided, truth = {}, {}, {}, {}
    for seed, (name, relative) in enumerate(MINILM_CASES):
        w = tensors[name].double()
        delta = decaying_delta(tuple(w.shape), relative * float(w.norm()), seed)
        base[name], ft[name] = w.to(torch.bfloat16), (w + delta).to(torch.bfloat16)
        one_sided[name] = (base[name].double() + delta).to(torch.bfloat16)
        truth[name] = delta
    folder = tmp_path_factory.mktemp("minilm_bf16")
    save_file(base, folder / "base.safetensors")
    save_file(ft, folder / "ft.safetensors")
    save_file(one_sided, folder / "ft_one_sided.safetensors")
    return folder, base, {"two-sided": ft, "one-sided": one_sided}, truth


@pytest.mark.parametrize("workflow", ["two-sided", "one-sided"])
def test_noise_share_and_signal_rank_against_the_true_update(minilm_bf16_pair, workflow):
    """--rounding auto finds the workflow (or, where the data cannot tell, takes the geometric mean of both
    models); the share within 1.5× of the actual one up to 30 %, signal_rank@90% within max(1, 25 %) up to 10 %."""
    folder, base, fts, truth = minilm_bf16_pair
    ft = fts[workflow]
    name_of = {"two-sided": "ft.safetensors", "one-sided": "ft_one_sided.safetensors"}
    report = deltakit.rank(folder / "base.safetensors", folder / name_of[workflow], energy=(0.5, 0.9),
                           options=SpectralOptions(device="cpu"))
    by_name = {m.name: m for m in report.matrices}
    shares = []
    for name, delta in truth.items():
        m = by_name[name]
        stored = ft[name].double() - base[name].double()
        actual = float((stored - delta).square().sum() / stored.square().sum())
        shares.append(actual)
        assert m.unchanged_fraction == pytest.approx(float((stored == 0).double().mean()), abs=1e-12)
        if actual <= 0.3:
            assert actual / 1.5 <= m.noise_share <= 1.5 * actual, (name, actual, m.noise_share)
        if actual >= 0.5:  # one-sided: the update is mostly erased, its scale read from what is left (a limit)
            assert m.noise_share >= (0.5 if workflow == "two-sided" else 0.2), (name, actual, m.noise_share)
        true_rank = rank_at(torch.linalg.svdvals(delta).numpy(), 0.9)
        signal = m.signal_rank_at[0.9]
        if actual <= 0.1:
            assert signal is not None and abs(signal - true_rank) <= max(1, 0.25 * true_rank), (name, signal, true_rank)
        elif actual <= 0.3:
            assert signal is not None and abs(signal - true_rank) <= max(2, 0.5 * true_rank), (name, signal, true_rank)
        assert m.noise_dominated(0.9) == (m.noise_share > 0.1 + 1e-12)
        assert m.spectrum_method == "gram" and m.noise_model == "shared-grid"
        assert m.rounding in (workflow, "between") and m.rounding_reason
        if 0.02 <= actual <= 0.3:  # where the grid is coarse against part of the update, the workflow is found
            assert m.rounding == workflow, (name, m.rounding, m.rounding_reason)
    # the cases span the regimes the acceptance names: small, moderate and rounding-dominated shares
    assert min(shares) < 0.01 and any(0.1 < s <= 0.3 for s in shares) and max(shares) > 0.5
    # raw rank@90% of the rounding-dominated ones is far above the truth: the reason for the signal metrics
    worst = by_name[MINILM_CASES[4][0]]
    assert worst.rank_at[0.9] > 10 * rank_at(torch.linalg.svdvals(truth[MINILM_CASES[4][0]]).numpy(), 0.9)


def test_rank_table_marks_rounding_dominated_matrices(minilm_bf16_pair, runner, tmp_path):
    folder = minilm_bf16_pair[0]
    out = tmp_path / "r.json"
    result = invoke(runner, "rank", str(folder / "base.safetensors"), str(folder / "ft.safetensors"),
                    "--device", "cpu", "--json", str(out))
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    flagged = [m for m in payload["matrices"] if m["noise_share"] > 0.1]
    assert flagged and payload["summary"]["noise_dominated"]["0.9"] == len(flagged)
    for m in payload["matrices"]:
        assert set(m["signal_rank_at"]) == set(m["rank_at"]) == {"0.9"}
        assert m["spectrum_method"] == "gram" and 0.0 <= m["unchanged_fraction"] <= 1.0
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("encoder.")}
    for m in payload["matrices"]:
        marked = f"{m['rank_at']['0.9']}*" in rows[m["name"]].split()
        assert marked == (m["noise_share"] > 0.1), rows[m["name"]]
    assert f"{len(flagged)} at r@0.9" in result.output


def test_fp32_pair_has_no_noise_and_signal_equals_raw(tmp_path):
    generator = torch.Generator().manual_seed(3)
    base = {f"layers.{i}.q_proj.weight": torch.randn(96, 64, generator=generator) for i in range(3)}
    ft = {name: (w.double() + decaying_delta((96, 64), 1e-3 * float(w.norm()), i)).float()
          for i, (name, w) in enumerate(base.items())}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    for exact in (False, True):
        report = deltakit.rank(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", energy=(0.5, 0.9, 0.99),
                               options=SpectralOptions(device="cpu", exact=exact))
        for m in report.matrices:
            assert m.noise_share < 1e-3
            assert m.signal_rank_at == m.rank_at
            assert m.signal_effective_rank == m.effective_rank


@pytest.mark.parametrize("rank", [4, 16])
def test_effective_rank_of_exact_equal_sigma_delta(rank):
    """Gram/eigh solver noise must not count: exact rank-k with equal σ reads effective rank k."""
    generator = torch.Generator().manual_seed(rank)
    u, _ = torch.linalg.qr(torch.randn(2048, rank, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(2048, rank, generator=generator))
    delta = u @ v.T
    spectrum = compute_spectrum(delta, SpectralOptions(device="cpu"))
    assert spectrum.effective_rank() == pytest.approx(rank, abs=0.05)
    assert spectrum.rank_at(1.0) == rank


def test_rank_and_extract_read_the_same_spectrum(tmp_path):
    """Exact rank-8 256×512 ΔW: rank@100% is 8 in `rank` and `extract --energy 1` keeps 8."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=generator)
    base = {"model.layers.0.self_attn.q_proj.weight": w}
    ft = {"model.layers.0.self_attn.q_proj.weight": (w.double() + low_rank(256, 512, 8, scale=0.05)).float()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    report = deltakit.rank(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", energy=(1.0,),
                           options=SpectralOptions(device="cpu"))
    assert report.matrices[0].rank_at[1.0] == 8
    extracted = deltakit.extract_lora(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "adapter",
                                      energy=1.0, options=SpectralOptions(device="cpu"))
    assert [m.rank for m in extracted.matrices] == [8]


def test_storage_floor_follows_large_columns():
    """Rounding concentrated in a few large columns lifts the floor there: a planted rank-3 update reads 3."""
    generator = torch.Generator().manual_seed(5)
    w = torch.randn(512, 384, generator=generator, dtype=torch.float64) * 0.02
    w[:, :4] *= 40.0  # a few large input channels, as LLM weights have
    delta = low_rank(512, 384, 3, scale=0.08, seed=2)
    base, ft = w.to(torch.bfloat16).double(), (w + delta).to(torch.bfloat16).double()
    stored = ft - base
    noise = storage_noise(base, stored, torch.bfloat16, torch.bfloat16)
    rounding_only = (w + delta).to(torch.bfloat16).double() - (w + delta)
    largest_noise = float(torch.linalg.svdvals(rounding_only)[0])
    assert noise.spectral_edge > largest_noise / 2, (noise.spectral_edge, largest_noise)
    # a floor from the global RMS alone ((√m + √n)·rms, twice) would sit under the rounding's top values
    uniform_floor = 2 * (math.sqrt(512) + math.sqrt(384)) * noise.rms
    assert uniform_floor < largest_noise < 2 * noise.spectral_edge
    spectrum = compute_spectrum(stored, SpectralOptions(device="cpu", precision="fp64"), noise,
                                float(stored.square().sum()))
    assert spectrum.rank == 3, (spectrum.values[:6], spectrum.noise_floor)
    assert spectrum.signal_rank_at(0.9) <= 3


def test_mixed_dtypes_use_independent_rounding():
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(200, 100, generator=generator, dtype=torch.float64)
    base = w.float().double()  # fp32 base
    ft = (w + 1e-6).to(torch.bfloat16).double()  # bf16 fine-tune: its rounding dominates
    stored = ft - base
    noise = storage_noise(base, stored, torch.float32, torch.bfloat16)
    actual = float((ft - (w + 1e-6)).square().sum())
    assert noise.model == "independent"
    assert noise.energy == pytest.approx(actual, rel=0.1)
    assert noise.share(float(stored.square().sum())) > 0.9


def test_without_a_noise_model_signal_is_raw():
    spectrum = build_spectrum(np.array([3.0, 2.0, 1.0]), (3, 3), "gram", "exact")
    assert spectrum.noise_share == 0.0 and spectrum.signal_rank_at(0.9) == spectrum.rank_at(0.9) == 2
    assert math.isclose(spectrum.signal_effective_rank(), spectrum.effective_rank())


def test_intruders_within_rounding_are_not_counted(tmp_path):
    """A base whose top singular values form a tight cluster: bf16 rounding alone turns the fine-tune's top
    vectors far from the base's (similarity < 0.5), but ΔW is rounding-sized, so nothing is counted."""
    generator = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(192, 96, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(96, 96, generator=generator, dtype=torch.float64))
    sigma = torch.cat([torch.full((32,), 1.0, dtype=torch.float64), torch.linspace(0.5, 0.01, 64, dtype=torch.float64)])
    w = (u * sigma) @ v.T
    tiny = 3e-4 * torch.randn(192, 96, generator=generator, dtype=torch.float64) * float(w.abs().mean())
    name = "model.layers.0.self_attn.q_proj.weight"
    save_file({name: w.to(torch.bfloat16)}, tmp_path / "base.safetensors")
    save_file({name: (w + tiny).to(torch.bfloat16)}, tmp_path / "ft.safetensors")
    report = deltakit.intruders(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", k=32, epsilon=0.5,
                                options=SpectralOptions(device="cpu", precision="fp64"))
    m = report.matrices[0]
    assert m.changed and m.below_rounding
    assert min(m.similarities) < 0.5  # the test would count intruders without the rounding check
    assert m.count(0.5) == 0 and report.summary()["below_rounding"] == 1


def test_spectra_file_and_plot_carry_signal_curves(minilm_bf16_pair, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from deltakit.io.spectra import load_spectra, save_spectra
    from deltakit.plot import plot_energy_curves

    folder = minilm_bf16_pair[0]
    report = deltakit.rank(folder / "base.safetensors", folder / "ft.safetensors", keep_spectra=True,
                           options=SpectralOptions(device="cpu"))
    assert set(report.signal_spectra) == {m.name for m in report.matrices if m.noise_share > 1e-6}
    save_spectra(tmp_path / "s.safetensors", report.spectra, report.spectra_info(), signal_spectra=report.signal_spectra)
    spectra, info = load_spectra(tmp_path / "s.safetensors")
    assert set(spectra) == {m.name for m in report.matrices}
    for name, signal in report.signal_spectra.items():
        np.testing.assert_array_equal(info["signal_spectra"][name], signal)
    ax = plot_energy_curves(spectra, info)
    signal_lines = [line for line in ax.get_lines() if str(line.get_gid()).startswith("signal ")]
    assert signal_lines
    for line in signal_lines:  # the signal curve of a rounding-heavy group stays below 1: buried energy is not placed
        assert 0 < line.get_ydata()[-1] <= 1.0 + 1e-9
    bare = dict(info, signal_spectra={})
    assert not [line for line in plot_energy_curves(spectra, bare).get_lines() if str(line.get_gid()).startswith("signal ")]


def test_rounding_option_forces_the_model_and_says_so(minilm_bf16_pair, runner, tmp_path):
    folder = minilm_bf16_pair[0]
    shares = {}
    for sides in ("one-sided", "two-sided"):
        out = tmp_path / f"{sides}.json"
        result = invoke(runner, "rank", folder / "base.safetensors", folder / "ft.safetensors", "--device", "cpu",
                        "--rounding", sides, "--json", out, "--quiet")
        assert result.exit_code == 0, result.output
        matrices = json.loads(out.read_text())["matrices"]
        assert {(m["rounding"], m["rounding_reason"]) for m in matrices} == {(sides, f"--rounding {sides}")}
        shares[sides] = {m["name"]: m["noise_share"] for m in matrices}
    # well above a grid step the one-sided variance is u²/12, half the two-sided u²/6
    name = MINILM_CASES[0][0]
    assert shares["one-sided"][name] == pytest.approx(shares["two-sided"][name] / 2, rel=0.05)
    result = invoke(runner, "rank", folder / "base.safetensors", folder / "ft.safetensors", "--rounding", "both")
    assert result.exit_code != 0 and "--rounding" in result.output
    with pytest.raises(deltakit.DeltakitError, match="unknown rounding"):
        SpectralOptions(rounding="both")
