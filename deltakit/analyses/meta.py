"""What every report says about its run: one base for `rank`, `intruders`, `compare` and `trajectory`.

A report carries its inputs (``base``, the fine-tunes ``fts``), where and how it was computed
(``device``, ``method``, ``precision``, ``elapsed_s``) and what it left out (``skipped``; a
pair report also ``only_base`` / ``only_ft``). :class:`ReportMeta` holds these once, writes
them to JSON (:meth:`ReportMeta.meta_dict`) and renders the header and footer lines every
table shares. Beside it: the checks of the fractions reports take, and the groupings their
summaries share (by module type, by layer, by tensor).

Example::

    @dataclass(kw_only=True)
    class MyReport(ReportMeta):
        matrices: list = field(default_factory=list)
        def to_dict(self): return self.report_dict({}, {"matrices": self.matrices}, {})
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np

from deltakit.errors import DeltakitError
from deltakit.pairing import MODULE_ORDER


def skipped_line(skipped: list[dict[str, str]], shown: int = 5) -> str:
    """``skipped N: name (reason); ...`` with the first ``shown`` entries."""
    return (f"skipped {len(skipped)}: " + "; ".join(f"{s['name']} ({s['reason']})" for s in skipped[:shown])
            + (" ..." if len(skipped) > shown else ""))


def names_line(label: str, names: list[str], shown: int = 5) -> str:
    """``label (N): a, b, ...`` with the first ``shown`` names."""
    return f"{label} ({len(names)}): " + ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")


_DISPLAY: dict[str, Callable[[Any], str]] = {}


def register_display(text: Callable[[Any], str], html: Callable[[Any], str]) -> None:
    """How reports show themselves: ``text(report)`` for ``str()`` / ``print``, ``html(report)`` in a notebook.

    The renderers live in the layers above (deltakit.report, deltakit.page), which register them
    when imported (``import deltakit`` does); until then a report shows its short ``repr``.
    """
    _DISPLAY.update(text=text, html=html)


class Displayed:
    """A report that a notebook shows as tables (``_repr_html_``) and ``print`` as the command's text."""

    def __repr__(self) -> str:
        fts = getattr(self, "fts", None) or [getattr(self, "ft", "?")]
        matrices = getattr(self, "matrices", [])
        return (f"<{type(self).__name__} {getattr(self, 'base', '?')} -> {', '.join(map(str, fts))}: "
                f"{len(matrices)} matrices; print() it for the tables, .to_dict() for the JSON>")

    def __str__(self) -> str:
        return _DISPLAY["text"](self) if "text" in _DISPLAY else repr(self)

    def _repr_html_(self) -> str | None:
        return _DISPLAY["html"](self) if "html" in _DISPLAY else None


@dataclass(kw_only=True, repr=False)
class ReportMeta(Displayed):
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


@dataclass(kw_only=True, repr=False)
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


# ---------------------------------------------------------------- options and groupings reports share

def energy_key(fraction: float) -> str:
    """JSON key of an energy fraction: 0.9 -> "0.9"."""
    return f"{fraction:g}"


def check_fractions(values: float | Sequence[float], label: str, hint: str, missing: str) -> tuple[float, ...]:
    """Fractions each in (0, 1], at least one, duplicates dropped, order kept; else a DeltakitError.
    One number is a sequence of one (``energy=0.9`` as ``energy=(0.9,)``)."""
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        fractions = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise DeltakitError(f"{label} must be a number or a sequence of numbers, got {values!r}; {hint}") from None
    if not fractions:
        raise DeltakitError(f"give at least one {missing}")
    for value in fractions:
        if math.isnan(value) or not 0.0 < value <= 1.0:
            raise DeltakitError(f"{label} {value:g} is outside (0, 1]; {hint}")
    return tuple(dict.fromkeys(fractions))


def check_energies(energy: float | Sequence[float]) -> tuple[float, ...]:
    """Validate energy fractions: each in (0, 1]; at least one; a number or a sequence of them."""
    return check_fractions(energy, "energy fraction", "use e.g. energy=0.9 (--energy 0.9)", "energy fraction")


def group_order(group: str) -> tuple[int, int, str]:
    """Layers numerically, module types in transformer order, anything else last."""
    if group.isdigit():
        return (0, int(group), "")
    return (1, MODULE_ORDER.index(group) if group in MODULE_ORDER else len(MODULE_ORDER), group)


T = TypeVar("T")


def _grouped(items: Iterable[T], key: Callable[[T], str]) -> dict[str, list[T]]:
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return {name: groups[name] for name in sorted(groups, key=group_order)}


def by_module_type(items: Iterable[T]) -> dict[str, list[T]]:
    """Per-matrix results grouped by ``module_type``, in transformer order (q, k, v, o, gate, ...)."""
    return _grouped(items, lambda m: m.module_type)  # type: ignore[attr-defined]


def by_layer(items: Iterable[T]) -> dict[str, list[T]]:
    """Per-matrix results grouped by layer index ("0", "1", ..., "none" for embeddings and heads)."""
    return _grouped(items, lambda m: "none" if m.layer is None else str(m.layer))  # type: ignore[attr-defined]


def median_known(values: Iterable[float | None]) -> float | None:
    """Median of the values that are known (not None); None when none is."""
    return of_known(values, np.median)


def of_known(values: Iterable[float | None], reduce: Callable[[list[float]], Any]) -> float | None:
    """``reduce`` (np.mean, np.median) of the values that are not None; None when there are none."""
    known = [v for v in values if v is not None]
    return float(reduce(known)) if known else None


def by_tensor(items: Iterable[T]) -> dict[str, list[T]]:
    """MoE experts' matrices grouped by the tensor they belong to (a fused 3-D tensor, or
    ``...experts.*.gate_proj.weight`` for one expert per tensor); other matrices are left out."""
    experts = [m for m in items if getattr(m, "expert", None) is not None]
    groups: dict[str, list[T]] = {}
    for m in experts:
        groups.setdefault(m.tensor, []).append(m)  # type: ignore[attr-defined]
    return groups


def mean_known(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    return of_known(values, np.mean)
