"""The one exception type for problems a user can act on."""


class DeltakitError(Exception):
    """A user-facing problem (bad path, corrupt file, mismatched model...).

    The CLI prints it as a single ``Error: <message>`` line and exits 1;
    anything else that escapes is a bug and keeps its traceback.
    """


class DeltakitWarning(Warning):
    """Something a user should know about a run that still completes (an input file left out, a partial result).

    The CLI prints each as one ``warning: <message>`` line on stderr, even with ``--quiet``;
    from Python they are ordinary warnings (``warnings.catch_warnings`` sees them).
    """
