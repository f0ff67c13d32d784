"""A report as one self-contained HTML page: its tables, its figures, the command line and the versions.

:func:`report_page` takes any report of `rank`, `intruders`, `compare`, `trajectory`, `extract` or `check`
and returns the page as a string. The page loads nothing: figures are PNG files embedded as
``data:`` URIs, the style sheet is inline, there is no script. Its tables are the ones the
command prints (:mod:`deltakit.report`), as HTML tables whose numeric columns align right, so
the page and the terminal never disagree. The same HTML, without the page around it, is what
a report shows in a notebook (:func:`report_fragment`, used by ``_repr_html_``).

Example::

    report = deltakit.rank("base", "ft")
    Path("report.html").write_text(report_page(report, command=["deltakit", "rank", "base", "ft"]))
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import platform
import shlex
import sys
from typing import Any, Sequence

from deltakit.analyses.compare import CompareReport
from deltakit.analyses.intruders import IntruderReport
from deltakit.analyses.meta import register_display
from deltakit.analyses.rank_report import RankReport
from deltakit.analyses.trajectory import TrajectoryReport
from deltakit.lora.extraction_report import ExtractReport
from deltakit.lora.fidelity import CheckReport
from deltakit.report import (
    Table, check_blocks, compare_blocks, extract_blocks, intruders_blocks, rank_blocks, trajectory_blocks,
)
from deltakit.version import __version__

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:80em;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.1em;margin:1.6em 0 .4em}
table{border-collapse:collapse;margin:.4em 0 1em;font-variant-numeric:tabular-nums}
th,td{padding:.2em .7em;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}
th{background:#f3f3f3;position:sticky;top:0}td.num,th.num{text-align:right}
tr:hover td{background:#fafae8}figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
.meta{color:#555}.meta code{background:#f6f6f6;padding:.1em .3em}p.note{color:#444}
.scroll{overflow-x:auto}
"""

TITLES = {RankReport: "rank", IntruderReport: "intruders", CompareReport: "compare", TrajectoryReport: "trajectory",
          ExtractReport: "extract", CheckReport: "check"}


def report_page(report: Any, command: Sequence[str] | None = None, figures: bool = True) -> str:
    """The whole page: title, inputs, the command line and versions, the report's tables and figures."""
    name = _kind(report)
    title = f"deltakit {name}: {_inputs(report)}"
    meta = [f"<p class='meta'>deltakit {html.escape(__version__)}, {html.escape(_versions())}; "
            f"written {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}</p>"]
    if command:
        meta.append(f"<p class='meta'>command: <code>{html.escape(shlex.join(list(command)))}</code></p>")
    body = report_fragment(report, figures=figures)
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(meta)
            + "\n" + body + "\n</body></html>\n")


def report_fragment(report: Any, figures: bool = True) -> str:
    """The report's tables (and with ``figures`` its figures) as HTML, without the page around them."""
    parts = [_figure_html(caption, png) for caption, png in figures_of(report)] if figures else []
    return "\n".join(parts + [_blocks_html(blocks_of(report))])


def blocks_of(report: Any) -> list[str]:
    """The lines and :class:`~deltakit.report.Table` s the command prints for ``report``."""
    if isinstance(report, RankReport):
        return rank_blocks(report)
    if isinstance(report, IntruderReport):
        return intruders_blocks(report)
    if isinstance(report, CompareReport):
        return compare_blocks(report, per_matrix=True)
    if isinstance(report, TrajectoryReport):
        return trajectory_blocks(report)
    if isinstance(report, ExtractReport):
        return extract_blocks(report)
    if isinstance(report, CheckReport):
        return check_blocks(report)
    raise TypeError(f"no page for {type(report).__name__}")


def _kind(report: Any) -> str:
    return next((name for cls, name in TITLES.items() if isinstance(report, cls)), type(report).__name__)


def _inputs(report: Any) -> str:
    fts = getattr(report, "fts", None) or [getattr(report, "ft", "")]
    return f"{report.base} → {', '.join(str(f) for f in fts)}" if len(fts) <= 3 else f"{report.base} → {len(fts)} models"


def _versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    for module in ("torch", "numpy", "safetensors"):
        loaded = sys.modules.get(module)
        if loaded is not None and getattr(loaded, "__version__", None):
            parts.append(f"{module} {loaded.__version__}")
    return ", ".join(parts) + f", {platform.system()} {platform.machine()}"


def _blocks_html(blocks: list[str]) -> str:
    """Lines become paragraphs; a line right before a table becomes its heading."""
    out: list[str] = []
    for index, block in enumerate(blocks):
        if isinstance(block, Table):
            out.append(table_html(block))
        elif not block.strip():
            continue
        elif index + 1 < len(blocks) and isinstance(blocks[index + 1], Table):
            out.append(f"<h2>{html.escape(block)}</h2>")
        else:
            out.append(f"<p class='note'>{html.escape(block)}</p>")
    return "\n".join(out)


def table_html(table: Table) -> str:
    """One ``<table>``: a header row, then a row per entry; columns past ``align_left`` are numeric (right)."""
    def cell(tag: str, text: str, column: int) -> str:
        kind = " class='num'" if column >= table.align_left else ""
        return f"<{tag}{kind}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", str(h), i) for i, h in enumerate(table.headers))
    rows = "\n".join("<tr>" + "".join(cell("td", c, i) for i, c in enumerate(row)) + "</tr>" for row in table.cells())
    return f"<div class='scroll'><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody></table></div>"


def _figure_html(caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def figures_of(report: Any) -> list[tuple[str, bytes]]:
    """(caption, PNG bytes) of each figure the page shows for ``report``; none where there is nothing to draw."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")  # files only
    from deltakit import plot

    found: list[tuple[str, Any]] = []
    if isinstance(report, RankReport) and report.matrices:
        if report.spectra:
            found.append(("energy curves, rank by depth, LoRA error against rank",
                          plot.plot_overview(report.spectra, report.spectra_info(), energy=report.energy[-1])))
        else:
            found.append((f"rank at {report.energy[-1]:g} of the energy by layer and module type",
                          plot.plot_rank_heatmap(None, report.spectra_info(), energy=report.energy[-1]).figure))
    elif isinstance(report, CompareReport) and report.matrices:
        found.append(("φ@k and cosine by layer and module type", plot.plot_overlap_heatmap(report.to_dict())))
    elif isinstance(report, TrajectoryReport) and report.matrices:
        found.append(("each metric against the step, by module type", plot.plot_trajectory(report.to_dict())))
    elif isinstance(report, IntruderReport) and report.matrices:
        found.append(("intruder dimensions by module type", plot.plot_intruder_counts(report.to_dict())))
    elif isinstance(report, ExtractReport) and report.matrices:
        found.append(("rank and relative error of each matrix", plot.plot_extraction(report.to_dict())))
    return [(caption, _png(figure)) for caption, figure in found]


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(figure)
    return buffer.getvalue()


def report_text(report: Any) -> str:
    """What the command prints for ``report`` (``print(report)`` shows it)."""
    return "\n".join(blocks_of(report))


def notebook_html(report: Any) -> str:
    """A report in a notebook: its tables, as the page shows them, without figures (they take seconds)."""
    return report_fragment(report, figures=False)


register_display(report_text, notebook_html)
