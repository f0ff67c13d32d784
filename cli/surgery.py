"""`deltakit extract`, `deltakit merge`, `deltakit unmerge`: LoRA surgery on checkpoints."""

from __future__ import annotations

from typing import Any

import click

from deltakit_cli.common import (
    allow_pickle_option, device_option, exclude_option, force_option, include_option, parallel_workers,
    build_spectral_options, progress, protect_inputs, spectral_options, stdout_taken, user_errors, write_html, write_json,
)
from deltakit_cli.options import (
    dtype_option, energy_option, hub_options, html_option, json_option, output_option, quiet_option,
)

NOT_CARRIED_SHOWN = 5

EXTRACT_EXAMPLES = """
\b
Examples:
  deltakit extract ./base ./ft -o ./ft-lora --rank 16
  deltakit extract ./base ./ft -o ./ft-lora --energy 0.9 --max-rank 64 --json extract.json
  deltakit extract ./base ./ft -o ./ft-lora --budget 20000000 --save-modules --dtype bfloat16
  deltakit extract ./base ./ft -o ./ft-lora --rank 16 --calibration calib.safetensors --activation-aware
  deltakit extract ./base ./lora-r64 -o ./lora-r16 --rank 16
  deltakit extract ./base ./lora-a ./lora-b --weights 0.7,0.3 -o ./lora-ab --ratio 0.05 --max-rank 32
  deltakit extract ./sd15/unet ./ft/unet -o ft-lora.safetensors --format kohya --rank 32 --dtype fp16
  deltakit extract ./sd15/unet ./ft/unet -o ft-locon.safetensors --format kohya --rank 32 --conv-rank 8
  deltakit extract ./sdxl.safetensors ./ft.safetensors -o ft.safetensors --format kohya --sv-fro 0.9 --max-rank 64
  deltakit extract ./sd15/unet lora-r64.safetensors -o lora-r16.safetensors --format kohya --rank 16
"""

MERGE_EXAMPLES = """
\b
Examples:
  deltakit merge ./base ./my-lora -o ./merged
  deltakit merge ./base ./my-lora -o ./merged-half --scale 0.5
  deltakit merge ./base ./my-dora ./my-loha -o ./merged --weights 0.7,0.3
  deltakit merge ./sdxl/unet style.safetensors detail.safetensors -o ./unet-merged --weights 0.8,0.5
"""

UNMERGE_EXAMPLES = """
\b
Examples:
  deltakit unmerge ./merged ./my-lora -o ./base-again --check ./base
  deltakit unmerge ./merged ./my-dora -o ./base-again --base ./base   # DoRA needs the original
"""


def _output_options(f: Any) -> Any:
    f = force_option(f)
    f = allow_pickle_option(f)
    f = quiet_option("Print nothing on stdout (warnings still go to stderr).")(f)
    return json_option(f)


skip_mismatched_option = click.option(
    "--skip-mismatched", is_flag=True,
    help="Write the output without the tensors that cannot be paired (another shape, or on one side only), "
         "instead of refusing; they are listed on stderr and in --json.")


def _weights(text: str | None) -> list[float] | None:
    """``--weights 0.7,0.3`` -> [0.7, 0.3] (extract, merge, unmerge); the count is checked against the adapters by
    the library."""
    from deltakit.errors import DeltakitError

    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise DeltakitError(f"cannot read --weights {text!r}; give numbers separated by commas, e.g. 0.7,0.3") from None


@click.command("extract", epilog=EXTRACT_EXAMPLES)
@click.argument("base")
@click.argument("ft", nargs=-1, required=True, metavar="FT|ADAPTER [ADAPTER...]")
@output_option("ADAPTER", "Adapter to write: a folder, or with --format kohya one .safetensors file.", required=True)
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya", "diffusers"]), default="peft", show_default=True,
              help="peft: a PEFT adapter folder; kohya: one kohya-ss LoRA .safetensors file (lora_unet_* / lora_te*_*, "
                   "lora_down / lora_up / alpha), read by sd-scripts, LyCORIS, diffusers, A1111 and ComfyUI; "
                   "diffusers: a folder as save_lora_weights writes it (pytorch_lora_weights.safetensors).")
@click.option("--weights", metavar="W1,W2,...", help="With adapters: the weight of each one's ΔW in the sum (default 1 each).")
@click.option("--rank", "-r", type=int, help="The same rank for every changed matrix.")
@energy_option("Per matrix, the smallest rank keeping this fraction of ||ΔW||_F².", multiple=False, default=None)
@click.option("--budget", type=int, metavar="N",
              help="Total LoRA parameters, Σ r·(m+n), allocated across matrices to minimise the total squared error.")
