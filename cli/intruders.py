"""`deltakit intruders`: find intruder dimensions, and optionally scale them down into a new model."""

from __future__ import annotations

import click

from deltakit_cli.common import (
    allow_pickle_option, exclude_option, force_option, include_option, parallel_workers, parse_size,
    build_spectral_options, progress, protect_inputs, spectral_options, stdout_taken, user_errors, write_html, write_json,
)
from deltakit_cli.options import (
    aliased, epsilon_check, epsilon_option, hub_options, html_option, json_option, output_option, quiet_option, top_k_option,
)

EXAMPLES = """
\b
Examples:
  deltakit intruders ./base ./lora-merged                      # top-10 vectors, ε = 0.5
  deltakit intruders ./base ./ft --epsilon 0.5 --epsilon 0.3 --json r.json   # an ε sweep
  deltakit intruders ./base ./my-lora-adapter                  # a PEFT adapter: W_ft = W + (α/r)·B·A
  deltakit intruders ./base ./lora-merged --scale 0.75 -o ./lora-scaled   # λ·σ for each intruder
"""

@click.command("intruders", epilog=EXAMPLES)
@click.argument("base")
@click.argument("ft")
@top_k_option("k", "How many of W_ft's top left singular vectors to examine per matrix.")
@epsilon_option("Cosine threshold in (0, 1]: a vector is an intruder when its max |cos| with every base "
                "singular vector is below it (repeatable for a sweep; --scale uses the first).")
@aliased("epsilon", ("-e",), multiple=True, type=float, callback=epsilon_check)
@click.option("--scale", type=float, metavar="λ",
              help="Write a model in which each intruder's singular value is multiplied by λ ≥ 0 "
                   "(0 removes them, 1 changes nothing) to --output.")
@output_option("DIR", "Model folder written by --scale.")
@click.option("--max-shard-size", default="5GB", show_default=True, metavar="SIZE",
              help="Largest safetensors shard written by --scale (e.g. 5GB, 500MB).")
@include_option
@exclude_option
@spectral_options
@json_option
@html_option
@quiet_option()
@allow_pickle_option
@force_option
@hub_options
@user_errors
def intruders_command(base, ft, k, epsilon, scale, out, max_shard_size, include, exclude, device, exact, fp64,
                      json_path, html_path, quiet, allow_pickle, force):
    """Intruder dimensions: new top singular vectors of W_ft that no singular vector of W_base resembles.

    For every weight matrix, the top-k left singular vectors of the fine-tune are compared with
    all left singular vectors of the base (Shuttleworth et al., "LoRA vs Full Fine-tuning: An
    Illusion of Equivalence", NeurIPS 2025); one whose largest |cosine| is below ε is an
    intruder. LoRA fine-tunes grow them, full fine-tunes do not. With --scale λ -o DIR, a
    complete model is written in which each intruder's singular value is multiplied by λ.
    """
    from deltakit.errors import DeltakitError
    from deltakit.analyses.intruders import intruders
    from deltakit.lora.intruder_scaling import scale_intruders
    from deltakit.io.writer import DEFAULT_SHARD_BYTES
    from deltakit.report import render_intruders

    if (scale is None) != (out is None):
        raise DeltakitError("--scale and -o/--output go together: --scale λ -o DIR writes the scaled model")
    inputs = protect_inputs(force, (json_path, html_path), [("base", base), ("fine-tune", ft)])
    options = build_spectral_options(device, exact, fp64)
    shard_bytes = parse_size(max_shard_size) if max_shard_size else DEFAULT_SHARD_BYTES
    with parallel_workers(device) as parallel:
        shown = progress if parallel.is_main else None
        if scale is None:
            report = intruders(base, ft, k, epsilon, options, include, exclude, allow_pickle, progress=shown,
                               parallel=parallel)
        else:
            report = scale_intruders(base, ft, out, scale, k, epsilon, options, include, exclude, allow_pickle,
                                     force, shard_bytes, progress=shown, parallel=parallel)
    if not parallel.is_main:
        return
    if json_path:
        write_json(json_path, report.to_dict(), force=force, inputs=inputs)
    write_html(html_path, report, force, inputs)
    if not quiet and not stdout_taken(json_path):
        click.echo(render_intruders(report))


COMMANDS = [intruders_command]
