"""Figures: drawn numbers match spectra built by construction; every kind renders a real image; errors are one line."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from deltakit import plot  # noqa: E402
from deltakit.analyses.weights import weight_spectra  # noqa: E402
from deltakit.errors import DeltakitError  # noqa: E402
from deltakit.io.spectra import load_spectra, save_spectra  # noqa: E402
from deltakit.spectral.metrics import energy_curve, marchenko_pastur_spectrum, rank_at_energy  # noqa: E402
from deltakit_cli.plot import plot_command  # noqa: E402

from conftest import assert_one_line_error, low_rank  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = 4
SHAPES = {"q": (32, 32), "k": (8, 32), "down": (32, 64)}
LEAVES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "down": "mlp.down_proj"}
EMBED = "model.embed_tokens.weight"


def name_of(kind: str, layer: int) -> str:
    return f"model.layers.{layer}.{LEAVES[kind]}.weight"


def true_rank(kind: str, layer: int) -> int:
    """The exact rank of the constructed ΔW: grows with depth, differs per module type."""
    return {"q": 2, "k": 1, "down": 5}[kind] + layer


def spectrum(rank: int, size: int) -> np.ndarray:
    """``rank`` equal singular values, then zeros: rank@f is exactly ceil(f·rank)."""
    s = np.zeros(size)
    s[:rank] = 1.0
    return s


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def built(tmp_path):
    """(spectra, info, path): 3 module types × 4 layers of known rank, plus an embedding outside any layer."""
    spectra, matrices = {}, {}
    for layer in range(LAYERS):
        for kind, shape in SHAPES.items():
            name = name_of(kind, layer)
            spectra[name] = spectrum(true_rank(kind, layer), min(shape))
            matrices[name] = {"shape": list(shape), "module_type": kind, "layer": layer,
                              "rank_at": {"0.9": math.ceil(0.9 * true_rank(kind, layer))}}
    spectra[EMBED] = spectrum(7, 32)
    matrices[EMBED] = {"shape": [100, 32], "module_type": "embed", "layer": None, "rank_at": {"0.9": 7}}
    info = {"base": str(tmp_path / "base.safetensors"), "ft": str(tmp_path / "ft.safetensors"), "energy": [0.9],
            "matrices": matrices}
    path = tmp_path / "spectra.safetensors"
    save_spectra(path, spectra, info)
    return spectra, info, path


@pytest.fixture
def checkpoints(tmp_path):
    """base / fine-tune single-file checkpoints whose q_proj of layer 0 differs by a rank-3 ΔW."""
    base = {name_of("q", 0): torch.randn(32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
    ft = {name_of("q", 0): base[name_of("q", 0)] + low_rank(32, 32, 3, scale=0.1)}
    base_path, ft_path = tmp_path / "base.safetensors", tmp_path / "ft.safetensors"
    save_file({k: v.float().contiguous() for k, v in base.items()}, str(base_path))
    save_file({k: v.float().contiguous() for k, v in ft.items()}, str(ft_path))
    return base_path, ft_path


def assert_real_png(path: Path) -> None:
    """A PNG file, decodable, of non-zero size, and not one flat colour."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    rgb = (image[..., :3] * 255).astype(np.int64)
    colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    assert len(colours) > 20, f"{path.name} looks blank ({len(colours)} colours)"


def line(ax, gid: str):
    found = [l for l in ax.get_lines() if l.get_gid() == gid]
    assert len(found) == 1, [l.get_gid() for l in ax.get_lines()]
    return found[0]


# --- numbers behind the figures ---------------------------------------------------------------------------------

def test_error_curve_is_the_best_rank_k_error():
    """sqrt(1 - energy) equals the Frobenius error of the truncated SVD, computed by hand."""
    s = np.array([3.0, 2.0, 1.0, 0.5, 0.0])
    hand = np.sqrt(1 - np.cumsum(s**2) / np.sum(s**2))
    np.testing.assert_allclose(plot.lowrank_error_curve(s), hand, atol=1e-12)
    delta = low_rank(7, 5, 4).numpy()
    u, sv, vt = np.linalg.svd(delta)
    truncation = [np.linalg.norm(delta - (u[:, :k] * sv[:k]) @ vt[:k]) / np.linalg.norm(delta) for k in range(1, 6)]
    np.testing.assert_allclose(plot.lowrank_error_curve(sv), truncation, atol=1e-10)


