"""Adapter files of the diffusion world: kohya-ss / LyCORIS files and diffusers' LoRA files; keys and metadata only.

* **kohya** (sd-scripts ``networks/lora.py``, LyCORIS, A1111 / ComfyUI): one ``.safetensors`` file,
  keys ``<module>.<kind>`` with ``<module>`` a kohya module name (``lora_unet_…``, ``lora_te1_…``,
  ``lycoris_…``; :mod:`deltakit.io.diffusion_names`) and ``<kind>`` one of a LoRA's
  ``lora_down.weight`` / ``lora_up.weight`` / ``alpha`` (and ``dora_scale``), LoHa's ``hada_w1_a`` …,
  LoKr's ``lokr_w1`` …; metadata ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha`` ….
* **diffusers** (``save_lora_weights``, ``pytorch_lora_weights.safetensors``): PEFT's keys behind a
  component prefix, ``unet.<module>.lora_A.weight``, and the components' LoraConfig as JSON in the
  metadata key ``lora_adapter_metadata`` (``"unet.r"``, ``"unet.lora_alpha"`` …).

What the tensors mean is decided in :mod:`deltakit.adapters.kohya`.

Example::

    files = read_adapter_file("my-lora.safetensors")
    files.format, group_modules(files.checkpoint)["lora_unet_mid_block_attentions_0_proj_in"]
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltakit.errors import DeltakitError
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.io.diffusion_names import KOHYA_MODULE
from deltakit.io.peft import is_peft_adapter
from deltakit.io.safetensors_header import read_safetensors_header

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
DIFFUSERS_METADATA = "lora_adapter_metadata"
DIFFUSERS_KEY = re.compile(rf"^(?P<component>{'|'.join(DIFFUSERS_COMPONENTS)})\.(?P<module>.+)\."
                           r"(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$")


@dataclass
class AdapterFile:
    """One kohya or diffusers adapter file opened lazily: its tensors' headers and its metadata."""

    path: Path
    checkpoint: Checkpoint
    format: str  # "kohya" | "diffusers"
    metadata: dict[str, str] = field(default_factory=dict)

    def component_config(self, component: str) -> dict[str, Any]:
        """A diffusers file's LoraConfig fields of one component (``"unet.r"`` -> ``"r"``), {} if not saved."""
        raw = self.metadata.get(DIFFUSERS_METADATA)
        if not raw:
            return {}
        try:
            packed = json.loads(raw)
        except ValueError:
            raise DeltakitError(f"{self.path}: its {DIFFUSERS_METADATA} metadata is not JSON") from None
        if not isinstance(packed, dict):
            raise DeltakitError(f"{self.path}: its {DIFFUSERS_METADATA} metadata is not a JSON object")
        prefix = f"{component}."
        return {key[len(prefix):]: value for key, value in packed.items() if key.startswith(prefix)}


def weights_file(path: str | os.PathLike) -> Path | None:
    """The one safetensors file a path names as an adapter file: itself, or a folder's
    ``pytorch_lora_weights.safetensors`` (diffusers' ``save_lora_weights`` output); None otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / DIFFUSERS_LORA_FILE
        return candidate if candidate.is_file() and not is_peft_adapter(path) else None
    return path if path.is_file() and path.suffix == ".safetensors" else None


def file_format(keys: list[str]) -> str | None:
    """"kohya" when every key is a kohya module's, "diffusers" when every key is a component's LoRA tensor."""
    if not keys:
        return None
    if all(KOHYA_MODULE.match(key.split(".", 1)[0]) and "." in key for key in keys):
        return "kohya"
    if all(DIFFUSERS_KEY.match(key) for key in keys):
        return "diffusers"
    return None


def adapter_file_format(path: str | os.PathLike) -> str | None:
    """"kohya" or "diffusers" when ``path`` is such an adapter file (read from its header alone), else None."""
    file = weights_file(path)
    if file is None:
        return None
    try:
        keys = list(read_safetensors_header(file))
    except DeltakitError:
        return None
    return file_format(keys)


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an adapter rather than a model: a PEFT folder, a kohya / LyCORIS file or a
    diffusers LoRA file (or a folder holding one)."""
    return is_peft_adapter(path) or adapter_file_format(path) is not None


def read_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Open a kohya or diffusers adapter file (headers and metadata; no tensor data)."""
    file = weights_file(path)
    keys = list(read_safetensors_header(file)) if file is not None else []
    fmt = file_format(keys)
    if file is None or fmt is None:
        raise DeltakitError(f"{path} is not a kohya / LyCORIS or diffusers LoRA file (keys like "
                            "lora_unet_<module>.lora_down.weight or unet.<module>.lora_A.weight)")
    from safetensors import safe_open  # the metadata strings; the header was validated above

    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return AdapterFile(path=file, checkpoint=open_checkpoint(file), format=fmt, metadata=metadata)


def group_modules(checkpoint: Checkpoint) -> dict[str, dict[str, str]]:
    """kohya module name -> {kind: key}: the kind is what follows the module name (``lora_down.weight``, ``alpha``)."""
    modules: dict[str, dict[str, str]] = {}
    for key in checkpoint.keys():
        module, _, kind = key.partition(".")
        modules.setdefault(module, {})[kind] = key
    return modules


def group_components(checkpoint: Checkpoint) -> dict[str, dict[str, dict[str, str]]]:
    """A diffusers LoRA file's keys: component -> module path -> {"lora_A" | "lora_B" | "lora_magnitude_vector": key}."""
    components: dict[str, dict[str, dict[str, str]]] = {}
    for key in checkpoint.keys():
        match = DIFFUSERS_KEY.match(key)
        assert match is not None  # file_format checked every key
        components.setdefault(match["component"], {}).setdefault(match["module"], {})[match["kind"]] = key
    return components
