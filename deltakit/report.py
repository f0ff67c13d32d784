"""Tables for people and CSV for spreadsheets: `rank`, `intruders`, `compare` and `trajectory` reports.

Every report shares its header (base, fine-tunes) and footer (what was skipped, where and how it
ran) through :class:`~deltakit.analyses.meta.ReportMeta`."""

from __future__ import annotations

import csv
import io
from typing import Any, Sequence

from deltakit.analyses.meta import energy_key
from deltakit.analyses.rank_report import MatrixResult, RankReport
from deltakit.analyses.compare import CompareReport
from deltakit.analyses.intruders import Intruder, IntruderReport
from deltakit.analyses.trajectory import TrajectoryReport
from deltakit.lora.extraction_report import ExtractReport


class Table(str):
    """A plain-text table that keeps its headers and rows (cell values), so that a page can show it as a table."""

    headers: list[str]
    rows: list[list[Any]]
    align_left: int

    def __new__(cls, text: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], align_left: int) -> "Table":
        table = super().__new__(cls, text)
        table.headers, table.rows, table.align_left = list(headers), [list(r) for r in rows], align_left
        return table

    def cells(self) -> list[list[str]]:
        """The rows as the text shows each cell."""
        return [[_cell(v) for v in row] for row in self.rows]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align_left: int = 1) -> Table:
    """A plain-text table; the first ``align_left`` columns are left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < align_left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return Table("\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]]), headers, rows, align_left)


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


def _count_cell(m: MatrixResult) -> str | int:
    """The numerical rank, or ≥bound where the adaptive path only bounded it."""
    return m.rank if m.rank is not None else f"≥{m.lower_bounds.get('rank', 0)}"


def _effective_cell(m: MatrixResult) -> str:
    text = _cell(m.effective_rank)
    return f"{text}±{_cell(m.effective_rank_error)}" if m.effective_rank_error else text


def _rank_cell(m: MatrixResult, fraction: float) -> str:
    return f"{m.rank_at[fraction]}{NOISE_MARK if m.noise_dominated(fraction) else ''}"


def matrix_table(report: RankReport) -> str:
    """One row per matrix: size of the change, its rounding share, its ranks raw and of the signal."""
    return format_table(*matrix_rows(report))


def matrix_rows(report: RankReport) -> tuple[list[str], list[list[Any]]]:
    """:func:`matrix_table`'s headers and rows (cells as values: numbers, text, None)."""
    energies = report.energy
    headers = ["matrix", "shape", "rel ΔW", "σ₁", "rank", "stable", "eff.", "noise"]
    headers += [f"r@{energy_key(e)}" for e in energies] + [f"sig@{energy_key(e)}" for e in energies]
    headers += [f"rand@{energy_key(e)}" for e in energies]
    rows = []
    for m in report.matrices:
        name = m.name + (" [conv1d]" if m.layout == "conv1d" else "") + (f" [+{m.added_rows} rows]" if m.added_rows else "")
        rows.append([name, _shape(m.shape), m.rel_delta, m.spectral_norm, _count_cell(m), m.stable_rank, _effective_cell(m),
                     _percent(m.noise_share)]
                    + [_rank_cell(m, e) for e in energies] + [m.signal_rank_at.get(e) for e in energies]
                    + [m.random_rank_at[e] for e in energies])
    return headers, rows


def group_table(groups: dict[str, Any], label: str, energies: Sequence[float]) -> str:
    return format_table(*group_rows(groups, label, energies))


def group_rows(groups: dict[str, Any], label: str, energies: Sequence[float]) -> tuple[list[str], list[list[Any]]]:
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
    return headers, rows


def noise_note(report: RankReport, summary: dict[str, Any]) -> str | None:
    """One line on the matrices whose rank@X may be storage rounding, or None when there are none."""
    counts = summary["noise_dominated"]
    flagged = [(e, counts[energy_key(e)]) for e in report.energy if counts[energy_key(e)]]
    if not flagged:
        return None
    parts = ", ".join(f"{n} at r@{energy_key(e)}" for e, n in flagged)
    return (f"{NOISE_MARK} storage rounding may account for more than 1 − X of ‖ΔW‖² ({parts}): "
            "that r@X measures rounding; sig@X is the rank of the update with rounding taken out (- where it cannot be read)")


