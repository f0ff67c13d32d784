"""Any other PEFT type whose layers merge into a weight, applied through PEFT itself, one layer at a time.

Optional (``pip install 'deltakit[peft]'``). For each adapted module deltakit builds a skeleton
holding only that one layer (an ``nn.Linear``, or an ``nn.Conv1d/2d/3d`` for a convolution's
weight, at the module's own path, so ``target_modules`` and patterns match as in the model) with
the base weight W0 in it; PEFT wraps it (``get_peft_model``), loads the module's tensors and the
adapter's shared ones (VB-LoRA's vector bank, RandLoRA's bases, ...) as it loads the adapter file
(``set_peft_model_state_dict``), and merges the layer (``BaseTunerLayer.merge``): ΔW = W_merged − W0.
The whole model is never built. Where the adapter shares tensors sized by its largest layer (VeRA's
family: PEFT's ``_find_dim``), the skeleton also holds an unused layer of the adapter's largest
(out, in), so PEFT makes (or, without ``save_projection``, draws) them at the size the file has.
This covers types whose merge multiplies W0 (OFT, BOFT, HRA) as well as additive ones (FourierFT,
...), so ΔW is treated as depending on W0: unmerge needs the original model, and tensors are
merged whole (no row blocks).

Example::

    delta = module.delta(tensors, base_weight.float(), transposed=False)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from deltakit.adapters.base import AdapterModule, BaseInfo, Rows
from deltakit.errors import DeltakitError
from deltakit.io.peft import PEFT_PREFIX, AdapterFiles, strip_prefix

EXTRA = "pip install 'deltakit[peft]'"


def _peft() -> Any:
    """The peft package, or None when it is not installed."""
    try:
        import peft
    except ImportError:
        return None
    return peft


def available() -> bool:
    """Whether PEFT is installed."""
    return _peft() is not None


def knows(peft_type: str) -> bool:
    """Whether the installed PEFT has a tuner for ``peft_type``."""
    peft = _peft()
    if peft is None:
        return False
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return peft_type in PEFT_TYPE_TO_TUNER_MAPPING


@dataclass(frozen=True)
class PeftLayerModule(AdapterModule):
    """One module of a PEFT type applied through PEFT's own layer; ``keys`` hold the adapter's shared
    tensors too, as ``SHARED + <file key>``."""

    peft_type: str = ""
    stored: tuple[int, ...] = ()  # the base weight's stored shape (a convolution's (out, in, *kernel))
    largest: tuple[int, int] | None = None  # (out, in) of the adapter's largest layer, when it shares tensors
    embedding: bool = False  # the layer is an nn.Embedding (stored vocab × dim): PEFT's embedding variant
    bias: bool = False  # the layer has a bias (its merge must leave it as it is)
    config: Any = field(default=None, compare=False)  # the adapter's PeftConfig

    kind: ClassVar[str] = "base"

    def stored_shape(self, transposed: bool) -> tuple[int, ...]:
        return (self.stored[0], math.prod(self.stored[1:])) if len(self.stored) > 2 else self.stored

    def splits_rows(self, transposed: bool) -> bool:
        return False

    def delta(self, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, transposed: bool,
              rows: Rows = None) -> torch.Tensor:
        if base is None or rows is not None:
            raise ValueError("a PEFT layer's ΔW needs the whole base weight")
        return self.merged(tensors, base, transposed) - base

    def merged(self, tensors: dict[str, torch.Tensor], base: torch.Tensor, transposed: bool) -> torch.Tensor:
        """W_merged as ``base`` holds W0: stored (a convolution as its matrix), or transposed."""
        from peft import get_peft_model, set_peft_model_state_dict

        weight = base if self.embedding or transposed else base.reshape(self.stored)  # as the layer holds it
        kind = "embedding" if self.embedding else "conv1d" if transposed else "linear"
        root = torch.nn.Module()
        layer = _layer(weight, kind, self.bias)
        _add_layer(root, self.module, layer)
        config = copy.deepcopy(self.config)
        config.target_modules = [self.module]
        if self.largest is not None:
            _add_layer(root, PHANTOM, torch.nn.Linear(self.largest[1], self.largest[0], bias=False,
                                                      device=weight.device, dtype=weight.dtype))
            config.target_modules.append(PHANTOM)
        for name, value in (("inference_mode", True), ("layers_to_transform", None), ("layers_pattern", None),
                            ("exclude_modules", None), ("modules_to_save", None),
                            ("fan_in_fan_out", kind == "conv1d")):
            if hasattr(config, name):  # the skeleton's layers are its own, of the kind the base weight is
                setattr(config, name, value)
        state = {(kind[len(SHARED):] if kind.startswith(SHARED) else f"{PEFT_PREFIX}{self.module}.{kind}"):
                 tensor.to(weight.device) for kind, tensor in tensors.items()}
        try:
            wrapped = get_peft_model(root, config)
            loaded = set_peft_model_state_dict(wrapped, state)
            layer = wrapped.base_model.model.get_submodule(self.module)
            layer.merge()
        except Exception as exc:  # PEFT's own refusal (a layer type it cannot build, ...), said in one line
            if base.dtype == torch.float64:  # some types build in fp32 / fp16 / bf16 only (PSOFT): fp32 then
                return self.merged({k: v.float() for k, v in tensors.items()}, base.float(), transposed).double()
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DeltakitError(f"PEFT could not apply the {self.peft_type} adapter to {self.module}: {text}") from None
        if loaded.unexpected_keys:
            raise DeltakitError(f"PEFT did not take {self.peft_type} tensors {loaded.unexpected_keys[0]} of "
                                f"{self.module}")
        merged = layer.get_base_layer().weight.detach()
        bias = getattr(layer.get_base_layer(), "bias", None)
        if bias is not None and not bool(torch.all(bias == PROBE_BIAS)):
            raise DeltakitError(f"the {self.peft_type} adapter changes the bias of {self.module} as well; deltakit "
                                "applies other PEFT types to weights only")
        return merged.reshape(base.shape)


# Types whose shared tensors one layer's skeleton loads as the whole model does (checked against
# merge_and_unload in tests/test_peft_layouts.py); others index them by the model's layers (TinyLoRA's
# tied vectors, FRoD's per-layer indices, UniLoRA's one vector) and are refused.
SHARED_ONE_LAYER = frozenset({"VBLORA", "RANDLORA", "PVERA"})
SHARED = "shared:"  # kind prefix of an adapter's shared tensor in a module's keys
PHANTOM = "deltakit_largest_layer"
CONVOLUTIONS = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}


PROBE_BIAS = 1.0  # the skeleton's bias: a merge that changes it changes the model's bias too


def _layer(weight: torch.Tensor, kind: str, bias: bool) -> torch.nn.Module:
    """A layer holding ``weight`` as stored: nn.Embedding (vocab × dim), transformers' Conv1D (in × out),
    nn.Linear (out × in) or nn.ConvNd (out, in, *kernel); with ``bias``, a bias of PROBE_BIAS."""
    options = dict(device=weight.device, dtype=weight.dtype)
    layer: torch.nn.Module
    if kind == "embedding":
        layer = torch.nn.Embedding(weight.shape[0], weight.shape[1], **options)
    elif kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(weight.shape[1], weight.shape[0]).to(**options)
    elif weight.dim() == 2:
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias, **options)
    else:
        layer = CONVOLUTIONS[weight.dim()](weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=bias,
                                           **options)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if getattr(layer, "bias", None) is not None:
            if bias:
                layer.bias.fill_(PROBE_BIAS)
            else:
                layer.bias = None
    return layer


def _add_layer(root: torch.nn.Module, path: str, layer: torch.nn.Module) -> None:
    parent = root
    *parents, leaf = path.split(".")
    for name in parents:
        if not hasattr(parent, name):
            parent.add_module(name, torch.nn.Module())
        parent = getattr(parent, name)
    parent.add_module(leaf, layer)


def build(files: AdapterFiles, base: BaseInfo) -> tuple[list[AdapterModule], dict[str, str]]:
    """Modules of a PEFT type deltakit does not read natively, and the adapter's whole tensors."""
    peft_type = files.peft_type
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    prefix = PEFT_TYPE_TO_TUNER_MAPPING[peft_type].prefix
    try:
        config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(str(files.path))
    except Exception as exc:
        raise DeltakitError(f"{files.path}: PEFT cannot read its {peft_type} config: "
                            f"{(str(exc).splitlines() or [''])[0]}") from None
    groups: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    shared: dict[str, str] = {}
    for key in files.checkpoint.keys():
        if not key.startswith(PEFT_PREFIX):
            shared[f"{SHARED}{key}"] = key  # the tuner's own tensors (a vector bank, projections, ...)
            continue
        name = strip_prefix(key)
        module, found, rest = name.partition(f".{prefix}")
        if found:
            groups.setdefault(module, {})[f"{prefix}{rest}"] = key
        else:
            whole[name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")] = key
    shapes = {module: base.shape(f"{module}.weight") for module in groups}
    for module, shape in shapes.items():
        if shape is None or not 2 <= len(shape) <= 5:
            raise DeltakitError(f"{files.path}: {peft_type} module {module} has no weight matrix or convolution in the "
                                "base; deltakit applies other PEFT types to those only")
    matrices = [tuple(s) for s in shapes.values() if s is not None and len(s) == 2]
    shares = bool(shared) or getattr(config, "save_projection", True) is False
    if shares and peft_type not in SHARED_ONE_LAYER:
        raise DeltakitError(f"{files.path}: the {peft_type} adapter keeps tensors shared by all layers"
                            f"{' (' + next(iter(shared.values())) + ')' if shared else ''}, which PEFT lays out over "
                            "the whole model; deltakit applies other PEFT types one layer at a time and reads "
                            f"shared tensors only for {', '.join(sorted(SHARED_ONE_LAYER))}")
    largest = (max(s[0] for s in matrices), max(s[1] for s in matrices)) if shares and matrices else None
    modules: list[AdapterModule] = []
    for module, keys in sorted(groups.items()):
        shape = tuple(shapes[module])  # type: ignore[arg-type]
        embedding = peft_type == "TRAINABLE_TOKENS" or any("embedding" in kind for kind in keys)
        modules.append(PeftLayerModule(module=module, target=f"{module}.weight", keys={**keys, **shared},
                                       out_features=shape[0], in_features=math.prod(shape[1:]), peft_type=peft_type,
                                       stored=shape, largest=largest, embedding=embedding, config=config,
                                       fan_in_fan_out=bool(getattr(config, "fan_in_fan_out", False)),
                                       bias=base.shape(f"{module}.bias") == (shape[1] if embedding else shape[0],)))
    return modules, whole
