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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from deltakit.adapters import Adapter, adapter_pairs, base_info, open_adapter
from deltakit.device.reads import prefetched
from deltakit.distributed import Parallel, process_device, reported_device, shared_directory, shared_writer
from deltakit.errors import DeltakitError
from deltakit.io.atomic import check_output_path
from deltakit.io.checkpoint import Checkpoint, open_checkpoint, read_model_config
from deltakit.io.inputs import footprints
from deltakit.io.model_files import copy_model_files, drop_quantization_config, weight_file_prefix
from deltakit.io.writer import DEFAULT_SHARD_BYTES, IO_THREADS, BackgroundWriter, rows_to_write
from deltakit.lora.extraction import output_dtype
from deltakit.lora.targets import ties_embeddings
from deltakit.lora.tensor_merge import (
    PIECE_BYTES, Distance, Part, Step, distance, loader, one_tensor, piece_bytes, pieces, summarise,
)
from deltakit.pairing import EMBEDDING_LEAF, match_names, module_type
from deltakit.pipeline import ProgressFn, run, share


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
    not_merged: list[dict[str, str]] = field(default_factory=list)  # skip_mismatched: modules left out, and why
    elapsed_s: float = 0.0
    left_out: list[dict[str, str]] = field(default_factory=list)  # kohya modules of parts the model does not hold

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["elapsed_s"] = round(self.elapsed_s, 3)
        if not self.left_out:
            del out["left_out"]
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
    skip_mismatched: bool = False,
) -> MergeReport:
    """Write ``base`` + scale · Σ wᵢ·ΔWᵢ of the adapter(s) as a complete model folder at ``out``.

    ``weights`` (one per adapter, default 1 each) weigh several adapters merged in one pass.
    With ``parallel`` (under torchrun) each process merges and writes its share of the tensors.
    ``dtype`` (float32 | bfloat16 | float16) writes every floating-point tensor in it. A quantized
    base (fp8, MXFP4) is read dequantized and written in its logical dtype (bfloat16 unless the
    config or ``dtype`` says otherwise), never re-quantized; ``report.dequantized`` says so.
    An adapter module that does not fit the base (no such tensor, another shape) is refused;
    ``skip_mismatched`` merges the others and lists it in ``report.not_merged``.
    Example: ``merge("base", "my-lora", "merged", scale=0.5)``.
    """
    plan = MergePlan("merge", str(base), _adapter_paths(adapter), str(out), scale, _tuple(weights), device=device,
                     force=force, allow_pickle=allow_pickle, prefetch=prefetch, dtype=dtype,
                     skip_mismatched=skip_mismatched)
    return apply_plan(plan, progress, parallel)


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
    plan = MergePlan("unmerge", str(merged), _adapter_paths(adapter), str(out), scale, _tuple(weights),
                     original=None if base is None else str(base), check=None if check is None else str(check),
                     keep_replaced=keep_replaced, device=device, force=force, allow_pickle=allow_pickle,
                     prefetch=prefetch)
    return apply_plan(plan, progress, parallel)


