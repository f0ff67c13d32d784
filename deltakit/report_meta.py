"""What every report says about its run: one base for `rank`, `intruders`, `compare` and `trajectory`.

A report carries its inputs (``base``, the fine-tunes ``fts``), where and how it was computed
(``device``, ``method``, ``precision``, ``elapsed_s``) and what it left out (``skipped``; a
pair report also ``only_base`` / ``only_ft``). :class:`ReportMeta` holds these once, writes
them to JSON (:meth:`ReportMeta.meta_dict`) and renders the header and footer lines every
table shares. It imports nothing from deltakit, so analyses, surgery and report.py can all
build on it without a cycle.

Example::

    @dataclass(kw_only=True)
    class MyReport(ReportMeta):
        matrices: list = field(default_factory=list)
        def to_dict(self): return self.report_dict({}, {"matrices": self.matrices}, {})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def skipped_line(skipped: list[dict[str, str]], shown: int = 5) -> str:
    """``skipped N: name (reason); ...`` with the first ``shown`` entries."""
    return (f"skipped {len(skipped)}: " + "; ".join(f"{s['name']} ({s['reason']})" for s in skipped[:shown])
            + (" ..." if len(skipped) > shown else ""))


def names_line(label: str, names: list[str], shown: int = 5) -> str:
    """``label (N): a, b, ...`` with the first ``shown`` names."""
    return f"{label} ({len(names)}): " + ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")


@dataclass(kw_only=True)
class ReportMeta:
    """Inputs, run and left-out entries of a report with several fine-tunes (compare, trajectory).

    ``fts``: the fine-tunes (or checkpoints) in the order given; ``skipped``: ``{"name",
    "reason"}`` per tensor left out. Reports fill ``skipped`` and ``elapsed_s`` as the run
    goes, so the base is a plain (not frozen) dataclass, as the reports built on it are.
    """

    base: str
    fts: list[str]
    device: str = "cpu"
    method: str = "gram"
    precision: str = "fp32"
    skipped: list[dict[str, str]] = field(default_factory=list)
    elapsed_s: float = 0.0

    # ---- JSON: the three groups in the order each report places them, and all of them at once

    def inputs_dict(self) -> dict[str, Any]:
        return {"base": self.base, "fts": list(self.fts)}

    def run_dict(self) -> dict[str, Any]:
        return {"device": self.device, "method": self.method, "precision": self.precision,
                "elapsed_s": round(self.elapsed_s, 3)}

    def left_out_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped)}

    def meta_dict(self) -> dict[str, Any]:
        """The JSON keys every report shares (docs/json.md, "Report metadata")."""
        return {**self.inputs_dict(), **self.run_dict(), **self.left_out_dict()}

    def report_dict(self, options: dict[str, Any], results: dict[str, Any], tail: dict[str, Any]) -> dict[str, Any]:
        """A report's JSON object: the metadata, then its ``options`` (``top``, ``energy``, ...),
        ``results`` (``matrices``, ...) and ``tail`` (``summary``, ...), in that order."""
        return {**self.meta_dict(), **options, **results, **tail}

    # ---- text

    def header_lines(self, label: str = "ft", each: bool = True) -> list[str]:
        """``base: ...`` then one line per fine-tune (``each``) or their count and the last; a blank line."""
        if not each:
            return [f"base: {self.base}", f"{len(self.fts)} {label}s, final: {self.fts[-1]}", ""]
        width = max(4, len(label) + 3)
        lines = [f"{'base:':<{width}} {self.base}"]
        lines += [f"{f'{label} {i}:' if len(self.fts) > 1 else f'{label}:':<{width}} {path}"
                  for i, path in enumerate(self.fts)]
        return lines + [""]

    def left_out_lines(self) -> list[str]:
        return [skipped_line(self.skipped)] if self.skipped else []

    def footer_lines(self, what: str) -> list[str]:
        """What was left out, then ``{what} in {precision} on {device}, {elapsed} s``."""
        return self.left_out_lines() + [f"{what} in {self.precision} on {self.device}, {self.elapsed_s:.2f} s"]


@dataclass(kw_only=True)
class PairReportMeta(ReportMeta):
    """A report on one base / fine-tune pair (rank, intruders): JSON ``ft`` (one path) instead of
    ``fts``, and the names found on one side only (``only_base``, ``only_ft``)."""

    only_base: list[str] = field(default_factory=list)
    only_ft: list[str] = field(default_factory=list)

    @property
    def ft(self) -> str:
        return self.fts[0]

    def inputs_dict(self) -> dict[str, Any]:
        return {"base": self.base, "ft": self.ft}

    def left_out_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped), "only_base": list(self.only_base), "only_ft": list(self.only_ft)}

    def report_dict(self, options: dict[str, Any], results: dict[str, Any], tail: dict[str, Any]) -> dict[str, Any]:
        """The order `rank --json` has always had: inputs, options, run, results, left-out, tail."""
        return {**self.inputs_dict(), **options, **self.run_dict(), **results, **self.left_out_dict(), **tail}

    def left_out_lines(self) -> list[str]:
        lines = super().left_out_lines()
        for label, names in (("only in base", self.only_base), ("only in fine-tune", self.only_ft)):
            if names:
                lines.append(names_line(label, names))
        return lines
