"""`deltakit extract`, `deltakit merge`, `deltakit unmerge`: LoRA surgery on checkpoints."""

from __future__ import annotations

from typing import Any

import click

from deltakit_cli.common import (
    allow_pickle_option, device_option, exclude_option, force_option, include_option, out_option, parallel_workers,
    progress, spectral_options, user_errors, write_json,
)

NOT_CARRIED_SHOWN = 5

EXTRACT_EXAMPLES = """
\b
Examples:
  deltakit extract ./base ./ft -o ./ft-lora --rank 16
  deltakit extract ./base ./ft -o ./ft-lora --energy 0.9 --max-rank 64 --json extract.json
  deltakit extract ./base ./ft -o ./ft-lora --budget 20000000 --save-modules --dtype bfloat16
"""

MERGE_EXAMPLES = """
\b
Examples:
  deltakit merge ./base ./my-lora -o ./merged
  deltakit merge ./base ./my-lora -o ./merged-half --scale 0.5
"""

UNMERGE_EXAMPLES = """
\b
Examples:
  deltakit unmerge ./merged ./my-lora -o ./base-again --check ./base
"""


def _output_options(f: Any) -> Any:
    f = force_option(f)
    f = allow_pickle_option(f)
    f = click.option("--quiet", "-q", is_flag=True, help="Print nothing on stdout.")(f)
    return click.option("--json", "json_path", metavar="PATH", help="Write the report as JSON ('-' for stdout).")(f)


def _check_outputs(json_path: str | None, force: bool) -> None:
    from deltakit.io import check_output_path

    if json_path and json_path != "-":
        check_output_path(json_path, force)


@click.command("extract", epilog=EXTRACT_EXAMPLES)
@click.argument("base")
@click.argument("ft")
@out_option("ADAPTER", "Adapter folder to write (PEFT format).", required=True)
@click.option("--rank", "-r", type=int, help="The same rank for every changed matrix.")
@click.option("--energy", "-e", type=float, help="Per matrix, the smallest rank keeping this fraction of ||ΔW||_F².")
@click.option("--budget", type=int, metavar="N",
              help="Total LoRA parameters, Σ r·(m+n), allocated across matrices to minimise the total squared error.")
@click.option("--max-rank", type=int, help="No matrix gets a higher rank than this.")
@include_option
@exclude_option
@click.option("--save-modules", is_flag=True,
              help="Carry changed tensors that are not LoRA material (norms, biases, embeddings) whole "
                   "(PEFT modules_to_save, and bias='lora_only' for biases of LoRA layers).")
