"""Any other PEFT type whose layers merge into a linear weight, applied through PEFT itself, one layer at a time.

Optional (``pip install 'deltakit[peft]'``). For each adapted module deltakit builds a skeleton
holding only that one ``nn.Linear`` (at the module's own path, so ``target_modules``,
``layers_to_transform`` and patterns match as in the model), with the base weight W0 in it;
PEFT injects its layer, loads the module's tensors and merges (``BaseTunerLayer.merge``), and
ΔW = W_merged − W0. The whole model is never built. This covers types whose merge multiplies
W0 (OFT, BOFT, HRA) as well as additive ones (FourierFT, ...), so ΔW is treated as depending
on W0: unmerge needs the original model, and tensors are merged whole (no row blocks).

Types that keep tensors shared by all layers outside the modules (VB-LoRA's vector bank,
RandLoRA's bases, ...) are refused: one layer alone cannot load them.

Example::

    delta = module.delta(tensors, base_weight.float(), transposed=False)
"""

from __future__ import annotations

import copy
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
    """One module of a PEFT type applied through PEFT's own layer."""

    peft_type: str = ""
    stored: tuple[int, ...] = ()  # the base weight's stored shape
    config: Any = field(default=None, compare=False)  # the adapter's PeftConfig

    kind: ClassVar[str] = "base"

    def stored_shape(self, transposed: bool) -> tuple[int, ...]:
        return self.stored

    def splits_rows(self, transposed: bool) -> bool:
        return False

    def delta(self, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, transposed: bool,
              rows: Rows = None) -> torch.Tensor:
        if base is None or rows is not None:
            raise ValueError("a PEFT layer's ΔW needs the whole base weight")
        return self.merged(tensors, base, transposed) - base

    def merged(self, tensors: dict[str, torch.Tensor], base: torch.Tensor, transposed: bool) -> torch.Tensor:
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        weight = base.T if transposed else base  # the layer's (out, in) matrix
        root = torch.nn.Module()
        parent = root
        *parents, leaf = self.module.split(".")
        for name in parents:
            child = torch.nn.Module()
            parent.add_module(name, child)
            parent = child
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                 dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        parent.add_module(leaf, linear)
        config = copy.deepcopy(self.config)
        config.target_modules = [self.module]
        config.inference_mode = True
        if hasattr(config, "fan_in_fan_out"):
            config.fan_in_fan_out = False  # the skeleton's layer is an nn.Linear, stored (out, in)
        try:
            inject_adapter_in_model(config, root)
            state = {f"{self.module}.{kind}": tensor.to(weight.device) for kind, tensor in tensors.items()}
            loaded = set_peft_model_state_dict(root, state)
            layer = root.get_submodule(self.module)
            layer.merge()
        except Exception as exc:  # PEFT's own refusal (a layer type it cannot build, ...), said in one line
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DeltakitError(f"PEFT could not apply the {self.peft_type} adapter to {self.module}: {text}") from None
        if loaded.unexpected_keys:
            raise DeltakitError(f"PEFT did not take {self.peft_type} tensors {loaded.unexpected_keys[0]} of "
                                f"{self.module}")
        merged = layer.get_base_layer().weight.detach()
        return merged.T if transposed else merged


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
    for key in files.checkpoint.keys():
        if not key.startswith(PEFT_PREFIX):
            raise DeltakitError(f"{files.path}: the {peft_type} adapter keeps tensors shared by all layers ({key}); "
                                "deltakit applies other PEFT types one layer at a time and cannot load them")
        name = strip_prefix(key)
        module, found, rest = name.partition(f".{prefix}")
        if found:
            groups.setdefault(module, {})[f"{prefix}{rest}"] = key
        else:
            whole[name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")] = key
    modules: list[AdapterModule] = []
    for module, keys in sorted(groups.items()):
        shape = base.shape(f"{module}.weight")
        if shape is None or len(shape) != 2:
            raise DeltakitError(f"{files.path}: {peft_type} module {module} has no weight matrix in the base; "
                                "deltakit applies other PEFT types to linear layers only")
        modules.append(PeftLayerModule(module=module, target=f"{module}.weight", keys=keys, out_features=shape[0],
                                       in_features=shape[1], peft_type=peft_type, stored=tuple(shape),
                                       config=config))
    return modules, whole
