"""Device plumbing: which device a run uses, the CUDA streams kept per role, reads ahead of the work,
the matrix threads, captured CUDA graphs and the host's solver threads. The math in
:mod:`deltakit.spectral` is testable without any of it.
"""
