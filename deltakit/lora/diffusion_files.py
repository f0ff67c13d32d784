"""Writing an extracted LoRA for the diffusion tools: a kohya-ss file, one ``.safetensors`` that
sd-scripts, LyCORIS, diffusers, A1111 and ComfyUI load, or a diffusers LoRA folder.

Each factored module ``m`` becomes ``<k>.lora_down.weight`` (A, r × in), ``<k>.lora_up.weight`` (B,
out × r) and ``<k>.alpha`` (r, a 0-D tensor: scaling α / r = 1, so up @ down is the extracted ΔW); a
convolution becomes a LoCon module, down a convolution with the layer's kernel (r, in, kh, kw) and up a
1×1 one (out, r, 1, 1), as sd-scripts' ``networks/lora.py`` and LyCORIS's LoCon store them (LyCORIS's
Tucker variant, a core between a 1×1 down and up, is not written: diffusers cannot load it),
with ``k`` the kohya name sd-scripts gives the module (:class:`deltakit.io.diffusion_names.KohyaNamer`:
an SD 1.x/2.x UNet in diffusers names, SDXL's in LDM names whichever layout the base stores, text encoders
as ``lora_te*``). The metadata carries sd-scripts' ``ss_network_module`` (``networks.lora``), ``ss_network_dim`` and
``ss_network_alpha`` (the rank, or ``Dynamic`` when the ranks differ, as ``resize_lora.py`` writes),
``ss_network_args`` with the ``conv_dim`` / ``conv_alpha`` of the convolutions larger than 1×1, and deltakit's
own record of the selection. The file is written atomically (a temporary folder beside it, renamed into
place), and the factors are parked in that folder between passes.

The diffusers format is what ``save_lora_weights`` writes: a folder with
``pytorch_lora_weights.safetensors``, PEFT's keys behind the component (``unet.<module>.lora_A.weight``;
a convolution's A (r, in, kh, kw) and B (out, r, 1, 1), PEFT's conv LoRA, which diffusers' loaders inject),
:class:`deltakit.io.diffusion_names.DiffusersNamer`) and each component's LoraConfig, with its
rank_pattern / alpha_pattern, as JSON in the metadata key ``lora_adapter_metadata`` (``"unet.r"`` …),
which diffusers' loaders read.

Example::

    with file_output(Path("lora.safetensors"), "kohya", force=False, inputs=[]) as (folder, file):
        write_lora_file(file, tensors, metadata)
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from deltakit.errors import DeltakitError
from deltakit.io.atomic import atomic_directory, atomic_file
from deltakit.io.diffusion_names import DiffusersNamer, KohyaNamer
from deltakit.io.peft import adapter_config
from deltakit.io.inputs import InputFootprint
from deltakit.io.writer import ShardedWriter
from deltakit.lora.adapter_files import AdapterTensor
from deltakit.lora.targets import LoraTarget
from deltakit.version import __version__

FORMATS = ("peft", "kohya", "diffusers")
DIFFUSERS_FILE = "pytorch_lora_weights"  # diffusers' LORA_WEIGHT_NAME_SAFE without .safetensors
NETWORK_MODULE = "networks.lora"  # sd-scripts' LoRA network: what loaders read ss_network_module for


def check_format(fmt: str, out: str, save_modules: bool, embeddings: bool, parallel_active: bool) -> None:
    """Refuse, before anything is read, what a kohya file cannot hold or deltakit does not write as one."""
    if fmt not in FORMATS:
        raise DeltakitError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "peft":
        return
    if fmt == "kohya" and not str(out).endswith(".safetensors"):
        raise DeltakitError(f"--format kohya writes one file: name it with .safetensors (got {out})")
    if save_modules:
        raise DeltakitError(f"--save-modules carries whole tensors as PEFT modules_to_save; a {fmt} LoRA file holds "
                            "LoRA factors only (use --format peft)")
    if embeddings:
        raise DeltakitError(f"--embeddings writes PEFT embedding LoRA, which --format {fmt} does not hold")
    if parallel_active:
        raise DeltakitError(f"--format {fmt} is written by one process; run extract without torchrun")


def check_targets(targets: Iterable[LoraTarget], fmt: str) -> None:
    """Every target must be an (out, in) weight that up @ down is, or a convolution's (LoCon; PEFT's conv LoRA in
    a diffusers file): no Conv1D, tables or fused experts."""
    for target in targets:
        if target.kind not in ("linear", "conv") or target.parameter is not None:
            what = "a fused expert tensor" if target.parameter else f"a {target.kind} weight"
            raise DeltakitError(f"{target.pair.name} is {what}, which a {fmt} LoRA file cannot hold; use --format peft "
                                "or leave it out with --exclude")


@contextlib.contextmanager
def file_output(out: str | Path, fmt: str, force: bool, inputs: Iterable[InputFootprint]) -> Iterator[tuple[Path, Path]]:
    """(a private folder for the staged factors, the temporary path of the file), published as ``out`` on success:
    the kohya file itself, or the diffusers folder that holds ``pytorch_lora_weights.safetensors``."""
    if fmt == "kohya":
        with atomic_file(out, force, inputs) as file:
            yield Path(file).parent, Path(file)
    else:
        with atomic_directory(out, force, inputs) as folder:
            yield Path(folder), Path(folder) / f"{DIFFUSERS_FILE}.safetensors"


def kohya_keys(weights: list[str], folder: str) -> Callable[[str, bool], tuple[str, str]]:
    """The (down, up) keys of a base module, for :meth:`Extraction.assemble`'s ``keys``."""
    namer = KohyaNamer(weights, folder)

    def keys(module: str, embedding: bool = False) -> tuple[str, str]:
        name = namer(module)
        return f"{name}.lora_down.weight", f"{name}.lora_up.weight"
    return keys