def test_error_vs_rank_draws_those_values(built):
    spectra, info, _ = built
    spectra = dict(spectra, custom=np.array([4.0, 2.0, 1.0, 1.0]))
    ax = plot.plot_error_vs_rank(spectra, names=["custom"], info=info)
    drawn = line(ax, "custom")
    np.testing.assert_array_equal(drawn.get_xdata(), [1, 2, 3, 4])
    np.testing.assert_allclose(drawn.get_ydata(), np.sqrt(1 - np.array([16, 20, 21, 22]) / 22), atol=1e-12)
    assert ax.get_xscale() == "log" and "rank k" in ax.get_xlabel()


def test_error_vs_rank_per_module_type_is_the_median(built):
    spectra, info, _ = built
    ax = plot.plot_error_vs_rank(spectra, info=info)
    # k ranks 1..4 over layers: error at k=1 is sqrt(1 - 1/r) for r = 1, 2, 3, 4 -> median of those four
    r = np.array([true_rank("k", layer) for layer in range(LAYERS)])
    assert line(ax, "k").get_ydata()[0] == pytest.approx(np.median(np.sqrt(1 - 1 / r)))
    random_curve = plot.lowrank_error_curve(np.sqrt(marchenko_pastur_spectrum((8, 32))))
    np.testing.assert_allclose(line(ax, "random 8×32").get_ydata(), random_curve)


def test_energy_curves_median_band_and_baseline(built):
    spectra, info, _ = built
    ax = plot.plot_energy_curves(spectra, info)
    curves = np.stack([energy_curve(spectra[name_of("q", layer)]) for layer in range(LAYERS)])
    np.testing.assert_allclose(line(ax, "q").get_ydata(), np.median(curves, axis=0))
    baseline = energy_curve(np.sqrt(marchenko_pastur_spectrum((32, 64))))
    np.testing.assert_allclose(line(ax, "random 32×64").get_ydata(), baseline)
    assert any(l.get_ydata()[0] == 0.9 for l in ax.get_lines() if l.get_gid() is None and len(l.get_ydata()) == 2)
    labels = ax.get_legend_handles_labels()[1]
    assert "q  (32×32, median of 4)" in labels and "embed  (100×32)" in labels
    assert [l for l in labels if l.startswith(("q", "k", "down", "embed"))] == [
        "q  (32×32, median of 4)", "k  (8×32, median of 4)", "down  (32×64, median of 4)", "embed  (100×32)"]


def test_unchanged_matrices_are_counted_not_drawn(built):
    spectra, info, _ = built
    spectra = dict(spectra, **{name_of("q", 0): np.zeros(32)})
    ax = plot.plot_energy_curves(spectra, info)
    assert "1 unchanged" in ax.get_xlabel()
    curves = np.stack([energy_curve(spectra[name_of("q", layer)]) for layer in range(1, LAYERS)])
    np.testing.assert_allclose(line(ax, "q").get_ydata(), np.median(curves, axis=0))


def test_rank_grid_uses_recorded_ranks(built):
    spectra, info, _ = built
    grid = plot.rank_grid(None, info, energy=0.9)
    assert grid.module_types == ["q", "k", "down"] and grid.layers == [0, 1, 2, 3]
    expected = [[math.ceil(0.9 * true_rank(kind, layer)) for layer in range(LAYERS)] for kind in grid.module_types]
    np.testing.assert_array_equal(grid.ranks, expected)
    assert grid.unlayered == {EMBED: 7}
    # recorded values win over the spectra (here deliberately inconsistent, to tell them apart)
    info["matrices"][name_of("k", 2)]["rank_at"]["0.9"] = 99
    assert plot.rank_grid(spectra, info, energy=0.9).ranks[1, 2] == 99


def test_rank_grid_computes_missing_energies(built):
    spectra, info, _ = built
    grid = plot.rank_grid(spectra, info, energy=0.5)
    expected = [[math.ceil(0.5 * true_rank(kind, layer)) for layer in range(LAYERS)] for kind in grid.module_types]
    np.testing.assert_array_equal(grid.ranks, expected)
    with pytest.raises(DeltakitError, match="no rank at energy 0.5"):
        plot.rank_grid(None, info, energy=0.5)