def adaptive_note(report: RankReport) -> str | None:
    """One line on the adaptive path: how many spectra were partial, and what that leaves open."""
    partial = [m for m in report.matrices if m.spectrum_method.startswith("adaptive")]
    fallback = [m for m in report.matrices if m.spectrum_fallback]
    if not partial and not fallback:
        return None
    unsettled = sum(1 for m in partial if m.rank is None)
    text = (f"{len(partial)} of {len(report.matrices)} spectra computed in part (adaptive): rank@X, stable rank exact, "
            "effective rank ± its estimated error")
    if unsettled:
        text += f"; {unsettled} numerical ranks shown as ≥bound"
    if fallback:
        text += f"; {len(fallback)} ran whole ({fallback[0].spectrum_fallback})"
    return text + "; --full-spectrum computes every value"


def expert_table(groups: dict[str, Any], energies: Sequence[float]) -> str:
    """One row per MoE expert tensor: how many of its experts changed, and their mean ranks."""
    return format_table(*expert_rows(groups, energies))


def expert_rows(groups: dict[str, Any], energies: Sequence[float]) -> tuple[list[str], list[list[Any]]]:
    headers = ["tensor", "experts", "changed", "mean rel ΔW", "mean rank"]
    headers += [f"mean r@{energy_key(e)}" for e in energies]
    rows = [[name, g["count"], g["changed"], g["mean_rel_delta"], g["mean_rank"]]
            + [g["mean_rank_at"][energy_key(e)] for e in energies] for name, g in groups.items()]
    return headers, rows


def render_report(report: RankReport, per_matrix: bool = True) -> str:
    """The human-readable output of `deltakit rank`: ``print(render_report(deltakit.rank(base, ft)))`` shows
    in Python what the command prints."""
    return "\n".join(rank_blocks(report, per_matrix))


def rank_blocks(report: RankReport, per_matrix: bool = True) -> list[str]:
    """The lines of :func:`render_report`, its tables as :class:`Table`."""
    summary = report.summary()
    parts = report.header_lines("ft")
    if per_matrix and report.matrices:
        parts += [matrix_table(report), ""]
    if report.matrices:
        parts += ["by module type", group_table(summary["by_module_type"], "type", report.energy), ""]
        if len(summary["by_layer"]) > 1:
            parts += ["by depth", group_table(summary["by_layer"], "layer", report.energy), ""]
        if summary.get("by_tensor"):
            parts += ["by expert tensor (all experts)", expert_table(summary["by_tensor"], report.energy), ""]
    note = noise_note(report, summary)
    if note is not None:
        parts.append(note)
    adaptive_line = adaptive_note(report)
    if adaptive_line is not None:
        parts.append(adaptive_line)
    parts += [f"note: {m.name}: {m.note}" for m in report.matrices if m.note]
    if summary["refined_matrices"]:
        parts.append(f"{summary['refined_matrices']} of {summary['matrices']} spectra refined (float64) where the "
                     "fp32 Gram path could not resolve the data's floor: rank is exact there")
    changed = [v for v in report.vectors if v.changed]
    parts.append(
        f"{summary['changed_matrices']} of {summary['matrices']} matrices changed; "
        f"{len(changed)} of {len(report.vectors)} 1-D tensors (norms, biases) changed"
    )
    adaptive = any(m.spectrum_method.startswith("adaptive") for m in report.matrices)
    what = f"adaptive spectra ({report.method} where whole)" if adaptive else f"{report.method} spectra"
    return parts + report.footer_lines(what)


CSV_FIELDS = ["name", "shape", "dtype", "module_type", "layer", "layout", "added_rows", "delta_fro", "rel_delta",
              "spectral_norm", "rank", "noise_floor", "stable_rank", "effective_rank", "noise_share", "unchanged_fraction",
              "signal_effective_rank", "spectrum_method", "effective_rank_error"]


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


