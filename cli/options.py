"""One flag vocabulary for every command: the options they share, each spelled once, here.

``-e/--energy`` (energy fractions), ``--epsilon`` (intruder threshold), ``-k/--top-k`` (top-k
vectors or subspaces), ``-o/--output`` (the file or folder a command writes), ``--json``,
``--csv``, ``--html`` (reports; ``-`` is stdout for the first two), ``-q/--quiet``, ``--dtype``
(the floating-point dtype a command writes), and for
commands that read checkpoints ``--offline``, ``--revision``, ``--token``, ``--cache-dir``
(spelled as the ``hf`` CLI spells them). A command that grows one of these uses the decorator
here, so a flag means one thing everywhere.

Spellings a command had before stay accepted as hidden aliases (:func:`aliased`): ``--out`` for
``--output``, ``--top`` for ``--top-k``, intruders' ``-e`` for ``--epsilon``, extract's ``--save-dtype``
for ``--dtype``. They do not show in ``--help``.

Nothing here imports the library: ``deltakit --help`` must answer at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

_ALIAS_SUFFIX = "__old_spelling"


def aliased(dest: str, names: tuple[str, ...], multiple: bool = False, type: Any = None,
            callback: Callable[..., Any] | None = None) -> Callable[[F], F]:
    """Accept the hidden spellings ``names`` for the option whose parameter is ``dest``.

    Given alone, an old spelling fills ``dest``; given beside the new one, a repeatable option
    takes both (new first), and a single-valued one is refused as ambiguous.
    """
    hidden = dest + _ALIAS_SUFFIX

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            old = kwargs.pop(hidden, None)
            if old not in (None, ()):
                context = click.get_current_context()
                source = context.get_parameter_source(dest)
                given = source is not None and source.name == "COMMANDLINE"
                if not given:
                    kwargs[dest] = old
                elif multiple:
                    kwargs[dest] = tuple(kwargs[dest]) + tuple(old)
                else:
                    raise click.UsageError(f"{names[0]} is an old spelling of the option given beside it; give one",
                                           context)
            return command(*args, **kwargs)

        return click.option(*names, hidden, multiple=multiple, type=type, hidden=True,
                            callback=callback)(wrapper)  # type: ignore[return-value]

    return decorate


def _fractions(what: str, example: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback: each value in (0, 1], else a usage error naming it (no library import)."""

    def check(context: click.Context, parameter: click.Parameter, value: Any) -> Any:
        for number in (value if isinstance(value, tuple) else (value,)):
            if number is not None and not 0.0 < number <= 1.0:
                raise click.BadParameter(f"{what} {number:g} is outside (0, 1]; use e.g. {example}")
        return value

    return check


def energy_option(help: str, multiple: bool = True, default: Any = (0.9,)) -> Callable[[F], F]:
    """``-e/--energy X``: a fraction of ‖ΔW‖²_F in (0, 1]."""
    return click.option("--energy", "-e", "energy", type=float, multiple=multiple, default=default,
                        show_default=default is not None, metavar="X", help=help,
                        callback=_fractions("energy fraction", "--energy 0.9"))


def epsilon_option(help: str, multiple: bool = True, default: Any = (0.5,)) -> Callable[[F], F]:
    """``--epsilon ε``: the intruder threshold (intruders' old ``-e`` stays a hidden alias where it was)."""
    return click.option("--epsilon", "epsilon", type=float, multiple=multiple, default=default, show_default=True,
                        metavar="ε", help=help, callback=epsilon_check)


epsilon_check = _fractions("epsilon", "--epsilon 0.5")


def top_k_option(dest: str, help: str, multiple: bool = False, default: Any = 10) -> Callable[[F], F]:
    """``-k/--top-k K`` (``--top`` is a hidden old spelling)."""

    def decorate(command: F) -> F:
        command = aliased(dest, ("--top",), multiple=multiple, type=int)(command)
        return click.option("--top-k", "-k", dest, type=int, multiple=multiple, default=default, show_default=True,
                            metavar="K", help=help)(command)

    return decorate


def output_option(metavar: str, help: str, required: bool = False, dest: str = "out") -> Callable[[F], F]:
    """``-o/--output PATH``, one spelling for every command that writes a file or folder (``--out`` hidden)."""

    def decorate(command: F) -> F:
        if required:  # required, but the old spelling may be the one given: checked once the alias is merged
            command = _required(dest, "'-o' / '--output'")(command)
        command = aliased(dest, ("--out",))(command)
        return click.option("-o", "--output", dest, metavar=metavar, help=help + (" Required." if required else ""))(command)

    return decorate


def _required(dest: str, shown: str) -> Callable[[F], F]:
    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get(dest) is None:
                raise click.UsageError(f"missing option {shown}", click.get_current_context())
            return command(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def dtype_option(help: str, old: tuple[str, ...] = ()) -> Callable[[F], F]:
    """``--dtype fp32|bf16|fp16`` (or float32|bfloat16|float16); ``old`` are hidden old spellings."""

    def decorate(command: F) -> F:
        if old:
            command = aliased("dtype", old)(command)
        return click.option("--dtype", "dtype", metavar="fp32|bf16|fp16", help=help)(command)

    return decorate


json_option = click.option("--json", "json_path", metavar="PATH", help="Write the full report as JSON ('-' for stdout).")
csv_option = click.option("--csv", "csv_path", metavar="PATH", help="Write one CSV row per matrix ('-' for stdout).")
html_option = click.option(
    "--html", "html_path", metavar="PATH",
    help="Write the report as one self-contained HTML page (tables, figures, versions, the command line).")


def quiet_option(help: str = "No table on stdout.") -> Callable[[F], F]:
    return click.option("--quiet", "-q", is_flag=True, help=help)


def hub_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--offline, --revision, --token, --cache-dir for commands that open checkpoints (as `hf download`
    spells them); Hub downloads stay silent with the command's --quiet."""

    @functools.wraps(command)
    def wrapper(*args: Any, offline: bool = False, revision: str | None = None, token: str | None = None,
                cache_dir: str | None = None, **kwargs: Any) -> Any:
        from deltakit.io.hub import hub_settings

        with _environment(HF_TOKEN=token, HF_HUB_CACHE=cache_dir), \
                hub_settings(offline=offline, progress=not kwargs.get("quiet", False), revision=revision):
            return command(*args, **kwargs)

    for option in (
        click.option("--cache-dir", metavar="DIR",
                     help="Hugging Face cache folder for hub ids (default: HF_HUB_CACHE, else ~/.cache/huggingface/hub)."),
        click.option("--token", metavar="TOKEN", help="Hub token for gated or private repositories (default: HF_TOKEN, "
                                                      "else the one `hf auth login` saved)."),
        click.option("--revision", metavar="REV",
                     help="Branch, tag or commit of every hub id given without @REV (default: main)."),
        click.option("--offline", is_flag=True,
                     help="No network: hub ids (org/name[@revision]) must already be in the local cache."),
    ):
        wrapper = option(wrapper)
    return wrapper


@contextlib.contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """The given (non-None) environment variables set for the block, restored after it."""
    previous = {name: os.environ.get(name) for name, value in values.items() if value is not None}
    for name in previous:
        os.environ[name] = str(values[name])
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
