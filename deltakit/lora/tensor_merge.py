"""One tensor of a merge or unmerge: what happens to it (a :class:`Step`), cut into row blocks
(:class:`Piece`), read, changed by its adapters' parts, checked finite, and measured against a
reference.

W0 + Σ wᵢ·ΔWᵢ(W0) in fp32, every ΔWᵢ from the same W0, cast back to the written dtype; a tensor
larger than ``piece_bytes_max`` (64 MiB) is done a block of rows at a time, since rows of ΔW need
only the matching rows of the adapter's tensors (and of W0), except where a type needs all rows
at once (DoRA stored transposed). Unmerge inverts it: W0 = W − Σ wᵢ·ΔWᵢ for additive types,
divided by 1 + Σ wᵢ·gᵢ for scaling types (IA3), or W − Σ wᵢ·ΔWᵢ(W0) with W0 given (DoRA).

Example::

    for piece in pieces(steps):
        result, ready = one_tensor(steps[piece.step], piece.rows, *loader(steps[piece.step], piece.rows, ...)())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from deltakit.adapters import Adapter, AdapterModule
from deltakit.device.reads import adopt, fetch
from deltakit.errors import DeltakitError
from deltakit.io.checkpoint import Checkpoint
from deltakit.pairing import TensorPair


@dataclass(frozen=True)
class Part:
    """One adapter's module on one tensor of the model, with its weight wᵢ (scale included)."""

    adapter: int  # index into the adapters
    pair: TensorPair
    module: AdapterModule
    weight: float

    @property
    def transposed(self) -> bool:
        return self.pair.transposed


@dataclass(frozen=True)
class Step:
    """What happens to one tensor of the model."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[Part, ...] = ()
    whole: tuple[int, str] | None = None  # (adapter index, key) of a whole replacement
    check_name: str | None = None  # tensor of the --check base to compare with
    original_name: str | None = None  # unmerge: tensor of the original model the ΔWs are computed from

    @property
    def splits_rows(self) -> bool:
        return all(part.module.splits_rows(part.transposed) for part in self.parts)


PIECE_BYTES = 64 * 1024**2  # a larger tensor is merged in row blocks of about this size


@dataclass(frozen=True)
class Piece:
    """Rows start:stop of one step's tensor (None: all of it), merged and written as one unit."""

    step: int
    rows: tuple[int, int] | None = None


