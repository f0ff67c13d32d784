"""IA3 (Liu et al. 2022): a learned vector l scales a layer's weight, W' = W0 ⊙ l, so ΔW = W0 ⊙ (l − 1).

For attention-like layers l has one entry per output (stored out × 1) and scales rows of the
(out, in) matrix, and the layer's bias too; for the ``feedforward_modules`` it has one entry per
input (stored 1 × in) and scales columns (PEFT ``ia3.Linear.merge``). Which of the two is read
from the stored shape of l. On a convolution l is (1, n, 1, ...) and the config's
``feedforward_modules`` tells: an output channel's gain scales its row of the (out, in·∏kernel)
matrix, an input channel's its ∏kernel columns, and with groups > 1 output channel o reads the
input channels of its group only (PEFT ``ia3._ConvNd._get_ia3_scaling_for_weight``). ΔW is proportional to W0: unmerge divides by l (PEFT adds 1e-8 to l
there; deltakit divides exactly and refuses a zero entry as non-finite).

Example::

    gain = module.gain(tensors, transposed=False, rows=None, dtype=torch.float32, device="cpu")  # l − 1
"""

from __future__ import annotations

import math
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
    groups: int = 1  # a convolution's groups (its input-channel gains are laid out per group)

    kind: ClassVar[str] = "scaling"

    def stored_shape(self, transposed: bool) -> tuple[int, ...]:
        return (self.out_features,) if self.bias else super().stored_shape(transposed)

    def gain(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        scale = tensors["ia3_l"].to(device, dtype) - 1  # (out, 1) or (1, in); a convolution's (1, n, 1, ...)
        if self.bias:
            scale = scale.reshape(-1)
            return scale if rows is None else scale[rows[0]:rows[1]]
        if self.kernel:
            scale = self._convolution_gain(scale.reshape(-1))
        elif transposed:
            scale = scale.T
        if rows is not None and scale.shape[0] > 1:
            scale = scale[rows[0]:rows[1]]
        return scale

    def _convolution_gain(self, scale: torch.Tensor) -> torch.Tensor:
        """The gain of the (out, in·∏kernel) matrix from l − 1: a column (output channels), or a row (input
        channels, each repeated over the kernel), or with groups one row per output channel."""
        if not self.feedforward:
            return scale.reshape(-1, 1)
        per_group = self.in_features // math.prod(self.kernel)  # input channels one output channel reads
        spread = scale.reshape(self.groups, 1, per_group).expand(self.groups, self.out_features // self.groups,
                                                                 per_group).reshape(self.out_features, per_group)
        gain = spread.repeat_interleave(math.prod(self.kernel), dim=1)
        return gain[:1] if self.groups == 1 else gain

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
        weight = base.shape(f"{module}.weight")
        if weight is not None and 3 <= len(weight) <= 5:
            built += _convolution(files, module, kinds["ia3_l"], shape, tuple(weight), base)
            continue
        if len(shape) != 2 or 1 not in shape:
            raise DeltakitError(f"{files.path}: IA3 module {module} has a vector of shape {shape}, which fits "
                                "neither a linear layer nor a convolution")
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


def _convolution(files: AdapterFiles, module: str, key: str, shape: tuple[int, ...], weight: tuple[int, ...],
                 base: BaseInfo) -> list[AdapterModule]:
    """IA3 on a convolution: l is (1, n, 1, ...), of the output channels or (feed-forward) the input channels."""
    length = math.prod(shape)
    if len(shape) != len(weight) or shape[1] != length:
        raise DeltakitError(f"{files.path}: IA3 module {module} has a vector of shape {shape}, but {module}.weight "
                            f"is {weight}")
    out_channels, per_group, kernel = weight[0], weight[1], weight[2:]
    feedforward = module.endswith(tuple(_ff(files)))
    groups = length // per_group if feedforward and per_group and length % per_group == 0 else 1
    if (feedforward and (groups * per_group != length or out_channels % groups)) or (
            not feedforward and length != out_channels):
        raise DeltakitError(f"{files.path}: IA3 module {module} has {length} gains, which fit neither the output nor "
                            f"the input channels of {module}.weight {weight}")
    fields = dict(module=module, keys={"ia3_l": key}, out_features=out_channels, feedforward=feedforward)
    built: list[AdapterModule] = [Ia3Module(target=f"{module}.weight", in_features=per_group * math.prod(kernel),
                                            kernel=kernel, groups=groups, **fields)]
    if not feedforward and base.shape(f"{module}.bias") == (out_channels,):
        built.append(Ia3Module(target=f"{module}.bias", in_features=1, bias=True, **fields))
    return built


def _ff(files: AdapterFiles) -> list[str]:
    modules = files.config.get("feedforward_modules") or []
    return [modules] if isinstance(modules, str) else list(modules)
