"""`deltakit merge` and `deltakit unmerge`: W ± scale · ΔW_LoRA, streamed tensor by tensor.

For every module of a PEFT LoRA adapter, ΔW = scaling · B @ A (transposed for Conv1D weights
stored [in, out] and for embeddings), scaling = lora_alpha / r, or lora_alpha / √r with
``use_rslora`` (Kalajdzievski 2023), r and alpha per module from ``rank_pattern`` /
``alpha_pattern``; see :mod:`deltakit.io.peft`. The sum is formed in fp32 and cast back to
the model's dtype, and checked to be finite before it is written (PEFT's ``safe_merge``).

Tensors the adapter carries whole (``modules_to_save``, LoRA-layer biases) replace the model's
on merge. Unmerge cannot restore them: the base values are not in the adapter; it refuses
unless told to leave them as they are in the merged model.

The output is a complete model folder written atomically (a temporary folder renamed into
place): safetensors shards at the input's shard size plus an index, and the input's config,
generation config and tokenizer files. Tensors larger than PIECE_BYTES (64 MiB) are read,
merged and written in row blocks, so host and GPU memory hold a few blocks whatever the model's
size; a block's B·A can differ from the whole product's rows in the last fp32 bit. Reads run
ahead on several threads, writes on several others (see :mod:`deltakit.io.writer`).

Example::

    merge("base", "my-lora", "merged")
    unmerge("merged", "my-lora", "base-again", check="base").check_max_abs
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from deltakit.delta import ProgressFn, adapter_pairs, adopt, fetch, lora_delta, prefetched, resolve_device
from deltakit.distributed import Parallel, gather_in_order, shared_directory, shared_writer
from deltakit.errors import DeltakitError
from deltakit.io.atomic import check_output_path
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.io.model_files import copy_model_files
from deltakit.io.peft import LoraAdapter, LoraModule, open_adapter
from deltakit.io.writer import DEFAULT_SHARD_BYTES, IO_THREADS, BackgroundWriter
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
    lora_modules: int = 0
    replaced: list[str] = field(default_factory=list)  # tensors replaced whole by the adapter
    left_as_merged: list[str] = field(default_factory=list)  # unmerge: replaced tensors it could not restore
    skipped_tied: list[str] = field(default_factory=list)  # adapter copies of a tied output layer
    tensors: int = 0
    shards: int = 0
    shard_bytes: int = DEFAULT_SHARD_BYTES
    vocab_size: int | None = None  # set when a carried embedding grew the vocabulary
    check: str | None = None
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
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    scale: float = 1.0,
    device: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    prefetch: int = 2,
    progress: ProgressFn | None = None,
    parallel: Parallel = Parallel(),
    dtype: str | torch.dtype | None = None,
) -> MergeReport:
    """Write ``base`` + scale · ΔW_adapter as a complete model folder at ``out``.

    With ``parallel`` (under torchrun) each process merges and writes its share of the tensors.
    ``dtype`` (float32 | bfloat16 | float16) writes every floating-point tensor in it. A quantized
    base (fp8, MXFP4) is read dequantized and written in its logical dtype (bfloat16 unless the
    config or ``dtype`` says otherwise), never re-quantized; ``report.dequantized`` says so.
    Example: ``merge("base", "my-lora", "merged", scale=0.5)``.
    """
    return _apply("merge", base, adapter, out, +1.0, scale, device, force, allow_pickle, prefetch, progress,
                  parallel=parallel, dtype=dtype)


def unmerge(
    merged: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    scale: float = 1.0,
    check: str | os.PathLike | None = None,
    keep_replaced: bool = False,
    device: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    prefetch: int = 2,
    progress: ProgressFn | None = None,
    parallel: Parallel = Parallel(),
) -> MergeReport:
    """Write ``merged`` − scale · ΔW_adapter at ``out``; with ``check``, measure its distance from that base.

    An adapter that replaced tensors whole (modules_to_save, biases) is refused, since their
    base values are lost; ``keep_replaced`` writes them as they are in ``merged`` instead.
    Example: ``unmerge("merged", "my-lora", "base-again", check="base").check_rel_fro``.
    """
    return _apply("unmerge", merged, adapter, out, -1.0, scale, device, force, allow_pickle, prefetch, progress,
                  check=check, keep_replaced=keep_replaced, parallel=parallel)


@dataclass(frozen=True)
class _Step:
    """What happens to one tensor of the model."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    lora: tuple[TensorPair, LoraModule] | None = None
    whole_key: str | None = None  # adapter key of a whole replacement
    check_name: str | None = None  # tensor of the --check base to compare with


