"""PEFT LoRA adapter folders: ``adapter_config.json`` plus ``adapter_model.safetensors``.

Key names follow PEFT: ``base_model.model.<module>.lora_A.weight`` (r × in) and
``...lora_B.weight`` (out × r) for linear / Conv1D layers, ``...lora_embedding_A`` (r × vocab)
and ``...lora_embedding_B`` (dim × r) for embeddings; any other tensor (``modules_to_save``,
trained biases) is a whole replacement of the base tensor of the same name. The scaling of
each module is lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora`` (Kalajdzievski
2023), with per-module r and alpha from ``rank_pattern`` / ``alpha_pattern``.

Example::

    adapter = open_adapter("my-lora")
    for module in adapter.modules.values():
        a, b = adapter.factors(module)        # ΔW = scaling · B @ A
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltakit.errors import DeltakitError
from deltakit.io.checkpoint import ADAPTER_CONFIG, Checkpoint, open_checkpoint, resolve_path

PEFT_PREFIX = "base_model.model."
_FACTOR_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$"
)
# Config switches that change the math; deltakit refuses rather than mis-applies them.
_UNSUPPORTED_SWITCHES = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA biases (lora_bias)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer: where its factors are stored and how they scale."""

    module: str  # module path in the model, e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool
    embedding: bool = False

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read lazily; see the module docstring."""

    path: Path
    config: dict[str, Any]
    checkpoint: Checkpoint
    modules: dict[str, LoraModule]  # by weight name ("<module>.weight")
    whole_tensors: dict[str, str]  # base tensor name -> key in the adapter file

    def factors(self, module: LoraModule, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as stored: A is r × in and B is out × r (embeddings: A is r × vocab, B is dim × r)."""
        return self.checkpoint.get(module.a_key, device), self.checkpoint.get(module.b_key, device)

    def delta_shape(self, module: LoraModule) -> tuple[int, int]:
        """Shape of the weight this module's ΔW adds to, as the base stores it."""
        a_shape, b_shape = self.checkpoint.shape(module.a_key), self.checkpoint.shape(module.b_key)
        if module.embedding:
            return (a_shape[1], b_shape[0])
        if module.fan_in_fan_out:
            return (a_shape[1], b_shape[0])
        return (b_shape[0], a_shape[1])


def is_peft_adapter(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding ``adapter_config.json`` (a hub id: only its configs are fetched)."""
    try:
        path = resolve_path(path, weights=False)
    except DeltakitError:
        return False
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module name or a dotted suffix (regex)."""
    for key, value in patterns.items():
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def open_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> LoraAdapter:
    """Read an adapter folder's config and tensor headers; refuse what deltakit cannot apply exactly."""
    folder = resolve_path(path, allow_pickle=allow_pickle)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise DeltakitError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltakitError(f"{config_path} is not valid JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise DeltakitError(f"{config_path} is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise DeltakitError(f"{folder}: adapter type {peft_type} is not supported; deltakit applies LORA adapters only")
    for switch, label in _UNSUPPORTED_SWITCHES.items():
        if config.get(switch):
            raise DeltakitError(f"{folder}: {label} is not supported; deltakit applies plain LoRA only")
    checkpoint = open_checkpoint(folder, allow_pickle=allow_pickle)
    if any("lora_magnitude_vector" in key for key in checkpoint.keys()):
        raise DeltakitError(f"{folder}: holds DoRA magnitude vectors; DoRA is not supported")
    modules, whole = _parse_keys(checkpoint, config, folder)
    if not modules and not whole:
        raise DeltakitError(f"{folder}: no LoRA tensors found (expected keys like base_model.model.<module>.lora_A.weight)")
    return LoraAdapter(path=folder, config=config, checkpoint=checkpoint, modules=modules, whole_tensors=whole)


def _strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _parse_keys(checkpoint: Checkpoint, config: dict[str, Any], folder: Path) -> tuple[dict[str, LoraModule], dict[str, str]]:
    factor_keys: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    for key in checkpoint.keys():
        match = _FACTOR_KEY.match(_strip_prefix(key))
        if match:
            factor_keys.setdefault(match["module"], {})[match["kind"]] = key
        else:
            name = _strip_prefix(key).replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
            # PEFT keys a LoRA layer's bias (bias="lora_only" / "all") and a saved embedding
            # base layer under the wrapped ``base_layer``: they replace the model's own tensor.
            whole[name.replace(".base_layer.", ".")] = key
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    use_rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for module, kinds in sorted(factor_keys.items()):
        embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_kind not in kinds or b_kind not in kinds:
            raise DeltakitError(f"{folder}: module {module} has only one of its LoRA factors")
        a_shape, b_shape = checkpoint.shape(kinds[a_kind]), checkpoint.shape(kinds[b_kind])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise DeltakitError(f"{folder}: module {module} has factors of shapes {a_shape} and {b_shape}, which do not multiply")
        rank = a_shape[0]
        declared = int(pattern_value(rank_pattern, module, r_default))
        if declared != rank:
            raise DeltakitError(f"{folder}: module {module} has rank {rank} but the config says r={declared}")
        alpha = float(pattern_value(alpha_pattern, module, alpha_default))
        modules[f"{module}.weight"] = LoraModule(
            module=module, a_key=kinds[a_kind], b_key=kinds[b_kind], rank=rank, alpha=alpha,
            scaling=lora_scaling(alpha, rank, use_rslora), fan_in_fan_out=fan_in_fan_out and not embedding,
            embedding=embedding,
        )
    return modules, whole


def adapter_config(
    modules: dict[str, int],
    fan_in_fan_out: bool = False,
    base_model_name_or_path: str | None = None,
    modules_to_save: list[str] | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """A PEFT LoraConfig dict for ``modules`` (module path -> rank) with scaling 1 everywhere.

    r is the most common rank, rank_pattern / alpha_pattern list the others, and lora_alpha = r
    (alpha_pattern = rank) so that alpha / r = 1: the stored factors are the delta itself.
    target_modules are full module paths, so PEFT adapts exactly these layers.
    """
    ranks = list(modules.values())
    r = max(set(ranks), key=lambda k: (ranks.count(k), k)) if ranks else 1
    # Pattern keys are regexes to PEFT; escape the dots so layer 1 never matches layer 11.
    exceptions = {re.escape(module): rank for module, rank in modules.items() if rank != r}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": exceptions,
        "alpha_pattern": dict(exceptions),
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def adapter_keys(module: str, embedding: bool = False) -> tuple[str, str]:
    """The PEFT file keys of a module's A and B factors (PEFT's embedding LoRA keys have no ``.weight``)."""
    if embedding:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def whole_tensor_key(name: str, lora_bias: bool = False) -> str:
    """The PEFT file key of a tensor carried whole: a ``modules_to_save`` parameter, or with
    ``lora_bias`` the bias of a LoRA layer as PEFT's ``bias="lora_only"`` saves it."""
    if lora_bias:
        module, _, leaf = name.rpartition(".")
        return f"{PEFT_PREFIX}{module}.base_layer.{leaf}"
    return f"{PEFT_PREFIX}{name}"
