"""`deltakit merge` and `deltakit unmerge`: W0 + Σ wᵢ·ΔWᵢ of one or more PEFT adapters, tensor by tensor.

ΔW of each module comes from its adapter type (LoRA, DoRA, AdaLoRA, LoHa, LoKr, VeRA, IA3,
LoRA on parameters; see :mod:`deltakit.adapters`), every ΔWᵢ from the same W0, so the adapters'
order does not matter. The sum is formed in fp32 and cast back to the model's dtype, and checked
to be finite before it is written (PEFT's ``safe_merge``). Unmerge inverts it: W0 = W − Σ wᵢ·ΔWᵢ
for additive types, divided by 1 + Σ wᵢ·gᵢ for scaling types (IA3); DoRA's ΔW depends on W0
through its norms, so unmerging it needs the original model (``base``).

Tensors the adapter carries whole (``modules_to_save``, LoRA-layer biases) replace the model's
on merge. Unmerge cannot restore them: the base values are not in the adapter; it refuses
unless told to leave them as they are in the merged model.

The output is a complete model folder written atomically (a temporary folder renamed into
place): safetensors shards at the input's shard size plus an index, and the input's config,
generation config and tokenizer files. Tensors larger than PIECE_BYTES (64 MiB) are read,
merged and written in row blocks, so host and GPU memory hold a few blocks whatever the model's
size (types whose rows need the whole tensor, DoRA on a transposed weight, are merged whole); a
block's B·A can differ from the whole product's rows in the last fp32 bit. Reads run
ahead on several threads, writes on several others (see :mod:`deltakit.io.writer`).

Example::

    merge("base", "my-lora", "merged")
    merge("base", ["lora-a", "dora-b"], "merged", weights=[0.7, 0.3])
    unmerge("merged", "my-lora", "base-again", check="base").check_max_abs
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from deltakit.adapters import Adapter, AdapterModule, base_info, open_adapter, stored_transposed
from deltakit.delta import ProgressFn, adapter_pairs, adopt, fetch, prefetched
from deltakit.distributed import (
    Parallel, gather_in_order, process_device, reported_device, shared_directory, shared_writer
)
from deltakit.errors import DeltakitError
from deltakit.io.atomic import check_output_path
from deltakit.io.checkpoint import Checkpoint, open_checkpoint, read_model_config
from deltakit.io.inputs import footprints
from deltakit.io.model_files import copy_model_files, drop_quantization_config
from deltakit.io.writer import DEFAULT_SHARD_BYTES, IO_THREADS, BackgroundWriter, rows_to_write
from deltakit.pairing import EMBEDDING_LEAF, TensorPair, match_names, module_type
from deltakit.lora.targets import ties_embeddings
from deltakit.lora.extract import output_dtype


@dataclass
class MergeReport:
    """What merge / unmerge did; ``to_dict()`` is the JSON report."""

    operation: str  # merge | unmerge
    model: str
    adapter: str
    out: str
    scale: float
    device: str
    adapters: list[str] = field(default_factory=list)  # every adapter, in the order given
    weights: list[float] = field(default_factory=list)  # wᵢ of each (scale included)
    adapter_types: list[str] = field(default_factory=list)  # LORA, DORA, LOHA, ...
    lora_modules: int = 0  # adapted tensors (modules of any type), summed over the adapters
    replaced: list[str] = field(default_factory=list)  # tensors replaced whole by the adapter
    left_as_merged: list[str] = field(default_factory=list)  # unmerge: replaced tensors it could not restore
    skipped_tied: list[str] = field(default_factory=list)  # adapter copies of a tied output layer
    tensors: int = 0
    shards: int = 0
    shard_bytes: int = DEFAULT_SHARD_BYTES
    vocab_size: int | None = None  # set when a carried embedding grew the vocabulary
    check: str | None = None
    base: str | None = None  # unmerge: the original model the ΔWs were computed from (DoRA)
    check_max_abs: float | None = None  # unmerge --check: max |W_out − W_base|
    check_rel_fro: float | None = None  # sqrt(Σ‖W_out − W_base‖²) / sqrt(Σ‖W_base‖²)
    check_worst: str | None = None  # the tensor with the largest max |Δ|
    dtype: str | None = None  # --dtype: floating-point tensors written in it
    dequantized: str | None = None  # the model was quantized: what was written instead (never re-quantized)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["elapsed_s"] = round(self.elapsed_s, 3)
        return out


def merge(
    base: str | os.PathLike,
    adapter: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    scale: float = 1.0,
    weights: Sequence[float] | None = None,
    device: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    prefetch: int = 2,
    progress: ProgressFn | None = None,
    parallel: Parallel = Parallel(),
    dtype: str | torch.dtype | None = None,
) -> MergeReport:
    """Write ``base`` + scale · Σ wᵢ·ΔWᵢ of the adapter(s) as a complete model folder at ``out``.

    ``weights`` (one per adapter, default 1 each) weigh several adapters merged in one pass.
    With ``parallel`` (under torchrun) each process merges and writes its share of the tensors.
    ``dtype`` (float32 | bfloat16 | float16) writes every floating-point tensor in it. A quantized
    base (fp8, MXFP4) is read dequantized and written in its logical dtype (bfloat16 unless the
    config or ``dtype`` says otherwise), never re-quantized; ``report.dequantized`` says so.
    Example: ``merge("base", "my-lora", "merged", scale=0.5)``.
    """
    return _apply("merge", base, adapter, out, +1.0, scale, device, force, allow_pickle, prefetch, progress,
                  weights=weights, parallel=parallel, dtype=dtype)


def unmerge(
    merged: str | os.PathLike,
    adapter: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    scale: float = 1.0,
    weights: Sequence[float] | None = None,
    base: str | os.PathLike | None = None,
    check: str | os.PathLike | None = None,
    keep_replaced: bool = False,
    device: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    prefetch: int = 2,
    progress: ProgressFn | None = None,
    parallel: Parallel = Parallel(),
) -> MergeReport:
    """Undo ``merge``: write the W0 that ``merged`` came from at ``out``; with ``check``, measure its
    distance from that base.

    DoRA's ΔW depends on W0 through its norms and cannot be inverted from ``merged`` and the
    adapter alone: ``base`` (the original model) is required then, and its ΔWs are subtracted.
    An adapter that replaced tensors whole (modules_to_save, biases) is refused, since their
    base values are lost; ``keep_replaced`` writes them as they are in ``merged`` instead.
    Example: ``unmerge("merged", "my-lora", "base-again", check="base").check_rel_fro``.
    """
    return _apply("unmerge", merged, adapter, out, -1.0, scale, device, force, allow_pickle, prefetch, progress,
                  weights=weights, original=base, check=check, keep_replaced=keep_replaced, parallel=parallel)


@dataclass(frozen=True)
class _Part:
    """One adapter's module on one tensor of the model, with its weight wᵢ (scale included)."""

    adapter: int  # index into the adapters
    pair: TensorPair
    module: AdapterModule
    weight: float

    @property
    def transposed(self) -> bool:
        return stored_transposed(self.pair, self.module)


