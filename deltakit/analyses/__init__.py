"""The analyses of weight deltas: each command a per-matrix function and a report built from its results.

``rank`` (spectra and rank metrics), ``intruders`` (intruder dimensions), ``compare`` (several
fine-tunes' directions), ``trajectory`` (a training run's checkpoints). Each module runs its
per-matrix function through :func:`deltakit.pipeline.run`; the package exports nothing itself, so
no module is shadowed by a function of the same name (``deltakit.rank`` is the function).
"""