def _apply(
    operation: str, model: str | os.PathLike, adapter_path: str | os.PathLike, out: str | os.PathLike, sign: float,
    scale: float, device: str, force: bool, allow_pickle: bool, prefetch: int, progress: ProgressFn | None,
    check: str | os.PathLike | None = None, keep_replaced: bool = False, parallel: Parallel = Parallel(),
    dtype: str | torch.dtype | None = None,
) -> MergeReport:
    started = time.perf_counter()
    scale = float(scale)
    if not math.isfinite(scale):
        raise DeltakitError(f"scale must be a finite number, got {scale}")
    compute_device = resolve_device(parallel.device if parallel.active else device)
    check_output_path(out, force)
    ckpt = open_checkpoint(model, allow_pickle=allow_pickle)
    adapter = open_adapter(adapter_path, allow_pickle=allow_pickle)
    report = MergeReport(operation=operation, model=str(model), adapter=str(adapter_path), out=str(out), scale=scale,
                         device=str(compute_device), check=str(check) if check is not None else None)
    lora = _lora_steps(adapter, ckpt)
    whole, new_shapes = _whole_steps(adapter, ckpt, operation, report)
    if operation == "unmerge":
        # A LoRA layer's own base weight stored in the adapter (PEFT saves embedding base layers)
        # is what merge starts from, so subtracting ΔW restores it; anything else replaced is lost.
        lost = [name for name in report.replaced if name not in lora]
        if lost and not keep_replaced:
            raise DeltakitError(
                f"adapter {adapter.path} replaced {len(lost)} tensor(s) whole on merge (modules_to_save or biases), "
                f"first {lost[0]}; their base values are not in the adapter, so unmerge cannot restore them. "
                "Pass --keep-replaced to leave them as they are in the merged model")
        report.left_as_merged, report.replaced, whole = lost, [], {}
    check_ckpt = open_checkpoint(check, allow_pickle=allow_pickle) if check is not None else None
    check_names = _check_names(ckpt, check_ckpt, new_shapes) if check_ckpt is not None else {}
    out_dtype = output_dtype(dtype)
    report.dtype = str(out_dtype).removeprefix("torch.") if out_dtype is not None else None
    report.dequantized = dequantized_note(ckpt, out_dtype)

    def written_dtype(name: str) -> torch.dtype:
        stored = ckpt.dtype(name)
        return out_dtype if out_dtype is not None and stored.is_floating_point else stored

    steps = [
        _Step(name=name, shape=new_shapes.get(name, ckpt.shape(name)), dtype=written_dtype(name), lora=lora.get(name),
              whole_key=whole.get(name), check_name=check_names.get(name))
        for name in ckpt.keys()
    ]
    report.lora_modules, report.tensors = len(lora), len(steps)
    report.shard_bytes = shard_size_of(ckpt)
    pieces = _pieces(steps)
    # Each process merges and writes its share; the work is reading and writing bytes.
    mine = parallel.share([_bytes(steps[p.step], p.rows) for p in pieces])
    with shared_directory(out, force, parallel) as tmp:
        plan = [(s.name, s.shape, s.dtype) for s in steps]
        sharded = shared_writer(parallel, tmp, plan, max_shard_bytes=report.shard_bytes)
        writer = BackgroundWriter(sharded, depth=IO_THREADS, workers=IO_THREADS)
        mine = sharded.interleaved(mine, lambda i: steps[pieces[i].step].name)
        loaders = [_loader(steps[pieces[i].step], pieces[i].rows, ckpt, adapter, check_ckpt, compute_device)
                   for i in mine]
        loaded = prefetched(loaders, max(prefetch, IO_THREADS) if prefetch > 0 else 0, workers=IO_THREADS)
        items = zip(mine, loaded)
        if progress is not None:
            items = progress(items, len(mine), operation)
        distances: list[tuple[int, _Distance]] = []
        try:
            for index, (weight, factors, replacement, reference) in items:  # type: ignore[misc]
                step, rows = steps[pieces[index].step], pieces[index].rows
                result, ready = _one_tensor(step, rows, weight, factors, replacement, sign * scale, compute_device)
                if reference is not None:
                    distances.append((index, _distance(step.name, result, reference, compute_device, ready)))
                    ready = None  # _distance waited for the copy and checked it
                writer.write(step.name, result, ready, start_row=rows[0] if rows else None)
            written = {steps[pieces[i].step].name for i in mine}
            report.shards = len(writer.finish(expected=sorted(written), write_index=parallel.is_main))
        finally:
            writer.close()  # never leave a thread writing into a folder being removed
        if new_shapes:
            report.vocab_size = max(shape[0] for shape in new_shapes.values())
        if parallel.is_main:
            copy_model_files(ckpt, Path(tmp))
            if ckpt.quantized:
                _drop_quantization_config(Path(tmp))
            if new_shapes:
                _update_vocab_size(Path(tmp), report.vocab_size)
        everyone = gather_in_order(distances, parallel)
    if check_ckpt is not None:
        report.check_max_abs, report.check_rel_fro, report.check_worst = _summarise(everyone)
    report.elapsed_s = time.perf_counter() - started
    return report


