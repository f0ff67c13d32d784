"""An adapter's modules paired with the base tensors they change, each pair's orientation decided.

The pairing is the checkpoint pairing's (:func:`deltakit.pairing.pair_tensors`), with the adapter's
update shapes for the fine-tune's: a fused expert tensor changed by LoRA on parameters becomes one
3-D pair again, and a 2-D weight's orientation comes from the shapes, the model's config and the
module's ``fan_in_fan_out`` (:func:`deltakit.pairing.adapted_layout`), or from the module itself for
an embedding table; the pair carries it (``TensorPair.transposed``) from then on.

Example::

    for pair, module in adapter_pairs(adapter, base_checkpoint):
        module.delta(adapter.load(module), base_weight, pair.transposed)
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from deltakit.adapters.base import AdapterModule
from deltakit.adapters.registry import Adapter
from deltakit.errors import DeltakitError
from deltakit.io.checkpoint import Checkpoint
from deltakit.adapters.whole import ReplacedModule
from deltakit.pairing import (
    TensorPair, adapted_layout, canonical_name, layer_index, match_names, model_order, module_type, pair_tensors,
)


def adapter_pairs(adapter: Adapter, base: Checkpoint, left_out: list[dict[str, str]] | None = None
                  ) -> list[tuple[TensorPair, AdapterModule]]:
    """Pair each adapter module with the base tensor it changes; refuse an adapter that does not fit the base.

    Orientation is decided here, once, from the shapes, the model's config and the adapter's
    ``fan_in_fan_out`` (:func:`~deltakit.pairing.adapted_layout`), and carried on the pair's
    ``layout``; the module's update must have the base tensor's shape in it. With ``left_out``
    (a list), modules that do not fit are appended to it (``{"name", "reason"}``) and left out
    instead of refused, as long as one fits.
    """
    mapping = match_names(base.keys(), adapter.modules.keys())  # adapter target -> base name
    unfit: list[dict[str, str]] = [{"name": name, "reason": "no such tensor in the base"}
                                   for name in adapter.modules if name not in mapping]
    if len(unfit) == len(adapter.modules):
        raise DeltakitError(f"adapter {adapter.path} does not fit base {base.path}: none of its modules exist there "
                            f"(first: {unfit[0]['name']})")
    names = [name for name in adapter.modules if name in mapping]
    ft_like = {name: (base.shape(mapping[name]), torch.float32) for name in names}
    plan = pair_tensors(base.metas(), ft_like, base.config)
    # An adapter changes a fused expert tensor whole: the pairing's per-expert slices become one 3-D pair again.
    fused = list(dict.fromkeys(p.ft_tensor for p in plan.pairs if p.expert_slice))
    pairs = [p for p in plan.pairs if not p.expert_slice]
    pairs += [_nd_pair(name, mapping[name], ft_like[name][0], base) for name in fused]
    pairs += [_nd_pair(s.name, mapping[s.name], ft_like[s.name][0], base)
              for s in plan.skipped if len(ft_like[s.name][0]) > 2]
    unfit += [{"name": s.name, "reason": s.reason} for s in plan.skipped if len(ft_like[s.name][0]) <= 2]
    out: list[tuple[TensorPair, AdapterModule]] = []
    undecided = [p for p in pairs if len(p.shape) == 2 and not p.kernel and not adapter.modules[p.name].embedding
                  and not adapter.modules[p.name].own_layout]
    shown = frozenset(_shape_layout(p, adapter.modules[p.name]) for p in undecided) - {None}
    for pair in sorted(pairs, key=lambda p: model_order(p.name)):  # the model's order, as for two checkpoints
        module = adapter.modules[pair.name]
        layout = pair.layout
        if pair in undecided:
            decided = adapted_layout(pair, module.stored_shape(False), module.stored_shape(True),
                                     module.fan_in_fan_out, base.config, shown)
            if "conv1d" in (decided, pair.layout):  # other layouts (embedding-like heads, vectors) keep their name
                layout = decided or pair.layout
        # the module's own kind decides a table (PEFT's embedding LoRA), else the layout just decided
        pair = replace(pair, layout=layout, transposed=module.embedding or layout == "conv1d")
        expected = module.stored_shape(pair.transposed)
        if pair.kernel:
            _check_convolution(adapter, pair, module)
        if tuple(pair.shape) != tuple(expected):
            unfit.append({"name": pair.name, "reason": f"{module.module} makes a {'×'.join(map(str, expected))} "
                                                       f"update, but {pair.base_name} is {'×'.join(map(str, pair.shape))}"})
            continue
        out.append((pair, module))
    if unfit and (left_out is None or not out):
        shown_names = ", ".join(entry["name"] for entry in unfit[:3]) + (f" and {len(unfit) - 3} more"
                                                                         if len(unfit) > 3 else "")
        raise DeltakitError(f"adapter {adapter.path} does not fit base {base.path}: {len(unfit)} module"
                            f"{'s' if len(unfit) != 1 else ''} cannot be paired ({shown_names}; first: "
                            f"{unfit[0]['reason']}); pass skip_mismatched=True (--skip-mismatched) to leave "
                            f"{'them' if len(unfit) != 1 else 'it'} out")
    if left_out is not None:
        left_out += unfit
    return out


def replacement_pairs(adapter: Adapter, base: Checkpoint) -> tuple[list[tuple[TensorPair, AdapterModule]],
                                                                    list[dict[str, str]]]:
    """The tensors the adapter carries whole (``modules_to_save``, trained biases), each paired with the base
    tensor it replaces as ΔW = R − W0, and (name, reason) of those that are no delta of the base.

    A whole tensor of a layer an adapter module also changes is that layer's W0 (PEFT saves the base
    layer of an embedding LoRA), and is left to the module.
    """
    adapted = {canonical_name(name) for name in adapter.modules}
    names = [name for name in adapter.whole_tensors if canonical_name(name) not in adapted]
    mapping = match_names(base.keys(), names)
    metas: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    skipped: list[dict[str, str]] = []
    for name in names:
        key = adapter.whole_tensors[name]
        shape, target = tuple(adapter.checkpoint.shape(key)), mapping.get(name)
        if target is None:
            skipped.append({"name": name, "reason": "carried whole by the adapter, but the model has no such tensor "
                                                    "(PEFT's copy of a tied output layer, say)"})
        elif shape != tuple(base.shape(target)):
            skipped.append({"name": name, "reason": f"replaced whole by the adapter with shape {shape} (the model's is "
                                                    f"{tuple(base.shape(target))}): not a delta of the base"})
        else:
            metas[name] = (shape, adapter.checkpoint.dtype(key))
    if not metas:
        return [], skipped
    plan = pair_tensors(base.metas(), metas, base.config)
    skipped += [{"name": s.name, "reason": s.reason} for s in plan.skipped]
    out: list[tuple[TensorPair, AdapterModule]] = []
    for pair in plan.pairs:
        if pair.expert_slice:  # an experts module carried whole: its slices are no separate tensors of the file
            skipped.append({"name": pair.name, "reason": "a fused expert tensor replaced whole: not analysed"})
            continue
        module = ReplacedModule(module=pair.name.rpartition(".")[0], target=pair.name,
                                keys={"whole": adapter.whole_tensors[pair.name]}, out_features=pair.shape[0],
                                in_features=pair.shape[1] if len(pair.shape) > 1 else 1, stored=tuple(pair.shape))
        out.append((pair, module))
    return out, skipped


def _check_convolution(adapter: Adapter, pair: TensorPair, module: AdapterModule) -> None:
    """Refuse a module shaped for another kernel, or for a grouped convolution (its layer reads every
    input channel, the weight only a group's: PEFT cannot merge LoRA there either, peft#2403)."""
    stored = "×".join(map(str, pair.stored_shape))
    if module.kernel and tuple(module.kernel) != tuple(pair.kernel):
        raise DeltakitError(f"adapter {adapter.path}: {module.module} is shaped for a "
                            f"{'×'.join(map(str, module.kernel))} kernel, but {pair.base_name} is {stored}")
    rows, cols = module.stored_shape(False)
    if rows == pair.shape[0] and cols > pair.shape[1] and cols % pair.shape[1] == 0:
        raise DeltakitError(
            f"adapter {adapter.path}: {module.module} is a convolution with groups={cols // pair.shape[1]} "
            f"({pair.base_name} is {stored}, the adapter reads all {cols // math.prod(pair.kernel)} input "
            "channels): PEFT cannot merge an adapter into a grouped convolution, and deltakit refuses it too")


def _shape_layout(pair: TensorPair, module: AdapterModule) -> str | None:
    """The layout a non-square weight's shape proves for ``module`` ("linear" or "conv1d"), None if it proves none."""
    fits = [layout for layout, shape in (("linear", module.stored_shape(False)), ("conv1d", module.stored_shape(True)))
            if tuple(shape) == tuple(pair.shape)]
    return fits[0] if len(fits) == 1 else None


def _nd_pair(name: str, base_name: str, shape: tuple[int, ...], base: Checkpoint) -> TensorPair:
    """A pair for a tensor of more than two dimensions (fused experts), which pairing leaves out of analysis."""
    return TensorPair(name=name, base_name=base_name, shape=tuple(shape), base_dtype=base.dtype(base_name),
                      ft_dtype=torch.float32, module_type=module_type(name), layer=layer_index(name), layout="experts")