@click.option("--embeddings", is_flag=True, help="Extract embedding tables too, as PEFT embedding LoRA.")
@click.option("--dtype", metavar="float32|bfloat16|float16", help="Adapter dtype (default: the fine-tune's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@spectral_options
@_output_options
@user_errors
def extract_command(base, ft, out, rank, energy, budget, max_rank, include, exclude, save_modules, embeddings, dtype,
                    seed, device, exact, fp64, json_path, quiet, allow_pickle, force):
    """Extract a PEFT LoRA adapter from a fine-tune: truncated SVD of every ΔW = W_ft − W_base.

    Each changed matrix gets B = U√S (out×r) and A = √S·Vᵀ (r×in), lora_alpha = r, so that
    `PeftModel.from_pretrained(base_model, ADAPTER)` reproduces the fine-tune as far as the
    rank allows. Give one of --rank, --energy or --budget. Unchanged matrices get no LoRA;
    changed norms, biases and embeddings are reported, and carried whole with --save-modules.
    """
    from deltakit.lora import extract_lora
    from deltakit.spectral.options import SpectralOptions

    _check_outputs(json_path, force)
    options = SpectralOptions(device=device, precision="fp64" if fp64 else "fp32", exact=exact)
    with parallel_workers(device) as parallel:
        report = extract_lora(base, ft, out, rank=rank, energy=energy, budget=budget, max_rank=max_rank,
                              include=include, exclude=exclude, save_modules=save_modules, embeddings=embeddings,
                              dtype=dtype, options=options, seed=seed, force=force, allow_pickle=allow_pickle,
                              progress=progress if parallel.is_main else None, parallel=parallel)
    if parallel.is_main:
        _print_extract(report, out, json_path, quiet, force)


def _print_extract(report: Any, out: str, json_path: str | None, quiet: bool, force: bool) -> None:
    if json_path:
        write_json(json_path, report.to_dict(), force=force)
    if quiet or json_path == "-":
        return
    width = max((len(m.name) for m in report.matrices), default=10)
    click.echo(f"{'matrix':<{width}}  {'shape':>11}  {'rank':>5}  {'kept energy':>11}  {'rel. error':>10}")
    for m in report.matrices:
        shape = f"{m.shape[0]}×{m.shape[1]}"
        click.echo(f"{m.name:<{width}}  {shape:>11}  {m.rank:>5}  {m.kept_energy:>11.4f}  {m.rel_error:>10.4f}")
    click.echo(f"\nadapter written to {out}: {sum(m.rank > 0 for m in report.matrices)} LoRA modules, "
               f"{report.parameters:,} parameters, overall relative error {report.relative_error:.4f}; "
               f"{len(report.unchanged)} unchanged matrices skipped")
    if report.carried_whole:
        click.echo(f"carried whole: {len(report.carried_whole)} tensors ({report.whole_parameters:,} parameters)")
    for entry in report.not_carried[:NOT_CARRIED_SHOWN]:
        click.echo(f"not carried: {entry['name']}: {entry['reason']}")
    if len(report.not_carried) > NOT_CARRIED_SHOWN:
        click.echo(f"not carried: {len(report.not_carried) - NOT_CARRIED_SHOWN} more (--json lists them all)")


def _merge_summary(report: Any) -> str:
    text = (f"{report.operation}d {report.lora_modules} LoRA modules (scale {report.scale:g}); wrote {report.tensors} "
            f"tensors in {report.shards} shard(s) to {report.out}")
    if report.replaced:
        text += f"; {len(report.replaced)} replaced whole by the adapter"
    if report.left_as_merged:
        text += f"; {len(report.left_as_merged)} replaced tensors left as merged (cannot be restored)"
    return text


@click.command("merge", epilog=MERGE_EXAMPLES)
@click.argument("base")
@click.argument("adapter")
@out_option("OUT", "Model folder to write.", required=True)
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply the adapter's update by this.")
@device_option
@_output_options
@user_errors
def merge_command(base, adapter, out, scale, device, json_path, quiet, allow_pickle, force):
    """Merge a PEFT LoRA adapter into BASE: W + scale·(α/r)·B·A, written as a complete model folder.

    Handles rsLoRA (α/√r), rank_pattern / alpha_pattern, fan_in_fan_out (GPT-2 Conv1D) and
    embedding LoRA; tensors in modules_to_save replace the base's. Applied in fp32, cast back
    to the model's dtype, checked finite, streamed tensor by tensor; shards follow BASE's.
    """
    from deltakit.lora import merge

    _check_outputs(json_path, force)
    with parallel_workers(device) as parallel:
        report = merge(base, adapter, out, scale=scale, device=device, force=force, allow_pickle=allow_pickle,
                       progress=progress if parallel.is_main else None, parallel=parallel)
    if not parallel.is_main:
        return
    if json_path:
        write_json(json_path, report.to_dict(), force=force)
    if not quiet and json_path != "-":
        click.echo(_merge_summary(report))


@click.command("unmerge", epilog=UNMERGE_EXAMPLES)
@click.argument("merged")
@click.argument("adapter")
@out_option("OUT", "Model folder to write.", required=True)
@click.option("--check", "check", metavar="BASE", help="Report the distance of the result from this original base.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="The scale the adapter was merged with.")
@click.option("--keep-replaced", is_flag=True,
              help="Adapters with modules_to_save replaced tensors whole, which cannot be undone: leave them as "
                   "they are in MERGED instead of refusing.")
@device_option
@_output_options
@user_errors
def unmerge_command(merged, adapter, out, check, scale, keep_replaced, device, json_path, quiet, allow_pickle, force):
    """Remove a merged PEFT LoRA adapter: W − scale·(α/r)·B·A, written as a complete model folder."""
    from deltakit.lora import unmerge

    _check_outputs(json_path, force)
    with parallel_workers(device) as parallel:
        report = unmerge(merged, adapter, out, scale=scale, check=check, keep_replaced=keep_replaced,
                         device=device, force=force, allow_pickle=allow_pickle,
                         progress=progress if parallel.is_main else None, parallel=parallel)
    if not parallel.is_main:
        return
    if json_path:
        write_json(json_path, report.to_dict(), force=force)
    if report.left_as_merged:
        click.echo(f"warning: {len(report.left_as_merged)} tensors the adapter replaced whole are left as merged "
                   f"(their base values are not in the adapter), first {report.left_as_merged[0]}", err=True)
    if quiet or json_path == "-":
        return
    click.echo(_merge_summary(report))
    if check:
        click.echo(f"distance from {check}: max |Δ| {report.check_max_abs:.3e} (in {report.check_worst}), "
                   f"relative Frobenius {report.check_rel_fro:.3e}")


COMMANDS = [extract_command, merge_command, unmerge_command]
