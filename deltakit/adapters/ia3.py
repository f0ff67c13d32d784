"""IA3 (Liu et al. 2022): a learned vector l scales a layer's weight, W' = W0 ⊙ l, so ΔW = W0 ⊙ (l − 1).

For attention-like layers l has one entry per output (stored out × 1) and scales rows of the
(out, in) matrix, and the layer's bias too; for the ``feedforward_modules`` it has one entry per
input (stored 1 × in) and scales columns (PEFT ``ia3.Linear.merge``). Which of the two is read
from the stored shape of l. ΔW is proportional to W0: unmerge divides by l (PEFT adds 1e-8 to l
there; deltakit divides exactly and refuses a zero entry as non-finite).

Example::

    gain = module.gain(tensors, transposed=False, rows=None, dtype=torch.float32, device="cpu")  # l − 1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from deltakit.adapters.base import AdapterModule, BaseInfo, Rows
from deltakit.errors import DeltakitError
from deltakit.io.peft import AdapterFiles

KINDS = ("ia3_l",)


@dataclass(frozen=True)
class Ia3Module(AdapterModule):
    """IA3's vector on one weight (or, with ``bias``, on the layer's bias)."""

    feedforward: bool = False
    bias: bool = False

    kind: ClassVar[str] = "scaling"

    def stored_shape(self, transposed: bool) -> tuple[int, ...]:
        return (self.out_features,) if self.bias else super().stored_shape(transposed)

    def gain(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        scale = tensors["ia3_l"].to(device, dtype) - 1  # (out, 1) or (1, in)
        if self.bias:
            scale = scale.reshape(-1)
            return scale if rows is None else scale[rows[0]:rows[1]]
        if transposed:
            scale = scale.T
        if rows is not None and scale.shape[0] > 1:
            scale = scale[rows[0]:rows[1]]
        return scale

    def delta(self, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, transposed: bool,
              rows: Rows = None) -> torch.Tensor:
        if base is None:
            raise ValueError("IA3's ΔW needs the base weight")
        return base * self.gain(tensors, transposed, rows, base.dtype, base.device)

    def apply(self, tensors: dict[str, torch.Tensor], base: torch.Tensor, transposed: bool, rows: Rows,
              weight: float) -> torch.Tensor:
        return base.mul_(1 + weight * self.gain(tensors, transposed, rows, base.dtype, base.device))


def build(files: AdapterFiles, modules: dict[str, dict[str, str]], base: BaseInfo) -> list[AdapterModule]:
    built: list[AdapterModule] = []
    for module, kinds in sorted(modules.items()):
        shape = tuple(files.checkpoint.shape(kinds["ia3_l"]))
        if len(shape) != 2 or 1 not in shape:
            raise DeltakitError(f"{files.path}: IA3 module {module} has a vector of shape {shape}; "
                                "deltakit applies IA3 to linear layers only")
        weight = base.shape(f"{module}.weight")
        if weight is None or len(weight) != 2:
            raise DeltakitError(f"{files.path} does not fit the base: IA3 module {module} has no weight matrix there")
        # l is (1, in) on feed-forward layers and (out, 1) elsewhere; a 1 × 1 l needs the config to tell.
        feedforward = shape[0] == 1 and (shape[1] != 1 or module.endswith(tuple(_ff(files))))
        length = shape[1] if feedforward else shape[0]
        if length not in weight:
            raise DeltakitError(f"{files.path}: IA3 module {module} has a vector of {length} entries, but "
                                f"{module}.weight is {tuple(weight)}")
        other = weight[1] if weight[0] == length else weight[0]  # the weight may be stored (out, in) or (in, out)
        out_features, in_features = (other, length) if feedforward else (length, other)
        keys = {"ia3_l": kinds["ia3_l"]}
        built.append(Ia3Module(module=module, target=f"{module}.weight", keys=keys, out_features=out_features,
                               in_features=in_features, feedforward=feedforward,
                               fan_in_fan_out=bool(files.config.get("fan_in_fan_out", False))))
        if not feedforward and base.shape(f"{module}.bias") == (out_features,):
            built.append(Ia3Module(module=module, target=f"{module}.bias", keys=keys, out_features=out_features,
                                   in_features=1, bias=True))
    return built


def _ff(files: AdapterFiles) -> list[str]:
    modules = files.config.get("feedforward_modules") or []
    return [modules] if isinstance(modules, str) else list(modules)
