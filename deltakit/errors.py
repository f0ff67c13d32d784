"""The one exception type for problems a user can act on."""


class DeltakitError(Exception):
    """A user-facing problem (bad path, corrupt file, mismatched model...).

    The CLI prints it as a single ``Error: <message>`` line and exits 1;
    anything else that escapes is a bug and keeps its traceback.
    """
