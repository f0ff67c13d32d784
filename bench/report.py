"""Turn the rows of a run into results.json's summary fields and the markdown table."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

PROJECTION = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")


def summarize_errors(matrices: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean / max relative error over the attention and MLP projections (the set every tool
    decomposes), plus the count over all scored matrices."""
    scored = [m for m in matrices if isinstance(m.get("rel_error"), (int, float))]
    projections = [m["rel_error"] for m in scored if PROJECTION.search(m["name"])] or [m["rel_error"] for m in scored]
    if not projections:
        return None
    return {"mean": statistics.fmean(projections), "max": max(projections), "projections": len(projections),
            "scored": len(scored)}


def self_reported_errors(report_path: Path) -> list[float]:
    """Every number under a ``rel_error`` key anywhere in a JSON report (schema-agnostic)."""
    try:
        payload = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    found: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "rel_error" and isinstance(value, (int, float)):
                    found.append(float(value))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(payload)
    return found


def _speedup(row: dict[str, Any], rows: list[dict[str, Any]], tool: str) -> str:
    if row["tool"] != "deltakit" or row["status"] != "ok":
        return ""
    other = next((r for r in rows if r["tool"] == tool and r["op"] == row["op"] and r["status"] == "ok"), None)
    if other is None or not row["wall_s"]:
        return ""
    return f"{other['wall_s'] / row['wall_s']:.1f}×"


def fmt(value: Any, pattern: str = "{:.2f}") -> str:
    """A number through ``pattern``, or "—" for anything else."""
    return pattern.format(value) if isinstance(value, (int, float)) else "—"


def _size(n_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes:.0f} B"


def _gb(mb: Any) -> str:
    return f"{mb / 1024:.2f}" if isinstance(mb, (int, float)) and mb > 0 else "—"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = ("| command | status | wall s | floor s | wall/floor | peak GPU GB | peak RSS GB (anon) "
              "| rel. error mean (max) | speedup vs plain loop | speedup vs mergekit |")
    lines = [header, "|" + " --- |" * 10]
    for row in rows:
        errors = row.get("rel_error")
        error_text = f"{errors['mean']:.4f} ({errors['max']:.4f})" if errors else "—"
        rss = _gb(row.get("max_rss_mb"))
        if isinstance(row.get("peak_anon_mb"), (int, float)):
            rss += f" ({_gb(row['peak_anon_mb'])})"
        ratio = (row["wall_s"] / row["floor_s"]) if row.get("wall_s") and row.get("floor_s") else None
        lines.append("| " + " | ".join([
            row["label"], row["status"], fmt(row.get("wall_s")), fmt(row.get("floor_s"), "{:.3f}"),
            fmt(ratio, "{:.1f}"), _gb(row.get("gpu_peak_mb")), rss, error_text,
            _speedup(row, rows, "plain"), _speedup(row, rows, "mergekit"),
        ]) + " |")
    return "\n".join(lines)


def markdown_report(result: dict[str, Any]) -> str:
    pair, bw, machine = result["pair"], result["bandwidth"], result["machine"]
    shape = pair["shape"]
    gpus = ", ".join(g["name"] for g in machine.get("gpus", [])) or "none"
    read, write = bw["read"], bw["write"]
    lines = [
        f"# deltakit benchmark: preset {result['preset']}",
        "",
        f"- machine: {machine.get('cpu_model')} ×{machine.get('cpu_count')}, {machine.get('memory_gb')} GB RAM, "
        f"GPU: {gpus}; torch {machine.get('torch')} (CUDA {machine.get('cuda')}), mergekit {machine.get('mergekit')}",
        f"- pair: hidden {shape['hidden']}, intermediate {shape['intermediate']}, layers {shape['layers']}, "
        f"vocab {shape['vocab']}; bf16; {_size(pair['base_bytes'])} per checkpoint in {pair['base_files']} shard(s); "
        + (f"generated on {pair.get('generate_device')} in {fmt(pair.get('generate_s'), '{:.1f}')} s"
           if not pair.get("reused") else "reused from an earlier run"),
        f"- read bandwidth: {read['bytes_per_s'] / 1e9:.2f} GB/s over {_size(read['bytes'])}, page cache "
        f"{result['cache']} (resident before: {fmt(read.get('resident_before'), '{:.0%}')}); write bandwidth "
        f"{write['bytes_per_s'] / 1e9:.2f} GB/s buffered "
        f"({fmt((write.get('bytes_per_s_with_fsync') or 0) / 1e9)} GB/s "
        f"with fsync) over {_size(write['bytes'])}",
        f"- device: {result['device']}; rank {result['rank']}; {result['timestamp']}",
        "",
        markdown_table(result["rows"]),
        "",
        "floor = bytes read ÷ read bandwidth + bytes written ÷ write bandwidth (no command can be faster "
        "without reading less). rel. error = ‖ΔW − scaling·BA‖_F / ‖ΔW‖_F measured by the harness from each "
        "adapter file against ft − base, mean (max) over the attention/MLP projections; the plain loop's "
        "adapter is the truncated SVD, the optimum (its fp32 value is in the notes). Wall time is end to end, "
        "interpreter start and imports included. Peak RSS counts mapped file pages; (anon) is the allocated part.",
        "",
    ]
    notes = [f"- {row['label']}: {note}" for row in result["rows"] for note in row.get("notes", [])]
    if notes:
        lines += ["Notes:", *notes, ""]
    return "\n".join(lines)
