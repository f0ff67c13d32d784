"""kohya-ss / LyCORIS files and diffusers' LoRA files as the adapter modules every command already applies.

A file's modules become the same objects as a PEFT adapter's (:class:`~deltakit.adapters.lora.LoraModule`,
:class:`~deltakit.adapters.dora.DoraModule`, :class:`~deltakit.adapters.loha.LohaModule`,
:class:`~deltakit.adapters.lokr.LokrModule`), each aimed at the base tensor it changes, so merge,
unmerge, rank, extract and the sums treat them as they treat PEFT's. Which tensor a kohya module
name means is found among the spellings of the base's names (:func:`deltakit.io.diffusion_names.kohya_spellings`:
either UNet layout, either text encoder part) and the shapes; modules of a part the base does not
hold (the text encoders when the base is a UNet) are left out and listed.

The formulas are LyCORIS's (``lycoris.modules``), which sd-scripts shares for LoRA:

* LoRA / LoCon: ΔW = (α / r) · up @ down, r = down's rows, α the module's ``alpha`` (absent or 0:
  α = r, scaling 1; ``LoConModule.__init__``).
* DoRA (``dora_scale``, LyCORIS ``wd_on_out``): W' = dora_scale ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ per output
  row (``weight_decompose``; LyCORIS adds fp32's eps to the norm, a relative 1e-7).
* LoHa: ΔW = (α / r) · (w1a @ w1b) ⊙ (w2a @ w2b), r = w1a's columns.
* LoKr: ΔW = s · W1 ⊗ W2, W1 and W2 whole or products; s = α / r with r the inner dimension of
  the first product stored (w1a's, else w2a's), and s = 1 when both are whole
  (``LokrModule.__init__``: "use scale = 1").

A diffusers file is PEFT's LoRA per component (``unet.``, ``transformer.``, ``text_encoder.``…),
scaled as its ``lora_adapter_metadata`` says, else with α = r (diffusers' ``get_peft_kwargs``).

Example::

    modules, left_out, kind = build(open_file("lora.safetensors"), base_info(unet))
"""

from __future__ import annotations

from typing import Any

import torch

from deltakit.adapters.base import AdapterModule, BaseInfo
from deltakit.adapters.dora import DoraModule
from deltakit.adapters.loha import LohaModule
from deltakit.adapters.lokr import LokrModule
from deltakit.adapters.lora import LoraModule
from deltakit.errors import DeltakitError
from deltakit.io.diffusion_names import (
    CLIP_TEXT, LDM_UNET, DIFFUSERS_UNET, UnetBlocks, kohya_part, kohya_spellings, part_of, parts_present, unet_to_ldm,
)
from deltakit.io.kohya_files import AdapterFile, group_components, group_modules
from deltakit.io.peft import lora_scaling, pattern_value

LORA = ("lora_down.weight", "lora_up.weight")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
CONVOLUTION_ONLY = ("lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2")  # Tucker cores of LoCon / LoHa / LoKr
KNOWN_EXTRAS = {"alpha", "dora_scale"}
# LyCORIS algorithms with no counterpart among deltakit's adapter types, named by a key of theirs.
OTHER_ALGORITHMS = {"diff": "full (a stored ΔW)", "w_norm": "norm", "b_norm": "norm", "oft_blocks": "OFT",
                    "oft_diag": "diagonal OFT", "a1.weight": "GLoRA", "weight": "IA3", "bias_indices": "sparse bias"}


def build(file: AdapterFile, base: BaseInfo) -> tuple[list[AdapterModule], list[dict[str, str]], str]:
    """(modules aimed at the base's tensors, modules left out with why, the adapter's type label)."""
    if file.format == "diffusers":
        return _diffusers(file, base)
    return _kohya(file, base)