@dataclass(frozen=True)
class _Step:
    """What happens to one tensor of the model."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[_Part, ...] = ()
    whole: tuple[int, str] | None = None  # (adapter index, key) of a whole replacement
    check_name: str | None = None  # tensor of the --check base to compare with
    original_name: str | None = None  # unmerge: tensor of the original model the ΔWs are computed from

    @property
    def splits_rows(self) -> bool:
        return all(part.module.splits_rows(part.transposed) for part in self.parts)


def _apply(
    operation: str, model: str | os.PathLike, adapter_paths: Any, out: str | os.PathLike, sign: float,
    scale: float, device: str, force: bool, allow_pickle: bool, prefetch: int, progress: ProgressFn | None,
    weights: Sequence[float] | None = None, original: str | os.PathLike | None = None,
    check: str | os.PathLike | None = None, keep_replaced: bool = False, parallel: Parallel = Parallel(),
    dtype: str | torch.dtype | None = None,
) -> MergeReport:
    started = time.perf_counter()
    paths = [adapter_paths] if isinstance(adapter_paths, (str, os.PathLike)) else list(adapter_paths)
    factors = _weights(paths, weights, scale)
    compute_device = process_device(parallel, device)
    inputs = footprints([("base" if operation == "merge" else "merged model", model), *(("adapter", p) for p in paths), ("base", original), ("check", check)])
    check_output_path(out, force, inputs)
    ckpt = open_checkpoint(model, allow_pickle=allow_pickle)
    info = base_info(ckpt)
    adapters = [open_adapter(path, allow_pickle=allow_pickle, base=info) for path in paths]
    report = MergeReport(operation=operation, model=str(model), adapter=", ".join(map(str, paths)), out=str(out),
                         scale=float(scale), device=reported_device(parallel, compute_device),
                         adapters=[str(p) for p in paths],
                         weights=factors, adapter_types=[a.label for a in adapters],
                         check=str(check) if check is not None else None,
                         base=str(original) if original is not None else None)
    parts = _parts(adapters, ckpt, factors)
    whole, new_shapes = _whole_steps(adapters, ckpt, operation, report)
    original_ckpt = None
    if operation == "unmerge":
        # A layer's own base weight stored in the adapter (PEFT saves embedding base layers)
        # is what merge starts from, so subtracting ΔW restores it; anything else replaced is lost.
        lost = [name for name in report.replaced if name not in parts]
        if lost and not keep_replaced:
            raise DeltakitError(
                f"{len(lost)} tensor(s) were replaced whole on merge (modules_to_save or biases), first {lost[0]}; "
                "their base values are not in the adapter, so unmerge cannot restore them. "
                "Pass --keep-replaced to leave them as they are in the merged model")
        report.left_as_merged, report.replaced, whole = lost, [], {}
        needs_base = sorted({adapters[p.adapter].label for ps in parts.values() for p in ps if p.module.kind == "base"})
        if needs_base and original is None:
            raise DeltakitError(
                f"{'/'.join(needs_base)} cannot be unmerged from the merged weights and the adapter alone (its ΔW "
                "depends on the original weights through their norms): give the original model with --base")
        if needs_base:
            original_ckpt = open_checkpoint(original, allow_pickle=allow_pickle)
    original_names = _original_names(ckpt, original_ckpt, parts) if original_ckpt is not None else {}
    check_ckpt = open_checkpoint(check, allow_pickle=allow_pickle) if check is not None else None
    check_names = _check_names(ckpt, check_ckpt, new_shapes) if check_ckpt is not None else {}
    out_dtype = output_dtype(dtype)
    report.dtype = str(out_dtype).removeprefix("torch.") if out_dtype is not None else None
    report.dequantized = dequantized_note(ckpt, out_dtype)

    def written_dtype(name: str) -> torch.dtype:
        stored = ckpt.dtype(name)
        return out_dtype if out_dtype is not None and stored.is_floating_point else stored

    steps = [
        _Step(name=name, shape=new_shapes.get(name, ckpt.shape(name)), dtype=written_dtype(name),
              parts=tuple(parts.get(name, ())), whole=whole.get(name), check_name=check_names.get(name),
              original_name=original_names.get(name))
        for name in ckpt.keys()
    ]
    report.lora_modules, report.tensors = sum(len(p) for p in parts.values()), len(steps)
    report.shard_bytes = shard_size_of(ckpt)
    pieces = _pieces(steps)
    # Each process merges and writes its share; the work is reading and writing bytes.
    mine = parallel.share([_bytes(steps[p.step], p.rows) for p in pieces])
    with shared_directory(out, force, parallel, inputs) as tmp:
        plan = [(s.name, s.shape, s.dtype) for s in steps]
        sharded = shared_writer(parallel, tmp, plan, max_shard_bytes=report.shard_bytes)
        writer = BackgroundWriter(sharded, depth=IO_THREADS, workers=IO_THREADS)
        mine = sharded.interleaved(mine, lambda i: steps[pieces[i].step].name)
        loaders = [_loader(steps[pieces[i].step], pieces[i].rows, ckpt, adapters, original_ckpt, check_ckpt,
                           compute_device) for i in mine]
        loaded = prefetched(loaders, max(prefetch, IO_THREADS) if prefetch > 0 else 0, workers=IO_THREADS)
        items = zip(mine, loaded)
        if progress is not None:
            items = progress(items, len(mine), operation)
        distances: list[tuple[int, _Distance]] = []
        try:
            for index, (weight, tensors, replacement, start_weight, reference) in items:  # type: ignore[misc]
                step, rows = steps[pieces[index].step], pieces[index].rows
                result, ready = _one_tensor(step, rows, weight, tensors, replacement, start_weight, sign,
                                            compute_device)
                if reference is not None:
                    distances.append((index, _distance(step.name, result, reference, compute_device, ready)))
                    ready = None  # _distance waited for the copy and checked it
                writer.write(step.name, result, ready, start_row=rows[0] if rows else None)
            written = rows_to_write(((steps[pieces[i].step].name, pieces[i].rows) for i in mine),
                                    {step.name: step.shape for step in steps})
            report.shards = len(writer.finish(expected=written, write_index=parallel.is_main))
        finally:
            writer.close()  # never leave a thread writing into a folder being removed
        if new_shapes:
            report.vocab_size = max(shape[0] for shape in new_shapes.values())
        if parallel.is_main:
            copy_model_files(ckpt, Path(tmp))
            if ckpt.quantized:
                drop_quantization_config(Path(tmp))
            if new_shapes:
                _update_vocab_size(Path(tmp), report.vocab_size)
        everyone = gather_in_order(distances, parallel)
    if check_ckpt is not None:
        report.check_max_abs, report.check_rel_fro, report.check_worst = _summarise(everyone)
    report.elapsed_s = time.perf_counter() - started
    return report


def _weights(paths: list[Any], weights: Sequence[float] | None, scale: float) -> list[float]:
    """wᵢ · scale for each adapter; refuse a count that does not match or a non-finite value."""
    if not paths:
        raise DeltakitError("no adapter given")
    if weights is None:
        weights = [1.0] * len(paths)
    weights = [float(w) for w in weights]
    if len(weights) != len(paths):
        raise DeltakitError(f"{len(weights)} weight(s) given for {len(paths)} adapter(s); give one weight per adapter")
    factors = [w * float(scale) for w in weights]
    if not all(math.isfinite(f) for f in [float(scale), *factors]):
        raise DeltakitError(f"scale must be a finite number, and every weight too; got scale {scale}, "
                            f"weights {weights}")
    return factors


PIECE_BYTES = 64 * 1024**2  # a larger tensor is merged in row blocks of about this size


@dataclass(frozen=True)
class _Piece:
    """Rows start:stop of one step's tensor (None: all of it), merged and written as one unit."""

    step: int
    rows: tuple[int, int] | None = None