PIECE_BYTES = 64 * 1024**2  # a larger tensor is merged in row blocks of about this size


@dataclass(frozen=True)
class _Piece:
    """Rows start:stop of one step's tensor (None: all of it), merged and written as one unit."""

    step: int
    rows: tuple[int, int] | None = None


def _pieces(steps: list[_Step]) -> list[_Piece]:
    """Every step cut into row blocks of at most PIECE_BYTES (a single row may be larger).

    Host and GPU memory then hold a few blocks whatever the size of the largest tensor; W + BA
    is computed block by block, since rows of W need only the matching rows of B (or
    columns of A, for weights stored transposed).
    """
    pieces: list[_Piece] = []
    for index, step in enumerate(steps):
        nbytes = _bytes(step)
        if len(step.shape) < 1 or step.shape[0] <= 1 or nbytes <= PIECE_BYTES:
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


def _lora_steps(adapter: LoraAdapter, ckpt: Checkpoint) -> dict[str, tuple[TensorPair, LoraModule]]:
    """Model tensor name -> (pair, module); refuse factors whose shapes do not fit the weight."""
    steps: dict[str, tuple[TensorPair, LoraModule]] = {}
    for pair, module in adapter_pairs(adapter, ckpt):
        a_shape, b_shape = adapter.checkpoint.shape(module.a_key), adapter.checkpoint.shape(module.b_key)
        # PEFT orients by the layer it wraps: Conv1D (stored [in, out]) and embeddings add (B @ A)ᵀ.
        transposed = module.embedding or pair.layout == "conv1d"
        expected = (a_shape[1], b_shape[0]) if transposed else (b_shape[0], a_shape[1])
        if tuple(pair.shape) != expected:
            raise DeltakitError(
                f"adapter {adapter.path} does not fit {ckpt.path}: {module.module} has B {b_shape} and A {a_shape}, "
                f"which make a {expected[0]}×{expected[1]} update, but {pair.base_name} is {tuple(pair.shape)}")
        steps[pair.base_name] = (pair, module)
    return steps