def _pair_label(fts: Sequence[str], a: int, b: int) -> str:
    return f"{a} vs {b}" if len(fts) > 2 else "A vs B"


def compare_group_table(groups: dict[str, Any], label: str, top: Sequence[str]) -> str:
    """Mean cosine, norm ratio and left/right overlaps (with the random baseline) per group."""
    headers = [label, "matrices", "cosine", "‖ΔA‖/‖ΔB‖"]
    headers += [f"φ@{k}" for k in top] + [f"rand@{k}" for k in top] + [f"right φ@{k}" for k in top]
    rows = [[name, g["count"], g["mean_cosine"], g["mean_norm_ratio"]]
            + [g["mean_overlap_at"].get(k) for k in top] + [g["mean_random_overlap_at"].get(k) for k in top]
            + [g["mean_right_overlap_at"].get(k) for k in top]
            for name, g in groups.items()]
    return format_table(headers, rows)


def render_compare(report: CompareReport, per_matrix: bool = False) -> str:
    """The human-readable output of `deltakit compare`."""
    return "\n".join(compare_blocks(report, per_matrix))


def compare_blocks(report: CompareReport, per_matrix: bool = False) -> list[str]:
    """The lines of :func:`render_compare`, its tables as :class:`Table`."""
    parts = report.header_lines("ft")
    summary = report.summary()
    for entry in summary["pairs"]:
        a, b = entry["a"], entry["b"]
        top = list(entry["mean_overlap_at"])
        title = f"fine-tune {a} vs {b}" if len(report.fts) > 2 else "fine-tune A (ft 0) vs B (ft 1)"
        parts += [title, ""]
        if per_matrix:
            headers = ["matrix", "shape", "cosine", "‖ΔA‖/‖ΔB‖"] + [f"φ@{k}" for k in top] + [f"rand@{k}" for k in top]
            rows = [[m.name, _shape(m.shape), m.cosine, m.norm_ratio]
                    + [m.to_dict()["overlap_at"].get(k) for k in top]
                    + [m.to_dict()["random_overlap_at"].get(k) for k in top]
                    for m in report.of_pair(a, b)]
            parts += [format_table(headers, rows), ""]
        parts += ["by module type", compare_group_table(entry["by_module_type"], "type", top), ""]
        if len(entry["by_layer"]) > 1:
            parts += ["by depth", compare_group_table(entry["by_layer"], "layer", top), ""]
        parts.append(f"overall: cosine {_cell(entry['mean_cosine'])}, "
                     + ", ".join(f"φ@{k} {_cell(entry['mean_overlap_at'][k])} (random {_cell(entry['mean_random_overlap_at'][k])})"
                                 for k in top))
        parts.append("")
    parts.append(f"{summary['matrices']} matrices in every fine-tune; φ@k = ‖U_Aᵀ U_B‖²_F / min(i, j) of the top-k left "
                 "singular subspaces, i and j ≤ k the directions each ΔW has there (1: one inside the other; "
                 "rand: random subspaces, max(i, j)/m)")
    return parts + report.footer_lines(f"{report.method} top-k SVD")


def render_trajectory(report: TrajectoryReport) -> str:
    """The human-readable output of `deltakit trajectory`."""
    return "\n".join(trajectory_blocks(report))


def trajectory_blocks(report: TrajectoryReport) -> list[str]:
    """The lines of :func:`render_trajectory`, its tables as :class:`Table`."""
    parts = report.header_lines("checkpoint", each=False)
    summary = report.summary()
    energies = [f"{e:g}" for e in report.energy]
    top = [str(k) for k in report.top]

    def table(series: list[dict[str, Any]]) -> str:
        headers = ["step", "checkpoint", "rel ΔW", "rank"] + [f"r@{e}" for e in energies]
        headers += [f"intruders (ε={report.epsilon:g})"] + [f"φ@{k} final" for k in top]
        rows = [[p["step"], p["checkpoint"], p["mean_rel_delta"], p["mean_rank"]]
                + [p["mean_rank_at"][e] for e in energies] + [p["intruders"]]
                + [p["mean_overlap_with_final"].get(k) for k in top] for p in series]
        return format_table(headers, rows, align_left=2)

    parts += [f"all {len(report.matrices)} matrices (means; intruders summed)", table(summary["overall"]), ""]
    for name, series in summary["by_module_type"].items():
        parts += [f"{name} ({series[0]['count']} matrices)", table(series), ""]
    return parts + report.footer_lines(f"{report.method} spectra")


