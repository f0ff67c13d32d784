"""How spectra are computed: one frozen dataclass shared by rank, extract and intruders."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltakit.errors import DeltakitError

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}
SPECTRUM_CHOICES = ("auto", "adaptive", "full")
GPU_MATRIX_THREADS = 3  # bench/probes/rank_workers.py times `rank` with 1, 2 and 3


@dataclass(frozen=True)
class SpectralOptions:
    """How spectra are computed; shared by rank, extract and intruders."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | fp64: the dtype of ΔW and of the decomposition
    exact: bool = False  # full SVD instead of the Gram/eigh fast path
    prefetch: int | None = None  # tensor pairs read ahead on background threads; None: by device (reads_ahead)
    spectrum: str = "auto"  # auto | adaptive | full: how much of each spectrum `rank` computes (docs/metrics.md)
    workers: int | None = None  # matrices `rank` computes at once, each on a thread; None: by device (matrix_threads)

    @property
    def dtype(self) -> torch.dtype:
        if self.precision not in PRECISIONS:
            raise DeltakitError(f"unknown precision {self.precision!r}; use fp32 or fp64")
        return PRECISIONS[self.precision]

    def reads_ahead(self, device: torch.device) -> int:
        """Pairs read ahead (``prefetch``, else by device): 8 on a GPU, where the reads are the bound and
        up to four reader threads keep it fed (a 7B pair streamed in 4.7 s with 2 ahead and 2.1 s with 8
        on an H200 host, bench/probes/read_paths.py; the 4 GB read-ahead budget caps what they hold);
        2 on the CPU, where the computation is slower than reading."""
        if self.prefetch is not None:
            return self.prefetch
        return 8 if device.type == "cuda" else 2

    def matrix_threads(self, device: torch.device, adaptive: bool = True) -> int:
        """Matrices `rank` works on at once (``workers``, else by path and device): three for the
        adaptive path on a GPU, each thread with its own stream, so that one's host work overlaps
        the others' kernels (:mod:`deltakit.workers`); one on the full path, bound by the device's
        eigensolver, where more threads only hold more workspace (a 70B-shaped slice with
        --full-spectrum reserved 13.9 GB on three threads, 7.8 GB on one); one on the CPU, whose
        BLAS already uses every core."""
        if self.workers is not None:
            if self.workers < 1:
                raise DeltakitError(f"workers must be at least 1, not {self.workers}")
            return self.workers
        return GPU_MATRIX_THREADS if device.type == "cuda" and adaptive else 1

    @property
    def method(self) -> str:
        return "exact" if self.exact else "gram"

    def adaptive_on(self, device: torch.device) -> bool:
        """Whether `rank` computes only the top of each spectrum (the adaptive path) on ``device``.

        "auto" does on a GPU, in fp32, without --exact: there a block of matrix products costs a
        fraction of a full eigendecomposition (4096² on an H200: 53 against 97 ms). On the CPU the
        full path stays the default (2048² on the 2-core development VM: 0.69 s full against
        0.85 s adaptive, bench/probes/adaptive_probe.py --preset cpu); "adaptive" forces it
        anywhere, "full" never.
        """
        if self.spectrum not in SPECTRUM_CHOICES:
            raise DeltakitError(f"unknown spectrum mode {self.spectrum!r}; use one of {', '.join(SPECTRUM_CHOICES)}")
        if self.spectrum == "full" or self.exact or self.precision != "fp32":
            return False
        return self.spectrum == "adaptive" or device.type == "cuda"