def _kohya(file: AdapterFile, base: BaseInfo) -> tuple[list[AdapterModule], list[dict[str, str]], str]:
    spellings = kohya_spellings(base.shapes)
    present = parts_present(base.shapes)
    left_out: list[dict[str, str]] = []
    found: dict[str, list[tuple[str, str, dict[str, str], tuple[int, int]]]] = {}  # part -> its modules
    for name, kinds in sorted(group_modules(file.checkpoint).items()):
        part = kohya_part(name) or ""
        if part not in present and not spellings.get(name):
            left_out.append({"name": name, "reason": f"changes the {_part_label(part)}, which the base does not hold "
                             "(in names deltakit maps)"})
            continue
        kind, update = _update_of(file, name, kinds)
        found.setdefault(part, []).append((name, kind, kinds, update))
    built: list[AdapterModule] = []
    for part, modules in found.items():
        # A text encoder folder is every text encoder part by name: the part none of whose modules fit
        # its shapes was made for the other encoder (SDXL's te1 and te2 in one file).
        if part.startswith("te") and not any(_fitting(spellings.get(m[0], []), m[3], base) for m in modules):
            left_out += [{"name": m[0], "reason": f"changes the {_part_label(part)}: no module fits the base's "
                          "shapes"} for m in modules]
            continue
        for name, kind, kinds, update in modules:
            built.append(_module(file, name, kind, kinds, _target(file, name, update, spellings.get(name, []), base),
                                 update))
    return built, left_out, _label(built)


def _label(built: list[AdapterModule]) -> str:
    """LORA, DORA, LOHA or LOKR when one type is used throughout, LYCORIS for a mixture."""
    kinds = {"DORA" if isinstance(m, DoraModule) else "LOHA" if isinstance(m, LohaModule) else
             "LOKR" if isinstance(m, LokrModule) else "LORA" for m in built}
    return kinds.pop() if len(kinds) == 1 else "LYCORIS"


def _fitting(candidates: list[str], update: tuple[int, int], base: BaseInfo) -> list[str]:
    return [c for c in candidates if base.shape(c) == update]


def _part_label(part: str) -> str:
    return {"unet": "UNet / denoiser", "te": "text encoder", "te1": "first text encoder",
            "te2": "second text encoder", "te3": "third text encoder"}.get(part, part)


def _shape(file: AdapterFile, key: str) -> tuple[int, ...]:
    return tuple(file.checkpoint.shape(key))


def _update_of(file: AdapterFile, name: str, kinds: dict[str, str]) -> tuple[str, tuple[int, int]]:
    """The module's type (LORA, LOHA, LOKR) and the (out, in) shape of its update; refuse what is not applied."""
    cores = [k for k in CONVOLUTION_ONLY if k in kinds]
    if cores or any(len(_shape(file, key)) > 2 for kind, key in kinds.items() if kind not in KNOWN_EXTRAS):
        raise DeltakitError(f"{file.path}: {name} adapts a convolution (LoCon / conv LoHa or LoKr"
                            f"{', Tucker core ' + cores[0] if cores else ''}); deltakit reads kohya modules of "
                            "linear layers only so far")
    if all(k in kinds for k in LORA):
        (rank, in_features), (out_features, rank_up) = _shape(file, kinds[LORA[0]]), _shape(file, kinds[LORA[1]])
        if rank != rank_up:
            raise DeltakitError(f"{file.path}: {name} has lora_down {(rank, in_features)} and lora_up "
                                f"{(out_features, rank_up)}, which do not multiply")
        return "LORA", (out_features, in_features)
    if all(k in kinds for k in LOHA):
        shapes = [_shape(file, kinds[k]) for k in LOHA]
        if shapes[0] != shapes[2] or shapes[1] != shapes[3] or shapes[0][1] != shapes[1][0]:
            raise DeltakitError(f"{file.path}: {name} has LoHa factors of shapes {shapes}, which do not make one update")
        return "LOHA", (shapes[0][0], shapes[1][1])
    if any(k in kinds for k in LOKR):
        first, second = _kron_factor(file, name, kinds, "lokr_w1"), _kron_factor(file, name, kinds, "lokr_w2")
        return "LOKR", (first[0] * second[0], first[1] * second[1])
    other = next((label for key, label in OTHER_ALGORITHMS.items() if key in kinds), None)
    what = f"LyCORIS's {other} algorithm, which deltakit does not apply" if other else (
        f"no LoRA, LoHa or LoKr tensors (it has {', '.join(sorted(kinds))})")
    raise DeltakitError(f"{file.path}: {name} is {what}")


