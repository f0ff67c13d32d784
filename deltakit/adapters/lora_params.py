"""LoRA on parameters (PEFT ``target_parameters``, ``lora.ParamWrapper``), e.g. fused MoE experts.

For a 3-D parameter (experts × d1 × d2) PEFT stores A as (r·E) × in and B as out × (r·E);
expert e's factors are A_e = A.reshape(E, r, in)[e] and B_e = B.reshape(out, r, E)[:, :, e], and
ΔW_e = scaling · B_e @ A_e (out × in), stored as (d1, d2) = (out, in), or (in, out) for
input-major experts (``is_transposed`` in transformers, e.g. gpt-oss) — PEFT
``ParamWrapper.get_delta_weight``. A 2-D parameter is a plain LoRA on it (E = 1).

A fused parameter the base checkpoint keeps one tensor per expert of (Mixtral's
``block_sparse_moe.experts.<e>.w1``, Qwen2-MoE's ``mlp.experts.<e>.gate_proj``) is adapted tensor by
tensor (:mod:`deltakit.adapters.expert_layouts`).

Several parameters of one module nest wrappers: the file keys of the inner ones carry
``.base_layer`` once per level. Which parameter each level adapts is found from the base's
shapes; deltakit refuses when the shapes cannot tell (PEFT nests in the order the model class
defines its parameters, which the files do not record).

Example::

    module.delta(tensors, base_experts)    # (E, d1, d2) fp32
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from deltakit.adapters.base import AdapterModule, BaseInfo, Rows
from deltakit.adapters.expert_layouts import ExpertRowsModule, Layout, fused_shape, per_expert_layout
from deltakit.adapters.lora import lora_factor_keys, lora_hyper
from deltakit.errors import DeltakitError
from deltakit.io.peft import AdapterFiles

# transformers experts classes declared ``is_transposed=True`` (stored experts × in × out).
INPUT_MAJOR_MODEL_TYPES = {"gpt_oss", "aria", "aria_text", "openai_privacy_filter"}
BASE_LAYER = ".base_layer"

@dataclass(frozen=True)
class LoraParamModule(AdapterModule):
    """LoRA on one parameter; ``experts`` > 1 for a fused 3-D expert tensor."""

    rank: int = 0
    alpha: float = 0.0
    scaling: float = 1.0
    experts: int = 1
    input_major: bool = False  # stored experts × in × out

    own_layout: ClassVar[bool] = True

    @property
    def a_key(self) -> str:
        return self.keys["A"]

    @property
    def b_key(self) -> str:
        return self.keys["B"]

    def stored_shape(self, transposed: bool) -> tuple[int, ...]:
        pair = (self.in_features, self.out_features) if self.input_major else (self.out_features, self.in_features)
        return (self.experts, *pair) if self.experts > 1 else pair

    def delta(self, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, transposed: bool,
              rows: Rows = None) -> torch.Tensor:
        """ΔW as stored: (E, d1, d2) for experts (``rows`` are experts start:stop), else (out, in)."""
        dtype = base.dtype if base is not None else torch.float32
        device = base.device if base is not None else tensors["A"].device
        lora_a, lora_b = (tensors[k].to(device, dtype) for k in ("A", "B"))
        if self.experts == 1:
            if rows is not None:
                lora_b = lora_b[rows[0]:rows[1]]
            return (lora_b @ lora_a) * self.scaling
        lora_a = lora_a.reshape(self.experts, self.rank, lora_a.shape[-1])  # (E, r, in)
        lora_b = lora_b.reshape(lora_b.shape[0], self.rank, self.experts).permute(2, 0, 1)  # (E, out, r)
        if rows is not None:
            lora_a, lora_b = lora_a[rows[0]:rows[1]], lora_b[rows[0]:rows[1]]
        delta = torch.bmm(lora_b, lora_a) * self.scaling  # (E, out, in)
        return delta.transpose(1, 2) if self.input_major else delta


def build(files: AdapterFiles, groups: dict[str, dict[str, str]], base: BaseInfo) -> list[AdapterModule]:
    """LoRA-on-parameter modules of the key groups that belong to ``target_parameters``."""
    targets = [str(t) for t in files.config.get("target_parameters") or []]
    model_type = str((base.config or {}).get("model_type", ""))
    split: dict[str, Layout] = {}  # fused parameters the base keeps one tensor per expert of

    def shape_of(name: str) -> tuple[int, ...] | None:
        found = base.shape(name)
        if found is None and name not in split:
            module, _, param = name.rpartition(".")
            layout = per_expert_layout(module, param, base)
            if layout is not None:
                split[name] = layout
        return fused_shape(split[name], base) if found is None and name in split else found
    by_module: dict[str, list[tuple[int, str, dict[str, str]]]] = {}
    for group, kinds in groups.items():
        module = group.replace(BASE_LAYER, "")
        by_module.setdefault(module, []).append((group.count(BASE_LAYER), group, kinds))
    built: list[AdapterModule] = []
    for module, levels in sorted(by_module.items()):
        params = _target_params(module, targets, shape_of)
        fits = {group: [p for p in params if _fits(files, kinds, shape_of(f"{module}.{p}"))]
                for _, group, kinds in levels}
        chosen: dict[str, str] = {}
        while fits:
            group = next((g for g, ps in fits.items() if len(ps) == 1), None)
            if group is None:
                first = next(iter(fits))
                what = "no parameter of the base fits it" if not fits[first] else (
                    f"its factors fit {', '.join(fits[first])} alike")
                raise DeltakitError(f"{files.path}: cannot tell which parameter the LoRA at {first} adapts: {what}")
            chosen[group] = fits.pop(group)[0]
            for others in fits.values():
                if chosen[group] in others:
                    others.remove(chosen[group])
        for _, group, kinds in sorted(levels):
            fused = _module(files, module, group, kinds, chosen[group], shape_of, model_type)
            layout = split.get(fused.target)
            built += [fused] if layout is None else _per_expert_modules(fused, layout)
    return built


def _per_expert_modules(fused: LoraParamModule, layout: Layout) -> list[AdapterModule]:
    """The fused parameter's LoRA as one module per stored per-expert tensor (rows of its experts' ΔW)."""
    out: list[AdapterModule] = []
    for expert, pieces in enumerate(layout):
        first_row = 0
        for name, rows in pieces:
            out.append(ExpertRowsModule(module=fused.module, target=name, keys=fused.keys, out_features=rows,
                                        in_features=fused.in_features, rank=fused.rank, alpha=fused.alpha,
                                        scaling=fused.scaling, experts=fused.experts, expert=expert,
                                        first_row=first_row))
            first_row += rows
    return out


def _target_params(module: str, targets: list[str], shape_of) -> list[str]:
    """Leaf names of ``module``'s parameters that a target_parameters entry names (PEFT matches a suffix)."""
    found = []
    for target in targets:
        leaf = target.rpartition(".")[2]
        full = f"{module}.{leaf}"
        if (full == target or full.endswith(f".{target}")) and shape_of(full) is not None and leaf not in found:
            found.append(leaf)
    return found


