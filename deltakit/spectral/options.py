"""How spectra are computed: one frozen dataclass shared by every command, validated when it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from deltakit.errors import DeltakitError
from deltakit.spectral.rounding import ROUNDING_CHOICES

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}
SPECTRUM_CHOICES = ("auto", "adaptive", "full")
BLOCKED_BYTES = 7 * 2**29
"""A pair whose ΔW in the compute dtype is over this (3.5 GiB) is analysed by row blocks.

Forming a ΔW of X bytes (fp32) from bf16 holds W_base, W_ft and ΔW, 2X: at 3.5 GiB that is
7.5 GB, the most the whole path can take under the 8 GB a layer of a 405B model is held to. 405B's MLP matrices (53248×16384,
3.25 GiB) stay on the whole path (adaptive spectrum, amplification; 7.45 GB by the memory
model of docs/benchmarks.md); its embedding and lm_head (7.8 GiB) do not."""
BLOCK_BYTES = 256 * 1024**2  # ΔW bytes (compute dtype) per row block read
GPU_MATRIX_THREADS = 3  # matrices `rank`'s adaptive path computes at once on a GPU (docs/benchmarks.md)


@dataclass(frozen=True)
class AdaptivePlan:
    """How far the adaptive path goes before the full eigendecomposition is cheaper.

    ``min_side``: matrices with a smaller side go straight to the full path (it is cheap there).
    ``start_width`` doubles while the metrics need more values, up to ``crossover`` × min(m, n).
    ``rounds``: power iterations per width. ``probes`` × ``steps``: the Lanczos quadrature of the tail.
    """

    min_side: int = 2048  # below it the full path is faster (1024×8192 on an H200, docs/benchmarks.md)
    start_width: int = 128
    crossover: float = 0.25
    rounds: int = 8
    warmup: int = 5  # power iterations before the first Rayleigh–Ritz round (a fine-tune's ΔW then settles in one)
    probes: int = 32
    steps: int = 64  # Lanczos steps at a side of 4096 or less; more above it (steps_for)
    settled_relative: float = 1e-3  # a top value counts as converged (and deflates the tail) below this error
    deflation_angle: float = 1e-3  # ... and the span of those within this angle (sin) of the true one

    def steps_for(self, side: int) -> int:
        """Lanczos steps for a tail whose operator is side×side: ``steps`` up to 4096, then ∝ √side in
        multiples of 32 (8192: 96, 16384: 128). The quadrature's bias on square noisy deltas grows with
        the side at a fixed step count: −0.27 % at 4096² and −0.58 % at 8192² with 64 steps, −0.30 %
        at 8192² with 96, against an fp64 eigendecomposition."""
        scaled = self.steps * math.sqrt(max(side, 1) / 4096)
        return max(self.steps, 32 * math.ceil(scaled / 32 - 1e-9))


@dataclass(frozen=True)
class SpectralOptions:
    """How spectra are computed; shared by rank, extract and intruders."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | fp64: the dtype of ΔW and of the decomposition
    exact: bool = False  # full SVD instead of the Gram/eigh fast path
    prefetch: int | None = None  # tensor pairs read ahead on background threads; None: by device (reads_ahead)
    spectrum: str = "auto"  # auto | adaptive | full: how much of each spectrum `rank` computes (docs/metrics.md)
    workers: int | None = None  # matrices `rank` computes at once, each on a thread; None: by device (matrix_threads)
    adaptive_plan: AdaptivePlan = field(default_factory=AdaptivePlan)  # how far the adaptive path goes
    blocked_bytes: int = BLOCKED_BYTES  # `rank` reads a tall pair whose ΔW is larger than this by row blocks
    block_bytes: int = BLOCK_BYTES  # ... this much ΔW at a time
    rounding: str = "auto"  # auto | one-sided | two-sided: which sides of a pair were rounded (spectral.rounding)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise DeltakitError(f"unknown precision {self.precision!r}; use fp32 or fp64")
        if self.spectrum not in SPECTRUM_CHOICES:
            raise DeltakitError(f"unknown spectrum mode {self.spectrum!r}; use one of {', '.join(SPECTRUM_CHOICES)}")
        if self.rounding not in ROUNDING_CHOICES:
            raise DeltakitError(f"unknown rounding {self.rounding!r}; use one of {', '.join(ROUNDING_CHOICES)}")
        if self.workers is not None and self.workers < 1:
            raise DeltakitError(f"workers must be at least 1, not {self.workers}")
        if self.prefetch is not None and self.prefetch < 0:
            raise DeltakitError(f"prefetch must be 0 or more, not {self.prefetch}")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def reads_ahead(self, device: torch.device) -> int:
        """Pairs read ahead (``prefetch``, else by device): 8 on a GPU, where the reads are the bound and
        up to four reader threads keep it fed (a 7B pair streamed twice as fast with 8 ahead as with 2 on an
        H200 host; the 4 GB read-ahead budget caps what they hold);
        2 on the CPU, where the computation is slower than reading."""
        if self.prefetch is not None:
            return self.prefetch
        return 8 if device.type == "cuda" else 2

    def matrix_threads(self, device: torch.device, adaptive: bool = True) -> int:
        """Matrices `rank` works on at once (``workers``, else by path and device): three for the
        adaptive path on a GPU, each thread with its own stream, so that one's host work overlaps
        the others' kernels (:mod:`deltakit.device.workers`); one on the full path, bound by the device's
        eigensolver, where more threads only hold more workspace (a 70B-shaped slice with
        --full-spectrum reserved 13.9 GB on three threads, 7.8 GB on one); one on the CPU, whose
        BLAS already uses every core."""
        if self.workers is not None:
            return self.workers
        return GPU_MATRIX_THREADS if device.type == "cuda" and adaptive else 1

    @property
    def method(self) -> str:
        return "exact" if self.exact else "gram"

    def adaptive_on(self, device: torch.device) -> bool:
        """Whether `rank` computes only the top of each spectrum (the adaptive path) on ``device``.

        "auto" does on a GPU, in fp32, without --exact: there a block of matrix products costs a
        fraction of a full eigendecomposition (4096² on an H200: 53 against 97 ms). On the CPU the
        full path stays the default (2048² on a 2-core machine: 0.69 s full against 0.85 s
        adaptive); "adaptive" forces it
        anywhere, "full" never.
        """
        if self.spectrum == "full" or self.exact or self.precision != "fp32":
            return False
        return self.spectrum == "adaptive" or device.type == "cuda"
