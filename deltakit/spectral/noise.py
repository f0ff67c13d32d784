"""Storage rounding inside ΔW = W_ft − W_base: how much of ‖ΔW‖²_F it accounts for, and where.

Both checkpoints are stored on a floating-point grid, so the stored ΔW is the true update plus
a rounding part N. Its size per entry is known from the dtype and the stored value (the grid
spacing, "ulp"), except for one thing: whether the true update of that entry was smaller than a
grid step. When it is, W_ft and W_base often round to the same number and the update is erased
rather than blurred. The model used here (docs/metrics.md, "storage noise"):

* same dtype on both sides ("shared grid"): each stored value is the rounding of an unknown
  value that sits uniformly within its grid cell; then E[ΔW_stored | δ] = δ and the rounding
  part of one entry has variance u²·φ(1−φ), φ = frac(|δ|/u), u the grid step. Averaged over a
  Gaussian spread of δ/u with scale s this is :func:`dither_variance` (→ u²/6 for updates much
  larger than a step, ≈ u·E|δ| for updates much smaller). The scale of δ at each entry is read
  from the stored ΔW itself, whose absolute value is an unbiased estimate of |δ| under this
  model, through a rank-1 fit of |ΔW| (row means × column means), so large rows and columns get
  their own scale.
* different dtypes ("independent"): each side's rounding is independent of the other and of δ,
  variance (u_base² + u_ft²)/12.
* both sides quantized ("quantized": fp8 with block / channel / tensor scales, MXFP4). Assumed:
  the fine-tune started from the dequantized base and was re-quantized to the same format, so
  the base is the exact starting point and only the fine-tune rounds, once. The grid step of
  an entry is a property of its stored code and scale, u = spacing(q)·s
  (``Checkpoint.quantization_step``), passed in per entry for both sides. Where the two steps
  differ by a power of two (the same scale, or one doubled) the grids coincide and the base
  sits on the fine-tune's grid: the rounding part is u·(round(t) − t), t = δ/u, of variance
  u²·E[(t − round t)²] (:func:`requantization_variance`: → u²/12 for updates much larger than
  a step; ≈ δ² below one, where the update is erased). Where the fine-tune's scale changed
  (an amax recomputed after training) the grids are offset by an unknown fraction of a step
  and even unchanged entries move: u_ft²/12. The bf16 rounding of the dequantized values (2⁻⁹
  relative, against fp8's 2⁻⁴) is left out.

Example::

    noise = storage_noise(base, delta, torch.bfloat16, torch.bfloat16)
    noise.energy / float(delta.square().sum())   # the share of ‖ΔW‖² that is rounding
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltakit.spectral.rounding import RoundingSums, decide_rounding

SMALL_SCALE = 0.2  # below it the small-scale series of dither_variance is exact to < 1e-6 relative
FOURIER_TERMS = 3  # above SMALL_SCALE the terms k > 3 add < 3e-8 (relative 2e-7): one pass each on the GPU


@dataclass(frozen=True)
class StorageNoise:
    """Estimated storage rounding in one stored ΔW (m×n).

    ``energy``: E‖N‖²_F, the rounding part's expected squared Frobenius norm.
    ``row_energy_max`` / ``col_energy_max``: the largest expected squared norm of one row / one
    column of N; their square roots bound N's spectral norm (Bandeira & van Handel 2016).
    ``unchanged_fraction``: the exact fraction of entries with W_ft == W_base.
    ``model``: "shared-grid", "independent", "quantized" (both sides on a quantized grid with
    per-entry steps) or "exact" (no rounding: an adapter's ΔW).
    """

    energy: float
    row_energy_max: float
    col_energy_max: float
    unchanged_fraction: float
    numel: int
    model: str
    sides: str = ""  # shared-grid / independent: "one-sided", "two-sided" or "between" (deltakit.spectral.rounding)
    sides_reason: str = ""  # why that model: the test's figures, or the option that forced it

    @property
    def rms(self) -> float:
        """Root mean square of the rounding part per entry."""
        return math.sqrt(self.energy / self.numel) if self.numel else 0.0

    @property
    def spectral_edge(self) -> float:
        """≈ the largest singular value rounding alone puts into ΔW: √(max row energy) + √(max column energy).

        For equal variances σ² per entry this is (√m + √n)·σ, the Bai–Yin edge of an m×n noise
        matrix; with unequal variances the row and column maxima bound it (Latała 2005,
        Bandeira & van Handel 2016), so a few large rows or columns lift the edge as they should.
        """
        return math.sqrt(self.row_energy_max) + math.sqrt(self.col_energy_max)

    def share(self, delta_energy: float) -> float:
        """Estimated fraction of ``delta_energy`` (= ‖ΔW‖²_F) that is rounding, clipped to [0, 1]."""
        if delta_energy <= 0.0:
            return 0.0
        return min(1.0, max(0.0, self.energy / delta_energy))


def exact_noise(delta: torch.Tensor) -> StorageNoise:
    """No storage rounding (a ΔW computed from adapter factors); only the unchanged fraction is measured."""
    unchanged = float((delta == 0).sum()) / delta.numel() if delta.numel() else 0.0
    return StorageNoise(0.0, 0.0, 0.0, unchanged, delta.numel(), "exact")


def grid_step(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype``'s grid at each of ``values`` (the ulp of |v|), as float32/64 like ``values``.

    ``values`` must already be exact ``dtype`` numbers held in a wider float. Zeros and
    subnormals get the subnormal spacing.
    """
    info = torch.finfo(dtype)
    mantissa, _ = torch.frexp(values)  # v = mantissa · 2^exponent, |mantissa| in [0.5, 1)
    # 2^(exponent−1) is v / (2·mantissa) exactly: a correctly rounded quotient that is representable
    # (2^exponent itself overflows at bf16's top binade held in float32). Not torch.ldexp: with an
    # integer exponent on a GPU that is not the current one, torch 2.11 launches its kernel on the
    # current GPU (reading another device's memory)
    half_power = torch.where(mantissa == 0, torch.zeros_like(values), values / (2 * mantissa))
    return (half_power * info.eps).clamp_min(info.tiny * info.eps)


def dither_variance(scale: torch.Tensor) -> torch.Tensor:
    """E[φ(1−φ)] with φ = frac(t), t ~ N(0, scale²): the rounding variance, in grid steps², of one
    entry of a shared-grid ΔW whose true update has spread ``scale`` steps.

    φ(1−φ) has the Fourier series 1/6 − Σ_k cos(2πkt)/(π²k²), and E cos(2πkt) = exp(−2π²k²s²),
    so for s ≥ 0.2 the sum converges in a few terms. For s < 0.2, |t| < 1 almost surely and
    φ(1−φ) = |t| − t², whose mean is s√(2/π) − s². The two agree at s = 0.2 to 1e-7.
    """
    small = scale * math.sqrt(2.0 / math.pi) - scale * scale
    large = torch.full_like(scale, 1.0 / 6.0)
    for k in range(1, FOURIER_TERMS + 1):
        large -= torch.exp(-2.0 * math.pi**2 * k * k * scale * scale) / (math.pi**2 * k * k)
    return torch.where(scale < SMALL_SCALE, small, large)


def requantization_variance(scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """E[(t − round t)²] with t = c + z, z ~ N(0, scale²): the rounding variance, in grid steps², of
    an entry that starts ``offset`` = c steps off the grid it is rounded to once, moved by a true
    update of spread ``scale`` steps (c = 0: the start is on that grid).

    (t − round t)² has the Fourier series 1/12 + Σ_k (−1)^k cos(2πkt)/(π²k²), and
    E cos(2πk(c + z)) = cos(2πkc)·exp(−2π²k²s²): five terms reach 1e-7 for s ≥ 0.15. Below,
    t stays within (−1.5, 1.5) but for a 6.7σ tail, where (t − round t)² = t² − (2|t| − 1)·[|t| > ½],
    whose Gaussian mean is closed-form (c′ = c − round c):
    c′² + s² − 2Σ_± [s·φ(d±) + (±c′ − ½)·Φ(d±)], d± = (±c′ − ½)/s. For c = 0 and s → 0 it is s²:
    the update is erased.
    """
    if offset is None:
        offset = torch.zeros_like(scale)
    centred = offset - torch.round(offset)
    large = torch.full_like(scale, 1.0 / 12.0)
    # cos(2πkc) and exp(−2π²k²s²) by recurrences (Chebyshev; q^(k²) = q^((k−1)²)·q^(2k−1)): products, not
    # a transcendental per term and entry; in place, so a block holds few temporaries (tests/memory_model.py)
    first = torch.cos(2.0 * math.pi * centred)
    cosine, previous = first, torch.ones_like(scale)
    q = torch.exp(scale.square().mul_(-2.0 * math.pi**2))
    power, odd = q.clone(), q.square().mul_(q)  # q^(k²) at k = 1; q^(2k+1) for the next step
    for k in range(1, REQUANTIZATION_TERMS + 1):
        large.addcmul_(cosine, power, value=(-1) ** k / (math.pi**2 * k * k))
        cosine, previous = torch.mul(first, cosine).mul_(2.0).sub_(previous), cosine
        power.mul_(odd)
        odd.mul_(q).mul_(q)
    del first, cosine, previous, q, power, odd
    s = scale.clamp_min(1e-30)
    small = centred.square().add_(scale.square())
    for sign in (1.0, -1.0):
        shifted = torch.mul(centred, sign).sub_(0.5)  # ±c′ − ½
        d = shifted / s
        normal_cdf = torch.erfc(d * (-1.0 / math.sqrt(2.0))).mul_(0.5)  # Φ(d); torch.special.ndtr is scalar on the CPU
        density = torch.exp(d.square_().mul_(-0.5)).mul_(s).mul_(1.0 / math.sqrt(2.0 * math.pi))  # s·φ(d)
        small.sub_(density.addcmul_(shifted, normal_cdf).mul_(2.0))
        del shifted, d, normal_cdf, density
    return torch.where(scale < REQUANTIZATION_SMALL, small, large)


REQUANTIZATION_SMALL = 0.15  # below it the closed form for |t| < 1.5 is exact to < 1e-10
REQUANTIZATION_TERMS = 5  # above it the terms k > 5 add < 1e-7 (relative 1e-6)
BLOCK_ELEMENTS = 1 << 24  # entries per row block of elementwise work on a GPU (64 MiB per fp32 temporary)
CPU_BLOCK_ELEMENTS = 1 << 20  # on the CPU (4 MiB per temporary): host memory is the process's RSS, and
                              # a dozen temporaries of a block stay within a few tens of MiB


def block_elements(device: torch.device | str) -> int:
    """Entries per row block of the noise model's elementwise work on ``device``."""
    return BLOCK_ELEMENTS if torch.device(device).type == "cuda" else CPU_BLOCK_ELEMENTS


def row_blocks(shape: tuple[int, int], block_elements: int = BLOCK_ELEMENTS) -> list[slice]:
    """Row slices covering an m×n matrix, each of at most ~``block_elements`` entries."""
    m, n = shape
    step = max(1, block_elements // max(1, n))
    return [slice(start, min(m, start + step)) for start in range(0, m, step)]


@dataclass(frozen=True)
class UpdateScale:
    """A rank-1 fit of |ΔW|: E|δ_ij| ≈ rows[i]·cols[j] / overall (row means, column means, overall mean)."""

    rows: torch.Tensor  # (m, 1)
    cols: torch.Tensor  # (1, n)
    overall: float

    def at(self, block: slice) -> torch.Tensor:
        if self.overall == 0.0:
            return torch.zeros_like(self.rows[block] * self.cols)
        return self.rows[block] * self.cols / self.overall


class ScaleSums:
    """:func:`update_scale` gathered a row block at a time, so ΔW never needs to be held whole."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device | str) -> None:
        m, n = shape
        self.shape = (m, n)
        self.rows = torch.empty((m, 1), dtype=dtype, device=device)
        self.col_sums = torch.zeros((1, n), dtype=torch.float64, device=device)

    def add(self, start: int, delta: torch.Tensor) -> None:
        """Rows ``start:start + len(delta)`` of ΔW (b×n, the accumulator's dtype)."""
        for block in row_blocks(tuple(delta.shape), block_elements(delta.device)):
            magnitude = delta[block].abs()
            self.rows[start + block.start:start + block.stop] = magnitude.mean(dim=1, keepdim=True)
            self.col_sums += magnitude.sum(dim=0, keepdim=True, dtype=torch.float64)

    def result(self) -> UpdateScale:
        m = self.shape[0]
        cols = (self.col_sums / max(m, 1)).to(self.rows.dtype)
        return UpdateScale(self.rows, cols, float(self.rows.double().mean()) if m else 0.0)


def update_scale(delta: torch.Tensor) -> UpdateScale:
    """The :class:`UpdateScale` of a stored ΔW, by row blocks."""
    sums = ScaleSums(tuple(delta.shape), delta.dtype, delta.device)
    sums.add(0, delta)
    return sums.result()


def rounding_variance(base: torch.Tensor, delta: torch.Tensor, base_dtype: torch.dtype,
                      ft_dtype: torch.dtype, scale: torch.Tensor | None = None,
                      steps: tuple[torch.Tensor, torch.Tensor] | None = None,
                      sides: str = "two-sided") -> torch.Tensor:
    """Expected squared rounding part of each entry of the stored ΔW (same shape and dtype as ``delta``).

    ``base`` holds the stored base values and ``delta`` the stored ΔW, both exactly, in a wider
    dtype (float32 or float64); ``scale`` is E|δ| per entry (default: the rank-1 fit of this
    ``delta``). ``steps``: (base, fine-tune) quantization steps per entry, shaped like ``delta``,
    when both sides are quantized; they replace the dtypes' grids. ``sides``: "two-sided" (both
    sides rounded from unrounded weights), "one-sided" (the fine-tune rounded once from the stored
    base) or "between" (the geometric mean of the two); see the module docstring and
    :mod:`deltakit.spectral.rounding`.
    """
    if steps is not None:
        return _requantized_variance(base, delta, *(step.to(delta.dtype) for step in steps), scale)
    if sides == "between":
        return torch.sqrt(rounding_variance(base, delta, base_dtype, ft_dtype, scale, None, "one-sided")
                          * rounding_variance(base, delta, base_dtype, ft_dtype, scale, None, "two-sided"))
    ft_step = grid_step(base + delta, ft_dtype)
    base_step = grid_step(base, base_dtype)
    if base_dtype != ft_dtype:
        return ft_step.square_().div_(12.0) + (0.0 if sides == "one-sided" else base_step.square_().div_(12.0))
    if scale is None:
        scale = update_scale(delta).at(slice(None))
    step = torch.maximum(base_step, ft_step)
    del base_step, ft_step
    spread = (scale / step).mul_(math.sqrt(math.pi / 2.0))  # Gaussian: E|t| = s·√(2/π)
    if sides == "one-sided":  # the base, exact, rounded once with its update onto the grid it is stored on
        variance = requantization_variance(spread, base / step)
    else:
        variance = dither_variance(spread)
    return variance.mul_(step.square_())


def _requantized_variance(base: torch.Tensor, delta: torch.Tensor, base_step: torch.Tensor, ft_step: torch.Tensor,
                          scale: torch.Tensor | None) -> torch.Tensor:
    """Model "quantized" (module docstring): the base, exact, rounded once onto the fine-tune's grid.

    Where the steps differ by a power of two (the same scale, or a doubled one) the base sits on
    that grid (offset 0, the larger step, as for shared dtypes); elsewhere its offset from the
    fine-tune's grid, base / u_ft − round(base / u_ft), is known from the stored values.
    """
    mantissa, _ = torch.frexp(base_step / ft_step.clamp_min(torch.finfo(ft_step.dtype).tiny))
    same_grid = mantissa == 0.5
    if scale is None:
        scale = update_scale(delta).at(slice(None))
    step = torch.where(same_grid, torch.maximum(base_step, ft_step), ft_step)
    offset = torch.where(same_grid, torch.zeros_like(base), base / step)
    spread = math.sqrt(math.pi / 2.0) * scale / step  # Gaussian: E|t| = s·√(2/π)
    return step.square() * requantization_variance(spread, offset)


class NoiseSums:
    """The sums behind a :class:`StorageNoise`, gathered a row block at a time (``storage_noise``'s loop,
    also what rank's blocked path feeds with blocks it reads from disk). Sums stay on the device until
    :meth:`result`: one synchronisation per matrix, not one per block."""

    def __init__(self, shape: tuple[int, int], base_dtype: torch.dtype, ft_dtype: torch.dtype,
                 device: torch.device | str, quantized: bool = False, sides: tuple[str, str] = ("two-sided", "")
                 ) -> None:
        m, n = shape
        self.shape = (m, n)
        self.base_dtype, self.ft_dtype, self.quantized = base_dtype, ft_dtype, quantized
        self.sides = ("", "") if quantized else sides  # (model, why) of rounding_variance's ``sides``
        self.shared = quantized or base_dtype == ft_dtype
        self.row_energy = torch.empty(m, dtype=torch.float64, device=device)
        self.col_energy = torch.zeros(n, dtype=torch.float64, device=device)
        self.unchanged = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, start: int, base: torch.Tensor, delta: torch.Tensor, scale: UpdateScale | None,
            steps: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Rows ``start:start + len(delta)``: the stored base (as stored or in ``delta``'s dtype), ΔW (b×n),
        the whole matrix's :class:`UpdateScale` (None unless shared) and the rows' quantization steps."""
        for block in row_blocks(tuple(delta.shape), block_elements(delta.device)):
            rows = slice(start + block.start, start + block.stop)
            # the base may be held as stored (bf16): its values are exact in delta's dtype, converted a block at a time
            variance = rounding_variance(base[block].to(delta.dtype), delta[block], self.base_dtype, self.ft_dtype,
                                         scale.at(rows) if scale is not None else None,
                                         (steps[0][block], steps[1][block]) if steps is not None else None,
                                         self.sides[0] or "two-sided")
            self.row_energy[rows] = variance.sum(dim=1, dtype=torch.float64)
            self.col_energy += variance.sum(dim=0, dtype=torch.float64)
            self.unchanged += (delta[block] == 0).sum()

    def result(self) -> StorageNoise:
        numel = self.shape[0] * self.shape[1]
        energy, row_max, col_max, unchanged_count = torch.stack(
            [self.row_energy.sum(), self.row_energy.max(), self.col_energy.max(), self.unchanged.double()]).tolist()
        return StorageNoise(
            energy=energy, row_energy_max=row_max, col_energy_max=col_max,
            unchanged_fraction=unchanged_count / numel, numel=numel,
            model="quantized" if self.quantized else "shared-grid" if self.shared else "independent",
            sides=self.sides[0], sides_reason=self.sides[1],
        )


def storage_noise(base: torch.Tensor, delta: torch.Tensor, base_dtype: torch.dtype,
                  ft_dtype: torch.dtype, steps: tuple[torch.Tensor, torch.Tensor] | None = None,
                  rounding: str = "auto") -> StorageNoise:
    """The :class:`StorageNoise` of a stored ΔW (2-D, on any device), computed by row blocks.

    ``steps``: the (base, fine-tune) per-entry quantization steps (m×n, e.g.
    ``Checkpoint.quantization_step``) when both sides are stored quantized; model "quantized".
    ``base`` may be held in its stored dtype or in ``delta``'s (the same numbers either way).
    ``rounding``: which sides were rounded, "one-sided", "two-sided" or "auto" (decided from this ΔW,
    :func:`rounding_sides`).
    """
    if delta.ndim != 2:
        raise ValueError(f"expected a 2-D ΔW, got shape {tuple(delta.shape)}")
    m, n = delta.shape
    if delta.numel() == 0:
        return StorageNoise(0.0, 0.0, 0.0, 0.0, 0, "exact")
    if steps is not None and any(tuple(step.shape) != (m, n) for step in steps):
        raise ValueError(f"quantization steps {[tuple(s.shape) for s in steps]} do not match ΔW {(m, n)}")
    shared = steps is None and base_dtype == ft_dtype
    scale = update_scale(delta) if shared or steps is not None else None
    sides = rounding_sides(base, delta, base_dtype, ft_dtype, scale, rounding) if steps is None else ("", "")
    sums = NoiseSums((m, n), base_dtype, ft_dtype, delta.device, quantized=steps is not None, sides=sides)
    sums.add(0, base, delta, scale, steps)
    return sums.result()


DETECTION_ENTRIES = 1 << 18  # entries (whole rows, evenly spaced) the rounding test reads of a larger ΔW


def rounding_sides(base: torch.Tensor, delta: torch.Tensor, base_dtype: torch.dtype, ft_dtype: torch.dtype,
                   scale: UpdateScale | None, rounding: str = "auto") -> tuple[str, str]:
    """(model, why) for ``rounding_variance``'s ``sides`` of one ΔW: as asked, or by
    :func:`~deltakit.spectral.rounding.decide_rounding` on a grid shared by both sides (evenly spaced rows,
    up to :data:`DETECTION_ENTRIES` entries); on two grids "auto" keeps both sides' rounding."""
    declared = declared_sides(base_dtype, ft_dtype, rounding)
    if declared is not None or scale is None:
        return declared or ("two-sided", "")
    sums = RoundingSums(delta.device)
    rounding_evidence(sums, 0, base, delta, base_dtype, scale, max(1, math.ceil(delta.numel() / DETECTION_ENTRIES)))
    return decide_rounding(sums)


def declared_sides(base_dtype: torch.dtype, ft_dtype: torch.dtype, rounding: str) -> tuple[str, str] | None:
    """(model, why) where it needs no data: as asked, or both sides' rounding on two grids; None: decide from ΔW."""
    if rounding != "auto":
        return rounding, f"--rounding {rounding}"
    if base_dtype != ft_dtype:
        return "two-sided", "different dtypes: each side rounded on its own grid"
    return None


def rounding_evidence(sums: RoundingSums, start: int, base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype,
                      scale: UpdateScale, stride: int = 1) -> None:
    """Rows ``start:start + len(delta)`` of a shared-grid ΔW (every ``stride``-th) into ``sums``: each entry's
    |ΔW|, grid step and update scale."""
    for block in row_blocks(tuple(delta.shape), block_elements(delta.device)):
        picked = slice(block.start, block.stop, stride)
        change = delta[picked]
        if not change.numel():
            continue
        held = base[picked].to(delta.dtype)
        step = torch.maximum(grid_step(held, dtype), grid_step(held + change, dtype))
        sums.add(change, step, torch.full_like(change, scale.overall))
