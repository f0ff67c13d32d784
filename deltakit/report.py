"""Tables for people and CSV for spreadsheets, from a :class:`~deltakit.analysis.RankReport`."""

from __future__ import annotations

import csv
import io
from typing import Any, Sequence

from deltakit.analysis import MatrixResult, RankReport, energy_key


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align_left: int = 1) -> str:
    """A plain-text table; the first ``align_left`` columns are left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < align_left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000 or abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(d) for d in shape)


NOISE_MARK = "*"  # after a rank@X that storage rounding may account for


def _percent(share: float) -> str:
    return "0%" if share == 0 else ("<0.1%" if share < 1e-3 else f"{100 * share:.1f}%")


def _rank_cell(m: MatrixResult, fraction: float) -> str:
    return f"{m.rank_at[fraction]}{NOISE_MARK if m.noise_dominated(fraction) else ''}"


def matrix_table(report: RankReport) -> str:
    """One row per matrix: size of the change, its rounding share, its ranks raw and of the signal."""
    energies = report.energy
    headers = ["matrix", "shape", "rel ΔW", "σ₁", "rank", "stable", "eff.", "noise"]
    headers += [f"r@{energy_key(e)}" for e in energies] + [f"sig@{energy_key(e)}" for e in energies]
    headers += [f"rand@{energy_key(e)}" for e in energies]
    rows = []
    for m in report.matrices:
        name = m.name + (" [conv1d]" if m.layout == "conv1d" else "") + (f" [+{m.added_rows} rows]" if m.added_rows else "")
        rows.append([name, _shape(m.shape), m.rel_delta, m.spectral_norm, m.rank, m.stable_rank, m.effective_rank,
                     _percent(m.noise_share)]
                    + [_rank_cell(m, e) for e in energies] + [m.signal_rank_at.get(e) for e in energies]
                    + [m.random_rank_at[e] for e in energies])
    return format_table(headers, rows)


def group_table(groups: dict[str, Any], label: str, energies: Sequence[float]) -> str:
    headers = [label, "matrices", "mean rel ΔW", "mean rank", "noise"]
    headers += [f"mean r@{energy_key(e)}" for e in energies] + [f"med sig@{energy_key(e)}" for e in energies]
    headers += [f"rand@{energy_key(e)}" for e in energies]
    rows = [
        [name, g["count"], g["mean_rel_delta"], g["mean_rank"], _percent(g["mean_noise_share"])]
        + [g["mean_rank_at"][energy_key(e)] for e in energies]
        + [g["median_signal_rank_at"][energy_key(e)] for e in energies]
        + [g["mean_random_rank_at"][energy_key(e)] for e in energies]
        for name, g in groups.items()
    ]
    return format_table(headers, rows)


def noise_note(report: RankReport, summary: dict[str, Any]) -> str | None:
    """One line on the matrices whose rank@X may be storage rounding, or None when there are none."""
    counts = summary["noise_dominated"]
    flagged = [(e, counts[energy_key(e)]) for e in report.energy if counts[energy_key(e)]]
    if not flagged:
        return None
    parts = ", ".join(f"{n} at r@{energy_key(e)}" for e, n in flagged)
    return (f"{NOISE_MARK} storage rounding may account for more than 1 − X of ‖ΔW‖² ({parts}): "
            "that r@X measures rounding; sig@X is the rank of the update with rounding taken out (- where it cannot be read)")


def render_report(report: RankReport, per_matrix: bool = True) -> str:
    """The human-readable output of `deltakit rank`."""
    summary = report.summary()
    parts = [f"base: {report.base}", f"ft:   {report.ft}", ""]
    if per_matrix and report.matrices:
        parts += [matrix_table(report), ""]
    if report.matrices:
        parts += ["by module type", group_table(summary["by_module_type"], "type", report.energy), ""]
        if len(summary["by_layer"]) > 1:
            parts += ["by depth", group_table(summary["by_layer"], "layer", report.energy), ""]
    note = noise_note(report, summary)
    if note is not None:
        parts.append(note)
    changed = [v for v in report.vectors if v.changed]
    parts.append(
        f"{summary['changed_matrices']} of {summary['matrices']} matrices changed; "
        f"{len(changed)} of {len(report.vectors)} 1-D tensors (norms, biases) changed"
    )
    if report.skipped:
        parts.append(f"skipped {len(report.skipped)}: " + "; ".join(f"{s['name']} ({s['reason']})" for s in report.skipped[:5])
                     + (" ..." if len(report.skipped) > 5 else ""))
    for label, names in (("only in base", report.only_base), ("only in fine-tune", report.only_ft)):
        if names:
            parts.append(f"{label} ({len(names)}): " + ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
    parts.append(f"{report.method} spectra in {report.precision} on {report.device}, {report.elapsed_s:.2f} s")
    return "\n".join(parts)


CSV_FIELDS = ["name", "shape", "dtype", "module_type", "layer", "layout", "added_rows", "delta_fro", "rel_delta",
              "spectral_norm", "rank", "noise_floor", "stable_rank", "effective_rank", "noise_share", "unchanged_fraction",
              "signal_effective_rank", "spectrum_method"]


def report_csv(report: RankReport) -> str:
    """One CSV row per matrix, with rank_at / random_rank_at columns per energy fraction."""
    buffer = io.StringIO()
    energy_cols = [f"rank_at_{energy_key(e)}" for e in report.energy]
    random_cols = [f"random_rank_at_{energy_key(e)}" for e in report.energy]
    signal_cols = [f"signal_rank_at_{energy_key(e)}" for e in report.energy]
    writer = csv.writer(buffer)
    writer.writerow(CSV_FIELDS + energy_cols + random_cols + signal_cols)
    for m in report.matrices:
        row = m.to_dict()
        row["shape"] = "x".join(str(d) for d in m.shape)
        writer.writerow([row[f] for f in CSV_FIELDS] + [m.rank_at[e] for e in report.energy]
                        + [m.random_rank_at[e] for e in report.energy]
                        + ["" if m.signal_rank_at.get(e) is None else m.signal_rank_at[e] for e in report.energy])
    return buffer.getvalue()
