"""Open any weight-changing PEFT adapter: the registry from ``peft_type`` to the module that reads it.

Every type gives :class:`~deltakit.adapters.base.AdapterModule` objects, one per model tensor it
changes, so the stream (rank, intruders, plot) and merge / unmerge never branch on the type.
Types that change activations rather than weights (prompt and prefix tuning, ...) have no ΔW and
are refused with one line naming the type.

Example::

    adapter = open_adapter("my-dora", base=BaseInfo(shapes, config))
    for target, module in adapter.modules.items():
        tensors = adapter.load(module)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from deltakit.adapters import adalora, dora, ia3, kohya, loha, lokr, lora, lora_params, peft_layer, vera
from deltakit.adapters.base import AdapterModule, BaseInfo
from deltakit.adapters.lora import factor_matrices
from deltakit.adapters.whole import token_modules
from deltakit.errors import DeltakitError
from deltakit.io.checkpoint import Checkpoint
from deltakit.io.kohya_files import adapter_file_format, read_adapter_file
from deltakit.io.peft import AdapterFiles, group_keys, read_adapter_files

Builder = Callable[[AdapterFiles, dict[str, dict[str, str]], BaseInfo, dict[str, str]], list[AdapterModule]]

ACTIVATION_ONLY = {
    "PROMPT_TUNING": "prompt tuning", "MULTITASK_PROMPT_TUNING": "multitask prompt tuning",
    "P_TUNING": "p-tuning", "PREFIX_TUNING": "prefix tuning", "ADAPTION_PROMPT": "adaption prompt (LLaMA-Adapter)",
    "CPT": "context-aware prompt tuning", "CARTRIDGE": "cartridges (a trained KV prefix)",
    "POLY": "Polytropon (routes between LoRAs per task)", "XLORA": "X-LoRA (gates LoRAs by the hidden states)",
}


def _lora(files: AdapterFiles, groups: dict[str, dict[str, str]], base: BaseInfo,
          whole: dict[str, str]) -> list[AdapterModule]:
    """LoRA, DoRA (``use_dora``) and LoRA on parameters (``target_parameters``)."""
    params = {g: k for g, k in groups.items() if _on_parameter(files, g, base)}
    plain = {g: k for g, k in groups.items() if g not in params}
    if files.config.get("use_dora"):
        if params:
            raise DeltakitError(f"{files.path}: DoRA on parameters (target_parameters) is not supported by PEFT")
        built = dora.build(files, plain)
    else:
        stray = next((g for g, kinds in plain.items() if dora.MAGNITUDE in kinds), None)
        if stray is not None:
            raise DeltakitError(f"{files.path}: {stray} has a DoRA magnitude vector but the config does not say "
                                "use_dora; refusing to guess which the adapter is")
        built = lora.build(files, plain)
    built = [replace(module, target=lora.layer_weight(module.module, base)) for module in built]
    built = [replace(module, scaling=module.scaling * lora.MHA_OUT_PROJ_FACTOR)  # type: ignore[attr-defined]
             if lora.attention_out_projection(module.module, base) else module for module in built]
    built += lora.bias_modules(files, plain, built)
    return built + (lora_params.build(files, params, base) if params else [])


def _on_parameter(files: AdapterFiles, group: str, base: BaseInfo) -> bool:
    """A key group belongs to target_parameters when wrappers nest, or its module has no weight of the base."""
    if not files.config.get("target_parameters"):
        return False
    return lora_params.BASE_LAYER in group or base.shape(f"{group}.weight") is None


TYPES: dict[str, tuple[tuple[str, ...], Builder]] = {
    "LORA": ((*lora.KINDS, dora.MAGNITUDE), _lora),
    "ADALORA": (adalora.KINDS, lambda files, groups, base, whole: adalora.build(files, groups)),
    "LOHA": (loha.KINDS, lambda files, groups, base, whole: loha.build(files, groups)),
    "LOKR": (lokr.KINDS, lambda files, groups, base, whole: lokr.build(files, groups)),
    "VERA": (vera.KINDS, vera.build),
    "IA3": (ia3.KINDS, lambda files, groups, base, whole: ia3.build(files, groups, base)),
}


@dataclass
class Adapter:
    """A PEFT adapter of any supported type, read lazily.

    ``modules`` maps each model tensor the adapter changes to its module; ``whole_tensors``
    maps model tensors the adapter replaces (``modules_to_save``, trained biases) to file keys.
    ``format`` is "peft" (a folder), "kohya" or "diffusers" (one file, :mod:`deltakit.adapters.kohya`);
    ``left_out`` lists the file's modules for parts of a model the base does not hold.
    """

    path: Path
    config: dict[str, Any]
    checkpoint: Checkpoint
    peft_type: str
    modules: dict[str, AdapterModule]
    whole_tensors: dict[str, str]
    format: str = "peft"
    left_out: list[dict[str, str]] = field(default_factory=list)

    def load(self, module: AdapterModule, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """One module's tensors as stored."""
        return module.load(self.checkpoint, device)

    def factors(self, module: AdapterModule, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of a LoRA module as the matrices B @ A multiplies: A is r × in and B is out × r (embeddings:
        r × vocab, dim × r; convolutions: r × in·∏kernel, out × r)."""
        tensors = {key: self.checkpoint.get(module.keys[key], device) for key in ("A", "B", "mid") if key in module.keys}
        return factor_matrices(tensors["A"], tensors["B"], tensors.get("mid"))

    @property
    def label(self) -> str:
        """The type as people call it: LORA, DORA, LOHA, ..."""
        return "DORA" if self.peft_type == "LORA" and self.config.get("use_dora") else self.peft_type


def open_adapter(path: str | os.PathLike, allow_pickle: bool = False, base: BaseInfo | None = None) -> Adapter:
    """Read an adapter folder's config and tensor headers; refuse what deltakit cannot apply exactly.

    ``base`` (the model's tensor shapes and config) is needed by the types whose files do not
    say everything (VeRA, IA3, LoRA on parameters); without it they are read as far as possible.
    """
    base = base if base is not None else BaseInfo({})
    if adapter_file_format(path) is not None:
        return _open_file(path, base)
    files = read_adapter_files(path, allow_pickle)
    kind = files.peft_type
    if kind in ACTIVATION_ONLY:
        raise DeltakitError(f"{files.path}: adapter type {kind} ({ACTIVATION_ONLY[kind]}) changes activations, "
                            "not weights: there is no ΔW to merge or analyse")
    if kind in TYPES:
        kinds, builder = TYPES[kind]
        groups, whole = group_keys(files.checkpoint, kinds)
        built = builder(files, groups, base, whole)
        expected = f"base_model.model.<module>.{kinds[0]}"
    elif peft_layer.knows(kind):  # the optional extra: PEFT itself builds each layer
        built, whole = peft_layer.build(files, base)
        expected = "base_model.model.<module>.<its tensors>"
    elif peft_layer.available():
        raise DeltakitError(f"{files.path}: adapter type {kind} is not supported; deltakit reads "
                            f"{', '.join(sorted(TYPES))} (and DoRA) adapters, and the types PEFT knows")
    else:
        raise DeltakitError(f"{files.path}: adapter type {kind} is not read natively (deltakit reads "
                            f"{', '.join(sorted(TYPES))} and DoRA); install the optional extra "
                            f"({peft_layer.EXTRA}) to apply it through PEFT, one layer at a time")
    built += token_modules(files, whole, base)
    modules: dict[str, AdapterModule] = {}
    for module in built:
        if module.target in modules:
            raise DeltakitError(f"{files.path}: {module.target} is changed twice, by {modules[module.target].module} "
                                f"and by {module.module}; deltakit cannot tell in which order PEFT applies them")
        modules[module.target] = module
    if not modules and not whole:
        raise DeltakitError(f"{files.path}: no {kind} tensors found (expected keys like {expected})")
    return Adapter(path=files.path, config=files.config, checkpoint=files.checkpoint, peft_type=kind,
                   modules=modules, whole_tensors=whole)


def _open_file(path: str | os.PathLike, base: BaseInfo) -> Adapter:
    """A kohya / LyCORIS or diffusers LoRA file, its modules aimed at the base's tensors."""
    file = read_adapter_file(path)
    built, left_out, label = kohya.build(file, base)
    if not built:
        first = left_out[0] if left_out else {"name": "(none)", "reason": "no modules"}
        raise DeltakitError(f"{file.path}: none of its modules changes this base (first: {first['name']}: "
                            f"{first['reason']})")
    return Adapter(path=file.path, config={"peft_type": label}, checkpoint=file.checkpoint, peft_type=label,
                   modules={m.target: m for m in built}, whole_tensors={}, format=file.format, left_out=left_out)


def base_info(checkpoint: Checkpoint) -> BaseInfo:
    """The shapes and config of a model checkpoint, as adapter types need them."""
    return BaseInfo({name: checkpoint.shape(name) for name in checkpoint.keys()}, checkpoint.config)
