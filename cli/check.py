"""`deltakit check`: how close base + an adapter is to a fine-tune, on calibration tokens."""

from __future__ import annotations

import click

from deltakit_cli.common import (
    allow_pickle_option, device_option, force_option, progress, protect_inputs, stdout_taken, user_errors, write_json,
)
from deltakit_cli.options import hub_options, json_option, quiet_option

CHECK_EXAMPLES = """
\b
Examples:
  deltakit check ./base ./ft ./ft-lora --calibration calib.safetensors
  deltakit check ./base ./ft ./lora-r16 --calibration prompts.txt --json check.json
  deltakit check ./base ./ft-bert ./bert-lora --calibration calib.safetensors --metric hidden
"""


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
@json_option
@quiet_option()
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
    if quiet or stdout_taken(json_path):
        return
    from deltakit.report import render_check

    click.echo(render_check(report))


COMMANDS = [check_command]