def _ranks(items: list[Intruder]) -> str:
    return ",".join(str(d.rank) for d in items) or "-"


def render_intruders(report: IntruderReport) -> str:
    """The human-readable output of `deltakit intruders`: per matrix, per module type, totals."""
    return "\n".join(intruders_blocks(report))


def intruders_blocks(report: IntruderReport) -> list[str]:
    """The lines of :func:`render_intruders`, its tables as :class:`Table`."""
    eps = report.epsilon
    parts = report.header_lines("ft")
    headers = ["matrix", "shape", "σ₁ ft", "σ₁ base", "min sim"] + [f"intr@{energy_key(e)}" for e in eps]
    headers.append(f"ranks@{energy_key(eps[0])}")
    rows = []
    for m in report.matrices:
        name = m.name + (" [conv1d]" if m.layout == "conv1d" else "")
        rows.append([name, _shape(m.shape), m.singular_values[0] if m.singular_values else 0.0,
                     m.base_spectral_norm, min(m.similarities, default=1.0)]
                    + [m.count(e) for e in eps] + [_ranks(m.intruders[eps[0]])])
    if rows:
        parts += [format_table(headers, rows), ""]
    summary = report.summary()
    group_headers = ["type", "matrices"] + [f"with@{energy_key(e)}" for e in eps]
    group_headers += [f"intr@{energy_key(e)}" for e in eps] + ["mean min sim"]
    group_rows = [[name, g["count"]] + [g["matrices_with_intruders"][energy_key(e)] for e in eps]
                  + [g["intruders"][energy_key(e)] for e in eps] + [g["mean_min_similarity"]]
                  for name, g in summary["by_module_type"].items()]
    if group_rows:
        parts += ["by module type", format_table(group_headers, group_rows), ""]
    for e in eps:
        total = summary["intruders"][energy_key(e)]
        parts.append(f"ε={energy_key(e)}: {total} intruder dimension{'' if total == 1 else 's'} in "
                     f"{summary['matrices_with_intruders'][energy_key(e)]} of {summary['matrices']} matrices "
                     f"(top k={report.k} left singular vectors of W_ft vs all of W_base)")
    if report.scaling:
        s = report.scaling
        done = sum(len(m.ranks) for m in s.matrices)
        parts.append(f"scaled {done} intruder singular values (ε={energy_key(s.epsilon)}) in {len(s.matrices)} "
                     f"matrices by λ={s.scale:g}; wrote {s.tensors_written} tensors to {s.output}")
        if s.dequantized:
            parts.append(f"note: {s.dequantized}")
    below = summary["below_rounding"]
    if below:
        parts.append(f"{below} matri{'x' if below == 1 else 'ces'} changed by no more than storage rounding: "
                     "their directions were not judged (below_rounding in --json)")
    return parts + report.footer_lines(report.method)


def render_extract(report: ExtractReport) -> str:
    """The human-readable output of `deltakit extract`: per matrix its rank, kept energy and error; totals."""
    return "\n".join(extract_blocks(report))