@click.option("--ratio", type=float, metavar="P",
              help="Per matrix, keep the singular values σ_i ≥ P·σ_1, P in (0, 1] (kohya's sv_ratio T is P = 1/T).")
@click.option("--sv-ratio", type=float, metavar="T",
              help="kohya's sv_ratio: per matrix, keep σ_i > σ_1 / T (T ≥ 1).")
@click.option("--sv-fro", type=float, metavar="T",
              help="kohya's sv_fro: per matrix, the smallest rank keeping T of ||ΔW||_F (i.e. --energy T²).")
@click.option("--sv-cumulative", type=float, metavar="T",
              help="kohya's sv_cumulative: per matrix, the smallest k with Σ_{i≤k} σ_i ≥ T·Σ σ_i (sums of σ, not σ²).")
@click.option("--quantile", type=float, metavar="Q",
              help="LyCORIS's quantile: per matrix, the number of k with Σ_{i≤k} σ_i < Q·Σ σ_i (at least 1).")
@click.option("--max-rank", type=int, help="No matrix gets a higher rank than this.")
@click.option("--conv-rank", type=int, metavar="N",
              help="A fixed rank for convolutions with a kernel larger than 1×1 (kohya's conv_dim, LyCORIS's conv "
                   "rank). Without it or --conv-energy they follow the rule given for the linear layers; 1×1 "
                   "convolutions always do. A convolution is factored as its (out, in·kh·kw) matrix (LoCon).")
@click.option("--conv-energy", type=float, metavar="F",
              help="Per convolution with a kernel larger than 1×1, the smallest rank keeping this fraction of "
                   "||ΔW||_F² (instead of --conv-rank).")
@click.option("--clamp-quantile", type=float, metavar="Q",
              help="Clamp the factors as kohya's extract_lora_from_models.py does (up = U·S, down = Vᵀ clamped to "
                   "± their Q-quantile; kohya's default 0.99); the report gives each matrix's error before and after.")
@include_option
@exclude_option
@click.option("--save-modules", is_flag=True,
              help="Carry changed tensors that are not LoRA material (norms, biases, embeddings) whole "
                   "(PEFT modules_to_save, and bias='lora_only' for biases of LoRA layers).")
@click.option("--embeddings", is_flag=True, help="Extract embedding tables too, as PEFT embedding LoRA.")
@click.option("--experts/--no-experts", default=True, show_default=True,
              help="Fused MoE expert tensors that changed (gpt-oss mlp.experts.gate_up_proj) become PEFT LoRA on "
                   "parameters (target_parameters), one rank per expert.")
@dtype_option("Adapter dtype, also as float32|bfloat16|float16 (default: the fine-tune's).", old=("--save-dtype",))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--calibration", metavar="PATH",
              help="Run the fine-tune on these tokens (a .safetensors file with input_ids [batch, seq], or text) "
                   "and report each matrix's output error and the KL of base + adapter to the fine-tune.")
@click.option("--activation-aware", is_flag=True,
              help="With --calibration: choose B·A to minimise the error of each layer's output on those inputs "
                   "(whitened SVD) instead of the weight error.")