def _pieces(steps: list[_Step]) -> list[_Piece]:
    """Every step cut into row blocks of at most PIECE_BYTES (a single row may be larger).

    Host and GPU memory then hold a few blocks whatever the size of the largest tensor; W + ΔW
    is computed block by block, since rows of ΔW need only the matching rows of the adapter's
    tensors (and of W0). A step whose ΔW needs all rows at once (DoRA stored transposed) stays whole.
    """
    pieces: list[_Piece] = []
    for index, step in enumerate(steps):
        nbytes = _bytes(step)
        if len(step.shape) < 1 or step.shape[0] <= 1 or nbytes <= PIECE_BYTES or not step.splits_rows:
            pieces.append(_Piece(index))
            continue
        per_piece = max(1, PIECE_BYTES // (nbytes // step.shape[0]))
        pieces += [_Piece(index, (start, min(start + per_piece, step.shape[0])))
                   for start in range(0, step.shape[0], per_piece)]
    return pieces


def _bytes(step: _Step, rows: tuple[int, int] | None = None) -> int:
    """Bytes of a step's tensor, or of its rows start:stop."""
    shape = step.shape if rows is None else (rows[1] - rows[0], *step.shape[1:])
    return math.prod(shape) * torch.empty((), dtype=step.dtype).element_size()


def _parts(adapters: list[Adapter], ckpt: Checkpoint, factors: list[float]) -> dict[str, list[_Part]]:
    """Model tensor name -> the adapters' modules on it; refuse adapters that do not fit the model."""
    parts: dict[str, list[_Part]] = {}
    for index, adapter in enumerate(adapters):
        for pair, module in adapter_pairs(adapter, ckpt):
            parts.setdefault(pair.base_name, []).append(_Part(index, pair, module, factors[index]))
    return parts


def _original_names(ckpt: Checkpoint, original: Checkpoint, parts: dict[str, list[_Part]]) -> dict[str, str]:
    """Adapted tensor -> its name in the original model (--base); the shapes must agree."""
    mapping = match_names(original.keys(), parts.keys())
    for name in parts:
        other = mapping.get(name)
        if other is None:
            raise DeltakitError(f"--base {original.path} has no tensor {name}")
        if original.shape(other) != ckpt.shape(name):
            raise DeltakitError(f"--base {original.path}: {other} is {original.shape(other)}, "
                                f"but {name} is {ckpt.shape(name)}")
    return mapping


def _whole_steps(adapters: list[Adapter], ckpt: Checkpoint, operation: str,
                 report: MergeReport) -> tuple[dict[str, tuple[int, str]], dict[str, tuple[int, ...]]]:
    """Model tensor name -> (adapter index, key) of its whole replacement, and the shapes that grew."""
    whole: dict[str, tuple[int, str]] = {}
    grown: dict[str, tuple[int, ...]] = {}
    for index, adapter in enumerate(adapters):
        if not adapter.whole_tensors:
            continue
        mapping = match_names(ckpt.keys(), adapter.whole_tensors.keys())  # adapter name -> model name
        for name, key in adapter.whole_tensors.items():
            target = mapping.get(name)
            if target is None:
                if module_type(name) == "lm_head" and ties_embeddings(ckpt.config):
                    report.skipped_tied.append(name)  # PEFT's copy of a tied head: the embedding carries it
                    continue
                raise DeltakitError(f"adapter {adapter.path} does not fit {ckpt.path}: it carries {name} whole, "
                                    "which the model does not have")
            if target in whole:
                raise DeltakitError(f"adapters {adapters[whole[target][0]].path} and {adapter.path} both replace "
                                    f"{target} whole; which one to keep is not defined")
            have, got = ckpt.shape(target), adapter.checkpoint.shape(key)
            if have != got:
                grows_vocab = (operation == "merge" and len(have) == 2 and len(got) == 2 and got[1] == have[1]
                               and got[0] > have[0] and EMBEDDING_LEAF.search(target))
                if not grows_vocab:
                    raise DeltakitError(f"adapter {adapter.path} does not fit {ckpt.path}: {name} is {tuple(got)} in "
                                        f"the adapter but {tuple(have)} in the model")
                grown[target] = tuple(got)
            whole[target] = (index, key)
            report.replaced.append(target)
    return whole, grown


def _check_names(ckpt: Checkpoint, check: Checkpoint, new_shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Output tensor name -> --check tensor name; the two must hold the same tensors."""
    mapping = match_names(check.keys(), ckpt.keys())
    for name in ckpt.keys():
        other = mapping.get(name)
        if other is None:
            raise DeltakitError(f"--check {check.path} has no tensor {name}")
        shape = new_shapes.get(name, ckpt.shape(name))
        if check.shape(other) != shape:
            raise DeltakitError(f"--check {check.path}: {other} is {check.shape(other)}, the output's is {shape}")
    return mapping


def _loader(step: _Step, rows: tuple[int, int] | None, ckpt: Checkpoint, adapters: list[Adapter],
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


def _one_tensor(step: _Step, rows: tuple[int, int] | None, weight: torch.Tensor | None,
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
        _require_finite(step.name, weight, "replaced by the adapter, has")
    assert weight is not None
    if not step.parts:
        return weight.to(step.dtype), None
    current = adopt(weight).to(device, torch.float32)
    if sign > 0:
        result = _merged(step, rows, current, tensors)
    elif original is not None:
        result = current - _sum_deltas(step, rows, adopt(original).to(device, torch.float32), tensors)
    else:
        result = _unmerged(step, rows, current, tensors)
    result = result.to(step.dtype)
    if result.device.type != "cuda":
        _require_finite(step.name, result, "gives")
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
            raise DeltakitError(_NOT_FINITE.format(name=step.name, verb="gives"))

    return host, ready


def _sum_deltas(step: _Step, rows: tuple[int, int] | None, base: torch.Tensor,
                tensors: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Σ wᵢ·ΔWᵢ(W0) over the step's parts, fp32, each from the same W0 = ``base``."""
    total = torch.zeros_like(base)
    for part, loaded in zip(step.parts, tensors):
        total.add_(part.module.delta(loaded, base, part.transposed, rows), alpha=part.weight)
    return total


def _merged(step: _Step, rows: tuple[int, int] | None, base: torch.Tensor,
            tensors: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """W0 + Σ wᵢ·ΔWᵢ(W0); one part is applied by its type, in place on W0 where it can."""
    if len(step.parts) == 1:
        part = step.parts[0]
        return part.module.apply(tensors[0], base, part.transposed, rows, part.weight)
    return base + _sum_deltas(step, rows, base, tensors)


def _unmerged(step: _Step, rows: tuple[int, int] | None, merged: torch.Tensor,
              tensors: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """W0 from W = W0 ⊙ (1 + Σ wᵢ·gᵢ) + Σ wⱼ·ΔWⱼ (scaling parts i, additive parts j)."""
    result = merged
    gain: torch.Tensor | None = None
    for part, loaded in zip(step.parts, tensors):
        if part.module.kind == "scaling":
            g = part.module.gain(loaded, part.transposed, rows, merged.dtype, merged.device) * part.weight
            gain = g if gain is None else gain + g
        else:
            # additive types read only the dtype and device of the weight they are given
            result = result - part.weight * part.module.delta(loaded, merged, part.transposed, rows)
    return result if gain is None else result / (1 + gain)


_NOT_FINITE = ("{name} {verb} non-finite values (inf or nan) after applying the adapter; nothing was written")


def _require_finite(name: str, tensor: torch.Tensor, verb: str) -> None:
    """PEFT's safe_merge: never write inf / nan (e.g. a half-precision overflow)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise DeltakitError(_NOT_FINITE.format(name=name, verb=verb))


@dataclass(frozen=True)
class _Distance:
    """One output tensor against the --check model: max |Δ|, ‖Δ‖², ‖W_ref‖²."""

    name: str
    max_abs: float
    diff_sq: float
    ref_sq: float


def _distance(name: str, result: torch.Tensor, reference: torch.Tensor, device: torch.device,
              ready: Callable[[], None] | None) -> _Distance:
    if ready is not None:
        ready()
    if not (result.is_floating_point() and reference.is_floating_point()):
        return _Distance(name, 0.0, 0.0, 0.0)
    ref = reference.to(device, torch.float64)
    diff = result.to(device, torch.float64) - ref
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    return _Distance(name, max_abs, float(torch.sum(diff * diff)), float(torch.sum(ref * ref)))


def _summarise(distances: list[_Distance]) -> tuple[float, float, str | None]:
    """max |Δ|, sqrt(Σ‖Δ‖² / Σ‖W_ref‖²) and the worst tensor, summed in model order."""
    max_abs, worst = 0.0, None
    for d in distances:
        if worst is None or d.max_abs > max_abs:
            max_abs, worst = d.max_abs, d.name
    diff_sq, ref_sq = sum(d.diff_sq for d in distances), sum(d.ref_sq for d in distances)
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    return max_abs, rel, worst


def shard_size_of(ckpt: Checkpoint) -> int:
    """The model's shard size: its largest shard's tensor bytes when sharded, else DEFAULT_SHARD_BYTES."""
    files = ckpt.files
    if len(files) <= 1:
        return DEFAULT_SHARD_BYTES
    sizes = {file: 0 for file in files}
    for info in ckpt.infos.values():
        sizes[info.file] += info.nbytes
    return max(sizes.values())


def dequantized_note(ckpt: Checkpoint, out_dtype: torch.dtype | None) -> str | None:
    """What a command that writes a quantized model (merge, intruders --scale) writes instead of quantized
    weights (None if it is not quantized)."""
    if not ckpt.quantized:
        return None
    formats = sorted({spec.description for spec in ckpt.quantized.values()})
    dtypes = sorted({str(out_dtype or spec.dtype).removeprefix("torch.") for spec in ckpt.quantized.values()})
    return (f"{ckpt.path} is quantized ({'; '.join(formats)}): its {len(ckpt.quantized)} quantized tensors were "
            f"dequantized and are written as {', '.join(dtypes)}, not re-quantized; config.json's "
            "quantization_config is removed")


def _update_vocab_size(folder: Path, rows: int) -> None:
    """A carried embedding grew the vocabulary to ``rows``: make config.json's vocab_size say so."""
    config_path = folder / "config.json"
    config = read_model_config(config_path)
    if config is not None and isinstance(config.get("vocab_size"), int) and config["vocab_size"] < rows:
        config["vocab_size"] = rows
        config_path.write_text(json.dumps(config, indent=2) + "\n")
