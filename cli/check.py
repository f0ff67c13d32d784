"""`deltakit check`: how close base + an adapter is to a fine-tune, on calibration tokens."""

from __future__ import annotations

from typing import Any

import click

from deltakit_cli.common import (
    allow_pickle_option, device_option, force_option, hub_options, progress, protect_inputs, user_errors, write_json,
)

CHECK_EXAMPLES = """
\b
Examples:
  deltakit check ./base ./ft ./ft-lora --calibration calib.safetensors
  deltakit check ./base ./ft ./lora-r16 --calibration prompts.txt --json check.json
  deltakit check ./base ./ft-bert ./bert-lora --calibration calib.safetensors --metric hidden
"""


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


@click.command("check", epilog=CHECK_EXAMPLES)
@click.argument("base")
@click.argument("ft")
@click.argument("adapter")
@click.option("--calibration", metavar="PATH", required=True,
              help="Tokens to run the models on: a .safetensors file with input_ids [batch, seq], or text "
                   "(tokenised with FT's tokenizer).")
@click.option("--metric", type=click.Choice(["auto", "kl", "hidden"]), default="auto", show_default=True,
              help="kl: mean per-token KL of the next-token distributions (causal language models); hidden: "
                   "relative error of the final hidden states; auto: kl where FT is a causal LM.")
@click.option("--json", "json_path", metavar="PATH", help="Write the report as JSON ('-' for stdout).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on stdout.")
@device_option
@force_option
@allow_pickle_option
@hub_options
@user_errors
def check_command(base, ft, adapter, calibration, metric, json_path, quiet, device, force, allow_pickle):
    """How close BASE + ADAPTER is to FT, judged by what the model does on calibration tokens.

    FT runs on the tokens (transformers): every adapted matrix gets its output error
    ||(ΔW_ft − ΔW_adapter)·Xᵀ|| / ||ΔW_ft·Xᵀ|| on FT's own layer inputs X; then BASE runs alone and
    with the adapter applied, for the mean per-token KL(FT ‖ BASE + ADAPTER) beside KL(FT ‖ BASE).
    Any adapter type merge reads: extracted, trained, resized, summed; compare candidates by it.
    """
    from deltakit.lora.fidelity import check_adapter
    from deltakit_cli.common import build_spectral_options

    inputs = protect_inputs(force, (json_path,), [("base", base), ("fine-tune", ft), ("adapter", adapter),
                                                  ("calibration", calibration)])
    report = check_adapter(base, ft, adapter, calibration, metric=metric, options=build_spectral_options(device),
                           allow_pickle=allow_pickle, progress=progress)
    if json_path:
        write_json(json_path, report.to_dict(), force=force, inputs=inputs)
    if quiet or json_path == "-":
        return
    width = max((len(m.name) for m in report.matrices), default=10)
    click.echo(f"{'matrix':<{width}}  {'shape':>11}  {'rel. error':>10}  {'output err.':>11}")
    for m in report.matrices:
        shape = f"{m.shape[0]}×{m.shape[1]}"
        click.echo(f"{m.name:<{width}}  {shape:>11}  {format_number(m.rel_error):>10}  {format_number(m.output_error):>11}")
    click.echo("")
    click.echo(fidelity_line(report.fidelity, report.mean_output_error))


def format_number(value: float | None) -> str:
    """A reported error with four decimals; '-' where there is none."""
    return "-" if value is None else f"{value:.4f}"


COMMANDS = [check_command]
