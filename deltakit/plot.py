"""Figures of ΔW spectra: energy curves, rank heatmap over depth, LoRA error vs rank, raw spectra.

Each function takes plain data, ``spectra, info`` in that order as
:func:`deltakit.io.spectra.load_spectra` returns them (everything after is keyword-only),
and an optional matplotlib ``ax``; it draws there
(or on a new figure) and returns the Axes, or the Figure for :func:`plot_overview`. Nothing
here calls ``plt.show()`` or picks a backend, so it behaves the same in a notebook and in the CLI.

Longer than ~450 lines: every figure of the spectra file (energy curves, error against rank, the
rank heatmap, the overview) and of compare and trajectory reports shares one set of axes helpers,
colours and grouping; the module is the drawing layer, no numerics beyond reading the file.

Example::

    spectra, info = load_spectra("spectra.safetensors")
    fig = plot_overview(spectra, info)
    save_figure(fig, "overview.png")
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

from deltakit.errors import DeltakitError
from deltakit.io import atomic_file
from deltakit.io.inputs import InputFootprint
from deltakit.pairing import check_names, layer_index, module_type
from deltakit.spectral.metrics import (
    as_sorted_spectrum, energy_curve, lowrank_error_curve, marchenko_pastur_spectrum, rank_at_energy,
)

Spectra = Mapping[str, np.ndarray]

# Display order, and one colour per role, shared by every panel. Fused / GPT-style names take
# the colour of the role they play, so "attention in" is blue in Llama and in GPT-2 alike.
MODULE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "mlp_in", "mlp_out", "embed",
                "lm_head", "other")
MODULE_COLOURS = {
    "q": "tab:blue", "qkv": "tab:blue", "k": "tab:orange", "v": "tab:green", "o": "tab:red",
    "gate": "tab:purple", "gate_up": "tab:purple", "mlp_in": "tab:purple", "up": "tab:brown",
    "down": "tab:cyan", "mlp_out": "tab:cyan", "embed": "tab:olive", "lm_head": "tab:pink", "other": "tab:gray",
}
ENERGY_LABEL = r"fraction of $\|\Delta W\|_F^2$ explained"
ERROR_LABEL = r"relative error $\|\Delta W - \Delta W_k\|_F \,/\, \|\Delta W\|_F$"


@dataclass(frozen=True)
class MatrixMeta:
    """What a plot needs to know about one ΔW besides its spectrum."""

    name: str
    module_type: str
    layer: int | None
    shape: tuple[int, int] | None  # None when the spectra file does not record it


def matrix_meta(spectra: Spectra | None, info: Mapping[str, Any] | None) -> list[MatrixMeta]:
    """One entry per matrix (those in ``spectra``, else in ``info``); type and layer from the name if unrecorded."""
    recorded = (info or {}).get("matrices", {})
    names = list(spectra) if spectra is not None else list(recorded)
    if not names:
        raise DeltakitError("the spectra file holds no matrices to plot")
    metas = []
    for name in names:
        entry = recorded.get(name, {})
        shape = entry.get("shape")
        metas.append(MatrixMeta(
            name=name,
            module_type=entry.get("module_type", module_type(name)),
            layer=entry["layer"] if "layer" in entry else layer_index(name),
            shape=(int(shape[0]), int(shape[1])) if shape else None,
        ))
    return metas


def _check_order(function: str, spectra: Any, info: Any) -> None:
    """A clear TypeError when ``spectra`` and ``info`` were passed the other way round."""
    def looks_like_info(value: Any) -> bool:
        return isinstance(value, Mapping) and isinstance(value.get("matrices"), Mapping)

    if looks_like_info(spectra) or (isinstance(info, Mapping) and info and not looks_like_info(info)
                                    and all(isinstance(v, np.ndarray) for v in info.values())):
        raise TypeError(f"{function}(spectra, info, ...): spectra first, then info, as load_spectra returns them; "
                        "these two look swapped")


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.4g}%"  # 0.9 -> 90%, 0.995 -> 99.5%


def _short(name: str) -> str:
    return name.removeprefix("model.").removesuffix(".weight")


def _groups(metas: list[MatrixMeta], by: str) -> dict[str, list[MatrixMeta]]:
    """Curves to draw: one per module type (in MODULE_ORDER) or one per matrix."""
    if by == "matrix":
        return {_short(m.name): [m] for m in metas}
    if by != "module_type":
        raise ValueError(f"group_by must be 'module_type' or 'matrix', got {by!r}")
    rank = {kind: i for i, kind in enumerate(MODULE_ORDER)}
    groups: dict[str, list[MatrixMeta]] = {}
    for meta in sorted(metas, key=lambda m: (rank.get(m.module_type, len(rank)), m.module_type)):
        groups.setdefault(meta.module_type, []).append(meta)
    return groups


def _shape_text(shape: tuple[int, int]) -> str:
    return f"{shape[0]}×{shape[1]}"


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def partial_energy(info: Mapping[str, Any] | None, name: str) -> float | None:
    """‖ΔW‖²_F of ``name`` when its spectrum in the file is partial (only the top values), else None."""
    entry = (info or {}).get("matrices", {}).get(name, {})
    return float(entry["energy"]) if entry.get("partial") and entry.get("energy") is not None else None


def _draw_curves(ax: Axes, spectra: Spectra, groups: dict[str, list[MatrixMeta]],
                 transform: Callable[[np.ndarray, float | None], np.ndarray],
                 info: Mapping[str, Any] | None = None) -> None:
    """Median curve and min–max band per group, and a dashed random-matrix twin per shape.

    The twin takes the colour of the first group of its shape (groups of one shape share it).
    Matrices whose ΔW is exactly zero have no curve; the x label counts them. A partial
    spectrum (``partial_energy``) is drawn against the whole ‖ΔW‖² and stops at its last
    computed value: past it nothing is known, so its band and median end there too.
    """
    unchanged, k_max, banded, partial = 0, 1, False, False
    shape_colours: dict[tuple[int, int], str] = {}
    matrix_colours = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for label, metas in groups.items():
        live = [m for m in metas if np.any(spectra[m.name] > 0)]
        unchanged += len(metas) - len(live)
        if not live:
            continue
        totals = [partial_energy(info, m.name) for m in live]
        curves = [transform(spectra[m.name], total) for m, total in zip(live, totals)]
        length = max(len(c) for c in curves)
        # Past its own rank a whole curve stays at its last value (all energy explained, zero
        # error); a partial one is unknown there.
        stack = np.stack([np.pad(c, (0, length - len(c)), mode="edge") if total is None
                          else np.pad(c, (0, length - len(c)), constant_values=np.nan)
                          for c, total in zip(curves, totals)])
        k = np.arange(1, length + 1)  # the longest curve covers every k, so no column is all NaN
        colour = MODULE_COLOURS.get(label) or next(matrix_colours)
        shapes = {m.shape for m in live}
        details = [_shape_text(next(iter(shapes))) if len(shapes) == 1 else "mixed shapes"] if any(shapes) else []
        if len(live) > 1:
            ax.fill_between(k, np.nanmin(stack, axis=0), np.nanmax(stack, axis=0), color=colour, alpha=0.15,
                            linewidth=0)
            details.append(f"median of {len(live)}")
            banded = True
        if any(total is not None for total in totals):
            details.append("top values only")
            partial = True
        legend_label = f"{label}  ({', '.join(details)})" if details else label
        ax.plot(k, np.nanmedian(stack, axis=0), color=colour, linewidth=1.8, label=legend_label, gid=label)
        k_max = max(k_max, length)
        for shape in sorted(tuple(sorted(s)) for s in shapes if s):  # m×n and n×m: same spectrum
            shape_colours.setdefault(shape, colour)
    for shape, colour in shape_colours.items():
        random_curve = transform(np.sqrt(marchenko_pastur_spectrum(shape)))
        ax.plot(np.arange(1, len(random_curve) + 1), random_curve, color=colour, linestyle="--", linewidth=1.0,
                alpha=0.8, gid=f"random {_shape_text(shape)}")
        k_max = max(k_max, len(random_curve))
    if banded:
        ax.fill_between([], [], color="0.6", alpha=0.3, linewidth=0, label="shaded: min–max of a group")
    if shape_colours:
        ax.plot([], [], color="0.4", linestyle="--", linewidth=1.0, label="random matrix of the same shape")
    ax.set_xscale("log")
    ax.set_xlim(1, max(k_max, 2))
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    notes = [f"{unchanged} unchanged matrices, ΔW = 0, not shown"] if unchanged else []
    if partial:
        notes.append("top values only: computed in part (rank --adaptive), each curve ends at its last value")
    ax.set_xlabel("rank k" + "".join(f"\n({note})" for note in notes))
    ax.grid(True, which="major", alpha=0.3)


def signal_energy_curve(signal: np.ndarray, signal_energy: float) -> np.ndarray:
    """Cumulative energy of the signal spectrum over the estimated signal energy (may stay below 1:
    what lies under the rounding's edge cannot be placed in any component)."""
    s = as_sorted_spectrum(signal)
    s = s[s > 0]
    if s.size == 0 or signal_energy <= 0:
        return np.zeros(1)
    return np.cumsum(s * s) / signal_energy


def _draw_signal_curves(ax: Axes, groups: dict[str, list[MatrixMeta]], info: Mapping[str, Any] | None) -> None:
    """Dotted median signal-energy curve per group, for the matrices whose signal spectrum differs from the raw one."""
    signal = (info or {}).get("signal_spectra") or {}
    recorded = (info or {}).get("matrices", {})
    drawn = False
    for label, metas in groups.items():
        curves = [signal_energy_curve(signal[m.name], recorded.get(m.name, {}).get("signal_energy", 0.0))
                  for m in metas if m.name in signal]
        if not curves:
            continue
        length = max(len(c) for c in curves)
        stack = np.stack([np.pad(c, (0, length - len(c)), mode="edge") for c in curves])
        ax.plot(np.arange(1, length + 1), np.median(stack, axis=0), color=MODULE_COLOURS.get(label, "0.3"),
                linestyle=":", linewidth=1.8, gid=f"signal {label}")
        drawn = True
    if drawn:
        ax.plot([], [], color="0.4", linestyle=":", linewidth=1.8,
                label="dotted: signal, storage rounding taken out (of its estimated energy)")


def plot_energy_curves(spectra: Spectra, info: Mapping[str, Any] | None = None, *, ax: Axes | None = None,
                       group_by: str = "module_type", energy: float = 0.9) -> Axes:
    """Cumulative energy of ΔW vs rank k, per module type (median over layers, min–max band).

    Dashed: the same curve for a Gaussian random matrix of the same shape, i.e. a ΔW with no
    low-rank structure. A curve far left of its dashed twin means a low-rank update.
    """
    _check_order("plot_energy_curves", spectra, info)
    ax = _new_axes(ax, (8, 5))
    groups = _groups(matrix_meta(spectra, info), group_by)
    _draw_curves(ax, spectra, groups, energy_curve, info)
    _draw_signal_curves(ax, groups, info)
    ax.axhline(energy, color="0.5", linewidth=0.8, linestyle=(0, (1, 2)), label=f"{_percent(energy)} of the energy")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(ENERGY_LABEL)
    ax.set_title("Energy of ΔW in its top-k singular values")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return ax


def plot_error_vs_rank(spectra: Spectra, info: Mapping[str, Any] | None = None, *,
                       names: Iterable[str] | None = None, ax: Axes | None = None, energy: float = 0.9) -> Axes:
    """Relative error of the best rank-k approximation of ΔW: what an extracted rank-k LoRA would miss.

    One curve per module type (median over layers), or per matrix when ``names`` are given;
    ``info`` adds the random-matrix baselines (dashed) and the module types recorded there.
    """
    _check_order("plot_error_vs_rank", spectra, info)
    ax = _new_axes(ax, (8, 5))
    metas = matrix_meta(spectra, info)
    if names is not None:
        wanted = set(check_names(spectra, names))
        metas = [m for m in metas if m.name in wanted]
    _draw_curves(ax, spectra, _groups(metas, "matrix" if names is not None else "module_type"), lowrank_error_curve,
                 info)
    ax.axhline(np.sqrt(1 - energy), color="0.5", linewidth=0.8, linestyle=(0, (1, 2)),
               label=f"{_percent(energy)} of the energy")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(ERROR_LABEL)
    ax.set_title("Error of a rank-k LoRA extracted from ΔW (best rank-k fit)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return ax


@dataclass
class RankGrid:
    """rank@energy over depth: ``ranks[i, j]`` is module type ``module_types[i]`` at layer ``layers[j]``.

    NaN where no such matrix exists; the median when a cell holds several (e.g. MoE experts).
    ``unlayered`` holds the matrices outside any block (embeddings, lm_head): name -> rank.
    """

    ranks: np.ndarray
    module_types: list[str]
    layers: list[int]
    unlayered: dict[str, int]
    max_per_cell: int


def _recorded_rank(entry: Mapping[str, Any], energy: float) -> int | None:
    for key, value in entry.get("rank_at", {}).items():
        if abs(float(key) - energy) < 1e-9:
            return int(value)
    return None


def rank_grid(spectra: Spectra | None, info: Mapping[str, Any] | None, *, energy: float = 0.9) -> RankGrid:
    """Arrange rank@energy by (module type, layer): recorded in ``info`` when present, else from ``spectra``.

    ``spectra`` may be None when ``info`` records the ranks at ``energy``.
    """
    _check_order("rank_grid", spectra, info)
    recorded = (info or {}).get("matrices", {})
    cells: dict[tuple[str, int], list[int]] = {}
    unlayered: dict[str, int] = {}
    for meta in matrix_meta(spectra, info):
        rank = _recorded_rank(recorded.get(meta.name, {}), energy)
        if rank is None:
            if spectra is None:
                known = ", ".join(sorted({k for e in recorded.values() for k in e.get("rank_at", {})})) or "none"
                raise DeltakitError(f"the spectra file records no rank at energy {energy:g} (it has {known}), "
                                    "and no spectra were given to compute it")
            found = rank_at_energy(spectra[meta.name], energy, partial_energy(info, meta.name))
            if found is None:  # past the computed top of a partial spectrum: unknown (a blank cell)
                if meta.layer is not None:
                    cells.setdefault((meta.module_type, int(meta.layer)), [])
                continue
            rank = found
        if meta.layer is None:
            unlayered[meta.name] = rank
        else:
            cells.setdefault((meta.module_type, int(meta.layer)), []).append(rank)
    order = {kind: i for i, kind in enumerate(MODULE_ORDER)}
    kinds = sorted({kind for kind, _ in cells}, key=lambda k: (order.get(k, len(order)), k))
    layers = list(range(min(l for _, l in cells), max(l for _, l in cells) + 1)) if cells else []
    ranks = np.full((len(kinds), len(layers)), np.nan)
    for (kind, layer), values in cells.items():
        if values:
            ranks[kinds.index(kind), layer - layers[0]] = float(np.median(values))
    return RankGrid(ranks, kinds, layers, unlayered, max((len(v) for v in cells.values()), default=0))


def plot_rank_heatmap(spectra: Spectra | None, info: Mapping[str, Any] | None, *, energy: float = 0.9,
                      ax: Axes | None = None) -> Axes:
    """Heatmap of rank@energy: module types (rows) × layer index (columns), values written in small grids.

    Matrices outside any layer (embeddings, lm_head) are listed under the axis instead, so
    their larger ranks do not flatten the colour scale of the blocks.
    """
    _check_order("plot_rank_heatmap", spectra, info)
    grid = rank_grid(spectra, info, energy=energy)
    ax = _new_axes(ax, (max(6.0, 0.4 * len(grid.layers) + 2.5), 1.0 + 0.45 * max(len(grid.module_types), 2)))
    note = ", ".join(f"{_short(n).rsplit('.', 1)[-1]} {r}" for n, r in list(grid.unlayered.items())[:4])
    note += f" and {len(grid.unlayered) - 4} more" if len(grid.unlayered) > 4 else ""
    ax.set_xlabel("layer index" + (f"\nnot in a layer (not shown): {note}" if note else ""))
    ax.set_title(f"Rank needed for {_percent(energy)} of $\\|\\Delta W\\|_F^2$, by depth")
    if not grid.layers:
        ax.text(0.5, 0.5, "no matrix has a layer index", ha="center", va="center", transform=ax.transAxes)
        return ax
    positive = grid.ranks[grid.ranks > 0]
    low, high = (positive.min(), positive.max()) if positive.size else (1.0, 1.0)
    # Ranks of different module types can differ by 100×; a log scale keeps both ends readable.
    norm = mcolors.LogNorm(low, high) if high / low >= 30 else mcolors.Normalize(0, max(high, 1.0))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.9")
    image = ax.imshow(np.ma.masked_invalid(grid.ranks), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    label = f"rank at {_percent(energy)} energy"
    if grid.max_per_cell > 1:
        label += f" (median of up to {grid.max_per_cell} per cell)"
    ax.figure.colorbar(image, ax=ax, label=label, pad=0.01)
    ax.set_yticks(range(len(grid.module_types)), grid.module_types)
    if len(grid.layers) <= 40:
        ax.set_xticks(range(len(grid.layers)), [str(layer) for layer in grid.layers])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(x) + grid.layers[0]}"))
    if grid.ranks.size <= 400 and len(grid.layers) <= 40:
        fontsize = 8 if len(grid.layers) <= 16 else 6
        for (i, j), value in np.ndenumerate(grid.ranks):
            if np.isnan(value):
                continue
            rgb = cmap(norm(value)) if value > 0 else (0.9, 0.9, 0.9, 1.0)
            dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=fontsize,
                    color="white" if dark else "black")
    return ax


def plot_spectra(spectra_by_label: Mapping[str, np.ndarray], *, title: str = "Singular values",
                 ax: Axes | None = None) -> Axes:
    """Singular values σ_k vs k (log–log) of a few related matrices, e.g. W_base, W_ft and ΔW."""
    ax = _new_axes(ax, (7, 4.5))
    for label, s in spectra_by_label.items():
        s = as_sorted_spectrum(s)
        # NaN instead of 0: a log axis cannot show a zero singular value
        ax.plot(np.arange(1, len(s) + 1), np.where(s > 0, s, np.nan), linewidth=1.6, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel("index k (descending)")
    ax.set_ylabel("singular value $\\sigma_k$")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_overview(spectra: Spectra, info: Mapping[str, Any] | None = None, *, energy: float = 0.9) -> Figure:
    """The default figure: energy curves and LoRA error vs rank side by side, rank heatmap below."""
    _check_order("plot_overview", spectra, info)
    fig = plt.figure(figsize=(15, 9.5), layout="constrained")
    # Two sub-figures, so the legend beside the curves and the heatmap's colour bar don't share a margin.
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.2, 1])
    axes = dict(zip(("energy", "error"), top.subplots(1, 2)))
    axes["heatmap"] = bottom.subplots()
    plot_energy_curves(spectra, info, ax=axes["energy"], energy=energy)
    plot_error_vs_rank(spectra, ax=axes["error"], info=info, energy=energy)
    plot_rank_heatmap(spectra, info, energy=energy, ax=axes["heatmap"])
    # Both curve panels share colours and baselines: one legend, right of the pair, off the data, holding the
    # entries of both (the energy panel's dotted signal curves have none in the error panel).
    entries: dict[str, Any] = {}
    for ax in (axes["error"], axes["energy"]):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    axes["energy"].get_legend().remove()
    axes["error"].legend(list(entries.values()), list(entries), loc="upper left", bbox_to_anchor=(1.01, 1.0),
                         fontsize="small", frameon=False)
    if info and info.get("base") and info.get("ft"):
        base, ft = Path(str(info["base"])).name, Path(str(info["ft"])).name
        fig.suptitle(f"ΔW = W_ft − W_base    base: {base}    fine-tune: {ft}")
    return fig


