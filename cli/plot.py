"""`deltakit plot`: figures from a spectra file written by `deltakit rank --save-spectra`."""

from __future__ import annotations

from pathlib import Path

import click

from deltakit_cli.common import device_option, force_option, protect_inputs, stdout_taken, user_errors, write_json
from deltakit_cli.options import energy_option, hub_options, json_option, output_option, quiet_option

KINDS = ("overview", "energy", "heatmap", "error", "spectrum")

PLOT_EXAMPLES = """
\b
Examples:
  deltakit rank BASE FT --save-spectra spectra.safetensors
  deltakit plot spectra.safetensors -o overview.png
  deltakit plot spectra.safetensors -o heatmap.pdf --kind heatmap --energy 0.99
  deltakit plot spectra.safetensors -o error.svg --kind error --matrix model.layers.0.mlp.down_proj.weight
  deltakit plot spectra.safetensors -o q0.png --kind spectrum --base BASE --ft FT \\
      --matrix model.layers.0.self_attn.q_proj.weight
"""


@click.command("plot", epilog=PLOT_EXAMPLES)
@click.argument("spectra", type=click.Path(dir_okay=False, path_type=Path))
@output_option("FIG.png", "Figure to write; its suffix picks the format (.png, .pdf, .svg).", required=True,
               dest="output")
@click.option("--kind", type=click.Choice(KINDS), default="overview", show_default=True,
              help="overview: the three panels below in one figure; energy: energy captured vs rank k; "
                   "heatmap: rank at --energy by layer and module type; error: best rank-k (LoRA) error vs k; "
                   "spectrum: singular values of W_base, W_ft and ΔW for one --matrix.")
@energy_option("Energy fraction for the heatmap and the reference lines.", multiple=False, default=0.9)
@click.option("--matrix", "matrices", multiple=True, metavar="NAME",
              help="Tensor name. --kind spectrum: the one matrix to show; --kind error: draw these matrices "
                   "(repeatable) instead of one curve per module type.")
@click.option("--base", type=click.Path(path_type=Path), metavar="BASE",
              help="Base checkpoint for --kind spectrum (default: the one recorded in SPECTRA, if it exists).")
@click.option("--ft", type=click.Path(path_type=Path), metavar="FT",
              help="Fine-tuned checkpoint for --kind spectrum (default: the one recorded in SPECTRA, if it exists).")
@device_option
@json_option
@quiet_option("Print nothing on stdout.")
@force_option
@hub_options
@user_errors
def plot_command(spectra: Path, output: str, kind: str, energy: float, matrices: tuple[str, ...],
                 base: Path | None, ft: Path | None, device: str, json_path: str | None, quiet: bool, force: bool) -> None:
    """Draw figures of the ΔW spectra saved by `deltakit rank --save-spectra`.

    SPECTRA is that file; the figure goes to -o/--output. --kind spectrum also reads the two
    checkpoints (--base, --ft) to show W_base and W_ft next to ΔW.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    from deltakit import plot
    from deltakit.analyses.weights import weight_spectra
    from deltakit.errors import DeltakitError
    from deltakit.io.spectra import load_spectra
    from deltakit.analyses.meta import check_energies

    output = Path(output)
    check_energies((energy,))
    inputs = protect_inputs(force, (output, json_path), [("spectra file", spectra), ("base", base), ("fine-tune", ft)])
    values, info = load_spectra(spectra)
    if matrices and kind not in ("spectrum", "error"):
        raise DeltakitError("--matrix is used only with --kind spectrum or --kind error")
    if kind == "overview":
        figure = plot.plot_overview(values, info, energy=energy)
    elif kind == "energy":
        figure = plot.plot_energy_curves(values, info, energy=energy).figure
    elif kind == "heatmap":
        figure = plot.plot_rank_heatmap(values, info, energy=energy).figure
    elif kind == "error":
        figure = plot.plot_error_vs_rank(values, info, names=matrices or None, energy=energy).figure
    else:
        if len(matrices) != 1:
            raise DeltakitError("--kind spectrum needs exactly one --matrix NAME")
        name = plot.check_names(values, matrices)[0]
        base_path = _checkpoint_path(base, info.get("base"), "--base")
        ft_path = _checkpoint_path(ft, info.get("ft"), "--ft")
        inputs = protect_inputs(force, (output, json_path),
                                [("spectra file", spectra), ("base", base_path), ("fine-tune", ft_path)])
        by_label = weight_spectra(base_path, ft_path, name, device=device)
        figure = plot.plot_spectra(by_label, title=f"Singular values of {name}").figure
    try:
        plot.save_figure(figure, output, force=force, inputs=inputs)
    finally:
        plt.close(figure)
    drawn = list(matrices) if matrices else sorted(values)
    if json_path:
        write_json(json_path, {"spectra": str(spectra), "output": str(output), "kind": kind, "energy": energy,
                               "matrices": drawn}, force=force, inputs=inputs)
    if not quiet and not stdout_taken(json_path):
        click.echo(f"{kind} figure of {len(drawn)} matri{'x' if len(drawn) == 1 else 'ces'} written to {output}")


def _checkpoint_path(given: Path | None, recorded: str | None, option: str) -> Path:
    """The checkpoint the user named, else the one the spectra file records when it exists here (or is a hub id)."""
    if given is not None:
        return given
    from deltakit.errors import DeltakitError
    from deltakit.io.hub import parse_hub_id

    if recorded and (Path(recorded).exists() or parse_hub_id(recorded) is not None):
        return Path(recorded)
    where = f"; the spectra file records {recorded}, which is not found here" if recorded else ""
    raise DeltakitError(f"--kind spectrum needs {option} (a checkpoint path){where}")


COMMANDS = [plot_command]
