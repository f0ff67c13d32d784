"""The `deltakit` command group.

Importing this module loads click and the command definitions only: the library (torch,
numpy, matplotlib) is imported inside each command's body, so `deltakit --help`,
`--version` and usage errors answer at once.
"""

from __future__ import annotations

import gc

import click

from deltakit_cli.common import DeltakitGroup
from deltakit_cli.rank import demo_command, rank_command

COMMANDS = [rank_command, demo_command]


def _optional_commands() -> list[click.Command]:
    """Commands whose modules may be absent in a partial checkout are added when present."""
    found = []
    for module_name, attribute in (("deltakit_cli.surgery", "COMMANDS"), ("deltakit_cli.plot", "COMMANDS"),
                                   ("deltakit_cli.intruders", "COMMANDS"), ("deltakit_cli.compare", "COMMANDS"),
                                   ("deltakit_cli.check", "COMMANDS")):
        try:
            module = __import__(module_name, fromlist=[attribute])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        found.extend(getattr(module, attribute))
    return found


@click.group("deltakit", cls=DeltakitGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="deltakit", prog_name="deltakit")  # the installed version; no torch import
def cli() -> None:
    """deltakit: what did fine-tuning change, and can it be a LoRA?

    \b
    Start here:
      deltakit demo                       # a built-in pair with known answers
      deltakit rank BASE FT               # rank of every ΔW = W_ft − W_base
      deltakit extract BASE FT -o LORA -r 64   # the fine-tune as a PEFT LoRA adapter
      deltakit merge BASE LORA -o MERGED  # and back: W = W0 + (α/r)·B·A
      deltakit intruders BASE FT          # intruder dimensions (LoRA's spectral fingerprint)
    """


COMMANDS += _optional_commands()

for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    """The console script: the command group, then an exit that skips the collector's last passes."""
    try:
        cli(prog_name="deltakit")
    finally:
        # The interpreter's shutdown would walk every object torch made (about 0.4 s of the exit after
        # `rank`, 0.1 s with the freeze; docs/benchmarks.md), all of it after the report is written.
        # Frozen objects are left to the OS; files are closed, atexit handlers still run.
        gc.freeze()


if __name__ == "__main__":
    main()