def _kron_factor(file: AdapterFile, name: str, kinds: dict[str, str], factor: str) -> tuple[int, int]:
    if factor in kinds:
        shape = _shape(file, kinds[factor])
        return shape[0], shape[1]
    if f"{factor}_a" not in kinds or f"{factor}_b" not in kinds:
        raise DeltakitError(f"{file.path}: LoKr module {name} has neither {factor} nor {factor}_a and {factor}_b")
    (out_features, rank), (rank_b, in_features) = _shape(file, kinds[f"{factor}_a"]), _shape(file, kinds[f"{factor}_b"])
    if rank != rank_b:
        raise DeltakitError(f"{file.path}: LoKr module {name} has {factor}_a and {factor}_b that do not multiply")
    return out_features, in_features


def _target(file: AdapterFile, name: str, update: tuple[int, int], candidates: list[str], base: BaseInfo) -> str:
    """The base tensor a module changes: among the weights its name can mean, the one of the update's shape."""
    fitting = _fitting(candidates, update, base)
    if len(fitting) == 1:
        return fitting[0]
    if not candidates:
        raise DeltakitError(f"{file.path}: {name} names no weight of the base (a kohya name is a module path with "
                            "its dots made underscores, in diffusers or LDM names)")
    if not fitting:
        shapes = ", ".join(f"{c} {base.shape(c)}" for c in candidates[:2])
        raise DeltakitError(f"{file.path}: {name} makes a {update[0]}×{update[1]} update, but it names {shapes}")
    raise DeltakitError(f"{file.path}: {name} could change {fitting[0]} or {fitting[1]} (same name and shape)")


def _alpha(file: AdapterFile, kinds: dict[str, str], rank: int) -> float:
    """The module's α: its stored ``alpha``, or r where it has none or it is 0 (LyCORIS: no scaling)."""
    if "alpha" not in kinds:
        return float(rank)
    value = file.checkpoint.get(kinds["alpha"]).float().reshape(-1)
    if value.numel() != 1 or not torch.isfinite(value).all():
        raise DeltakitError(f"{file.path}: {kinds['alpha']} is not one finite number")
    return float(value[0]) or float(rank)


def _module(file: AdapterFile, name: str, kind: str, kinds: dict[str, str], target: str,
            update: tuple[int, int]) -> AdapterModule:
    fields: dict[str, Any] = dict(module=target.removesuffix(".weight"), target=target,
                                  out_features=update[0], in_features=update[1])
    if kind == "LORA":
        rank = _shape(file, kinds[LORA[0]])[0]
        alpha = _alpha(file, kinds, rank)
        keys = {"A": kinds[LORA[0]], "B": kinds[LORA[1]]}
        lora = dict(fields, rank=rank, alpha=alpha, scaling=alpha / rank)
        if "dora_scale" not in kinds:
            return LoraModule(keys=keys, **lora)
        scale = _shape(file, kinds["dora_scale"])
        if scale not in ((update[0], 1), (update[0],)):
            raise DeltakitError(f"{file.path}: {name}'s dora_scale has shape {scale}; deltakit applies LyCORIS's "
                                f"DoRA with the norm per output row (wd_on_out), dora_scale ({update[0]}, 1)")
        return DoraModule(keys={**keys, "m": kinds["dora_scale"]}, **lora)
    if "dora_scale" in kinds:
        raise DeltakitError(f"{file.path}: {name} is a {kind} with weight decomposition (dora_scale); deltakit "
                            "applies DoRA to LoRA modules only")
    factors = {k: v for k, v in kinds.items() if k != "alpha"}
    if kind == "LOHA":
        rank = _shape(file, kinds["hada_w1_a"])[1]
        alpha = _alpha(file, kinds, rank)
        return LohaModule(keys=factors, rank=rank, alpha=alpha, scaling=alpha / rank, **fields)
    inner = next((_shape(file, kinds[k])[1] for k in ("lokr_w1_a", "lokr_w2_a") if k in kinds), None)
    if inner is None:  # both factors whole: LyCORIS uses scale 1 whatever alpha says
        return LokrModule(keys=factors, rank=1, alpha=1.0, scaling=1.0, **fields)
    alpha = _alpha(file, kinds, inner)
    return LokrModule(keys=factors, rank=inner, alpha=alpha, scaling=alpha / inner, **fields)