def _whole_steps(adapter: LoraAdapter, ckpt: Checkpoint, operation: str,
                 report: MergeReport) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Model tensor name -> adapter key of its whole replacement, and the shapes that grew."""
    if not adapter.whole_tensors:
        return {}, {}
    mapping = match_names(ckpt.keys(), adapter.whole_tensors.keys())  # adapter name -> model name
    whole: dict[str, str] = {}
    grown: dict[str, tuple[int, ...]] = {}
    for name, key in adapter.whole_tensors.items():
        target = mapping.get(name)
        if target is None:
            if module_type(name) == "lm_head" and ties_embeddings(ckpt.config):
                report.skipped_tied.append(name)  # PEFT's copy of a tied head: the embedding carries it
                continue
            raise DeltakitError(f"adapter {adapter.path} does not fit {ckpt.path}: it carries {name} whole, "
                                "which the model does not have")
        have, got = ckpt.shape(target), adapter.checkpoint.shape(key)
        if have != got:
            grows_vocab = (operation == "merge" and len(have) == 2 and len(got) == 2 and got[1] == have[1]
                           and got[0] > have[0] and EMBEDDING_LEAF.search(target))
            if not grows_vocab:
                raise DeltakitError(f"adapter {adapter.path} does not fit {ckpt.path}: {name} is {tuple(got)} in the "
                                    f"adapter but {tuple(have)} in the model")
            grown[target] = tuple(got)
        whole[target] = key
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


def _loader(step: _Step, rows: tuple[int, int] | None, ckpt: Checkpoint, adapter: LoraAdapter,
            check: Checkpoint | None, device: torch.device) -> Callable[[], tuple]:
    def read(source: Checkpoint, name: str) -> torch.Tensor:
        return source.get(name) if rows is None else source.get_rows(name, *rows)

    def load() -> tuple:
        # Only weights that change go to the compute device; the rest are copied as read.
        weight = None if step.whole_key else (fetch(ckpt, step.name, device, rows) if step.lora else read(ckpt, step.name))
        factors = adapter.factors(step.lora[1]) if step.lora else None
        replacement = read(adapter.checkpoint, step.whole_key) if step.whole_key else None
        reference = read(check, step.check_name) if check is not None and step.check_name else None
        return weight, factors, replacement, reference

    return load


def _one_tensor(step: _Step, rows: tuple[int, int] | None, weight: torch.Tensor | None,
                factors: tuple[torch.Tensor, torch.Tensor] | None, replacement: torch.Tensor | None,
                signed_scale: float, device: torch.device) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """The output value of one tensor or of its ``rows`` (copied, replaced whole, or W ± scale·ΔW
    in fp32 cast back).

    Returns the tensor on the host and, for a GPU result still being copied there, a
    ``ready`` function that waits for the copy and refuses non-finite values; it runs on the
    writer's thread, so the GPU never waits for the host.
    """
    if replacement is not None:  # merge starts from the adapter's copy (PEFT loads it before the LoRA)
        weight = replacement.to(step.dtype)
        _require_finite(step.name, weight, "replaced by the adapter, has")
    assert weight is not None
    if factors is None:
        return weight.to(step.dtype), None
    pair, module = step.lora  # type: ignore[misc]
    weight = adopt(weight)
    lora_a, lora_b = factors
    transposed = module.embedding or pair.layout == "conv1d"
    if rows is not None:  # rows of B·A are rows of B; rows of (B·A)ᵀ are columns of A
        lora_a, lora_b = (lora_a[:, rows[0]:rows[1]], lora_b) if transposed else (lora_a, lora_b[rows[0]:rows[1]])
    delta = lora_delta(lora_a.to(device, torch.float32), lora_b.to(device, torch.float32), module.scaling, transposed)
    result = (weight.to(device, torch.float32) + signed_scale * delta).to(step.dtype)
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
    """What a merge into a quantized model writes instead of quantized weights (None if it is not quantized)."""
    if not ckpt.quantized:
        return None
    formats = sorted({spec.description for spec in ckpt.quantized.values()})
    dtypes = sorted({str(out_dtype or spec.dtype).removeprefix("torch.") for spec in ckpt.quantized.values()})
    return (f"{ckpt.path} is quantized ({'; '.join(formats)}): its {len(ckpt.quantized)} quantized tensors were "
            f"dequantized and are written as {', '.join(dtypes)}, not re-quantized; config.json's "
            "quantization_config is removed")


def _drop_quantization_config(folder: Path) -> None:
    """The output holds dequantized weights: a quantization_config would make loaders expect quantized ones."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def _update_vocab_size(folder: Path, rows: int) -> None:
    """A carried embedding grew the vocabulary to ``rows``: make config.json's vocab_size say so."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    if isinstance(config.get("vocab_size"), int) and config["vocab_size"] < rows:
        config["vocab_size"] = rows
        config_path.write_text(json.dumps(config, indent=2) + "\n")
