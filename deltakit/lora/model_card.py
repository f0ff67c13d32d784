"""The README.md model card of an extracted adapter: what it was made from, how, and how close it is.

The YAML front matter has the fields PEFT writes into an adapter's card (``base_model``,
``library_name: peft``, tags) so the Hub lists the adapter under its base model; ``base_model``
is given only when the base is a Hub id (a local path is no Hub reference).
"""

from __future__ import annotations

from typing import Any


def model_card(report: Any, config: dict[str, Any]) -> str:
    """README.md text for an adapter written by `deltakit extract`.

    ``report`` is the :class:`~deltakit.lora.extraction.ExtractReport` (base, ft, selection, method,
    matrices, relative_error); ``config`` the adapter_config.json written beside it.
    """
    from deltakit.io.hub import base_model_fields
    from deltakit.version import __version__

    on_hub = bool(base_model_fields(report.base))
    base = config.get("base_model_name_or_path") or report.base
    front = ["---"]
    if on_hub:
        front.append(f"base_model: {base}")
    front += ["library_name: peft", "tags:"]
    if on_hub:
        front.append(f"- base_model:adapter:{base}")
    front += ["- lora", "- deltakit", "---"]
    revision = f" (revision {config['revision']})" if config.get("revision") else ""
    modules = sum(1 for m in report.matrices if m.rank > 0)
    lines = [
        f"# LoRA adapter of {report.ft}",
        "",
        f"Extracted by deltakit {__version__} from the weight difference between `{report.ft}` (fine-tune) "
        f"and `{report.base}` (base{revision}): each changed matrix ΔW = W_ft − W_base is replaced by the "
        f"{report.method} truncated SVD B·A (lora_alpha = r, so PEFT's scaling α/r is 1).",
        "",
        f"- rank selection: {_selection(report.selection)}",
        f"- {modules} LoRA modules, {report.parameters:,} LoRA parameters"
        + (f", {len(report.modules_to_save)} modules saved whole" if report.modules_to_save else ""),
        f"- relative error over the changed matrices, sqrt(Σ‖ΔW − BA‖²_F / Σ‖ΔW‖²_F): {report.relative_error:.4g}",
        f"- unchanged matrices (no LoRA): {len(report.unchanged)}",
    ] + _calibration_lines(getattr(report, "calibration", None)) + [
        f"- fused expert tensor `{e['name']}`: LoRA on the parameter (target_parameters), rank {e['rank']} "
        f"per expert, {len(e['factored_experts'])} of {e['experts']} experts changed"
        for e in getattr(report, "expert_parameters", [])
    ] + [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "PATH_OR_HUB_ID_OF_THIS_ADAPTER")',
        "```",
        "",
        f"Or merge it back with `deltakit merge {base} ADAPTER -o merged`.",
        "",
    ]
    return "\n".join(front + [""] + lines)


def _calibration_lines(calibration: dict[str, Any] | None) -> list[str]:
    """What a calibration adds: the tokens, and whether the factors minimise the output error."""
    if not calibration:
        return []
    how = ("activation-aware: each B·A minimises the output error ‖(ΔW − BA)·Xᵀ‖_F on the fine-tune's layer inputs X "
           f"(whitened truncated SVD, ridge {calibration['ridge']:g})") if calibration.get("activation_aware") else \
        "factors minimise the weight error; output errors measured on the fine-tune's layer inputs"
    return [f"- calibration: {calibration['tokens']:,} tokens of `{calibration['path']}`; {how}"]


def _selection(selection: dict[str, Any]) -> str:
    """'rank 16', 'energy 0.9 (max rank 64)', 'budget 20,000,000 parameters'."""
    mode = selection.get("mode")
    if mode == "rank":
        text = f"rank {selection['rank']} for every changed matrix"
    elif mode == "energy":
        text = f"energy {selection['energy']:g} of ‖ΔW‖²_F kept per matrix"
    elif mode == "budget":
        text = f"budget {selection['budget']:,} parameters, allocated to minimise the total squared error"
    else:
        text = str(mode)
    return text + (f" (max rank {selection['max_rank']})" if selection.get("max_rank") else "")

