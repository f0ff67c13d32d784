"""`deltakit rank` and `deltakit demo`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import click

from deltakit_cli.common import (
    allow_pickle_option, device_option, exclude_option, force_option, include_option, parallel_workers,
    build_spectral_options, progress, protect_inputs, rounding_option, spectral_options, stdout_taken, user_errors,
    write_html, write_json, write_text,
)
from deltakit_cli.options import csv_option, energy_option, hub_options, html_option, json_option, quiet_option

if TYPE_CHECKING:
    from deltakit.analyses.rank_report import RankReport
    from deltakit.io.inputs import InputFootprint

RANK_EXAMPLES = """
\b
Examples:
  deltakit rank meta-llama/Llama-2-7b-hf meta-llama/Llama-2-7b-chat-hf
  deltakit rank org/base org/finetune@v1.0 --offline  # a revision; the cache only
  deltakit rank ./base ./ft --energy 0.5 --energy 0.9 --energy 0.99 --json report.json
  deltakit rank ./base ./my-lora-adapter            # a PEFT adapter: ΔW = (α/r)·B·A
  deltakit rank ./base ./ft --include '*self_attn*' --save-spectra spectra.safetensors
  deltakit rank ./base ./ft --html report.html     # one page: tables, figures, versions

\b
Columns: rel ΔW = ‖ΔW‖_F/‖W_base‖_F; σ₁ the largest singular value; rank the numerical rank
(singular values above the rounding-noise floor); stable = ‖ΔW‖²_F/σ₁²; eff. the effective rank
(entropy of the spectrum); noise the share of ‖ΔW‖²_F that bf16/fp16 storage rounding can
explain; r@X the smallest k whose σ₁²..σ_k² hold X of ‖ΔW‖²_F (* where rounding may account for
more than 1 − X of it); sig@X the same with the rounding taken out; rand@X r@X of a random
matrix of the same shape. docs/metrics.md has the formulas.
"""


def emit_rank_outputs(report: RankReport, json_path: str | None, csv_path: str | None, spectra_path: str | None,
                      quiet: bool, force: bool, inputs: Sequence[InputFootprint] = (), html_path: str | None = None) -> None:
    from deltakit.io.spectra import save_spectra
    from deltakit.report import render_report, report_csv

    if json_path:
        write_json(json_path, report.to_dict(), force=force, inputs=inputs)
    if csv_path:
        write_text(csv_path, report_csv(report), force=force, inputs=inputs)
    if spectra_path:
        save_spectra(spectra_path, report.spectra, report.spectra_info(), force=force,
                     signal_spectra=report.signal_spectra, inputs=inputs)
    write_html(html_path, report, force, inputs)
    if not quiet and not stdout_taken(json_path, csv_path):
        click.echo(render_report(report))


@click.command("rank", epilog=RANK_EXAMPLES)
@click.argument("base")
@click.argument("ft")
@energy_option("Energy fraction of ||ΔW||_F² to explain; rank@energy per matrix (repeatable).")
@include_option
@exclude_option
@spectral_options
@rounding_option
@json_option
@csv_option
@html_option
@click.option("--save-spectra", "spectra_path", metavar="PATH",
              help="Save every singular value of every ΔW (safetensors) for `deltakit plot`; with --adaptive only "
                   "the computed top values, which the plots mark as partial.")
@click.option("--full-spectrum", "spectrum", flag_value="full",
              help="Compute every singular value of every ΔW (the default on a GPU computes only the top that "
                   "settles rank@X and estimates the effective rank; numerical ranks may then read ≥bound).")
@click.option("--adaptive", "spectrum", flag_value="adaptive",
              help="Compute only the top of each spectrum on the CPU too (the default there is the full one).")
@quiet_option("No table on stdout (warnings still go to stderr).")
@allow_pickle_option
@force_option
@hub_options
@user_errors
def rank_command(base, ft, energy, include, exclude, device, exact, fp64, rounding, json_path, csv_path, html_path,
                 spectra_path, spectrum, quiet, allow_pickle, force):
    """How large and how low-rank is each change ΔW = W_ft − W_base?

    BASE and FT are Hub ids (org/name or org/name@revision; what is read is downloaded),
    Hugging Face model folders (sharded or not) or single .safetensors files; FT may also be
    a PEFT adapter, folder or Hub id (LoRA, DoRA, AdaLoRA, LoHa, LoKr, VeRA, IA3).
    For every weight matrix: relative size of the change, spectral norm, numerical rank
    (above the rounding-noise floor), stable and effective rank, the rank that explains
    each --energy fraction, and that rank for a random matrix of the same shape.

    On a GPU only the top of each spectrum is computed, as far as rank@X needs (the
    adaptive path; --full-spectrum, --exact, --fp64 and --save-spectra compute all of it).
    """
    from deltakit.analyses.rank import rank

    inputs = protect_inputs(force, (json_path, csv_path, spectra_path, html_path), [("base", base), ("fine-tune", ft)])
    options = build_spectral_options(device, exact, fp64, spectrum, rounding)
    with parallel_workers(device) as parallel:
        report = rank(base, ft, energy, options, include, exclude, allow_pickle, keep_spectra=bool(spectra_path),
                      progress=progress if parallel.is_main else None, parallel=parallel)
        if parallel.is_main:
            emit_rank_outputs(report, json_path, csv_path, spectra_path, quiet, force, inputs, html_path)


DEMO_EXAMPLES = """
\b
Examples:
  deltakit demo                          # in a temporary folder, deleted when it ends
  deltakit demo --keep demo              # keep the pair: demo/base and demo/ft
  deltakit rank demo/base demo/ft --json report.json
"""


@click.command("demo", epilog=DEMO_EXAMPLES)
@click.option("--keep", metavar="DIR",
              help="Write the demo pair into DIR (DIR/base, DIR/ft) and keep it; DIR must be empty or new "
                   "unless --force. Default: a temporary folder, deleted when the command ends.")
@device_option
@force_option
@user_errors
def demo_command(keep, device, force):
    """Write a small Llama-shaped base / fine-tune pair with known-rank deltas and run `rank` on it.

    q_proj and v_proj carry a merged rank-8 LoRA (rank must read 8), the MLP a dense
    update with a decaying spectrum, everything else is unchanged (rank 0). Nothing is
    downloaded.
    """
    from deltakit.analyses.rank import rank
    from deltakit.demo import DEMO_LORA_RANK, write_demo_pair
    from deltakit.report import render_report

    with tempfile.TemporaryDirectory(prefix="deltakit-demo-") as tmp:
        folder = Path(keep) if keep else Path(tmp)
        base, ft = write_demo_pair(folder, force=force)
        where = (f"to {folder}" if keep
                 else "to a temporary folder, deleted when this command ends (--keep DIR keeps it)")
        click.echo(f"demo pair written {where}; q_proj, v_proj: merged rank-{DEMO_LORA_RANK} LoRA; "
                   "MLP: dense update; rest unchanged", err=True)
        report = rank(base, ft, (0.5, 0.9, 0.99), build_spectral_options(device), progress=progress)
        click.echo(render_report(report))
        if keep:  # an output name no README example writes, so that following the hint breaks none of them
            click.echo(f"\nnext: deltakit rank {base} {ft} --html {folder / 'report.html'}", err=True)