@dataclass(frozen=True)
class MergePlan:
    """What one merge or unmerge does, validated when made.

    ``model`` is the base (merge) or the merged model (unmerge); ``adapters`` are added (merge) or
    removed (unmerge), each with its weight from ``weights`` (default 1) times ``scale``;
    ``original`` is the model the ΔWs were computed from (unmerging DoRA needs it); ``check``
    a model the output is measured against; ``keep_replaced`` leaves tensors an adapter replaced
    whole as they are in the merged model; ``dtype`` writes floating-point tensors in it.
    """

    operation: str  # "merge" | "unmerge"
    model: str
    adapters: tuple[str, ...]
    out: str
    scale: float = 1.0
    weights: tuple[float, ...] | None = None
    original: str | None = None
    check: str | None = None
    keep_replaced: bool = False
    device: str = "auto"
    force: bool = False
    allow_pickle: bool = False
    prefetch: int = 2
    dtype: str | torch.dtype | None = None
    piece_bytes: int = PIECE_BYTES  # a larger tensor is merged in row blocks of about this size
    skip_mismatched: bool = False  # leave out adapter modules that do not fit the model, instead of refusing

    def __post_init__(self) -> None:
        if self.operation not in ("merge", "unmerge"):
            raise ValueError(f"operation {self.operation!r}")
        _weights(list(self.adapters), self.weights, self.scale)  # refuse a count or value that does not fit
        output_dtype(self.dtype)

    @property
    def sign(self) -> float:
        """+1: W0 + Σ wᵢ·ΔWᵢ; −1: W − Σ wᵢ·ΔWᵢ."""
        return 1.0 if self.operation == "merge" else -1.0

    @property
    def factors(self) -> list[float]:
        """wᵢ · scale of each adapter."""
        return _weights(list(self.adapters), self.weights, self.scale)


