"""deltakit's command line: thin click commands over the library (installed as ``deltakit_cli``)."""