def alpha_tensors(ranks: dict[str, int], weights: list[str], folder: str, dtype: torch.dtype) -> list[AdapterTensor]:
    """One 0-D ``alpha`` = r per module: scaling α / r = 1."""
    out, namer = [], KohyaNamer(weights, folder)
    for module, rank in ranks.items():
        name = namer(module)
        out.append(AdapterTensor(f"{name}.alpha", (), dtype, lambda r=rank: torch.tensor(float(r))))
    return out


def kohya_metadata(ranks: dict[str, int], spatial: set[str], selection: dict[str, Any], base: str,
                   ft: str) -> dict[str, str]:
    """sd-scripts' ss_* fields a loader reads, and deltakit's record of what was extracted.

    ``ss_network_dim`` / ``ss_network_alpha`` are the rank of the linear layers and 1×1 convolutions
    (``Dynamic`` when it differs), and ``ss_network_args`` holds that of the convolutions with a larger
    kernel (``spatial``: those modules) as ``conv_dim`` / ``conv_alpha`` when the file has any, as sd-scripts'
    ``extract_lora_from_models.py`` writes them (its conv_dim ranks only those; ``networks/lora.py``).
    """
    linear = [r for m, r in ranks.items() if m not in spatial] or list(ranks.values())
    conv = [r for m, r in ranks.items() if m in spatial]
    dim = _dim(linear)
    metadata = {"ss_network_module": NETWORK_MODULE, "ss_network_dim": dim, "ss_network_alpha": dim}
    if conv:
        metadata["ss_network_args"] = json.dumps({"conv_dim": _dim(conv), "conv_alpha": _dim(conv)})
    return {**metadata, "deltakit_version": __version__, "deltakit_selection": json.dumps(selection, sort_keys=True),
            "deltakit_base": base, "deltakit_ft": ft}


def _dim(ranks: list[int]) -> str:
    """One rank as sd-scripts writes it, or ``Dynamic`` when they differ (``resize_lora.py``)."""
    distinct = set(ranks)
    return str(distinct.pop()) if len(distinct) == 1 else "Dynamic"


def diffusers_keys(weights: list[str], folder: str) -> Callable[[str, bool], tuple[str, str]]:
    """The (A, B) keys of a base module in a diffusers LoRA file, for :meth:`Extraction.assemble`'s ``keys``."""
    namer = DiffusersNamer(weights, folder)

    def keys(module: str, embedding: bool = False) -> tuple[str, str]:
        component, path = namer(module)
        return f"{component}.{path}.lora_A.weight", f"{component}.{path}.lora_B.weight"
    return keys


def diffusers_metadata(ranks: dict[str, int], weights: list[str], folder: str) -> dict[str, str]:
    """``lora_adapter_metadata``: each component's LoraConfig (scaling 1: lora_alpha = r, patterns where ranks
    differ), its keys packed as ``<component>.<key>`` as diffusers' ``_pack_dict_with_prefix`` packs them."""
    namer = DiffusersNamer(weights, folder)
    by_component: dict[str, dict[str, int]] = {}
    for module, rank in ranks.items():
        component, path = namer(module)
        by_component.setdefault(component, {})[path] = rank
    packed: dict[str, Any] = {}
    for component, modules in by_component.items():
        config = adapter_config(modules)
        config.pop("peft_type", None)
        config.pop("task_type", None)
        packed.update({f"{component}.{key}": value for key, value in config.items()})
    return {"lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


def write_lora_file(file: Path, tensors: list[AdapterTensor], metadata: dict[str, str],
                progress: Callable[..., Any] | None = None) -> None:
    """Write ``tensors`` into the one safetensors file ``file`` with ``metadata``."""
    writer = ShardedWriter(file.parent, [(t.key, t.shape, t.dtype) for t in tensors], max_shard_bytes=sys.maxsize,
                           prefix=file.name.removesuffix(".safetensors"), metadata=metadata)
    items = progress(tensors, len(tensors), "writing LoRA file") if progress else tensors
    for tensor in items:
        writer.write(tensor.key, tensor.load().to(tensor.dtype))
    writer.finish()