def extract_blocks(report: ExtractReport) -> list[str]:
    """The lines of :func:`render_extract`, its table as :class:`Table`; with calibration an output-error column
    and the fidelity line."""
    width = max((len(m.name) for m in report.matrices), default=10)
    calibrated = report.calibration is not None
    headers = ["matrix", "shape", "rank", "kept energy", "rel. error"] + (["output err."] if calibrated else [])
    lines = [f"{'matrix':<{width}}  {'shape':>11}  {'rank':>5}  {'kept energy':>11}  {'rel. error':>10}"
             + (f"  {'output err.':>11}" if calibrated else "")]
    rows = []
    for m in report.matrices:
        shape = f"{m.shape[0]}×{m.shape[1]}"
        output = [format_number(m.output_error)] if calibrated else []
        lines.append(f"{m.name:<{width}}  {shape:>11}  {m.rank:>5}  {m.kept_energy:>11.4f}  {m.rel_error:>10.4f}"
                     + "".join(f"  {value:>11}" for value in output))
        rows.append([m.name, shape, m.rank, f"{m.kept_energy:.4f}", f"{m.rel_error:.4f}", *output])
    experts = report.expert_parameters
    modules = sum(m.rank > 0 and "[" not in m.module for m in report.matrices)  # an expert slice is module[e]
    parts = f"{modules} LoRA modules" + (f" and {len(experts)} fused expert tensors (target_parameters)" if experts else "")
    out = [Table("\n".join(lines), headers, rows, 1), "",
           f"adapter written to {report.adapter}: {parts}, {report.parameters:,} parameters, overall relative error "
           f"{report.relative_error:.4f}; {len(report.unchanged)} unchanged matrices skipped"]
    if calibrated:
        out.append(fidelity_line(report.fidelity, report.mean_output_error, report.calibration["activation_aware"]))
    rank_zero = sum(1 for m in report.matrices if m.rank == 0)
    if rank_zero:
        out.append(f"{rank_zero} changed matri{'x' if rank_zero == 1 else 'ces'} got rank 0 (no LoRA module: "
                   f"{'the budget went elsewhere' if report.selection.get('mode') == 'budget' else 'below the threshold'})")
    if report.carried_whole:
        out.append(f"carried whole: {len(report.carried_whole)} tensors ({report.whole_parameters:,} parameters)")
    return out


def format_number(value: float | None) -> str:
    """A reported error with four decimals; '-' where there is none."""
    return "-" if value is None else f"{value:.4f}"


def fidelity_line(fidelity: dict[str, Any], mean_output_error: float | None, activation_aware: bool | None = None) -> str:
    """One line: the adapter's KL (or hidden-state error) beside the base's, and the mean output error."""
    tokens = fidelity["tokens"]
    if "kl" in fidelity:
        text = (f"fidelity on {tokens:,} calibration tokens: KL(ft ‖ base + adapter) {fidelity['kl']:.4g} "
                f"(KL(ft ‖ base) {fidelity['kl_base']:.4g})")
    else:
        text = (f"fidelity on {tokens:,} calibration tokens: final hidden states' relative error "
                f"{fidelity['hidden_error']:.4g} (base: {fidelity['hidden_error_base']:.4g})")
    if mean_output_error is not None:
        text += f"; mean output error {mean_output_error:.4f}"
    if activation_aware:
        text += " (activation-aware factors)"
    return text


def render_check(report: Any) -> str:
    """The human-readable output of `deltakit check`: per matrix its weight and output error; the fidelity line."""
    return "\n".join(check_blocks(report))


def check_blocks(report: Any) -> list[str]:
    """The lines of :func:`render_check`, its table as :class:`Table`."""
    width = max((len(m.name) for m in report.matrices), default=10)
    lines = [f"{'matrix':<{width}}  {'shape':>11}  {'rel. error':>10}  {'output err.':>11}"]
    rows = []
    for m in report.matrices:
        shape = f"{m.shape[0]}×{m.shape[1]}"
        lines.append(f"{m.name:<{width}}  {shape:>11}  {format_number(m.rel_error):>10}  "
                     f"{format_number(m.output_error):>11}")
        rows.append([m.name, shape, format_number(m.rel_error), format_number(m.output_error)])
    return [Table("\n".join(lines), ["matrix", "shape", "rel. error", "output err."], rows, 1), "",
            fidelity_line(report.fidelity, report.mean_output_error)]