def test_rank_grid_gaps_and_medians():
    def gate(layer: int, expert: int, rank: int) -> tuple[str, dict]:
        name = f"model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight"
        return name, {"shape": [8, 4], "module_type": "gate", "layer": layer, "rank_at": {"0.9": rank}}

    info = {"matrices": dict([gate(0, 0, 2), gate(0, 1, 4), gate(0, 2, 9), gate(2, 0, 1)])}
    grid = plot.rank_grid(None, info)  # layer 1 has no matrix: a gap, not a zero; layer 0 holds 3 experts: their median
    assert grid.layers == [0, 1, 2] and grid.max_per_cell == 3
    np.testing.assert_array_equal(grid.ranks, [[4.0, np.nan, 1.0]])


def test_heatmap_shows_the_grid(built):
    spectra, info, _ = built
    ax = plot.plot_rank_heatmap(spectra, info)
    shown = np.ma.filled(ax.images[0].get_array(), np.nan)
    np.testing.assert_array_equal(shown, plot.rank_grid(spectra, info).ranks)
    texts = {t.get_text() for t in ax.texts}
    assert {str(math.ceil(0.9 * true_rank("down", 3))), "1"} <= texts
    assert "embed_tokens 7" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["q", "k", "down"]


def test_plot_spectra_log_axes_and_zeros_hidden():
    ax = plot.plot_spectra({"ΔW": np.array([2.0, 1.0, 0.0])}, title="one")
    y = ax.get_lines()[0].get_ydata()
    assert ax.get_yscale() == "log" and np.isnan(y[2]) and y[0] == 2.0
    assert ax.get_title() == "one" and ax.get_legend() is not None


def test_weight_spectra_match_numpy(checkpoints):
    base_path, ft_path = checkpoints
    result = weight_spectra(base_path, ft_path, name_of("q", 0))
    from safetensors.numpy import load_file

    base = load_file(str(base_path))[name_of("q", 0)].astype(np.float64)
    ft = load_file(str(ft_path))[name_of("q", 0)].astype(np.float64)
    for label, matrix in (("W_base", base), ("W_ft", ft), ("ΔW", ft - base)):
        np.testing.assert_allclose(result[label], np.linalg.svd(matrix, compute_uv=False), rtol=1e-10, atol=1e-12)
    assert rank_at_energy(result["ΔW"], 0.999999) == 3
    with pytest.raises(DeltakitError, match="did you mean"):
        weight_spectra(base_path, ft_path, name_of("q", 0).replace("q_proj", "q_prj"))


def test_weight_spectra_shared_rows_of_a_grown_embedding(tmp_path):
    base = torch.randn(10, 6, dtype=torch.float64)
    ft = torch.cat([base + 0.01 * low_rank(10, 6, 2), torch.randn(3, 6, dtype=torch.float64)])
    save_file({EMBED: base.float()}, str(tmp_path / "b.safetensors"))
    save_file({EMBED: ft.float()}, str(tmp_path / "f.safetensors"))
    result = weight_spectra(tmp_path / "b.safetensors", tmp_path / "f.safetensors", EMBED)
    assert len(result["W_ft"]) == 6 and rank_at_energy(result["ΔW"], 0.99999) == 2


def test_overview_has_three_panels(built):
    spectra, info, _ = built
    fig = plot.plot_overview(spectra, info)
    titles = [ax.get_title() for ax in fig.get_axes()]
    assert sum(bool(t) for t in titles) == 3, titles
    assert "ft.safetensors" in fig.get_suptitle()


# --- files -----------------------------------------------------------------------------------------------------

def test_every_function_renders_a_png(built, checkpoints, tmp_path):
    spectra, info, _ = built
    figures = {
        "energy": plot.plot_energy_curves(spectra, info),
        "heatmap": plot.plot_rank_heatmap(spectra, info),
        "error": plot.plot_error_vs_rank(spectra, info=info),
        "spectrum": plot.plot_spectra(weight_spectra(*checkpoints, name_of("q", 0))),
        "overview": plot.plot_overview(spectra, info),
    }
    for kind, figure in figures.items():
        path = plot.save_figure(figure, tmp_path / f"{kind}.png", dpi=72)
        assert_real_png(path)


def test_save_figure_refuses_overwrite_and_odd_suffixes(built, tmp_path):
    spectra, info, _ = built
    ax = plot.plot_energy_curves(spectra, info)
    target = tmp_path / "fig.pdf"
    plot.save_figure(ax, target)
    assert target.read_bytes()[:4] == b"%PDF"
    with pytest.raises(DeltakitError, match="already exists"):
        plot.save_figure(ax, target)
    plot.save_figure(ax, target, force=True)
    with pytest.raises(DeltakitError, match="figure format"):
        plot.save_figure(ax, tmp_path / "fig.xyz")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


