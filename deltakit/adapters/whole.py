"""What an adapter sets rather than adds to: rows of an embedding (trainable tokens) and tensors it
carries whole (``modules_to_save``).

Trainable tokens (PEFT ``trainable_token_indices`` of a LoRA config; ``TrainableTokensLayer``):
the adapter stores the new values of some rows of an embedding table, ``<module>.token_adapter.
trainable_tokens_delta`` (n × dim, despite its name the rows themselves, not a difference), and
merging copies them in, W[indices] = values (``index_copy``). So ΔW = values − W0[indices] on those
rows and 0 elsewhere: it depends on W0, and unmerging needs the original model.

A tensor carried whole replaces the model's on merge (:mod:`deltakit.lora.merging` applies it);
for the analyses it is ΔW = R − W0 like any other, reported with how it changed.

Example::

    module = TokensModule(module="emb", target="emb.weight", keys={"values": key}, out_features=100,
                          in_features=5, indices=(0, 10))
    module.delta(tensors, base_weight.float(), transposed=False)   # non-zero in rows 0 and 10 only
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from deltakit.adapters.base import AdapterModule, BaseInfo, Rows
from deltakit.errors import DeltakitError
from deltakit.io.peft import AdapterFiles

TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


@dataclass(frozen=True)
class TokensModule(AdapterModule):
    """New values of rows ``indices`` of an embedding table (stored vocab × dim)."""

    indices: tuple[int, ...] = ()

    kind: ClassVar[str] = "base"
    own_layout: ClassVar[bool] = True

    def stored_shape(self, transposed: bool) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def delta(self, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, transposed: bool,
              rows: Rows = None) -> torch.Tensor:
        if base is None:
            raise ValueError("trainable tokens' ΔW needs the base weight")
        values = tensors["values"].to(base.device, base.dtype)
        start, stop = rows if rows is not None else (0, base.shape[0])
        delta = torch.zeros_like(base)
        for row, index in enumerate(self.indices):
            if start <= index < stop:
                delta[index - start] = values[row] - base[index - start]
        return delta

    def change(self) -> str | None:
        return f"rows {', '.join(map(str, self.indices))} replaced (trainable tokens)"


@dataclass(frozen=True)
class ReplacedModule(AdapterModule):
    """A tensor the adapter carries whole (``modules_to_save``, a trained bias): ΔW = R − W0, as stored."""

    stored: tuple[int, ...] = ()

    kind: ClassVar[str] = "base"
    own_layout: ClassVar[bool] = True

    def stored_shape(self, transposed: bool) -> tuple[int, ...]:
        return self.stored

    def delta(self, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, transposed: bool,
              rows: Rows = None) -> torch.Tensor:
        if base is None:
            raise ValueError("a replaced tensor's ΔW needs the base weight")
        replacement = tensors["whole"] if rows is None else tensors["whole"][rows[0]:rows[1]]
        return replacement.to(base.device, base.dtype).reshape(base.shape) - base

    def change(self) -> str | None:
        return "replaced whole by the adapter (modules_to_save)"


def token_modules(files: AdapterFiles, whole: dict[str, str], base: BaseInfo) -> list[AdapterModule]:
    """Pop the trainable tokens out of the whole tensors: one module per embedding they change."""
    indices_config: Any = files.config.get("trainable_token_indices")
    if files.peft_type == "TRAINABLE_TOKENS":
        return []  # its own type: applied through PEFT (deltakit.adapters.peft_layer)
    built: list[AdapterModule] = []
    for name in [n for n in whole if n.endswith(TOKENS_SUFFIX)]:
        key = whole.pop(name)
        module = name[: -len(TOKENS_SUFFIX)]
        indices = _indices(indices_config, module)
        if indices is None:
            raise DeltakitError(f"{files.path}: {module} has trainable tokens but trainable_token_indices does not "
                                "name it")
        values = tuple(files.checkpoint.shape(key))
        table = base.shape(f"{module}.weight")
        if table is None or len(table) != 2:
            raise DeltakitError(f"{files.path} does not fit the base: the trainable tokens of {module} have no "
                                "embedding table there")
        if len(values) != 2 or values != (len(indices), table[1]) or len(set(indices)) != len(indices) or \
                not all(0 <= i < table[0] for i in indices):
            raise DeltakitError(f"{files.path}: the trainable tokens of {module} are {values} for indices "
                                f"{list(indices)}, which do not fit its table {tuple(table)}")
        built.append(TokensModule(module=module, target=f"{module}.weight", keys={"values": key},
                                  out_features=table[0], in_features=table[1], indices=tuple(indices)))
    return built


def _indices(config: Any, module: str) -> list[int] | None:
    """PEFT's trainable_token_indices for ``module``: a list (the input embedding: the one table the file
    names), or a dict from module names (matched as a dotted suffix) to lists."""
    if isinstance(config, list):
        return [int(i) for i in config]
    if isinstance(config, dict):
        for name, indices in config.items():
            if module == name or module.endswith(f".{name}"):
                return [int(i) for i in indices]
    return None

