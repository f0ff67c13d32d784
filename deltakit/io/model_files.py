"""The non-weight files that make a folder of weights a loadable model (config, tokenizer, ...)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import warnings
from pathlib import Path

from deltakit.errors import DeltakitWarning
from deltakit.io.checkpoint import Checkpoint, read_model_config
from deltakit.io.diffusion_names import is_diffusion_file
from deltakit.io.filenames import ADAPTER_CONFIG, DIFFUSERS_WEIGHTS_PREFIX
from deltakit.io.paths import containment_root, is_inside

# Files of a model folder that are weights (never copied: the output has its own).
WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.msgpack|\.h5|\.onnx|\.gguf|\.index\.json)$")
# Beside a single weight file only these are copied (its folder may hold anything).
MODEL_FILE = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|"
    r"merges\.txt|chat_template\..*|preprocessor_config\.json|processor_config\.json|.*\.tiktoken|spiece\.model|"
    r"sentencepiece.*\.model)$"
)


def copy_model_files(ckpt: Checkpoint, folder: Path, only_config: bool = False) -> list[str]:
    """Copy config, generation config, tokenizer and other non-weight files of ``ckpt`` into ``folder``.

    From a model folder every regular, non-hidden, non-weight file is copied (custom code and
    README included); beside a single weight file only the files transformers reads.
    ``only_config`` copies config.json alone. Returns the names copied. Only regular files
    inside the checkpoint's folder are copied: a symbolic link that leaves it, a FIFO or a
    device is left out with a :class:`~deltakit.errors.DeltakitWarning`.
    """
    if ckpt.hub_id:
        _fetch_model_files(ckpt.hub_id, only_config)
    from_folder = ckpt.path.is_dir()
    root = containment_root(ckpt.root)
    copied = []
    for source in sorted(ckpt.root.iterdir()):
        if source.name.startswith(".") or WEIGHT_FILE.search(source.name) or source.is_dir():
            continue
        if source.name == ADAPTER_CONFIG or (not from_folder and not MODEL_FILE.match(source.name)):
            continue
        if only_config and source.name != "config.json":
            continue
        reason = _not_copyable(source, root)
        if reason:
            warnings.warn(f"{source} not copied into the output: {reason}", DeltakitWarning, stacklevel=2)
            continue
        shutil.copy2(source, Path(folder) / source.name, follow_symlinks=True)
        copied.append(source.name)
    return copied


def _not_copyable(source: Path, root: Path) -> str | None:
    """Why ``source`` is not copied (a link out of ``root``, not a regular file), or None."""
    if not is_inside(source, root):
        return f"it is a symbolic link to {os.path.realpath(source)}, outside {root}"
    try:
        mode = os.stat(source).st_mode
    except OSError as exc:
        return exc.strerror or "it cannot be read"
    return None if stat.S_ISREG(mode) else "it is not a regular file"


def _fetch_model_files(hub_id: str, only_config: bool) -> None:
    """Download the non-weight files transformers reads (tokenizer, generation config...) beside a Hub checkpoint."""
    from deltakit.io.hub import fetch_files, hub_id_of

    parsed = hub_id_of(hub_id)
    if parsed is not None and not only_config:  # config.json came with the weights
        fetch_files(parsed, lambda name: bool(MODEL_FILE.match(name)) or name.endswith(".py"))


def weight_file_prefix(ckpt: Checkpoint) -> tuple[str, bool]:
    """(file name prefix, whether the weights stay one file) of a model written from ``ckpt``.

    A diffusers component folder keeps diffusers' name (``diffusion_pytorch_model.safetensors``, which
    ``from_pretrained`` looks for); a single-file diffusion checkpoint (SD / SDXL / Flux original
    names) is written as one file of its own name, as the tools that read such files expect;
    anything else as transformers writes it (``model.safetensors``, shards plus an index).
    """
    if ckpt.path.is_dir() and all(f.name.startswith(DIFFUSERS_WEIGHTS_PREFIX) for f in ckpt.files):
        return DIFFUSERS_WEIGHTS_PREFIX, False
    if ckpt.path.is_file() and ckpt.path.suffix == ".safetensors" and is_diffusion_file(ckpt.keys()):
        return ckpt.path.name.removesuffix(".safetensors"), True
    return "model", False


def drop_quantization_config(folder: Path) -> None:
    """The output holds dequantized weights: a quantization_config would make loaders expect quantized ones."""
    config = read_model_config(folder / "config.json")
    config_path = folder / "config.json"
    if config is not None and config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2) + "\n")
