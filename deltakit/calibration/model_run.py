"""A transformers model built from a checkpoint folder, to run calibration tokens through.

One model is held at a time (the caller drops it before loading the next), on the compute
device, in the dtype it is stored in. Its modules and parameters are found by the names the
checkpoint gives them (``model.layers.0.self_attn.q_proj``), with or without the model's
``base_model_prefix`` (``bert.``), as transformers itself maps a checkpoint onto a model.

Example::

    model = load_model("ft-folder", torch.device("cuda"), causal=True)
    modules = find_modules(model, ["model.layers.0.mlp.down_proj"])
"""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from deltakit.calibration.tokens import first_line
from deltakit.errors import DeltakitError

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(config: Mapping[str, Any] | None) -> bool:
    """Whether a config.json names a causal language model (an ``*ForCausalLM`` / ``*LMHeadModel`` class)."""
    architectures = [str(a) for a in (config or {}).get("architectures") or []]
    return any(a.endswith(CAUSAL_SUFFIXES) for a in architectures)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[Any]:
    """transformers imported, its progress bars and warnings off for the block (the CLI owns stderr)."""
    try:
        import transformers
    except ImportError:
        raise DeltakitError("--calibration runs the model with transformers, which is not installed "
                            "(pip install transformers)") from None
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield transformers
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_model(folder: str | os.PathLike, device: torch.device, causal: bool) -> torch.nn.Module:
    """The model of ``folder`` (config.json and weights) on ``device`` in its stored dtype, in eval mode.

    ``causal``: the language model with its head (``AutoModelForCausalLM``), else the bare model
    whose output is the final hidden states (``AutoModel``).
    """
    with _quiet_transformers() as transformers:
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        # transformers before 4.56 names the dtype argument torch_dtype
        major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
        dtype = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": "auto"}
        placements = [{"device_map": {"": str(device)}}, {}] if device.type == "cuda" else [{}]
        for placement in placements:  # straight onto the GPU where transformers can (accelerate), else via the host
            try:
                model = auto.from_pretrained(str(folder), local_files_only=True, **dtype, **placement)
                break
            except Exception as exc:  # noqa: BLE001 -- transformers raises many types for a model it cannot build
                if placement and "accelerate" in str(exc).lower():
                    continue
                raise DeltakitError(f"transformers cannot build the model of {folder}: {first_line(exc)}") from None
    return model.to(device).eval()


def free_memory() -> None:
    """Collect what the last model left (its modules hold reference cycles) and return the device's cached
    blocks, before the next model is loaded; call it once no frame holds the model any more."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _named(items: Iterable[tuple[str, Any]], names: Iterable[str], prefix: str) -> dict[str, Any]:
    """Checkpoint name -> the model's item of that name, with or without ``prefix.`` (absent names left out)."""
    by_name = dict(items)
    found = {}
    for name in names:
        for candidate in (name, name.removeprefix(f"{prefix}.") if prefix else name, f"{prefix}.{name}"):
            if candidate in by_name:
                found[name] = by_name[candidate]
                break
    return found


def find_modules(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.nn.Module]:
    """Checkpoint module path -> the model's module (absent ones left out)."""
    return _named(model.named_modules(), names, getattr(model, "base_model_prefix", ""))


def find_parameters(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.nn.Parameter]:
    """Checkpoint tensor name -> the model's parameter (tied ones are found under either name)."""
    items = list(model.named_parameters(remove_duplicate=False))
    return _named(items, names, getattr(model, "base_model_prefix", ""))


Edit = Callable[[torch.Tensor], torch.Tensor]  # the stored weight in fp32 -> its new value (fp32)


@torch.no_grad()
def edit_parameters(model: torch.nn.Module, edits: Iterable[tuple[str, Edit]]) -> None:
    """Apply each edit to the parameter the checkpoint calls ``name``, in fp32, stored back in the parameter's dtype.

    Raises :class:`DeltakitError` for a name the model does not have or an edit of another shape.
    """
    for name, edit in edits:
        found = find_parameters(model, [name])
        if name not in found:
            raise DeltakitError(f"the model built by transformers has no parameter {name}")
        param = found[name]
        value = edit(param.detach().to(torch.float32))
        if tuple(value.shape) != tuple(param.shape):
            raise DeltakitError(f"{name}: the adapter gives shape {tuple(value.shape)}, the model's parameter is "
                                f"{tuple(param.shape)}")
        param.copy_(value.to(param.device, param.dtype))
        del value
