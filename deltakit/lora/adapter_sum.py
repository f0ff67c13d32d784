"""Several PEFT adapters on one base, summed module by module: ΔW = Σ_i w_i·ΔW_i.

Each adapter is opened as a :class:`~deltakit.delta.DeltaSource` against the same base, so an
adapter made for another model is refused by name, and the adapted weights are united by base
tensor name, in the base's order. The sum streams two ways, both in the orientation the base
stores the weight, as ``DeltaSource.stream`` yields it:

* dense: each adapter's ΔW from ``DeltaSource.stream`` (any adapter type that defines one),
  weighted and added on the device;
* factored, for plain LoRA adapters only: the factors of the sum stacked into one
  :class:`~deltakit.lora.resize.LowRankDelta` (Σ_i w_i s_i B_i A_i = [w_1 s_1 B_1, …]·[A_1; …]),
  which never forms ΔW and never reads a weight of the base.

Example::

    adapters = open_adapter_sum("base", ["lora-a", "lora-b"], weights=[0.7, 0.3])
    for item in adapters.stream(adapters.pairs, factored=True):
        item.delta.frobenius()              # ‖0.7·ΔW_a + 0.3·ΔW_b‖_F of one weight
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from deltakit.delta import DeltaSource, Selection, open_delta_source
from deltakit.device.reads import prefetched, read_threads
from deltakit.errors import DeltakitError
from deltakit.io.checkpoint import Checkpoint
from deltakit.adapters import Adapter
from deltakit.adapters.lora import LoraModule
from deltakit.lora.resize import LowRankDelta
from deltakit.pairing import PairPlan, TensorPair


@dataclass(frozen=True)
class SumItem:
    """The summed ΔW of one base weight: dense (stored shape, on the device) or as factors."""

    pair: TensorPair
    delta: torch.Tensor | LowRankDelta


@dataclass
class AdapterSum:
    """Adapters on one base with their weights, and which of them adapt each base weight."""

    paths: list[str]
    sources: list[DeltaSource]  # one per adapter, same base
    weights: tuple[float, ...]
    pairs: list[TensorPair]  # every adapted base weight once, in the base's order
    members: list[tuple[tuple[int, int], ...]]  # per pair: (adapter, index into that adapter's pairs)

    @property
    def base(self) -> Checkpoint:
        return self.sources[0].base

    @property
    def factored(self) -> bool:
        """Whether every adapter is a plain LoRA, so every ΔW is a product of stored factors."""
        return all(_plain_lora(source) for source in self.sources)

    @property
    def dtype(self) -> torch.dtype:
        """The adapters' floating-point tensor dtype (promoted where they differ)."""
        found: torch.dtype | None = None
        for source in self.sources:
            ckpt = getattr(source.adapter, "checkpoint", None)
            for name in ckpt.keys() if ckpt is not None else ():
                if ckpt.dtype(name).is_floating_point:
                    found = ckpt.dtype(name) if found is None else torch.promote_types(found, ckpt.dtype(name))
                    break
        return found or torch.float32

    def plan(self) -> PairPlan:
        """The adapted weights as a pairing plan (nothing skipped, nothing on one side only)."""
        return PairPlan(pairs=list(self.pairs))

    def not_carried(self) -> list[dict[str, str]]:
        """Tensors the adapters replace whole (modules_to_save, layer biases): not deltas, not written."""
        adapted = {pair.base_name for pair in self.pairs} | {pair.name for pair in self.pairs}
        # PEFT also saves the base weight of an embedding LoRA layer (save_embedding_layers): that is
        # W_0 of a weight whose ΔW is extracted, not a replacement, and is left out here.
        return [{"name": name, "reason": f"replaced whole by adapter {path} (modules_to_save or a layer bias): "
                 "not a delta; extract from adapters writes LoRA factors only"}
                for path, source in zip(self.paths, self.sources)
                for name in getattr(source.adapter, "whole_tensors", {}) if name not in adapted]

    def stream(self, pairs: Sequence[TensorPair], device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, prefetch: int = 2, factored: bool = True) -> Iterator[SumItem]:
        """Σ_i w_i·ΔW_i of each of ``pairs`` (a subset of :attr:`pairs`), in that order.

        ``factored``: as a :class:`LowRankDelta` (requires :attr:`factored`), else dense.
        """
        index = {pair.name: i for i, pair in enumerate(self.pairs)}
        chosen = [index[pair.name] for pair in pairs]
        device = torch.device(device)
        if factored:
            if not self.factored:
                raise ValueError("a factored stream needs plain LoRA adapters")
            return self._factored(chosen, device, dtype, prefetch)
        return self._dense(chosen, device, dtype, prefetch)

    def _dense(self, chosen: list[int], device: torch.device, dtype: torch.dtype, prefetch: int) -> Iterator[SumItem]:
        streams = [iter(source.stream([j for i in chosen for a, j in self.members[i] if a == k], device, dtype, prefetch))
                   for k, source in enumerate(self.sources)]
        for i in chosen:
            total: torch.Tensor | None = None
            for a, _ in self.members[i]:
                term = next(streams[a]).delta
                if self.weights[a] != 1.0:
                    term.mul_(self.weights[a])  # the stream's own tensor: scaled in place
                total = term if total is None else total.add_(term)
            assert total is not None
            yield SumItem(self.pairs[i], total)

    def _factored(self, chosen: list[int], device: torch.device, dtype: torch.dtype,
                  prefetch: int) -> Iterator[SumItem]:
        def reader(i: int) -> Callable[[], list[Any]]:
            return lambda: [self.sources[a].adapter.factors(self.sources[a].modules[j])  # type: ignore[union-attr]
                            for a, j in self.members[i]]

        loaded_all = prefetched([reader(i) for i in chosen], prefetch, read_threads(prefetch))
        for i, loaded in zip(chosen, loaded_all):
            terms: list[tuple[float, LowRankDelta]] = []
            for (a, j), (lora_a, lora_b) in zip(self.members[i], loaded):  # type: ignore[arg-type]
                module = self.sources[a].modules[j]
                term = LowRankDelta(lora_b, lora_a).to(device, dtype)  # B @ A: out × in
                pair = self.sources[a].pairs[j]
                terms.append((self.weights[a] * module.scaling, term.T if pair.transposed else term))
            yield SumItem(self.pairs[i], LowRankDelta.stack(terms))