def save_figure(fig: Figure | Axes, path: str | os.PathLike, force: bool = False, dpi: int = 150,
                inputs: Iterable[InputFootprint] = ()) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names; refuse to overwrite unless ``force``,
    and ever to write over one of ``inputs``."""
    figure = fig
    while not isinstance(figure, Figure):  # Axes -> (SubFigure ->) Figure
        figure = figure.figure
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    supported = figure.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise DeltakitError(f"cannot tell the figure format from {path.name!r}; "
                            f"use a suffix among {', '.join('.' + s for s in sorted(supported))}")
    with atomic_file(path, force=force, inputs=inputs) as tmp:
        figure.savefig(tmp, format=fmt, dpi=dpi)
    return path


# ---------------------------------------------------------------- compare and trajectory figures

def overlap_grid(matrices: Iterable[Mapping[str, Any]], key: str = "overlap_at", k: str | int = 8
                 ) -> tuple[np.ndarray, list[str], list[int]]:
    """``values[i, j]``: the mean ``key``[k] of module type i at layer j (NaN where absent); rows, layers."""
    cells: dict[tuple[str, int], list[float]] = {}
    for m in matrices:
        value = m[key].get(str(k)) if isinstance(m[key], Mapping) else m[key]
        if m.get("layer") is not None and value is not None:
            cells.setdefault((m["module_type"], int(m["layer"])), []).append(float(value))
    order = {kind: i for i, kind in enumerate(MODULE_ORDER)}
    kinds = sorted({kind for kind, _ in cells}, key=lambda kind: (order.get(kind, len(order)), kind))
    layers = list(range(min(l for _, l in cells), max(l for _, l in cells) + 1)) if cells else []
    values = np.full((len(kinds), len(layers)), np.nan)
    for (kind, layer), found in cells.items():
        values[kinds.index(kind), layer - layers[0]] = float(np.mean(found))
    return values, kinds, layers


def _annotated_heatmap(ax: Axes, values: np.ndarray, kinds: list[str], layers: list[int], vmin: float, vmax: float,
                       cmap_name: str, label: str) -> None:
    cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="0.9")
    norm = mcolors.Normalize(vmin, vmax)
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label=label, pad=0.01)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("layer index")
    if values.size <= 400:
        for (i, j), value in np.ndenumerate(values):
            if not np.isnan(value):
                rgb = cmap(norm(value))
                dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")


def plot_overlap_heatmap(report: Mapping[str, Any], k: int | None = None, pairs: Iterable[tuple[int, int]] | None = None,
                         cosine: bool = True) -> Figure:
    """φ@k (left top-k subspace overlap) by layer × module type, one row of panels per pair of fine-tunes.

    ``report`` is :meth:`deltakit.analyses.compare.CompareReport.to_dict`; ``k`` defaults to the middle
    --top value. With ``cosine``, a second panel per pair shows cos(vec ΔW_A, vec ΔW_B).
    """
    top = [int(t) for t in report["top"]]
    k = k if k is not None else top[len(top) // 2]
    chosen = [tuple(p) for p in (pairs if pairs is not None else report["pairs"])]
    columns = 2 if cosine else 1
    fig, axes = plt.subplots(len(chosen), columns, squeeze=False, layout="constrained",
                             figsize=(6.0 * columns, 0.5 + 2.6 * len(chosen)))
    for row, (a, b) in enumerate(chosen):
        items = [m for m in report["matrices"] if (m["a"], m["b"]) == (a, b)]
        values, kinds, layers = overlap_grid(items, "overlap_at", k)
        baseline = [m["random_overlap_at"].get(str(k)) for m in items]
        baseline_mean = float(np.mean([v for v in baseline if v is not None])) if baseline else float("nan")
        label = f"{Path(str(report['fts'][a])).name} vs {Path(str(report['fts'][b])).name}"
        ax = axes[row][0]
        if layers:
            _annotated_heatmap(ax, values, kinds, layers, 0.0, 1.0, "viridis", f"φ@{k}")
        ax.set_title(f"{label}: top-{k} left subspace overlap (random ≈ {baseline_mean:.2g})", fontsize=9)
        if cosine:
            values, kinds, layers = overlap_grid(items, "cosine")
            if layers:
                _annotated_heatmap(axes[row][1], values, kinds, layers, -1.0, 1.0, "RdBu_r", "cosine")
            axes[row][1].set_title(f"{label}: cos(vec ΔW_A, vec ΔW_B)", fontsize=9)
    return fig


def plot_trajectory(report: Mapping[str, Any], energy: float | None = None, k: int | None = None) -> Figure:
    """Each trajectory metric vs training step, one line per module type (mean over layers).

    ``report`` is :meth:`deltakit.analyses.trajectory.TrajectoryReport.to_dict`. Panels: relative ΔW,
    rank@energy, intruder dimensions (summed), φ@k with the final checkpoint.
    """
    energy_key = f"{energy if energy is not None else report['energy'][-1]:g}"
    k_key = str(k if k is not None else report["top"][0])
    steps = report["steps"]
    xs = steps if all(s is not None for s in steps) else list(range(len(steps)))
    panels = (("mean_rel_delta", r"$\|\Delta W\|_F / \|W\|_F$"), ("mean_rank_at", f"rank@{energy_key}"),
              ("intruders", f"intruder dimensions (ε = {report['epsilon']:g})"),
              ("mean_overlap_with_final", f"φ@{k_key} with the final ΔW"))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), layout="constrained")
    for kind, series in report["summary"]["by_module_type"].items():
        colour = MODULE_COLOURS.get(kind, "tab:gray")
        for ax, (key, _) in zip(axes, panels):
            values = [p[key] for p in series]
            if key == "mean_rank_at":
                values = [v[energy_key] for v in values]
            elif key == "mean_overlap_with_final":
                values = [v.get(k_key) for v in values]
            ax.plot(xs, [np.nan if v is None else v for v in values], "o-", ms=3, color=colour, label=kind)
    for ax, (_, title) in zip(axes, panels):
        ax.set(xlabel="step" if xs is steps else "checkpoint", title=title)
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
    axes[-1].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7, ncol=2)
    return fig


def plot_intruder_counts(report: Mapping[str, Any]) -> Figure:
    """Intruder dimensions per module type, one bar per ε, beside how many matrices of that type hold any.

    ``report`` is :meth:`deltakit.analyses.intruders.IntruderReport.to_dict`.
    """
    groups = report["summary"]["by_module_type"]
    kinds = list(groups)
    epsilons = [f"{e:g}" for e in report["epsilon"]]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(kinds) + 2.0), 3.2), layout="constrained")
    width = 0.8 / max(len(epsilons), 1)
    for i, eps in enumerate(epsilons):
        xs = np.arange(len(kinds)) + (i - (len(epsilons) - 1) / 2) * width
        ax.bar(xs, [groups[k]["intruders"][eps] for k in kinds], width, label=f"ε = {eps}")
    ax.set_xticks(range(len(kinds)), [f"{k}\n({groups[k]['count']})" for k in kinds])
    ax.set(ylabel="intruder dimensions", title=f"Intruder dimensions among the top {report['k']} vectors, "
                                               "by module type (matrices in brackets)")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_extraction(report: Mapping[str, Any]) -> Figure:
    """Rank and relative error of each extracted matrix, in the adapter's order (``ExtractReport.to_dict``)."""
    matrices = report["matrices"]
    xs = np.arange(len(matrices))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, 0.12 * len(matrices) + 3.0), 4.2),
                                      layout="constrained")
    colours = [MODULE_COLOURS.get(module_type(m["name"]), "tab:gray") for m in matrices]
    top.bar(xs, [m["rank"] for m in matrices], color=colours)
    top.set(ylabel="rank", title=f"{len(matrices)} changed matrices; overall relative error "
                                 f"{report['relative_error']:.4f}")
    top.title.set_fontsize(10)
    bottom.bar(xs, [m["rel_error"] for m in matrices], color=colours)
    bottom.set(ylabel=r"$\|\Delta W - BA\|_F / \|\Delta W\|_F$", xlabel="matrix (adapter order)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3, axis="y")
    return fig
