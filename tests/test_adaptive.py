"""The adaptive (partial) spectrum against the full one and against fp64 truth, on constructed ΔW.

Matrices are CPU-sized (768×512) with a plan that lets the adaptive path run there; the GPU sizes
and timings are in docs/benchmarks.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import deltakit.analyses.rank as analysis
from deltakit.device.graphs import GraphCache
from deltakit.spectral import adaptive, metrics, partial
from deltakit.spectral.noise import exact_noise, storage_noise
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.partial import SubspaceIteration
from deltakit.spectral.adaptive import adaptive_spectrum
from deltakit.spectral.options import AdaptivePlan
from deltakit.spectral.spectrum import compute_spectrum
from deltakit_cli.main import cli
from spectra_helpers import TEST_PLAN as PLAN, noisy_bf16_pair, spectrum_matrix, spectrum_paths_agree

DEVICES = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]  # GPU runs: bash bench/gpu.sh cuda-tests
FRACTIONS = (0.5, 0.9, 0.99)


def both_paths(delta: torch.Tensor, noise, fractions=FRACTIONS):
    energy = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
    full = compute_spectrum(delta, SpectralOptions(), noise, energy)
    part, why = adaptive_spectrum(delta, noise, energy, fractions, PLAN)
    assert part is not None, why
    return full, part


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [1, 11, 21])
@pytest.mark.parametrize("sigma", [np.ones(4), 1.0 / np.arange(1, 17)], ids=["rank4-equal", "rank16-decaying"])
def test_exact_low_rank_reads_the_same_on_both_paths(sigma, seed, device):
    delta = spectrum_matrix(768, 512, sigma, seed=seed).to(device)
    full, part = both_paths(delta, exact_noise(delta), FRACTIONS + (1.0,))
    assert part.method.startswith("adaptive")
    assert part.rank == full.rank == sigma.size
    assert [part.rank_at(x) for x in FRACTIONS + (1.0,)] == [full.rank_at(x) for x in FRACTIONS + (1.0,)]
    assert part.stable_rank() == pytest.approx(full.stable_rank(), rel=1e-4)
    truth = metrics.effective_rank(sigma)
    assert part.effective_rank() == pytest.approx(truth, abs=0.05)
    assert part.effective_rank_error is None  # nothing estimated: the rest is rounding
    assert part.signal_rank_at(0.9) == full.signal_rank_at(0.9)


@pytest.mark.parametrize("device", DEVICES)
def test_a_count_the_next_ritz_estimate_cannot_settle_is_certified_by_the_rest_of_the_matrix(device, monkeypatch):
    """Where the (n+1)-th Ritz value's upper estimate is too loose (a GPU's residuals at the rounding level), the
    count of an exactly low-rank ΔW is settled by ‖ΔW(I − VVᵀ)‖_F; a ΔW with more above the floor is not."""
    sigma = 1.0 / np.arange(1, 17)
    low_rank = spectrum_matrix(768, 512, sigma, seed=3).to(device)
    iteration = SubspaceIteration(low_rank, 32, seed=0, warmup=2)
    values = iteration.round().values
    floor = 1e-4  # far above fp32 rounding (≈ 1e-7), far below σ₁₆ = 0.0625
    assert adaptive.certified_count(iteration, values, floor) == sigma.size
    noise = torch.randn(768, 512, generator=torch.Generator().manual_seed(4)).to(device) * (3 * floor / np.sqrt(512))
    noisy = SubspaceIteration(low_rank + noise, 32, seed=0, warmup=2)
    # dense noise with its top singular value ≈ (√768 + √512)·3·floor/√512 ≈ 6.7·floor: nothing to certify
    assert adaptive.certified_count(noisy, noisy.round().values, floor) is None
    # the path as a GPU takes it: no Ritz estimate settles the count, the certificate does
    monkeypatch.setattr(adaptive, "count_above", lambda *_: None)
    full, part = both_paths(low_rank, exact_noise(low_rank))
    assert part.method.startswith("adaptive") and part.rank == full.rank == sigma.size


@pytest.mark.parametrize("device", DEVICES)
def test_noisy_bf16_delta_agrees_with_the_full_path_and_fp64_truth(device):
    delta, noise = noisy_bf16_pair()
    full, part = both_paths(delta.to(device), noise, (0.5, 0.9))
    assert part.tail is not None  # the noise holds energy: the effective rank is estimated
    assert [part.rank_at(x) for x in (0.5, 0.9)] == [full.rank_at(x) for x in (0.5, 0.9)]
    assert [part.signal_rank_at(x) for x in (0.5, 0.9)] == [full.signal_rank_at(x) for x in (0.5, 0.9)]
    assert part.stable_rank() == pytest.approx(full.stable_rank(), rel=1e-4)
    truth = metrics.effective_rank(torch.linalg.svdvals(delta.double()).numpy())
    # the values under the gram floor are counted (0.03% off on the CPU; 0.3% with the H200's fp32 eigensolver)
    assert full.effective_rank() == pytest.approx(truth, rel=5e-3)
    error = part.effective_rank_error
    assert error is not None and 0 < error < 0.02 * truth
    assert abs(part.effective_rank() - truth) <= max(3 * error, 0.015 * truth)
    assert part.noise_share == full.noise_share
    if part.rank is None:  # a count the block cannot settle is a true lower bound
        assert 0 < part.lower_bounds["rank"] <= full.rank
    else:
        assert part.rank == full.rank


def test_merged_lora_in_bf16_reads_its_rank_on_both_paths():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(768, 512, generator=gen) * 0.02
    lora = spectrum_matrix(768, 512, np.full(8, 0.05), seed=3)
    base, ft = weight.bfloat16(), (weight + lora).bfloat16()
    delta = ft.float() - base.float()
    full, part = both_paths(delta, storage_noise(base, delta, torch.bfloat16, torch.bfloat16), (0.9,))
    assert full.rank == 8
    assert part.rank == 8
    assert part.signal_rank_at(0.9) == full.signal_rank_at(0.9) <= 8


def test_ritz_values_are_lower_bounds_and_their_estimates_cover_the_truth():
    delta = spectrum_matrix(768, 512, np.arange(1, 101) ** -0.8, seed=4)
    truth = torch.linalg.svdvals(delta.double()).numpy()
    iteration = SubspaceIteration(delta, 64)
    for _ in range(4):
        block = iteration.round()
    assert np.all(block.values <= truth[:64] * (1 + 1e-6))
    converged = block.errors < 1e-3 * block.values
    assert converged[:20].all()
    assert np.all(block.upper[converged] >= truth[:64][converged] * (1 - 1e-6))


def test_rank_at_past_the_crossover_falls_back_and_says_so(tmp_path):
    # a flat spectrum: rank@0.9 needs ~ 0.8 of all values, far past 0.25·min(m, n)
    delta = torch.randn(768, 512, generator=torch.Generator().manual_seed(5))
    energy = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
    spectrum, why = adaptive_spectrum(delta, exact_noise(delta), energy, (0.9,), PLAN)
    assert spectrum is None and "rank@0.9" in why and "0.25" in why
    save_file({"layers.0.mlp.up_proj.weight": torch.zeros(768, 512)}, tmp_path / "base.safetensors")
    save_file({"layers.0.mlp.up_proj.weight": delta}, tmp_path / "ft.safetensors")
    report = analysis.rank(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", (0.9,),
                           SpectralOptions(device="cpu", spectrum="adaptive", adaptive_plan=PLAN))
    matrix = report.matrices[0]
    assert matrix.spectrum_method == "gram"
    assert "rank@0.9" in matrix.spectrum_fallback
    assert json.loads(json.dumps(report.to_dict()))["matrices"][0]["spectrum_fallback"] == matrix.spectrum_fallback


def test_cli_adaptive_and_full_spectrum_flags(tmp_path):
    """The CLI runs the default plan: a matrix whose smaller side reaches its min_side."""
    side = AdaptivePlan().min_side
    delta, _ = noisy_bf16_pair(seed=6, noise_rms=2e-5, shape=(side, side))
    gen = torch.Generator().manual_seed(6)
    weight = (torch.randn(side, side, generator=gen) * 0.02).bfloat16()
    save_file({"model.layers.0.self_attn.q_proj.weight": weight}, tmp_path / "base.safetensors")
    save_file({"model.layers.0.self_attn.q_proj.weight": (weight.float() + delta).bfloat16()}, tmp_path / "ft.safetensors")
    runner = CliRunner()
    found = {}
    for flag in ("--adaptive", "--full-spectrum"):
        out = tmp_path / f"{flag.strip('-')}.json"
        result = runner.invoke(cli, ["rank", str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors"),
                                     "--device", "cpu", flag, "--json", str(out)])
        assert result.exit_code == 0, result.output
        assert ("computed in part (adaptive)" in result.output) == (flag == "--adaptive")
        assert ("adaptive spectra (gram where whole)" in result.output) == (flag == "--adaptive")
        found[flag] = json.loads(out.read_text())["matrices"]
    adaptive, full = found["--adaptive"][0], found["--full-spectrum"][0]
    assert adaptive["spectrum_method"].startswith("adaptive(") and full["spectrum_method"] == "gram"
    assert adaptive["effective_rank_error"] > 0 and full["effective_rank_error"] is None
    check = spectrum_paths_agree(found["--adaptive"], found["--full-spectrum"], tolerance=0.015)
    assert check["matrices"] == check["adaptive"] == 1
    assert check["rank_at_equal"] == check["signal_rank_at_equal"] == check["stable_rank_1e-4"] == 1
    assert check["effective_rank_1pct"] == 1
    assert check["rank_equal"] + check["rank_bounded"] == 1


def test_spectrum_paths_agree_counts_each_criterion():
    full = [{"name": "a", "rank_at": {"0.9": 10}, "stable_rank": 2.0, "effective_rank": 100.0, "rank": 50,
             "signal_rank_at": {"0.9": 9}}]
    close = [{**full[0], "spectrum_method": "adaptive(128)", "effective_rank": 100.5, "effective_rank_error": 0.4,
              "rank": None, "lower_bounds": {"rank": 40}}]
    off = [{**full[0], "rank_at": {"0.9": 12}, "stable_rank": 2.01, "effective_rank": 103.0, "rank": 49,
            "signal_rank_at": {"0.9": 8}}]
    good, bad = spectrum_paths_agree(close, full), spectrum_paths_agree(off, full)
    assert (good["rank_at_equal"], good["effective_rank_1pct"], good["rank_bounded"], good["adaptive"]) == (1, 1, 1, 1)
    assert good["effective_rank_within_2_errors"] == 1
    assert (bad["rank_at_equal"], bad["rank_at_within_1"], bad["stable_rank_1e-4"], bad["effective_rank_1pct"],
            bad["signal_rank_at_equal"], bad["rank_equal"]) == (0, 0, 0, 0, 0, 0)


def test_amplification_from_the_adaptive_directions_matches_the_exact_svd():
    from deltakit.spectral.subspace import amplification, amplification_factor

    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(768, 512, generator=gen) * 0.02
    delta = spectrum_matrix(768, 512, 0.5 * np.arange(1, 65) ** -1.2, seed=7)
    energy = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
    for matrix, base in ((delta, weight), (delta.T.contiguous(), weight.T.contiguous())):  # wide and tall
        part, why = adaptive_spectrum(matrix, exact_noise(matrix), energy, (0.9,), PLAN)
        assert part is not None, why
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        exact = amplification_factor(base.double(), energy ** 0.5, u[:, :16], vh[:16])
        found = amplification(base, matrix, energy ** 0.5, 16, directions=part.directions)
        randomized = amplification(base, matrix, energy ** 0.5, 16)  # what runs without the directions
        assert found["k"] == 16 and found["value"] == pytest.approx(exact, rel=1e-3)
        assert abs(found["value"] - exact) <= abs(randomized["value"] - exact) + 1e-6 * exact


def test_radau_rule_has_a_node_at_zero_and_keeps_the_gauss_moments():
    """Gauss–Radau's Jacobi matrix (Golub's extension of the Lanczos tridiagonal) has 0 as a node,
    and its first k+1 rows reproduce T's: the weights still sum to 1 and the first moment is α₁."""
    rng = np.random.default_rng(3)
    steps, probes = 24, 5
    alphas, betas = rng.random((steps, probes)) + 0.5, rng.random((steps, probes)) * 0.4
    nodes, weights = partial.quadrature(partial.radau_tridiagonals(alphas, betas))
    np.testing.assert_allclose(nodes[:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.sum(weights * nodes, axis=1), alphas[0], rtol=1e-12)
    gauss_nodes, _ = partial.quadrature(partial.dense_tridiagonals(alphas, betas))
    for p in range(probes):  # the Gauss nodes are the plain tridiagonal's eigenvalues
        dense = np.diag(alphas[:, p]) + np.diag(betas[:-1, p], 1) + np.diag(betas[:-1, p], -1)
        np.testing.assert_allclose(gauss_nodes[p], np.linalg.eigvalsh(dense), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_gauss_and_radau_bracket_the_square_noise_tail_and_the_midpoint_is_within_1pct(device):
    """The hard case of the tail: a square ΔW whose rest is dense noise, so its singular values run
    down to 0 (quarter-circle law), where √λ is least smooth. Per probe Gauss overestimates vᵀ√(RᵀR)v
    and Gauss–Radau underestimates it (exact values from an fp64 eigendecomposition); the
    effective rank from their midpoint is within 1 % of the fp64 truth and within its error bar."""
    gen = torch.Generator().manual_seed(11)
    n = 768
    signal = (torch.randn(n, 24, generator=gen) * torch.logspace(0, -1, 24)) @ torch.randn(24, n, generator=gen) / 8
    delta = (signal + torch.randn(n, n, generator=gen) / n ** 0.5).double()
    block = SubspaceIteration(delta.float().to(device), 64, warmup=5)
    ritz = block.round()
    deflated = partial.deflatable(ritz, 1e-3, 1e-3)
    basis = block.left_vectors(deflated)
    scale = float(ritz.values[0])
    sums = adaptive.tail_sums(delta.float().to(device), basis, scale, probes=32, steps=64)
    rest = delta - basis.double().cpu() @ (basis.double().cpu().T @ delta)
    eigenvalues, vectors = torch.linalg.eigh(rest.T @ rest)
    root = (vectors * eigenvalues.clamp_min(0).sqrt()) @ vectors.T / scale
    start = partial.rademacher(n, 32, 1, torch.device(device), torch.float32).double().cpu()  # tail_sums' probes
    exact_per_probe = n * torch.einsum("ip,ij,jp->p", start, root, start).numpy()
    assert np.mean(sums.radau_nuclear) < np.mean(exact_per_probe) < np.mean(sums.nuclear)
    # per probe too, up to the fp32 Lanczos's own error (~1e-3 here: fp64 brackets every probe)
    assert np.all(sums.nuclear >= exact_per_probe * (1 - 1e-3))
    assert np.all(sums.radau_nuclear <= exact_per_probe * (1 + 1e-3))
    assert np.all(sums.nuclear > sums.radau_nuclear)  # two distinct rules, in the order the theory gives
    truth = metrics.effective_rank(torch.linalg.svdvals(delta).numpy())
    estimate, error = partial.effective_rank_estimate(ritz.values[:deflated], sums)
    assert abs(estimate - truth) <= min(0.01 * truth, 2 * error)


@pytest.mark.parametrize("device", DEVICES)
def test_replayed_lanczos_equals_the_plain_loop_for_new_inputs(device):
    """The captured loop (CUDA) gives the plain loop's coefficients, also for a second matrix and a
    narrower deflation block replayed through the same graph (its inputs are copied in each call)."""
    results = {}
    caches = {enabled: GraphCache(enabled=enabled) for enabled in (False, True)}
    for enabled, graphs in caches.items():
        for seed, deflated in ((1, 12), (2, 5)):
            gen = torch.Generator().manual_seed(seed)
            matrix = torch.randn(600, 400, generator=gen).to(device)
            basis = torch.linalg.qr(matrix @ torch.randn(400, deflated, generator=gen).to(device))[0]
            sums = adaptive.tail_sums(matrix, basis, 10.0, probes=8, steps=16, padded_width=16, graphs=graphs)
            results[enabled, seed] = np.concatenate([sums.nuclear, sums.entropy, sums.radau_nuclear])
    for seed in (1, 2):
        np.testing.assert_allclose(results[True, seed], results[False, seed], rtol=2e-5)
    assert (len(caches[True]) == 1) == device.startswith("cuda")  # one graph served both matrices
    caches[True].clear()


@pytest.mark.parametrize("device", DEVICES)
def test_pending_tails_started_back_to_back_equal_the_plain_loop(device):
    """Tails started before any is resolved (on CUDA: each loads the graph's buffers
    while the first may still run beside it), their inputs dropped at once, give what the plain
    loop gives for each."""
    graphs = GraphCache()
    inputs = []
    for seed in (3, 4, 5):  # the first captures the graph, the next two replay it
        gen = torch.Generator().manual_seed(seed)
        matrix = torch.randn(500, 300, generator=gen) * seed
        basis = torch.linalg.qr(matrix @ torch.randn(300, 6, generator=gen))[0]
        inputs.append((matrix, basis))
    pending = [adaptive.start_tail_sums(m.to(device), b.to(device), 5.0, probes=8, steps=16, padded_width=8,
                                        graphs=graphs)
               for m, b in inputs]  # the device copies are dropped here
    plain_calls = GraphCache(enabled=False)
    for (matrix, basis), started in zip(inputs, pending):
        plain = adaptive.tail_sums(matrix.to(device), basis.to(device), 5.0, probes=8, steps=16, graphs=plain_calls)
        np.testing.assert_allclose(started.result().nuclear, plain.nuclear, rtol=2e-5)
        np.testing.assert_allclose(started.result().entropy, plain.entropy, rtol=2e-5, atol=1e-9)
    graphs.clear()


def test_deflation_takes_settled_spans_not_just_settled_values():
    """A value settled long before its vector is: only a span within the angle bound deflates the tail
    (Davis–Kahan), and a cluster of equal values deflates as a whole though its single vectors are not defined."""
    def block(values, residuals):
        values, residuals = np.asarray(values, float), np.asarray(residuals, float)
        return partial.RitzBlock(values, partial.value_errors(values, residuals, values > 0), values.size, 1, residuals)

    cluster = block([2.0, 2.0, 2.0, 2.0, 0.01, 0.005], [1e-9] * 4 + [1e-11, 1e-11])
    assert partial.deflatable(cluster, 1e-3, 1e-3) == 6
    # the third value's error (ρ²/gap ≈ 1e-4 relative) is settled, its vector (ρ/gap ≈ 0.02) is not
    loose = block([3.0, 2.0, 1.5, 1.4, 0.1], [1e-9, 1e-9, 0.02, 1e-9, 1e-9])
    assert loose.errors[2] <= 1e-3 * loose.values[2]
    assert partial.deflatable(loose, 1e-3, 1e-3) == 2
    assert partial.deflatable(loose, 1e-3, 0.1) == 4  # the span of the top four is sound to 0.01; the fifth gap is small


@pytest.mark.parametrize("device", DEVICES)
def test_graphs_dropped_for_new_shapes_while_tails_are_pending(device):
    """With room for one graph, a new shape's capture drops the last graph while its replay may still
    run beside the caller (on CUDA); every result still equals the plain loop's (a graph's buffers
    must not be reused before its replays are done)."""
    graphs = GraphCache(kept=1)
    inputs = []
    shapes = [(500, 300), (500, 300), (400, 260), (400, 260), (500, 300), (500, 300)]  # capture, replay, ...
    for seed, (m, n) in enumerate(shapes):
        gen = torch.Generator().manual_seed(seed)
        matrix = torch.randn(m, n, generator=gen)
        inputs.append((matrix, torch.linalg.qr(matrix @ torch.randn(n, 6, generator=gen))[0]))
    pending = [adaptive.start_tail_sums(m.to(device), b.to(device), 3.0, probes=8, steps=16, padded_width=8,
                                        graphs=graphs)
               for m, b in inputs]
    plain_calls = GraphCache(enabled=False)
    for (matrix, basis), started in zip(inputs, pending):
        plain = adaptive.tail_sums(matrix.to(device), basis.to(device), 3.0, probes=8, steps=16, graphs=plain_calls)
        assert np.isfinite(started.result().nuclear).all()
        np.testing.assert_allclose(started.result().nuclear, plain.nuclear, rtol=2e-5)
    graphs.clear()


def test_partial_spectra_are_saved_as_such_and_plotted_against_the_whole_energy(tmp_path):
    """`rank --adaptive --save-spectra` keeps the computed top values, marked partial with ‖ΔW‖²; the
    energy curve of such a file ends below 1 at the share they hold (not at 1, as a whole spectrum's
    would), and rank_grid leaves a fraction past them unknown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltakit.io.spectra import load_spectra
    from deltakit.plot import plot_energy_curves, rank_grid

    delta, _ = noisy_bf16_pair(seed=6)
    gen = torch.Generator().manual_seed(6)
    weight = (torch.randn(768, 512, generator=gen) * 0.02).bfloat16()
    name = "model.layers.0.self_attn.q_proj.weight"
    save_file({name: weight}, tmp_path / "base.safetensors")
    save_file({name: (weight.float() + delta).bfloat16()}, tmp_path / "ft.safetensors")
    from deltakit_cli.rank import emit_rank_outputs  # what `rank --adaptive --save-spectra` writes, from its report

    report = analysis.rank(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", (0.9,),
                           SpectralOptions(device="cpu", spectrum="adaptive", adaptive_plan=PLAN), keep_spectra=True)
    emit_rank_outputs(report, None, None, str(tmp_path / "s.safetensors"), quiet=True, force=False)
    spectra, info = load_spectra(tmp_path / "s.safetensors")
    entry = info["matrices"][name]
    values = spectra[name]
    assert entry["partial"] is True and values.size < 512
    share = float(np.sum(values ** 2)) / entry["energy"]
    stored = (weight.float() + delta).bfloat16().float() - weight.float()
    assert entry["energy"] == pytest.approx(float(torch.sum(stored.double() ** 2)), rel=1e-9)
    assert 0.9 <= share < 1.0
    ax = plot_energy_curves(spectra, info)
    (line,) = [line for line in ax.get_lines() if line.get_gid() == "q"]
    assert line.get_ydata()[-1] == pytest.approx(share) and len(line.get_xdata()) == values.size
    assert "top values only" in ax.get_xlabel()
    plt.close(ax.figure)
    recorded = dict(info, matrices={name: {k: v for k, v in entry.items() if k != "rank_at"}})
    assert rank_grid(spectra, recorded, energy=0.9).ranks[0, 0] == entry["rank_at"]["0.9"]
    past = rank_grid(spectra, recorded, energy=0.9999)  # past the computed values: a blank cell
    assert past.ranks.shape == (1, 1) and np.isnan(past.ranks[0, 0])


def test_a_plan_whose_first_block_passes_the_crossover_takes_the_full_path():
    """A matrix above min_side whose first block would already pass the crossover goes to the full path
    (it used to reach the end of the growth loop without a verdict)."""
    import dataclasses
    matrix = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    plan = dataclasses.replace(PLAN, min_side=100, start_width=64, crossover=0.25)  # 64 > 0.25·200
    spectrum, why = adaptive_spectrum(matrix, None, float(matrix.square().sum()), (0.9,), plan)
    assert spectrum is None and why == "small matrix"


def test_lanczos_steps_grow_with_the_side_as_the_quadrature_bias_does():
    """64 steps up to a side of 4096, then ∝ √side in multiples of 32 (the figures are in steps_for's docstring)."""
    plan = AdaptivePlan()
    assert [plan.steps_for(side) for side in (512, 2048, 4096, 4097, 6000, 8192, 16384)] == [64, 64, 64, 96, 96, 96, 128]