@spectral_options
@skip_mismatched_option
@html_option
@_output_options
@hub_options
@user_errors
def extract_command(base, ft, out, fmt, weights, rank, energy, budget, ratio, sv_ratio, sv_fro, sv_cumulative, quantile,
                    max_rank, conv_rank, conv_energy, clamp_quantile, include, exclude, save_modules, embeddings,
                    experts, dtype, seed, calibration, activation_aware, device, exact, fp64, skip_mismatched, html_path,
                    json_path, quiet, allow_pickle, force):
    """Extract a PEFT LoRA adapter from a fine-tune: truncated SVD of every ΔW = W_ft − W_base.

    Each changed matrix gets B = U√S (out×r) and A = √S·Vᵀ (r×in), lora_alpha = r, so that
    `PeftModel.from_pretrained(base_model, ADAPTER)` reproduces the fine-tune as far as the
    rank allows. With --calibration the fine-tune runs on those tokens (transformers): the report
    adds each matrix's output error and the adapter's KL; --activation-aware minimises the former. Give one of --rank, --energy, --budget or --ratio. Unchanged matrices get no
    LoRA; changed norms, biases and embeddings are reported, and carried whole with --save-modules.
    Changed fused MoE expert tensors (gpt-oss) become LoRA on parameters, each expert factored
    on its own (--no-experts leaves them out).

    With PEFT adapters of BASE instead of FT, ΔW = Σ w_i·ΔW_i of the adapters: resize a LoRA,
    convert an adapter to a plain LoRA, or merge several into one. LoRA inputs are resized in
    factor space (exact, without forming ΔW or reading BASE's weights). kohya / LyCORIS and
    diffusers LoRA files are adapters too; --format kohya writes one (convolutions as LoCon:
    lora_down with the layer's kernel, a 1×1 lora_up).
    """
    from deltakit.lora import extract_lora

    inputs = protect_inputs(force, (json_path, html_path), [("base", base), *(("fine-tune", source) for source in ft),
                                                            ("calibration", calibration)])
    options = build_spectral_options(device, exact, fp64)
    sources = ft[0] if len(ft) == 1 else list(ft)
    with parallel_workers(device) as parallel:
        report = extract_lora(base, sources, out, rank=rank, energy=energy, budget=budget, max_rank=max_rank,
                              include=include, exclude=exclude, save_modules=save_modules, embeddings=embeddings,
                              dtype=dtype, options=options, seed=seed, force=force, allow_pickle=allow_pickle,
                              progress=progress if parallel.is_main else None, parallel=parallel, ratio=ratio,
                              weights=_weights(weights), experts=experts, skip_mismatched=skip_mismatched,
                              calibration=calibration, activation_aware=activation_aware, format=fmt,
                              clamp_quantile=clamp_quantile, sv_ratio=sv_ratio, sv_fro=sv_fro,
                              sv_cumulative=sv_cumulative, quantile=quantile, conv_rank=conv_rank,
                              conv_energy=conv_energy)
    if parallel.is_main:
        _print_extract(report, out, json_path, quiet, force, inputs)
        write_html(html_path, report, force, inputs)


def _print_extract(report: Any, out: str, json_path: str | None, quiet: bool, force: bool, inputs: Any) -> None:
    if json_path:
        write_json(json_path, report.to_dict(), force=force, inputs=inputs)
    _warn_not_carried(report.not_carried)
    if quiet or stdout_taken(json_path):
        return
    from deltakit.report import render_extract

    click.echo(render_extract(report))


def _warn_not_carried(entries: list[dict[str, str]]) -> None:
    """What the output lacks, on stderr (with -q too): a script must not ship an incomplete adapter unnoticed."""
    for entry in entries[:NOT_CARRIED_SHOWN]:
        click.echo(f"warning: not carried: {entry['name']}: {entry['reason']}", err=True)
    if len(entries) > NOT_CARRIED_SHOWN:
        click.echo(f"warning: not carried: {len(entries) - NOT_CARRIED_SHOWN} more (--json lists them all)", err=True)


ADAPTER_NAMES = {"LORA": "LoRA", "DORA": "DoRA", "ADALORA": "AdaLoRA", "LOHA": "LoHa", "LOKR": "LoKr", "VERA": "VeRA"}


def _merge_summary(report: Any) -> str:
    kinds = ", ".join(sorted({ADAPTER_NAMES.get(kind, kind) for kind in report.adapter_types}))
    adapters = f"{len(report.adapters)} adapters ({kinds})" if len(report.adapters) > 1 else f"{kinds} adapter"
    text = (f"{report.operation}d {report.lora_modules} modules of the {adapters} (scale {report.scale:g}); wrote "
            f"{report.tensors} tensors in {report.shards} shard(s) to {report.out}")
    if report.replaced:
        text += f"; {len(report.replaced)} replaced whole by the adapter"
    if report.left_as_merged:
        text += f"; {len(report.left_as_merged)} replaced tensors left as merged (cannot be restored)"
    if report.left_out:
        text += (f"; {len(report.left_out)} adapter modules left out: they change parts the model does not hold "
                 f"(first {report.left_out[0]['name']})")
    if report.dequantized:
        text += f"\nnote: {report.dequantized}"
    return text


_WEIGHTS_HELP = "One weight per adapter, comma-separated (default 1 each): W0 + Σ wᵢ·ΔWᵢ."


@click.command("merge", epilog=MERGE_EXAMPLES)
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@output_option("OUT", "Model folder to write.", required=True)
@click.option("--weights", metavar="W1,W2,...", help=_WEIGHTS_HELP)
@click.option("--scale", type=float, default=1.0, show_default=True, help="Multiply every adapter's update by this.")
@dtype_option("Write floating-point tensors in this dtype, also as float32|bfloat16|float16 (default: the model's; "
              "bfloat16 for a quantized base).")