# --- the command -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["overview", "energy", "heatmap", "error"])
def test_cli_renders_each_kind(runner, built, tmp_path, kind):
    _, _, spectra_path = built
    out = tmp_path / f"{kind}.png"
    result = runner.invoke(plot_command, [str(spectra_path), "-o", str(out), "--kind", kind])
    assert result.exit_code == 0, result.output
    assert_real_png(out)


def test_cli_spectrum(runner, built, checkpoints, tmp_path):
    _, _, spectra_path = built
    base_path, ft_path = checkpoints
    out = tmp_path / "spectrum.png"
    args = [str(spectra_path), "-o", str(out), "--kind", "spectrum", "--matrix", name_of("q", 0), "--device", "cpu"]
    result = runner.invoke(plot_command, args + ["--base", str(base_path), "--ft", str(ft_path)])
    assert result.exit_code == 0, result.output
    assert_real_png(out)
    # without --base / --ft, the checkpoints recorded in the spectra file are used when they exist
    result = runner.invoke(plot_command, args + ["--force"])
    assert result.exit_code == 0, result.output


def test_cli_error_vs_rank_of_chosen_matrices(runner, built, tmp_path):
    _, _, spectra_path = built
    out = tmp_path / "error.png"
    result = runner.invoke(plot_command, [str(spectra_path), "-o", str(out), "--kind", "error",
                                          "--matrix", name_of("down", 3), "--matrix", name_of("k", 0)])
    assert result.exit_code == 0, result.output
    assert_real_png(out)


def test_cli_refuses_overwrite_without_force(runner, built, tmp_path):
    _, _, spectra_path = built
    out = tmp_path / "fig.png"
    out.write_bytes(b"keep me")
    result = runner.invoke(plot_command, [str(spectra_path), "-o", str(out), "--kind", "heatmap"])
    assert_one_line_error(result, "already exists")
    assert out.read_bytes() == b"keep me"
    result = runner.invoke(plot_command, [str(spectra_path), "-o", str(out), "--kind", "heatmap", "--force"])
    assert result.exit_code == 0, result.output
    assert_real_png(out)


def test_cli_bad_spectra_files(runner, tmp_path):
    out = str(tmp_path / "fig.png")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file at all")
    assert_one_line_error(runner.invoke(plot_command, [str(garbage), "-o", out]), "spectra file")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(plain))
    assert_one_line_error(runner.invoke(plot_command, [str(plain), "-o", out]), "not a deltakit spectra file")
    assert_one_line_error(runner.invoke(plot_command, [str(tmp_path / "missing.safetensors"), "-o", out]), "no such")
    assert not Path(out).exists()


@pytest.mark.parametrize("extra, message", [
    (["--kind", "spectrum", "--matrix", "model.layers.0.self_attn.q_prj.weight", "--base", "b", "--ft", "f"],
     "did you mean model.layers.0.self_attn.q_proj.weight"),
    (["--kind", "error", "--matrix", "nothing.like.it"], "no matrix named nothing.like.it"),
    (["--kind", "spectrum", "--matrix", name_of("q", 0)], "needs --base"),
    (["--kind", "spectrum"], "exactly one --matrix"),
    (["--kind", "heatmap", "--matrix", name_of("q", 0)], "--matrix is used only"),
    (["--kind", "heatmap", "--energy", "0.5", "-o", "fig.xyz"], "figure format"),
])
def test_cli_bad_arguments(runner, built, tmp_path, extra, message, monkeypatch):
    _, info, spectra_path = built
    monkeypatch.chdir(tmp_path)  # the recorded base/ft do not exist: nothing was written there
    result = runner.invoke(plot_command, [str(spectra_path), "-o", str(tmp_path / "fig.png"), *extra])
    assert_one_line_error(result, message)


def test_cli_help_has_an_example(runner):
    result = runner.invoke(plot_command, ["--help"])
    assert result.exit_code == 0 and "deltakit plot spectra.safetensors -o overview.png" in result.output


def test_spectra_round_trip_feeds_the_plots(built):
    """What the command reads is what the fixture wrote (guards the fixture itself)."""
    spectra, info, path = built
    loaded, loaded_info = load_spectra(path)
    assert loaded.keys() == spectra.keys() and loaded_info == info