def _diffusers(file: AdapterFile, base: BaseInfo) -> tuple[list[AdapterModule], list[dict[str, str]], str]:
    """PEFT LoRA (and DoRA) per component, each module aimed at the base's weight of its path."""
    names = set(base.shapes)
    blocks = UnetBlocks.of(part_of(n)[1] for n in names if part_of(n)[0] == "unet")
    built: list[AdapterModule] = []
    left_out: list[dict[str, str]] = []
    for component, modules in sorted(group_components(file.checkpoint).items()):
        config = file.component_config(component)
        where = {m: _diffusers_target(m, names, blocks) for m in modules}
        if not any(where.values()):
            left_out += [{"name": f"{component}.{m}", "reason": f"changes the {component}, which the base does not "
                          "hold"} for m in sorted(modules)]
            continue
        for module, kinds in sorted(modules.items()):
            target = where[module]
            if target is None:
                raise DeltakitError(f"{file.path}: {component}.{module} names no weight of the base")
            built.append(_peft_module(file, component, module, kinds, target, config))
    return built, left_out, _label(built)


def _diffusers_target(module: str, names: set[str], blocks: UnetBlocks | None) -> str | None:
    """The base weight a diffusers module path means: itself, or its LDM spelling in a single file."""
    paths = [module] + ([module.removeprefix("text_model."), f"text_model.{module}"] if CLIP_TEXT.match(module) else [])
    candidates = [f"{prefix}{path}.weight" for prefix in ("", "cond_stage_model.transformer.",
                                                         "conditioner.embedders.0.transformer.") for path in paths]
    if blocks is not None and DIFFUSERS_UNET.match(module):
        ldm = unet_to_ldm(module, blocks)
        if ldm is not None:
            candidates.append(f"{LDM_UNET}{ldm}.weight")
    return next((c for c in candidates if c in names), None)


def _peft_module(file: AdapterFile, component: str, module: str, kinds: dict[str, str], target: str,
                 config: dict[str, Any]) -> AdapterModule:
    if "lora_A" not in kinds or "lora_B" not in kinds:
        raise DeltakitError(f"{file.path}: {component}.{module} has only one of its LoRA factors")
    a_shape, b_shape = _shape(file, kinds["lora_A"]), _shape(file, kinds["lora_B"])
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise DeltakitError(f"{file.path}: {component}.{module} has factors of shapes {a_shape} and {b_shape}; "
                            "deltakit reads diffusers LoRA files of linear layers only so far")
    rank = a_shape[0]
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
    scaling = lora_scaling(alpha, rank, bool(config.get("use_rslora", False)))
    fields = dict(module=target.removesuffix(".weight"), target=target, keys={"A": kinds["lora_A"], "B": kinds["lora_B"]},
                  out_features=b_shape[0], in_features=a_shape[1], rank=rank, alpha=alpha, scaling=scaling)
    if "lora_magnitude_vector" in kinds:
        fields["keys"] = {**fields["keys"], "m": kinds["lora_magnitude_vector"]}
        return DoraModule(**fields)
    return LoraModule(**fields)