def _fits(files: AdapterFiles, kinds: dict[str, str], shape: tuple[int, ...] | None) -> bool:
    if shape is None or len(shape) not in (2, 3) or "lora_A" not in kinds or "lora_B" not in kinds:
        return False
    (rows_a, cols_a), (rows_b, _) = files.checkpoint.shape(kinds["lora_A"]), files.checkpoint.shape(kinds["lora_B"])
    experts, d1, d2 = shape if len(shape) == 3 else (1, *shape)
    return rows_a % experts == 0 and {cols_a, rows_b} == {d1, d2} and (cols_a, rows_b) in ((d1, d2), (d2, d1))


def _module(files: AdapterFiles, module: str, group: str, kinds: dict[str, str], param: str, shape_of,
            model_type: str) -> LoraParamModule:
    keys, _ = lora_factor_keys(files, group, kinds)
    shape = shape_of(f"{module}.{param}")
    assert shape is not None
    a_shape, b_shape = files.checkpoint.shape(keys["A"]), files.checkpoint.shape(keys["B"])
    experts = shape[0] if len(shape) == 3 else 1
    rank = a_shape[0] // experts
    in_features, out_features = a_shape[1], b_shape[0]
    if experts == 1:
        input_major = False
    elif in_features != out_features:
        input_major = (shape[1], shape[2]) == (in_features, out_features)
    else:  # square experts: the layout is the model class's (transformers' is_transposed)
        input_major = model_type in INPUT_MAJOR_MODEL_TYPES
    # PEFT looks a ParamWrapper's r and alpha up by the parameter's path (rank_pattern / alpha_pattern).
    alpha, scaling = lora_hyper(files, f"{module}.{param}", rank, check_rank=False)
    return LoraParamModule(module=module, target=f"{module}.{param}", keys=keys, out_features=out_features,
                           in_features=in_features, rank=rank, alpha=alpha, scaling=scaling, experts=experts,
                           input_major=input_major)
