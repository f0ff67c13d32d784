"""``python -m deltakit ...``: the ``deltakit`` command (``python -m deltakit rank BASE FT``)."""

from deltakit_cli.console import main

if __name__ == "__main__":
    main()
