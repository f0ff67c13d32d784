"""PEFT adapter folders: ``adapter_config.json`` plus ``adapter_model.safetensors``, keys and config only.

Key names follow PEFT: ``base_model.model.<module>.<kind>[.weight]``, where ``kind`` names one of
the adapter's own tensors (``lora_A``, ``hada_w1_a``, ``ia3_l``...; each adapter type in
:mod:`deltakit.adapters` says which kinds it has). Any other tensor (``modules_to_save``, trained
biases, a saved embedding ``base_layer``) is a whole replacement of the model's tensor of the same
name. What the tensors mean is not decided here: see :mod:`deltakit.adapters`.

Example::

    files = read_adapter_files("my-adapter")
    modules, whole = group_keys(files.checkpoint, {"lora_A", "lora_B"})
    # modules["model.layers.0.self_attn.q_proj"] == {"lora_A": "base_model.model....lora_A.weight", ...}
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from deltakit.errors import DeltakitError
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.io.hub import resolve_path
from deltakit.io.filenames import ADAPTER_CONFIG
from deltakit.io.json_files import peft_pattern, read_json, validate_adapter_config
from deltakit.io.paths import refuse_escaping_link

PEFT_PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."  # tensors shared by every layer (VeRA's projections) sit outside the model


@dataclass
class AdapterFiles:
    """An adapter folder opened lazily: its parsed config, its tensors' headers, its PEFT type."""

    path: Path
    config: dict[str, Any]
    checkpoint: Checkpoint
    peft_type: str  # upper case, e.g. "LORA", "LOHA"


def is_peft_adapter(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding ``adapter_config.json`` (a hub id: only its configs are fetched)."""
    try:
        path = resolve_path(path, weights=False)
    except DeltakitError:
        return False
    return path.is_dir() and (path / ADAPTER_CONFIG).exists()  # a FIFO of that name is refused when read


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the module name or a dotted suffix (regex)."""
    for key, value in patterns.items():
        if key == module or peft_pattern(key).match(module):
            return value
    return default


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def read_adapter_files(path: str | os.PathLike, allow_pickle: bool = False) -> AdapterFiles:
    """Read an adapter folder's config and tensor headers (no tensor data)."""
    folder = resolve_path(path, allow_pickle=allow_pickle)
    config_path = folder / ADAPTER_CONFIG
    if os.path.lexists(config_path):
        refuse_escaping_link(config_path, folder)
    if not os.path.lexists(config_path):
        raise DeltakitError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    config = validate_adapter_config(read_json(config_path), config_path)
    peft_type = str(config.get("peft_type") or "LORA").upper()
    checkpoint = open_checkpoint(folder, allow_pickle=allow_pickle)
    return AdapterFiles(path=folder, config=config, checkpoint=checkpoint, peft_type=peft_type)


def strip_prefix(key: str) -> str:
    """A file key without PEFT's ``base_model.model.`` wrapper."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def group_keys(checkpoint: Checkpoint, kinds: Iterable[str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Split an adapter file's keys into adapter tensors by module and whole tensors.

    Returns (module path -> {kind: file key}, model tensor name -> file key of its whole
    replacement). A module path keeps any ``.base_layer`` of nested PEFT wrappers (several
    LoRAs on parameters of one module); whole tensors are named as the model names them.
    """
    pattern = re.compile(
        rf"^(?P<module>.+?)\.(?P<kind>{'|'.join(sorted(map(re.escape, kinds), key=len, reverse=True))})"
        r"(?:\.[A-Za-z0-9_-]+)??(?:\.weight)?$")
    modules: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    for key in checkpoint.keys():
        match = pattern.match(strip_prefix(key))
        if match:
            # a trained bias of an adapter's own layer (LoRA's lora_bias: lora_B.bias) is a kind of its own
            kind = f"{match['kind']}.bias" if key.endswith(".bias") else match["kind"]
            modules.setdefault(match["module"], {})[kind] = key
        elif key.startswith(PEFT_PREFIX):
            name = strip_prefix(key).replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
            # PEFT keys a LoRA layer's bias (bias="lora_only" / "all") and a saved embedding
            # base layer under the wrapped ``base_layer``: they replace the model's own tensor.
            whole[name.replace(".base_layer.", ".")] = key
        else:
            whole.setdefault(key, key)  # a key outside the model wrapper: the type decides (VeRA's projections)
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
