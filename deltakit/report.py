"""Tables for people and CSV for spreadsheets, from a :class:`~deltakit.analysis.RankReport`."""

from __future__ import annotations

import csv
import io
from typing import Any, Sequence

from deltakit.analysis import RankReport, energy_key


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


def matrix_table(report: RankReport) -> str:
    """One row per matrix: size of the change and its ranks."""
    energies = report.energy
    headers = ["matrix", "shape", "rel ΔW", "σ₁", "rank", "stable", "eff."]
    headers += [f"r@{energy_key(e)}" for e in energies] + [f"rand@{energy_key(e)}" for e in energies]
    rows = []
    for m in report.matrices:
        name = m.name + (" [conv1d]" if m.layout == "conv1d" else "") + (f" [+{m.added_rows} rows]" if m.added_rows else "")
        rows.append([name, _shape(m.shape), m.rel_delta, m.spectral_norm, m.rank, m.stable_rank, m.effective_rank]
                    + [m.rank_at[e] for e in energies] + [m.random_rank_at[e] for e in energies])
    return format_table(headers, rows)


def group_table(groups: dict[str, Any], label: str, energies: Sequence[float]) -> str:
    headers = [label, "matrices", "mean rel ΔW", "mean rank"]
    headers += [f"mean r@{energy_key(e)}" for e in energies] + [f"rand@{energy_key(e)}" for e in energies]
    rows = [
        [name, g["count"], g["mean_rel_delta"], g["mean_rank"]]
        + [g["mean_rank_at"][energy_key(e)] for e in energies]
        + [g["mean_random_rank_at"][energy_key(e)] for e in energies]
        for name, g in groups.items()
    ]
    return format_table(headers, rows)


def expert_table(groups: dict[str, Any], energies: Sequence[float]) -> str:
    """One row per MoE expert tensor: how many of its experts changed, and their mean ranks."""
    headers = ["tensor", "experts", "changed", "mean rel ΔW", "mean rank"]
    headers += [f"mean r@{energy_key(e)}" for e in energies]
    rows = [[name, g["count"], g["changed"], g["mean_rel_delta"], g["mean_rank"]]
            + [g["mean_rank_at"][energy_key(e)] for e in energies] for name, g in groups.items()]
    return format_table(headers, rows)


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
        if summary.get("by_tensor"):
            parts += ["by expert tensor (all experts)", expert_table(summary["by_tensor"], report.energy), ""]
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
              "spectral_norm", "rank", "noise_floor", "stable_rank", "effective_rank"]


def report_csv(report: RankReport) -> str:
    """One CSV row per matrix, with rank_at / random_rank_at columns per energy fraction."""
    buffer = io.StringIO()
    energy_cols = [f"rank_at_{energy_key(e)}" for e in report.energy]
    random_cols = [f"random_rank_at_{energy_key(e)}" for e in report.energy]
    writer = csv.writer(buffer)
    writer.writerow(CSV_FIELDS + energy_cols + random_cols)
    for m in report.matrices:
        row = m.to_dict()
        row["shape"] = "x".join(str(d) for d in m.shape)
        writer.writerow([row[f] for f in CSV_FIELDS] + [m.rank_at[e] for e in report.energy]
                        + [m.random_rank_at[e] for e in report.energy])
    return buffer.getvalue()