def _adapter_paths(adapter: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[str, ...]:
    return (str(adapter),) if isinstance(adapter, (str, os.PathLike)) else tuple(str(a) for a in adapter)


def _tuple(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def apply_plan(plan: MergePlan, progress: ProgressFn | None = None, parallel: Parallel = Parallel()) -> MergeReport:
    """Carry out a :class:`MergePlan`: every tensor of the model, read, changed by its adapters' parts (row
    blocks of large ones), and written, through the pipeline; the model files copied; the output
    published atomically."""
    started = time.perf_counter()
    operation, paths, factors = plan.operation, list(plan.adapters), plan.factors
    compute_device = process_device(parallel, plan.device)
    inputs = footprints([("base" if operation == "merge" else "merged model", plan.model),
                         *(("adapter", p) for p in paths), ("base", plan.original), ("check", plan.check)])
    check_output_path(plan.out, plan.force, inputs)
    ckpt = open_checkpoint(plan.model, allow_pickle=plan.allow_pickle)
    info = base_info(ckpt)
    adapters = [open_adapter(path, allow_pickle=plan.allow_pickle, base=info) for path in paths]
    report = MergeReport(operation=operation, model=plan.model, adapter=", ".join(paths), out=plan.out,
                         scale=float(plan.scale), device=reported_device(parallel, compute_device),
                         adapters=paths, weights=factors, adapter_types=[a.label for a in adapters],
                         check=plan.check, base=plan.original,
                         left_out=[{**entry, "adapter": str(a.path)} for a in adapters for entry in a.left_out])
    parts = _parts(adapters, ckpt, factors, report.not_merged if plan.skip_mismatched else None)
    whole, new_shapes = _whole_steps(adapters, ckpt, operation, report)
    original_ckpt = None
    if operation == "unmerge":
        # A layer's own base weight stored in the adapter (PEFT saves embedding base layers)
        # is what merge starts from, so subtracting ΔW restores it; anything else replaced is lost.
        lost = [name for name in report.replaced if name not in parts]
        if lost and not plan.keep_replaced:
            raise DeltakitError(
                f"{len(lost)} tensor(s) were replaced whole on merge (modules_to_save or biases), first {lost[0]}; "
                "their base values are not in the adapter, so unmerge cannot restore them. "
                "Pass --keep-replaced to leave them as they are in the merged model")
        report.left_as_merged, report.replaced, whole = lost, [], {}
        needs_base = sorted({adapters[p.adapter].label for ps in parts.values() for p in ps if p.module.kind == "base"})
        if needs_base and plan.original is None:
            raise DeltakitError(
                f"{'/'.join(needs_base)} cannot be unmerged from the merged weights and the adapter alone (its ΔW "
                "depends on the original weights: DoRA's norms, rows set by trainable tokens, a layer PEFT applies): "
                "give the original model with --base")
        if needs_base:
            original_ckpt = open_checkpoint(plan.original, allow_pickle=plan.allow_pickle)
    original_names = _original_names(ckpt, original_ckpt, parts) if original_ckpt is not None else {}
    check_ckpt = open_checkpoint(plan.check, allow_pickle=plan.allow_pickle) if plan.check is not None else None
    check_names = _check_names(ckpt, check_ckpt, new_shapes) if check_ckpt is not None else {}
    out_dtype = output_dtype(plan.dtype)
    report.dtype = str(out_dtype).removeprefix("torch.") if out_dtype is not None else None
    report.dequantized = dequantized_note(ckpt, out_dtype)

    def written_dtype(name: str) -> torch.dtype:
        stored = ckpt.dtype(name)
        return out_dtype if out_dtype is not None and stored.is_floating_point else stored

    steps = [
        Step(name=name, shape=new_shapes.get(name, ckpt.shape(name)), dtype=written_dtype(name),
             parts=tuple(parts.get(name, ())), whole=whole.get(name), check_name=check_names.get(name),
             original_name=original_names.get(name))
        for name in ckpt.keys()
    ]
    report.lora_modules, report.tensors = sum(len(p) for p in parts.values()), len(steps)
    prefix, one_file = weight_file_prefix(ckpt)
    report.shard_bytes = sys.maxsize if one_file else shard_size_of(ckpt)
    cut = pieces(steps, plan.piece_bytes)
    # Each process merges and writes its share; the work is reading and writing bytes.
    costs = [piece_bytes(steps[p.step], p.rows) for p in cut]
    with shared_directory(plan.out, plan.force, parallel, inputs) as tmp:
        layout = [(s.name, s.shape, s.dtype) for s in steps]
        sharded = shared_writer(parallel, tmp, layout, max_shard_bytes=report.shard_bytes, prefix=prefix)
        writer = BackgroundWriter(sharded, depth=IO_THREADS, workers=IO_THREADS)
        reads_ahead = max(plan.prefetch, IO_THREADS) if plan.prefetch > 0 else 0

        def read(mine: list[int]) -> Any:
            return prefetched([loader(steps[cut[i].step], cut[i].rows, ckpt, adapters, original_ckpt,
                                      check_ckpt, compute_device) for i in mine], reads_ahead, workers=IO_THREADS)

        def apply_piece(index: int, loaded: tuple) -> Distance | None:
            weight, tensors, replacement, start_weight, reference = loaded
            step, rows = steps[cut[index].step], cut[index].rows
            result, ready = one_tensor(step, rows, weight, tensors, replacement, start_weight, plan.sign,
                                       compute_device)
            measured = None
            if reference is not None:
                measured = distance(step.name, result, reference, compute_device, ready)
                ready = None  # distance() waited for the copy and checked it
            writer.write(step.name, result, ready, start_row=rows[0] if rows else None)
            return measured

        try:
            distances = run(costs, read, apply_piece, parallel=parallel, progress=progress, label=operation,
                            arrange=lambda mine: sharded.interleaved(mine, lambda i: steps[cut[i].step].name))
            written = rows_to_write(((steps[cut[i].step].name, cut[i].rows) for i in share(costs, parallel)),
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
    if check_ckpt is not None:
        report.check_max_abs, report.check_rel_fro, report.check_worst = summarise(
            [d for d in distances if d is not None])
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


def _parts(adapters: list[Adapter], ckpt: Checkpoint, factors: list[float],
           left_out: list[dict[str, str]] | None = None) -> dict[str, list[Part]]:
    """Model tensor name -> the adapters' modules on it; refuse adapters that do not fit the model
    (with ``left_out``, leave out the modules that do not fit and list them there)."""
    parts: dict[str, list[Part]] = {}
    for index, adapter in enumerate(adapters):
        for pair, module in adapter_pairs(adapter, ckpt, left_out):
            parts.setdefault(pair.base_name, []).append(Part(index, pair, module, factors[index]))
    return parts


def _original_names(ckpt: Checkpoint, original: Checkpoint, parts: dict[str, list[Part]]) -> dict[str, str]:
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
