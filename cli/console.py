"""The `deltakit` console script, with stop signals handled from its first instruction.

Importing click, torch and the library takes seconds on a loaded machine. A SIGTERM, SIGHUP or
SIGINT in that time ends the process with one ``Error: interrupted (SIG...)`` line and status
128 + the signal number, as one during the command does (nothing has been written yet, so
there is nothing to clean up). Once a command runs, :func:`deltakit_cli.common.stop_signals_raise`
takes over and unwinds through the atomic writers.
"""

import os
import signal

STOP_SIGNALS = ("SIGTERM", "SIGHUP", "SIGINT")


def _stopped_before_the_command(signum: int, frame: object) -> None:
    os.write(2, f"Error: interrupted ({signal.Signals(signum).name})\n".encode())
    os._exit(128 + signum)


def handle_stop_signals_early() -> None:
    """Until a command takes over, a stop signal ends the process with one line and 128 + its number."""
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _stopped_before_the_command)


def main() -> None:
    """Handle stop signals, then import and run the command group."""
    handle_stop_signals_early()
    from deltakit_cli.main import main as run_command_group

    run_command_group()


if __name__ == "__main__":
    main()
