"""`deltakit compare` (fine-tunes against each other) and `deltakit trajectory` (checkpoints of one run)."""

from __future__ import annotations

import click

from deltakit_cli.common import (
    allow_pickle_option, exclude_option, force_option, include_option, parallel_workers, progress,
    build_spectral_options, protect_inputs, rounding_option, spectral_options, stdout_taken, user_errors, write_html,
    write_json,
)
from deltakit_cli.options import energy_option, epsilon_option, hub_options, html_option, json_option, quiet_option, top_k_option

COMPARE_EXAMPLES = """
\b
Examples:
  deltakit compare ./base ./ft-task-a ./ft-task-b                 # cosine, top-1/8/64 overlaps
  deltakit compare ./base ./lora-r8 ./lora-r64 -k 8 --json overlap.json
  deltakit compare ./base ./full-ft ./lora-adapter ./other-ft --plot overlap.png   # all pairs
"""

TRAJECTORY_EXAMPLES = """
\b
Examples:
  deltakit trajectory ./base 'output/checkpoint-*'                # sorted by step number
  deltakit trajectory ./base run/checkpoint-100 run/checkpoint-200 run/final --json traj.json
  deltakit trajectory ./base 'output/checkpoint-*' --plot trajectory.png -e 0.5 -e 0.9 --html trajectory.html
"""


@click.command("compare", epilog=COMPARE_EXAMPLES)
@click.argument("base")
@click.argument("fts", nargs=-1, required=True, metavar="FT_A FT_B [FT_C ...]")
@top_k_option("top", "Size k of the top singular subspaces compared (repeatable; capped by each matrix's shape).",
              multiple=True, default=(1, 8, 64))
@include_option
@exclude_option
@spectral_options
@json_option
@html_option
@click.option("--plot", "plot_path", metavar="FIG.png", help="Write the overlap heatmap (layer × module type).")
@click.option("--per-matrix", is_flag=True, help="Also print one row per matrix.")
@quiet_option()
@allow_pickle_option
@hub_options
@force_option
@user_errors
def compare_command(base, fts, top, include, exclude, device, exact, fp64, json_path, html_path, plot_path, per_matrix,
                    quiet, allow_pickle, force):
    """Do two or more fine-tunes of BASE change the same directions?

    FT_A, FT_B, ... are models or PEFT adapters of BASE (anything `deltakit rank` accepts).
    For every weight matrix present in all of them and every pair: the cosine of vec(ΔW_A)
    and vec(ΔW_B); φ@k, the overlap ‖U_Aᵀ U_B‖²_F / min(i, j) of their top-k left (and right)
    singular subspaces, i and j the directions each ΔW has within its top k (Hu et al. 2021,
    §7.2), beside that of random subspaces (max(i, j)/m); and ‖ΔW_A‖/‖ΔW_B‖.
    Top-k vectors come from a randomized SVD (--exact: full SVD).
    """
    from deltakit.analyses.compare import compare

    inputs = protect_inputs(force, (json_path, plot_path, html_path),
                            [("base", base), *(("fine-tune", ft) for ft in fts)])
    with parallel_workers(device) as parallel:
        report = compare(base, fts, top, build_spectral_options(device, exact, fp64), include, exclude, allow_pickle,
                         progress=progress if parallel.is_main else None, parallel=parallel)
    if not parallel.is_main:
        return
    if json_path:
        write_json(json_path, report.to_dict(), force=force, inputs=inputs)
    if plot_path:
        from deltakit.plot import plot_overlap_heatmap, save_figure

        save_figure(plot_overlap_heatmap(report.to_dict()), plot_path, force=force, inputs=inputs)
    write_html(html_path, report, force, inputs)
    if not quiet and not stdout_taken(json_path):
        from deltakit.report import render_compare

        click.echo(render_compare(report, per_matrix))


@click.command("trajectory", epilog=TRAJECTORY_EXAMPLES)
@click.argument("base")
@click.argument("checkpoints", nargs=-1, required=True, metavar="CKPT1 [CKPT2 ...]")
@energy_option("Energy fraction for rank@energy (repeatable).")
@top_k_option("top", "Size k of the top left singular subspace compared with the final checkpoint's (repeatable).",
              multiple=True, default=(8,))
@click.option("--intruder-k", type=int, default=10, show_default=True,
              help="Top singular vectors of each checkpoint examined for intruder dimensions.")
@epsilon_option("Intruder threshold: max |cos| with every base singular vector below it.", multiple=False, default=0.5)
@include_option
@exclude_option
@spectral_options
@rounding_option
@json_option
@html_option
@click.option("--plot", "plot_path", metavar="FIG.png", help="Write each metric vs step, by module type.")
@quiet_option()
@allow_pickle_option
@hub_options
@force_option
@user_errors
def trajectory_command(base, checkpoints, energy, top, intruder_k, epsilon, include, exclude, device, exact, fp64,
                       rounding, json_path, html_path, plot_path, quiet, allow_pickle, force):
    """How did ΔW grow over a training run? One row per checkpoint.

    CKPT1 CKPT2 ... are checkpoint folders of one run (or a quoted glob such as
    'output/checkpoint-*'), sorted by the step number in their names; the last is the final
    one. Per checkpoint, by module type: relative ΔW, numerical rank and rank@energy of ΔW,
    intruder dimensions (as `deltakit intruders`), and the overlap of ΔW's top-k left singular
    subspace with the final checkpoint's.
    """
    from deltakit.analyses.trajectory import checkpoint_paths, trajectory

    paths = checkpoint_paths(checkpoints)
    inputs = protect_inputs(force, (json_path, plot_path, html_path),
                            [("base", base), *(("checkpoint", path) for path in paths)])
    with parallel_workers(device) as parallel:
        report = trajectory(base, paths, energy, top, intruder_k, epsilon, build_spectral_options(device, exact, fp64,
                                                                                        rounding=rounding),
                            include, exclude, allow_pickle, progress=progress if parallel.is_main else None, parallel=parallel)
    if not parallel.is_main:
        return
    if json_path:
        write_json(json_path, report.to_dict(), force=force, inputs=inputs)
    if plot_path:
        from deltakit.plot import plot_trajectory, save_figure

        save_figure(plot_trajectory(report.to_dict()), plot_path, force=force, inputs=inputs)
    write_html(html_path, report, force, inputs)
    if not quiet and not stdout_taken(json_path):
        from deltakit.report import render_trajectory

        click.echo(render_trajectory(report))


COMMANDS = [compare_command, trajectory_command]