def pieces(steps: list[Step], piece_bytes_max: int = PIECE_BYTES) -> list[Piece]:
    """Every step cut into row blocks of at most PIECE_BYTES (a single row may be larger).

    Host and GPU memory then hold a few blocks whatever the size of the largest tensor; W + ΔW
    is computed block by block, since rows of ΔW need only the matching rows of the adapter's
    tensors (and of W0). A step whose ΔW needs all rows at once (DoRA stored transposed) stays whole.
    """
    pieces: list[Piece] = []
    for index, step in enumerate(steps):
        nbytes = piece_bytes(step)
        if len(step.shape) < 1 or step.shape[0] <= 1 or nbytes <= piece_bytes_max or not step.splits_rows:
            pieces.append(Piece(index))
            continue
        per_piece = max(1, piece_bytes_max // (nbytes // step.shape[0]))
        pieces += [Piece(index, (start, min(start + per_piece, step.shape[0])))
                   for start in range(0, step.shape[0], per_piece)]
    return pieces


def piece_bytes(step: Step, rows: tuple[int, int] | None = None) -> int:
    """Bytes of a step's tensor, or of its rows start:stop."""
    shape = step.shape if rows is None else (rows[1] - rows[0], *step.shape[1:])
    return math.prod(shape) * torch.empty((), dtype=step.dtype).element_size()


def loader(step: Step, rows: tuple[int, int] | None, ckpt: Checkpoint, adapters: list[Adapter],
            original: Checkpoint | None, check: Checkpoint | None, device: torch.device) -> Callable[[], tuple]:
    def read(source: Checkpoint, name: str) -> torch.Tensor:
        return source.get(name) if rows is None else source.get_rows(name, *rows)

    def load() -> tuple:
        # Only weights that change go to the compute device; the rest are copied as read.
        weight = None if step.whole else (fetch(ckpt, step.name, device, rows) if step.parts else read(ckpt, step.name))
        if weight is not None and step.parts and ckpt.format == "pickle" and weight.device.type == "cpu":
            weight = weight.clone()  # a loaded pickle is cached whole; the merge works in place on its copy
        tensors = [adapters[part.adapter].load(part.module) for part in step.parts]
        replacement = read(adapters[step.whole[0]].checkpoint, step.whole[1]) if step.whole else None
        start_weight = fetch(original, step.original_name, device, rows) if original and step.original_name else None
        reference = read(check, step.check_name) if check is not None and step.check_name else None
        return weight, tensors, replacement, start_weight, reference

    return load


def one_tensor(step: Step, rows: tuple[int, int] | None, weight: torch.Tensor | None,
                tensors: list[dict[str, torch.Tensor]], replacement: torch.Tensor | None,
                original: torch.Tensor | None, sign: float,
                device: torch.device) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """The output value of one tensor or of its ``rows`` (copied, replaced whole, merged or unmerged
    in fp32 and cast back).

    Returns the tensor on the host and, for a GPU result still being copied there, a
    ``ready`` function that waits for the copy and refuses non-finite values; it runs on the
    writer's thread, so the GPU never waits for the host.
    """
    if replacement is not None:  # merge starts from the adapter's copy (PEFT loads it before the adapter)
        weight = replacement.to(step.dtype)
        require_finite(step.name, weight, "replaced by the adapter, has")
    assert weight is not None
    if not step.parts:
        return weight.to(step.dtype), None
    pair = step.parts[0].pair  # the parts of one tensor are paired with it alike: a convolution as its matrix
    current = pair.as_matrix(adopt(weight).to(device, torch.float32))
    if sign > 0:
        result = merged(step, rows, current, tensors)
    elif original is not None:
        result = current - sum_deltas(step, rows, pair.as_matrix(adopt(original).to(device, torch.float32)), tensors)
    else:
        result = unmerged(step, rows, current, tensors)
    result = pair.as_stored(result).to(step.dtype)
    if result.device.type != "cuda":
        require_finite(step.name, result, "gives")
        return result, None
    host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
    host.copy_(result, non_blocking=True)
    finite = torch.empty((), dtype=torch.bool, pin_memory=True)
    finite.copy_(torch.isfinite(result).all(), non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def ready() -> None:
        copied.synchronize()
        if not bool(finite):
            raise DeltakitError(NOT_FINITE.format(name=step.name, verb="gives"))

    return host, ready


def sum_deltas(step: Step, rows: tuple[int, int] | None, base: torch.Tensor,
                tensors: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Σ wᵢ·ΔWᵢ(W0) over the step's parts, fp32, each from the same W0 = ``base``."""
    total = torch.zeros_like(base)
    for part, loaded in zip(step.parts, tensors):
        total.add_(part.module.delta(loaded, base, part.transposed, rows), alpha=part.weight)
    return total


def merged(step: Step, rows: tuple[int, int] | None, base: torch.Tensor,
            tensors: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """W0 + Σ wᵢ·ΔWᵢ(W0); one part is applied by its type, in place on W0 where it can. Several scaling
    parts (IA3) scale W0 once, by their factor :func:`scaling_factor`: W0 ⊙ f + Σ wⱼ·ΔWⱼ(W0)."""
    if len(step.parts) == 1:
        part = step.parts[0]
        return part.module.apply(tensors[0], base, part.transposed, rows, part.weight)
    factor = scaling_factor(step, rows, base, tensors)
    if factor is None:
        return base + sum_deltas(step, rows, base, tensors)
    others = Step(step.name, step.shape, step.dtype, tuple(p for p in step.parts if p.module.kind != "scaling"))
    rest = [t for p, t in zip(step.parts, tensors) if p.module.kind != "scaling"]
    return base * factor.to(base.dtype) + sum_deltas(others, rows, base, rest)


def scaling_factor(step: Step, rows: tuple[int, int] | None, weight: torch.Tensor,
                   tensors: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """f = 1 + Σ wᵢ·gᵢ over the step's scaling parts (IA3: gᵢ = lᵢ − 1), in fp64, or None without any.

    Weighted gains can cancel (f ≪ 1 in some row): formed in fp32, f would carry an absolute error
    of ~1e-7, relative 1e-7 / f, which dividing by f on unmerge amplifies; in fp64 W0 ⊙ f and W / f
    keep the storage dtype's own relative precision however small f is (0 is refused as non-finite)."""
    factor: torch.Tensor | None = None
    for part, loaded in zip(step.parts, tensors):
        if part.module.kind == "scaling":
            gain = part.module.gain(loaded, part.transposed, rows, torch.float64, weight.device) * part.weight
            factor = 1 + gain if factor is None else factor + gain
    return factor


def unmerged(step: Step, rows: tuple[int, int] | None, merged: torch.Tensor,
              tensors: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """W0 from W = W0 ⊙ f + Σ wⱼ·ΔWⱼ (f = 1 + Σ wᵢ·gᵢ over scaling parts i, additive parts j), divided in fp64."""
    result = merged
    for part, loaded in zip(step.parts, tensors):
        if part.module.kind != "scaling":
            # additive types read only the dtype and device of the weight they are given
            result = result - part.weight * part.module.delta(loaded, merged, part.transposed, rows)
    factor = scaling_factor(step, rows, merged, tensors)
    return result if factor is None else (result.double() / factor).to(merged.dtype)


NOT_FINITE = ("{name} {verb} non-finite values (inf or nan) after applying the adapter; nothing was written")


def require_finite(name: str, tensor: torch.Tensor, verb: str) -> None:
    """PEFT's safe_merge: never write inf / nan (e.g. a half-precision overflow)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise DeltakitError(NOT_FINITE.format(name=name, verb=verb))


@dataclass(frozen=True)
class Distance:
    """One output tensor against the --check model: max |Δ|, ‖Δ‖², ‖W_ref‖²."""

    name: str
    max_abs: float
    diff_sq: float
    ref_sq: float


def distance(name: str, result: torch.Tensor, reference: torch.Tensor, device: torch.device,
              ready: Callable[[], None] | None) -> Distance:
    if ready is not None:
        ready()
    if not (result.is_floating_point() and reference.is_floating_point()):
        return Distance(name, 0.0, 0.0, 0.0)
    ref = reference.to(device, torch.float64)
    diff = result.to(device, torch.float64) - ref
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    return Distance(name, max_abs, float(torch.sum(diff * diff)), float(torch.sum(ref * ref)))


def summarise(distances: list[Distance]) -> tuple[float, float, str | None]:
    """max |Δ|, sqrt(Σ‖Δ‖² / Σ‖W_ref‖²) and the worst tensor, summed in model order."""
    max_abs, worst = 0.0, None
    for d in distances:
        if worst is None or d.max_abs > max_abs:
            max_abs, worst = d.max_abs, d.name
    diff_sq, ref_sq = sum(d.diff_sq for d in distances), sum(d.ref_sq for d in distances)
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    return max_abs, rel, worst
