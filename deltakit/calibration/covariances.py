"""C = XᵀX of the inputs X (tokens × in) each target module sees, accumulated with forward hooks.

Modules that read the same input tensor (q, k and v projections; gate and up) share one
covariance: which do is found by running one short probe sequence with hooks that note the
tensor each module was given. The covariances are accumulated in fp32 on the model's device,
as many groups at a time as ``budget_bytes`` holds (every group gets in² · 4 bytes), with one run
over the calibration batches per such set of groups. As each run ends they are kept in host memory
while they fit ``host_bytes`` (a quarter of the machine's memory by default), and parked on disk
beyond it (one safetensors file per group): device memory holds the model, one set and one
batch's activations; host memory at most ``host_bytes`` of them, whatever the model's size.

Activations in bf16 or fp16 are exact in TF32, so for them the products of XᵀX (and nothing else
the model computes) run on TF32 tensor cores with fp32 accumulation, losing nothing against fp32.

Example::

    covariances = record_covariances(model, find_modules(model, names), tokens.batches, folder, device)
    covariances.get("model.layers.0.self_attn.q_proj", device)   # fp32 (in, in); None if never called
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

COVARIANCE_BYTES = 4 * 1024**3  # device memory for covariances accumulated at once
HOST_FRACTION = 0.25  # of the machine's memory, for covariances kept off disk
PROBE_TOKENS = 8

Observe = Callable[[int, Any], None]  # (batch index, the model's output) on the first run
Progress = Callable[[Iterable[Any], int, str], Iterator[Any]]  # deltakit.pipeline.ProgressFn


@dataclass
class Covariances:
    """Where each module's C = XᵀX lies (host memory or a file, one per distinct input), over how many tokens."""

    folder: Path
    files: dict[str, Path | torch.Tensor] = field(default_factory=dict)  # module -> its group's C or file
    groups: list[list[str]] = field(default_factory=list)  # modules sharing one input, in model order
    tokens: int = 0

    def get(self, module: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """C of ``module``'s input (fp32, in × in) on ``device``, not to be changed in place; None for a module
        that never ran."""
        from safetensors.torch import load_file

        found = self.files.get(module)
        if found is None or isinstance(found, torch.Tensor):
            return found if found is None else found.to(device)
        return load_file(str(found), device=str(device))["covariance"]


def host_budget() -> int:
    """Bytes of covariances kept in host memory: HOST_FRACTION of the machine's (0 where it cannot be read)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * HOST_FRACTION)
    except (ValueError, OSError, AttributeError):
        return 0


def input_groups(model: torch.nn.Module, modules: dict[str, torch.nn.Module], probe: torch.Tensor,
                 run: Callable[[torch.Tensor], Any]) -> list[list[str]]:
    """Modules that are given the very same input tensor, grouped, in the order they first run."""
    seen: list[tuple[str, torch.Tensor]] = []

    def note(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor) and all(n != name for n, _ in seen):
                seen.append((name, args[0]))
        return hook

    handles = [module.register_forward_pre_hook(note(name)) for name, module in modules.items()]
    try:
        run(probe)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, tensor in seen:
        match = next((members for first, members in groups if first is tensor), None)
        if match is None:
            groups.append((tensor, [name]))
        else:
            match.append(name)
    return [members for _, members in groups]


def plan_runs(groups: Sequence[Sequence[str]], sizes: Sequence[int], budget_bytes: int) -> list[list[int]]:
    """Group indices per run over the batches: consecutive groups while their fp32 in² fit the budget
    (a group larger than the budget runs alone)."""
    runs: list[list[int]] = []
    used = 0
    for index, size in enumerate(sizes):
        need = 4 * size * size
        if runs and used + need <= budget_bytes:
            runs[-1].append(index)
            used += need
        else:
            runs.append([index])
            used = need
    return runs


@contextlib.contextmanager
def exact_tf32(dtype: torch.dtype) -> Iterator[None]:
    """TF32 matrix products for the block when activations are bf16 / fp16 (exact in TF32), else unchanged.

    Set and restored through ``fp32_precision`` where torch has it (reading the legacy ``allow_tf32``
    after the new setting was used raises there), else through ``allow_tf32``.
    """
    matmul = torch.backends.cuda.matmul
    if dtype not in (torch.bfloat16, torch.float16) or not torch.cuda.is_available():
        yield
        return
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    before = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, before)


def record_covariances(model: torch.nn.Module, modules: dict[str, torch.nn.Module], batches: Sequence[torch.Tensor],
                       folder: Path, run: Callable[[torch.Tensor], Any], observe: Observe | None = None,
                       budget_bytes: int = COVARIANCE_BYTES, progress: Progress | None = None,
                       host_bytes: int | None = None) -> Covariances:
    """C = XᵀX of every module's input over all ``batches``, parked in ``folder`` (module docstring).

    ``run(batch)`` runs the model on one batch of token ids and returns its output; ``observe`` sees
    every batch's output on the first run over them (the reference outputs of the fidelity).
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    result = Covariances(folder)
    host_left = host_budget() if host_bytes is None else host_bytes
    probe = batches[0][:1, :PROBE_TOKENS] if batches else None
    groups = input_groups(model, modules, probe, run) if probe is not None and modules else []
    result.groups = groups
    sizes = [_in_features(modules[members[0]]) for members in groups]
    runs = plan_runs(groups, sizes, budget_bytes) or [[]]
    for number, chosen in enumerate(runs):
        sums = {index: torch.zeros(sizes[index], sizes[index], dtype=torch.float32, device=_device(model))
                for index in chosen}
        handles = [modules[groups[index][0]].register_forward_pre_hook(_accumulate(sums[index])) for index in chosen]
        label = f"calibration {number + 1}/{len(runs)}"
        items = progress(enumerate(batches), len(batches), label) if progress else enumerate(batches)
        try:
            for index, batch in items:
                output = run(batch)
                if observe is not None and number == 0:
                    observe(index, output)
                del output
        finally:
            for handle in handles:
                handle.remove()
        for index in chosen:
            covariance = sums.pop(index).cpu()
            kept: Path | torch.Tensor = covariance
            if covariance.numel() * covariance.element_size() <= host_left:
                host_left -= covariance.numel() * covariance.element_size()
            else:
                kept = folder / f"covariance-{index:05d}.safetensors"
                save_file({"covariance": covariance}, str(kept))
            del covariance
            for name in groups[index]:
                result.files[name] = kept
    result.tokens = sum(int(batch.numel()) for batch in batches)
    return result


def _accumulate(total: torch.Tensor) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple) -> None:
        inputs = args[0].detach()
        rows = inputs.reshape(-1, inputs.shape[-1])
        with exact_tf32(rows.dtype):  # this product only: the model's own fp32 products (RoPE angles) stay fp32
            rows = rows.to(torch.float32)
            total.addmm_(rows.T, rows)
    return hook


def _in_features(module: torch.nn.Module) -> int:
    """Width of the last dimension of the module's input: nn.Linear's in_features, a Conv1D's weight rows."""
    if isinstance(module, torch.nn.Linear):
        return int(module.in_features)
    weight = getattr(module, "weight", None)
    if weight is not None and weight.ndim == 2 and type(module).__name__ == "Conv1D":
        return int(weight.shape[0])
    raise TypeError(f"no input width known for {type(module).__name__}")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