def _plain_lora(source: DeltaSource) -> bool:
    # Exact types: an adapter type built on LoRA's factors but not a plain product (DoRA's column
    # norms, say) must take the dense route, where its own ΔW is formed.
    adapter = source.adapter
    return (type(adapter) is Adapter and all(type(m) is LoraModule for m in source.modules)
            and str(adapter.config.get("peft_type", "LORA")).upper() == "LORA" and not adapter.config.get("use_dora"))


def check_weights(weights: Sequence[float] | None, count: int) -> tuple[float, ...]:
    """One finite weight per adapter (all 1 when none are given)."""
    if weights is None:
        return (1.0,) * count
    values = tuple(float(w) for w in weights)
    if len(values) != count:
        raise DeltakitError(f"--weights has {len(values)} value(s) for {count} adapter(s); give one weight per adapter")
    for value in values:
        if not math.isfinite(value):
            raise DeltakitError(f"--weights must be finite numbers, got {value}")
    return values


def open_adapter_sum(
    base: str | os.PathLike,
    adapters: Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    allow_pickle: bool = False,
) -> AdapterSum:
    """Open each adapter against ``base`` and unite their adapted weights.

    Raises :class:`DeltakitError` for a weight count that differs from the adapter count, an
    adapter of a type deltakit cannot read, or one that does not fit the base.
    """
    paths = [str(path) for path in adapters]
    if not paths:
        raise DeltakitError("give at least one adapter")
    values = check_weights(weights, len(paths))
    sources = [open_delta_source(base, path, Selection(tuple(include), tuple(exclude), allow_pickle), replacements=False)
               for path in paths]
    order = {name: i for i, name in enumerate(sources[0].base.keys())}
    holders: dict[str, list[tuple[int, int]]] = {}
    for k, source in enumerate(sources):
        for j, pair in enumerate(source.pairs):
            holders.setdefault(pair.base_name, []).append((k, j))
    names = sorted(holders, key=lambda name: order[name])
    pairs = [sources[holders[n][0][0]].pairs[holders[n][0][1]] for n in names]
    return AdapterSum(paths, sources, values, pairs, [tuple(holders[n]) for n in names])
