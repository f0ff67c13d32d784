"""Tensor names of diffusion checkpoints in each layout, and the one mapping between the layouts.

Pure functions of names: nothing is read here. The layouts:

* **diffusers**: a component folder (``unet/``, ``transformer/``, ``text_encoder/``) names its modules
  as the diffusers / transformers class does: ``down_blocks.0.attentions.0.proj_in``,
  ``text_model.encoder.layers.0.self_attn.q_proj``.
* **LDM** (one ``.safetensors`` file of the original repositories, CompVis / Stability ``sgm``): the
  UNet under ``model.diffusion_model.`` as ``input_blocks.N.M`` / ``middle_block.M`` /
  ``output_blocks.N.M``, SD 1.x's CLIP text encoder under ``cond_stage_model.transformer.``, SDXL's
  first under ``conditioner.embedders.0.transformer.`` (transformers' names inside); SD 2.x's and
  SDXL's OpenCLIP encoders (``...model.transformer.resblocks``, fused q/k/v) have no other spelling
  here. Flux's original (BFL) names (``double_blocks.0.img_attn.qkv``) sit at the top level or
  under ``model.diffusion_model.``.
* **kohya** (sd-scripts, LyCORIS, A1111 / ComfyUI LoRA files): a module path with its dots made
  underscores behind a part prefix, ``lora_unet_`` (the denoiser), ``lora_te_`` (SD's one text
  encoder), ``lora_te1_`` / ``lora_te2_`` (SDXL's two); LyCORIS's own wrapper uses ``lycoris_``.
  sd-scripts spells an SD 1.x/2.x UNet in diffusers names and an SDXL UNet in LDM names
  (``sdxl_original_unet``), Flux in BFL names; LyCORIS spells whatever model it wraps; readers accept
  either UNet spelling (diffusers ``_maybe_map_sgm_blocks_to_diffusers``, A1111, ComfyUI).

The UNet mapping between diffusers and LDM names is diffusers' ``convert_ldm_unet_checkpoint``
(``diffusers.loaders.single_file_utils``) written both ways, one module path at a time: block
``b`` of a UNet with ``n`` resnets per down block is ``input_blocks`` ``1 + b(n+1) + l`` (its
downsampler ``(b+1)(n+1)``), up block ``b`` is ``output_blocks`` ``b(n+1) + l``, and inside a
resnet ``norm1 / conv1 / time_emb_proj / norm2 / conv2 / conv_shortcut`` are
``in_layers.0 / in_layers.2 / emb_layers.1 / out_layers.0 / out_layers.3 / skip_connection``.

Example::

    blocks = UnetBlocks.of(names)                       # from the names of either layout
    unet_to_ldm("down_blocks.1.attentions.0.proj_in", blocks)   # 'input_blocks.4.1.proj_in' when n = 2
    kohya_spellings(names)["lora_unet_input_blocks_4_1_proj_in"]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

LDM_UNET = "model.diffusion_model."
# Single-file prefixes of the parts kohya names, with the part's kohya prefix (the text encoders'
# paths inside them are transformers' CLIPTextModel names, as in a diffusers text_encoder folder).
LDM_PARTS = (
    (LDM_UNET, "unet"),
    ("cond_stage_model.transformer.", "te"),
    ("conditioner.embedders.0.transformer.", "te1"),
)
KOHYA_PARTS = ("unet", "te", "te1", "te2", "te3")
LYCORIS_PREFIX = "lycoris"  # LyCORIS's own wrapper (create_lycoris) names modules lycoris_<path>
KOHYA_MODULE = re.compile(r"^(?:lora_(?P<part>unet|te\d?)|lycoris)_(?P<rest>.+)$")
TEXT_MODEL = "text_model."
# A CLIP text encoder's own names: transformers 4 saves them under ``text_model.``, transformers 5 without it.
CLIP_TEXT = re.compile(r"^(text_model\.|encoder\.layers\.|embeddings\.(token|position)_embedding|final_layer_norm\.|"
                       r"text_projection\.)")

# resnet leaves: diffusers -> LDM
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_BACK = {ldm: diffusers for diffusers, ldm in _RESNET.items()}
_SIMPLE = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_SIMPLE_BACK = {ldm: diffusers for diffusers, ldm in _SIMPLE.items()}
DIFFUSERS_UNET = re.compile(r"^(conv_in|conv_out|conv_norm_out|time_embedding|add_embedding|down_blocks|mid_block|"
                            r"up_blocks)(\.|$)")
LDM_UNET_BLOCKS = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)\.")


@dataclass(frozen=True)
class UnetBlocks:
    """What the UNet mapping needs of a UNet's structure: resnets per down block (diffusers'
    ``layers_per_block``; up blocks have one more), and which up blocks have attentions."""

    layers: int
    up_attentions: frozenset[int]

    @classmethod
    def of(cls, paths: Iterable[str]) -> "UnetBlocks | None":
        """The structure from module or tensor paths of either layout (no prefix); None if they name no UNet."""
        paths = list(paths)
        diffusers = [m for m in map(_DOWN_RESNET.match, paths) if m]
        if diffusers:
            ups = {int(m[1]) for m in map(_UP_ATTENTION.match, paths) if m}
            return cls(1 + max(int(m[1]) for m in diffusers), frozenset(ups))
        inputs = [int(m[1]) for m in map(_INPUT_BLOCK.match, paths) if m]
        if not inputs:
            return None
        downsamplers = [int(m[1]) for m in map(_DOWNSAMPLER.match, paths) if m]
        layers = min(downsamplers) - 1 if downsamplers else max(inputs)
        ups = {int(m[1]) // (layers + 1) for m in map(_OUTPUT_ATTENTION.match, paths) if m}
        return cls(layers, frozenset(ups))


_DOWN_RESNET = re.compile(r"^down_blocks\.\d+\.resnets\.(\d+)\.")
_UP_ATTENTION = re.compile(r"^up_blocks\.(\d+)\.attentions\.")
_INPUT_BLOCK = re.compile(r"^input_blocks\.(\d+)\.")
_DOWNSAMPLER = re.compile(r"^input_blocks\.(\d+)\.0\.op(\.|$)")
_OUTPUT_ATTENTION = re.compile(r"^output_blocks\.(\d+)\.1\.(?!conv(\.|$))")


def unet_to_ldm(path: str, blocks: UnetBlocks) -> str | None:
    """A diffusers UNet module or tensor path in LDM names (no ``model.diffusion_model.``); None if it has none."""
    head, leaf = _split_simple(path, _SIMPLE)
    if head is not None:
        return head + leaf
    n = blocks.layers + 1
    match = re.match(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if match:
        side, block, kind, layer, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        index = (1 + block * n + layer) if side == "down" else block * n + layer
        where = "input_blocks" if side == "down" else "output_blocks"
        return f"{where}.{index}.{0 if kind == 'resnets' else 1}.{_resnet_leaf(rest) if kind == 'resnets' else rest}"
    match = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if match:
        kind, index, rest = match[1], int(match[2]), match[3]
        return f"middle_block.{2 * index}.{_resnet_leaf(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    match = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv(\..+)?$", path)
    if match:
        return f"input_blocks.{(int(match[1]) + 1) * n}.0.op{match[2] or ''}"
    match = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv(\..+)?$", path)
    if match:
        block = int(match[1])
        return f"output_blocks.{block * n + blocks.layers}.{2 if block in blocks.up_attentions else 1}.conv{match[2] or ''}"
    return None


def unet_from_ldm(path: str, blocks: UnetBlocks) -> str | None:
    """An LDM UNet module or tensor path (no ``model.diffusion_model.``) in diffusers names; None if it has none."""
    head, leaf = _split_simple(path, _SIMPLE_BACK)
    if head is not None:
        return head + leaf
    n = blocks.layers + 1
    match = re.match(r"^(input|output)_blocks\.(\d+)\.(\d+)\.(.+)$", path)
    if match:
        side, index, slot, rest = match[1], int(match[2]), int(match[3]), match[4]
        if side == "input":
            block, layer = divmod(index - 1, n)
            if layer == n - 1 or index == 0:  # the downsampler's slot (or conv_in, handled above)
                op = re.match(r"^op(\..+)?$", rest)
                return f"down_blocks.{block}.downsamplers.0.conv{op[1] or ''}" if op and slot == 0 else None
            where = "down_blocks"
        else:
            block, layer = divmod(index, n)
            up = re.match(r"^conv(\..+)?$", rest)
            if slot in (1, 2) and up and layer == blocks.layers:
                return f"up_blocks.{block}.upsamplers.0.conv{up[1] or ''}"
            where = "up_blocks"
        if slot == 0:
            leaf = _resnet_leaf_back(rest)
            return None if leaf is None else f"{where}.{block}.resnets.{layer}.{leaf}"
        return f"{where}.{block}.attentions.{layer}.{rest}" if slot == 1 else None
    match = re.match(r"^middle_block\.(\d+)\.(.+)$", path)
    if match:
        slot, rest = int(match[1]), match[2]
        if slot == 1:
            return f"mid_block.attentions.0.{rest}"
        leaf = _resnet_leaf_back(rest)
        return None if leaf is None or slot not in (0, 2) else f"mid_block.resnets.{slot // 2}.{leaf}"
    return None


def _split_simple(path: str, table: Mapping[str, str]) -> tuple[str | None, str]:
    for source, target in table.items():
        if path == source or path.startswith(source + "."):
            return target, path[len(source):]
    return None, ""


def _resnet_leaf(rest: str) -> str:
    first, dot, tail = rest.partition(".")
    return _RESNET.get(first, first) + dot + tail


def _resnet_leaf_back(rest: str) -> str | None:
    for ldm, diffusers in _RESNET_BACK.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return diffusers + rest[len(ldm):]
    return None


def part_of(name: str) -> tuple[str | None, str]:
    """(kohya part, path inside the part) of a stored tensor or module name.

    A single file's prefixes say the part (:data:`LDM_PARTS`); a CLIP text encoder folder's names
    (:data:`CLIP_TEXT`) are part None (``te``, ``te1`` or ``te2``, which only its shapes tell);
    anything else is a denoiser's (a UNet or transformer folder, or a BFL Flux file). A text
    encoder's path is given without transformers 4's ``text_model.``, so both spellings meet.
    """
    for prefix, part in LDM_PARTS:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return part, rest.removeprefix(TEXT_MODEL) if part != "unet" else rest
    if CLIP_TEXT.match(name):
        return None, name.removeprefix(TEXT_MODEL)
    return "unet", name


def flatten(path: str) -> str:
    """A module path as kohya spells it: dots made underscores."""
    return path.replace(".", "_")


def kohya_spellings(weights: Iterable[str]) -> dict[str, list[str]]:
    """kohya module name -> the stored weight names (``<module>.weight``) it can mean, for every name
    kohya-format files use: each part's own names, the other UNet layout's, LyCORIS's ``lycoris_``.

    A text encoder folder's names are offered under ``lora_te_``, ``lora_te1_`` and ``lora_te2_``
    alike (the caller tells them apart by shape).
    """
    weights = [w for w in weights if w.endswith(".weight")]
    unet_paths = [part_of(w)[1] for w in weights if part_of(w)[0] == "unet"]
    blocks = UnetBlocks.of(unet_paths)
    found: dict[str, list[str]] = {}
    for weight in weights:
        part, path = part_of(weight)
        module = path[: -len(".weight")]
        names = {f"{LYCORIS_PREFIX}_{flatten(module)}"}
        if part == "unet":
            names.add(f"lora_unet_{flatten(module)}")
        else:  # kohya spells a text encoder with transformers 4's text_model_, LyCORIS on transformers 5 without
            for p in [part] if part is not None else ["te", "te1", "te2"]:
                names |= {f"lora_{p}_{flatten(module)}", f"lora_{p}_text_model_{flatten(module)}"}
        if part == "unet" and blocks is not None:
            other = unet_to_ldm(module, blocks) if DIFFUSERS_UNET.match(module) else (
                unet_from_ldm(module, blocks) if LDM_UNET_BLOCKS.match(module) else None)
            if other is not None:
                names.add(f"lora_unet_{flatten(other)}")
        for name in names:
            found.setdefault(name, []).append(weight)
    return found


def kohya_part(module: str) -> str | None:
    """The part prefix of a kohya module name (``unet``, ``te``, ``te1``...), ``lycoris``, or None if it is none."""
    match = KOHYA_MODULE.match(module)
    if not match:
        return None
    return match["part"] or LYCORIS_PREFIX


def parts_present(weights: Iterable[str]) -> set[str]:
    """The kohya parts a checkpoint holds weights of (a text encoder folder counts as each of te, te1, te2)."""
    present: set[str] = set()
    for weight in weights:
        part, _ = part_of(weight)
        present |= {part} if part is not None else {"te", "te1", "te2"}
    return present | {LYCORIS_PREFIX}


class KohyaNamer:
    """The kohya names of a base's modules: ``lora_<part>_<path>``, a UNet's path in the layout sd-scripts
    names it in whatever layout the base stores: an SD 1.x/2.x UNet in diffusers names (sd-scripts converts it
    on load; what LyCORIS's ``create_lycoris_from_weights`` finds in the diffusers model), an SDXL UNet (one
    with ``add_embedding`` / ``label_emb``) in LDM names (sd-scripts' ``sdxl_original_unet``), which diffusers'
    SDXL loader expects: given diffusers names it mangles ``add_embedding.linear_1`` / ``linear_2`` and drops
    them. A denoiser that is no UNet keeps its own names. A text encoder is named with transformers 4's
    ``text_model_``, its part ``te`` (``te2`` when its folder is named ``text_encoder_2``, as in a diffusers
    SDXL pipeline) or the single file's.
    """

    def __init__(self, weights: Iterable[str], folder: str = "") -> None:
        paths = [path for part, path in map(part_of, weights) if part == "unet"]
        self.blocks = UnetBlocks.of(paths)
        self.sdxl = any(p.startswith(("label_emb.", "add_embedding.")) for p in paths)
        self.folder = folder

    def __call__(self, module: str) -> str:
        part, path = part_of(module)
        if part != "unet":
            part = part or ("te2" if self.folder == "text_encoder_2" else "te")
            return f"lora_{part}_text_model_{flatten(path)}"
        if self.blocks is not None and not self.sdxl and LDM_UNET_BLOCKS.match(path):
            path = unet_from_ldm(path, self.blocks) or path
        elif self.blocks is not None and self.sdxl and DIFFUSERS_UNET.match(path):
            path = unet_to_ldm(path, self.blocks) or path
        return f"lora_unet_{flatten(path)}"


class DiffusersNamer:
    """A base module's (component, module path) in a diffusers LoRA file (``save_lora_weights``): the
    denoiser as ``unet`` in diffusers names (an LDM single file's converted) or ``transformer`` (a
    UNet-less model, in its own names), a text encoder as ``text_encoder`` (``text_encoder_2``: SDXL's
    second, or a folder of that name) in the names it is stored with."""

    def __init__(self, weights: Iterable[str], folder: str = "") -> None:
        paths = [path for part, path in map(part_of, weights) if part == "unet"]
        self.blocks = UnetBlocks.of(paths)
        self.folder = folder

    def __call__(self, module: str) -> tuple[str, str]:
        part, path = part_of(module)
        if part == "unet":
            if self.blocks is None:
                return "transformer", path
            return "unet", (unet_from_ldm(path, self.blocks) if LDM_UNET_BLOCKS.match(path) else None) or path
        stored = next((module[len(prefix):] for prefix, p in LDM_PARTS if module.startswith(prefix)), module)
        second = part == "te2" or (part is None and self.folder == "text_encoder_2")
        return ("text_encoder_2" if second else "text_encoder"), stored


def is_diffusion_file(names: Iterable[str]) -> bool:
    """Whether a single file's names are a diffusion checkpoint's original ones (an LDM UNet, BFL Flux)."""
    return any(n.startswith((LDM_UNET, "double_blocks.", "single_blocks.")) for n in names)


def common_names(names: Iterable[str]) -> dict[str, str]:
    """A key per stored name that is the same in every layout (a UNet tensor in diffusers names, a text
    encoder tensor in transformers' names, each behind its part) -> the stored name.

    Two checkpoints of one model in different layouts (an LDM single file and a diffusers folder)
    pair by these keys.
    """
    names = list(names)
    blocks = UnetBlocks.of(part_of(n)[1] for n in names if part_of(n)[0] == "unet")
    keys: dict[str, str] = {}
    for name in names:
        part, path = part_of(name)
        if part == "unet" and blocks is not None and LDM_UNET_BLOCKS.match(path):
            path = unet_from_ldm(path, blocks) or path
        keys[f"{'te' if part is None or part.startswith('te') else part}:{path}"] = name
    return keys
