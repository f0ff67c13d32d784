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
  α = r, scaling 1; ``LoConModule.__init__``). On a convolution down is (r, in, *kernel) and up (out, r, 1, ...),
  their product the (out, in·∏kernel) matrix of ΔW; with ``use_tucker`` LyCORIS puts a core ``lora_mid``
  (r, r, *kernel) between a 1×1 down and up (:func:`deltakit.adapters.lora.factor_matrices`).
* DoRA (``dora_scale``, LyCORIS ``wd_on_out``): W' = dora_scale ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ per output
  row (``weight_decompose``; LyCORIS adds fp32's eps to the norm, a relative 1e-7).
* LoHa: ΔW = (α / r) · (w1a @ w1b) ⊙ (w2a @ w2b), r = w1b's rows; on a convolution w1b is (r, in·∏kernel),
  or with ``use_tucker`` each product is a CP product with a core ``hada_t1`` / ``hada_t2`` (r, r, *kernel).
* LoKr: ΔW = s · W1 ⊗ W2 (W1 ⊗ the matrix of a convolution's W2, ``make_kron``), W1 and W2 whole or
  products, W2 a CP product with a core ``lokr_t2`` under ``use_tucker``; s = α / r with r the core's size,
  else the inner dimension of the first product stored (w1a's, else w2a's), and s = 1 when both are whole
  (``LokrModule.__init__``: "use scale = 1"; LyCORIS 4.1.3 cannot load its own Tucker LoKr files, whose
  modules compute with r the core's size).

* Full: ΔW stored whole as ``diff`` (what LyCORIS's extraction writes where the rank asked for is at least half
  the output channels; :mod:`deltakit.adapters.full`); its ``diff_b``, the bias's ΔW, is added to the layer's bias.

Convolutions are matched by their (out, in·∏kernel) matrix and, where the tensors say, their kernel.
Refused: LyCORIS's other algorithms (norms, OFT, GLoRA, IA3, sparse bias),
DoRA on LoHa / LoKr, LoKr with a whole 3-D W2 (a Conv1d, whose product LyCORIS and PEFT form differently).

A diffusers file is PEFT's LoRA per component (``unet.``, ``transformer.``, ``text_encoder.``…),
scaled as its ``lora_adapter_metadata`` says, else with α = r (diffusers' ``get_peft_kwargs``).

Example::

    modules, left_out, kind = build(open_file("lora.safetensors"), base_info(unet))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from deltakit.adapters.base import AdapterModule, BaseInfo
from deltakit.adapters.dora import DoraModule
from deltakit.adapters.full import FullModule
from deltakit.adapters.loha import LohaModule
from deltakit.adapters.lokr import LokrModule
from deltakit.adapters.lora import LoraBiasModule, LoraModule, factors_multiply
from deltakit.errors import DeltakitError
from deltakit.io.diffusion_names import (
    CLIP_TEXT, LDM_UNET, DIFFUSERS_UNET, UnetBlocks, kohya_part, kohya_spellings, part_of, parts_present, unet_to_ldm,
)
from deltakit.io.kohya_files import AdapterFile, group_components, group_modules
from deltakit.io.peft import lora_scaling, pattern_value

LORA = ("lora_down.weight", "lora_up.weight")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
TUCKER = {"LORA": ("lora_mid.weight",), "LOHA": ("hada_t1", "hada_t2"), "LOKR": ("lokr_t2",)}  # convolutions' cores
KNOWN_EXTRAS = {"alpha", "dora_scale"}
# LyCORIS algorithms with no counterpart among deltakit's adapter types, named by a key of theirs.
OTHER_ALGORITHMS = {"w_norm": "norm", "b_norm": "norm", "oft_blocks": "OFT",
                    "oft_diag": "diagonal OFT", "a1.weight": "GLoRA", "weight": "IA3", "bias_indices": "sparse bias"}


@dataclass(frozen=True)
class Update:
    """What a kohya module changes: its type (LORA, LOHA, LOKR), the (out, in·∏kernel) matrix of its update,
    and the convolution kernel its tensors are shaped for (() where they do not say: linear layers, and
    LyCORIS's LoHa / LoKr on a convolution without a Tucker core, whose factors are the matrix's)."""

    kind: str
    shape: tuple[int, int]
    kernel: tuple[int, ...] = ()


def build(file: AdapterFile, base: BaseInfo) -> tuple[list[AdapterModule], list[dict[str, str]], str]:
    """(modules aimed at the base's tensors, modules left out with why, the adapter's type label)."""
    if file.format == "diffusers":
        return _diffusers(file, base)
    return _kohya(file, base)


def _kohya(file: AdapterFile, base: BaseInfo) -> tuple[list[AdapterModule], list[dict[str, str]], str]:
    spellings = kohya_spellings(base.shapes)
    present = parts_present(base.shapes)
    left_out: list[dict[str, str]] = []
    found: dict[str, list[tuple[str, dict[str, str], Update]]] = {}  # part -> its modules
    for name, kinds in sorted(group_modules(file.checkpoint).items()):
        part = kohya_part(name) or ""
        if part not in present and not spellings.get(name):
            left_out.append({"name": name, "reason": f"changes the {_part_label(part)}, which the base does not hold "
                             "(in names deltakit maps)"})
            continue
        found.setdefault(part, []).append((name, kinds, _update_of(file, name, kinds)))
    built: list[AdapterModule] = []
    for part, modules in found.items():
        # A text encoder folder is every text encoder part by name: the part none of whose modules fit
        # its shapes was made for the other encoder (SDXL's te1 and te2 in one file).
        if part.startswith("te") and not any(_fitting(spellings.get(m[0], []), m[2], base) for m in modules):
            left_out += [{"name": m[0], "reason": f"changes the {_part_label(part)}: no module fits the base's "
                          "shapes"} for m in modules]
            continue
        for name, kinds, update in modules:
            target = _target(file, name, update, spellings.get(name, []), base)
            built.append(_module(file, name, kinds, target, update))
            if "diff_b" in kinds:
                built.append(_bias(file, name, kinds["diff_b"], target, update, base))
    return built, left_out, _label(built)


def _bias(file: AdapterFile, name: str, key: str, target: str, update: Update, base: BaseInfo) -> AdapterModule:
    """A full module's ``diff_b``: ΔW of its layer's bias, added as it is (``FullModule``)."""
    bias = f"{target.rpartition('.')[0]}.bias"
    shape = _shape(file, key)
    if shape != (update.shape[0],) or base.shape(bias) != shape:
        raise DeltakitError(f"{file.path}: {name}'s diff_b has shape {shape}, but the layer's bias {bias} is "
                            f"{base.shape(bias)}")
    return LoraBiasModule(module=target.removesuffix(".weight"), target=bias, keys={"b": key},
                          out_features=update.shape[0], in_features=1)


def _label(built: list[AdapterModule]) -> str:
    """LORA, DORA, LOHA or LOKR when one type is used throughout, LYCORIS for a mixture."""
    kinds = {"DORA" if isinstance(m, DoraModule) else "LOHA" if isinstance(m, LohaModule) else
             "LOKR" if isinstance(m, LokrModule) else "FULL" if isinstance(m, (FullModule, LoraBiasModule)) else
             "LORA" for m in built}
    return kinds.pop() if len(kinds) == 1 else "LYCORIS"


def _fitting(candidates: list[str], update: Update, base: BaseInfo) -> list[str]:
    """The weights among ``candidates`` whose (out, in·∏kernel) matrix, and kernel where it says, are the update's."""
    fitting = []
    for candidate in candidates:
        shape = base.shape(candidate)
        if shape and len(shape) >= 2 and (shape[0], math.prod(shape[1:])) == update.shape and (
                not update.kernel or tuple(shape[2:]) == update.kernel):
            fitting.append(candidate)
    return fitting


def _part_label(part: str) -> str:
    return {"unet": "UNet / denoiser", "te": "text encoder", "te1": "first text encoder",
            "te2": "second text encoder", "te3": "third text encoder"}.get(part, part)


def _shape(file: AdapterFile, key: str) -> tuple[int, ...]:
    return tuple(file.checkpoint.shape(key))


def _update_of(file: AdapterFile, name: str, kinds: dict[str, str]) -> Update:
    """The module's type and update (:class:`Update`); refuse what does not make one update, or is not applied."""
    cores = {core for kind in TUCKER.values() for core in kind}
    unknown = sorted(set(kinds) - set(LORA) - set(LOHA) - set(LOKR) - KNOWN_EXTRAS - cores)
    if all(k in kinds for k in LORA):
        update = _lora_update(file, name, kinds)
    elif all(k in kinds for k in LOHA):
        update = _loha_update(file, name, kinds)
    elif any(k in kinds for k in LOKR):
        update = _lokr_update(file, name, kinds)
    elif "diff" in kinds and set(kinds) <= {"diff", "diff_b", "alpha"}:
        shape = _shape(file, kinds["diff"])
        if len(shape) < 2:
            raise DeltakitError(f"{file.path}: {name} stores a {len(shape)}-D diff; deltakit applies stored ΔWs of "
                                "weights (2-D or a convolution's)")
        return Update("FULL", (shape[0], math.prod(shape[1:])), tuple(shape[2:]))
    else:
        other = next((label for key, label in OTHER_ALGORITHMS.items() if key in kinds), None)
        what = f"LyCORIS's {other} algorithm, which deltakit does not apply" if other else (
            f"no LoRA, LoHa or LoKr tensors (it has {', '.join(sorted(kinds))})")
        raise DeltakitError(f"{file.path}: {name} is {what}")
    stray = [k for t, cores in TUCKER.items() if t != update.kind for k in cores if k in kinds]
    if unknown or stray:
        raise DeltakitError(f"{file.path}: {name} is a {update.kind} module with {', '.join(unknown + stray)} too, "
                            "which deltakit does not apply")
    return update


def _lora_update(file: AdapterFile, name: str, kinds: dict[str, str]) -> Update:
    """LoRA / LoCon: down (r, in[, *kernel]), up (out, r[, 1, ...]); LyCORIS's Tucker LoCon: down (r, in, 1, ...),
    mid (r, r, *kernel), up (out, r, 1, ...)."""
    down, up = _shape(file, kinds[LORA[0]]), _shape(file, kinds[LORA[1]])
    mid = _shape(file, kinds["lora_mid.weight"]) if "lora_mid.weight" in kinds else None
    kernel = mid[2:] if mid is not None else down[2:]
    fits = factors_multiply(down, up) and (
        mid is None or (len(mid) == len(down) and mid[:2] == (down[0], down[0]) and set(down[2:]) <= {1}))
    if not fits:
        described = f"lora_down {down}, lora_up {up}" + (f", lora_mid {mid}" if mid is not None else "")
        raise DeltakitError(f"{file.path}: {name} has {described}, which do not multiply")
    return Update("LORA", (up[0], down[1] * math.prod(kernel)), kernel)


def _loha_update(file: AdapterFile, name: str, kinds: dict[str, str]) -> Update:
    """LoHa: w_a (out, r), w_b (r, in·∏kernel); with Tucker cores t (r, r, *kernel): w_a (r, out), w_b (r, in)."""
    shapes = [_shape(file, kinds[k]) for k in LOHA]
    tucker = "hada_t1" in kinds or "hada_t2" in kinds
    if tucker:
        cores = [_shape(file, kinds[k]) if k in kinds else None for k in TUCKER["LOHA"]]
        (rank, out_features), (rank_b, in_features) = shapes[0], shapes[1]
        fits = (cores[0] is not None and cores[0] == cores[1] and len(cores[0]) >= 3
                and cores[0][:2] == (rank, rank) and rank == rank_b and shapes[2:] == shapes[:2])
        kernel = tuple(cores[0][2:]) if fits else ()  # type: ignore[index]
    else:
        (out_features, rank), (rank_b, in_features) = shapes[0], shapes[1]
        fits, kernel = rank == rank_b and shapes[2:] == shapes[:2] and all(len(s) == 2 for s in shapes), ()
    if not fits:
        raise DeltakitError(f"{file.path}: {name} has LoHa factors of shapes {shapes}"
                            f"{' and Tucker cores' if tucker else ''}, which do not make one update")
    return Update("LOHA", (out_features, in_features * math.prod(kernel)), kernel)


def _lokr_update(file: AdapterFile, name: str, kinds: dict[str, str]) -> Update:
    """LoKr: W1 ⊗ W2 with W1 (a, c) and W2 (b, d·∏kernel): whole (b, d, *kernel), a product
    (b, r)(r, d·∏kernel), or with a Tucker core t2 (r, r, *kernel): w2_a (r, b), w2_b (r, d)."""
    first, _ = _kron_factor(file, name, kinds, "lokr_w1")
    second, kernel = _kron_factor(file, name, kinds, "lokr_w2")
    if len(kernel) == 1 and "lokr_w2" in kinds:
        raise DeltakitError(f"{file.path}: LoKr module {name} has a whole 3-D lokr_w2 (a Conv1d); deltakit applies "
                            "LyCORIS's LoKr to linear layers and 2-D / 3-D convolutions only")
    return Update("LOKR", (first[0] * second[0], first[1] * second[1]), kernel)


def _kron_factor(file: AdapterFile, name: str, kinds: dict[str, str],
                 factor: str) -> tuple[tuple[int, int], tuple[int, ...]]:
    """(the factor's matrix shape, the kernel its tensors say)."""
    if factor in kinds:
        shape = _shape(file, kinds[factor])
        if len(shape) < 2 or (factor == "lokr_w1" and len(shape) != 2):
            raise DeltakitError(f"{file.path}: LoKr module {name} has a {len(shape)}-D {factor}")
        return (shape[0], math.prod(shape[1:])), tuple(shape[2:])
    if f"{factor}_a" not in kinds or f"{factor}_b" not in kinds:
        raise DeltakitError(f"{file.path}: LoKr module {name} has neither {factor} nor {factor}_a and {factor}_b")
    a_shape, b_shape = _shape(file, kinds[f"{factor}_a"]), _shape(file, kinds[f"{factor}_b"])
    if factor == "lokr_w2" and "lokr_t2" in kinds:
        core = _shape(file, kinds["lokr_t2"])
        if len(core) < 3 or core[0] != core[1] or len(a_shape) != 2 or len(b_shape) != 2 or \
                a_shape[0] != core[0] or b_shape[0] != core[0]:
            raise DeltakitError(f"{file.path}: LoKr module {name} has lokr_t2 {core}, {factor}_a {a_shape} and "
                                f"{factor}_b {b_shape}, which do not make one factor")
        return (a_shape[1], b_shape[1] * math.prod(core[2:])), tuple(core[2:])
    if len(a_shape) != 2 or len(b_shape) < 2 or a_shape[1] != b_shape[0] or (factor == "lokr_w1" and len(b_shape) != 2):
        raise DeltakitError(f"{file.path}: LoKr module {name} has {factor}_a {a_shape} and {factor}_b {b_shape}, "
                            "which do not multiply")
    return (a_shape[0], math.prod(b_shape[1:])), tuple(b_shape[2:])


def _target(file: AdapterFile, name: str, update: Update, candidates: list[str], base: BaseInfo) -> str:
    """The base tensor a module changes: among the weights its name can mean, the one of the update's shape."""
    fitting = _fitting(candidates, update, base)
    if len(fitting) == 1:
        return fitting[0]
    if not candidates:
        raise DeltakitError(f"{file.path}: {name} names no weight of the base (a kohya name is a module path with "
                            "its dots made underscores, in diffusers or LDM names)")
    if not fitting:
        shapes = ", ".join(f"{c} {base.shape(c)}" for c in candidates[:2])
        made = "×".join(map(str, update.shape)) + (f" (kernel {'×'.join(map(str, update.kernel))})"
                                                    if update.kernel else "")
        raise DeltakitError(f"{file.path}: {name} makes a {made} update, but it names {shapes}")
    raise DeltakitError(f"{file.path}: {name} could change {fitting[0]} or {fitting[1]} (same name and shape)")


def _alpha(file: AdapterFile, kinds: dict[str, str], rank: int) -> float:
    """The module's α: its stored ``alpha``, or r where it has none or it is 0 (LyCORIS: no scaling)."""
    if "alpha" not in kinds:
        return float(rank)
    value = file.checkpoint.get(kinds["alpha"]).float().reshape(-1)
    if value.numel() != 1 or not torch.isfinite(value).all():
        raise DeltakitError(f"{file.path}: {kinds['alpha']} is not one finite number")
    return float(value[0]) or float(rank)


def _module(file: AdapterFile, name: str, kinds: dict[str, str], target: str, update: Update) -> AdapterModule:
    fields: dict[str, Any] = dict(module=target.removesuffix(".weight"), target=target, out_features=update.shape[0],
                                  in_features=update.shape[1], kernel=update.kernel)
    if update.kind == "LORA":
        rank = _shape(file, kinds[LORA[0]])[0]
        alpha = _alpha(file, kinds, rank)
        keys = {"A": kinds[LORA[0]], "B": kinds[LORA[1]]}
        if "lora_mid.weight" in kinds:
            keys["mid"] = kinds["lora_mid.weight"]
        lora = dict(fields, rank=rank, alpha=alpha, scaling=alpha / rank)
        if "dora_scale" not in kinds:
            return LoraModule(keys=keys, **lora)
        scale = _shape(file, kinds["dora_scale"])
        if not scale or scale[0] != update.shape[0] or set(scale[1:]) - {1}:
            raise DeltakitError(f"{file.path}: {name}'s dora_scale has shape {scale}; deltakit applies LyCORIS's "
                                f"DoRA with the norm per output channel (wd_on_out), dora_scale "
                                f"({update.shape[0]}, 1, ...)")
        return DoraModule(keys={**keys, "m": kinds["dora_scale"]}, **lora)
    if update.kind == "FULL":
        return FullModule(keys={"diff": kinds["diff"]}, **fields)
    if "dora_scale" in kinds:
        raise DeltakitError(f"{file.path}: {name} is a {update.kind} with weight decomposition (dora_scale); deltakit "
                            "applies DoRA to LoRA modules only")
    factors = {k: v for k, v in kinds.items() if k != "alpha"}
    if update.kind == "LOHA":
        rank = _shape(file, kinds["hada_w1_b"])[0]  # LyCORIS's lora_dim: w1_b is (r, in·∏kernel) or (r, in)
        alpha = _alpha(file, kinds, rank)
        return LohaModule(keys=factors, rank=rank, alpha=alpha, scaling=alpha / rank, cp="hada_t1" in kinds, **fields)
    # LyCORIS's lora_dim: the Tucker core's, else the inner dimension of the first product stored
    inner = _shape(file, kinds["lokr_t2"])[0] if "lokr_t2" in kinds else next(
        (_shape(file, kinds[k])[1] for k in ("lokr_w1_a", "lokr_w2_a") if k in kinds), None)
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
    # PEFT's LoRA: A (r, in) and B (out, r), or on a convolution A (r, in, *kernel) and B (out, r, 1, ...)
    if not factors_multiply(a_shape, b_shape):
        raise DeltakitError(f"{file.path}: {component}.{module} has factors of shapes {a_shape} and {b_shape}, "
                            "which do not multiply")
    rank = a_shape[0]
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
    scaling = lora_scaling(alpha, rank, bool(config.get("use_rslora", False)))
    fields = dict(module=target.removesuffix(".weight"), target=target, keys={"A": kinds["lora_A"], "B": kinds["lora_B"]},
                  out_features=b_shape[0], in_features=math.prod(a_shape[1:]), kernel=tuple(a_shape[2:]), rank=rank,
                  alpha=alpha, scaling=scaling)
    if "lora_magnitude_vector" in kinds:
        fields["keys"] = {**fields["keys"], "m": kinds["lora_magnitude_vector"]}
        return DoraModule(**fields)
    return LoraModule(**fields)