@device_option
@skip_mismatched_option
@_output_options
@hub_options
@user_errors
def merge_command(base, adapters, out, weights, scale, dtype, device, skip_mismatched, json_path, quiet, allow_pickle,
                  force):
    """Merge one or more PEFT adapters into BASE: W0 + scale·Σ wᵢ·ΔWᵢ, written as a complete model folder.

    Any weight-changing adapter type: LoRA (rsLoRA, rank_pattern / alpha_pattern, fan_in_fan_out,
    embeddings, target_parameters), DoRA, AdaLoRA, LoHa, LoKr, VeRA, IA3, and kohya / LyCORIS
    (LoRA, DoRA, LoHa, LoKr) and diffusers LoRA files, into a diffusers folder or a single-file
    checkpoint (SD / SDXL / Flux names) alike; each ΔWᵢ is taken at
    BASE's weights, and tensors in modules_to_save replace the base's. Applied in fp32, cast back
    to the model's dtype, checked finite, streamed tensor by tensor; shards follow BASE's.
    """
    from deltakit.lora import merge

    inputs = protect_inputs(force, (json_path,), [("base", base), *(("adapter", a) for a in adapters)])
    with parallel_workers(device) as parallel:
        report = merge(base, list(adapters), out, scale=scale, weights=_weights(weights), device=device,
                       force=force, allow_pickle=allow_pickle, progress=progress if parallel.is_main else None,
                       parallel=parallel, dtype=dtype, skip_mismatched=skip_mismatched)
    if not parallel.is_main:
        return
    if json_path:
        write_json(json_path, report.to_dict(), force=force, inputs=inputs)
    _warn_not_carried(report.not_merged)
    if not quiet and not stdout_taken(json_path):
        click.echo(_merge_summary(report))


@click.command("unmerge", epilog=UNMERGE_EXAMPLES)
@click.argument("merged")
@click.argument("adapters", nargs=-1, required=True)
@output_option("OUT", "Model folder to write.", required=True)
@click.option("--base", "original", metavar="BASE",
              help="The original model the adapters were merged into; needed to unmerge DoRA, whose ΔW depends on "
                   "the original weights.")
@click.option("--check", "check", metavar="BASE", help="Report the distance of the result from this original base.")
@click.option("--weights", metavar="W1,W2,...", help="The weights the adapters were merged with (default 1 each).")
@click.option("--scale", type=float, default=1.0, show_default=True, help="The scale the adapters were merged with.")
@click.option("--keep-replaced", is_flag=True,
              help="Adapters with modules_to_save replaced tensors whole, which cannot be undone: leave them as "
                   "they are in MERGED instead of refusing.")
@device_option
@_output_options
@hub_options
@user_errors
def unmerge_command(merged, adapters, out, original, check, weights, scale, keep_replaced, device, json_path, quiet,
                    allow_pickle, force):
    """Remove merged PEFT adapters: the W0 with MERGED = W0 + scale·Σ wᵢ·ΔWᵢ, written as a model folder.

    Additive types (LoRA, AdaLoRA, LoHa, LoKr, VeRA) are subtracted and IA3 divided out; DoRA
    needs the original model (--base), since its ΔW depends on the original weights.
    """
    from deltakit.lora import unmerge

    inputs = protect_inputs(force, (json_path,), [("merged model", merged), *(("adapter", a) for a in adapters),
                                                  ("base", original), ("check", check)])
    with parallel_workers(device) as parallel:
        report = unmerge(merged, list(adapters), out, scale=scale, weights=_weights(weights), base=original,
                         check=check, keep_replaced=keep_replaced, device=device, force=force,
                         allow_pickle=allow_pickle, progress=progress if parallel.is_main else None,
                         parallel=parallel)
    if not parallel.is_main:
        return
    if json_path:
        write_json(json_path, report.to_dict(), force=force, inputs=inputs)
    if report.left_as_merged:
        click.echo(f"warning: {len(report.left_as_merged)} tensors the adapter replaced whole are left as merged "
                   f"(their base values are not in the adapter), first {report.left_as_merged[0]}", err=True)
    if quiet or stdout_taken(json_path):
        return
    click.echo(_merge_summary(report))
    if check:
        click.echo(f"distance from {check}: max |Δ| {report.check_max_abs:.3e} (in {report.check_worst}), "
                   f"relative Frobenius {report.check_rel_fro:.3e}")


COMMANDS = [extract_command, merge_command, unmerge_command]
