"""LoRA on a fused expert parameter of a model whose checkpoint keeps one tensor per expert.

transformers 5 builds MoE experts as fused parameters (``mlp.experts.gate_up_proj`` E × 2I × H,
``mlp.experts.down_proj`` E × H × I, each expert's slice stored (out, in)) and converts the per-expert
tensors of a checkpoint on load, and back on save (``transformers.conversion_mapping``): Mixtral's
``block_sparse_moe.experts.<e>.w1 / w3 / w2`` (``mlp.experts.<e>...`` for its derivatives), Qwen2-MoE's
and its family's ``mlp.experts.<e>.gate_proj / up_proj / down_proj``; gate_up_proj is gate over up
(``Concatenate(dim=1)``). A PEFT ``target_parameters`` adapter names the fused parameter, so each of
its experts' ΔW_e = scaling · B_e @ A_e (:mod:`deltakit.adapters.lora_params`) is cut into the rows
of the per-expert tensors it covers, each of which becomes a module of its own.

Example::

    layout = per_expert_layout("model.layers.0.mlp.experts", "gate_up_proj", base)
    layout[3]      # [("model.layers.0.block_sparse_moe.experts.3.w1.weight", 24), (... w3.weight, 24)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from deltakit.adapters.base import AdapterModule, BaseInfo, Rows

# fused parameter -> the per-expert leaf names it is saved as, in row order, per naming family
PER_EXPERT: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
    "down_proj": (("w2",), ("down_proj",)),
}

Layout = list[list[tuple[str, int]]]  # per expert: (stored tensor, its rows), in the fused parameter's row order


def per_expert_layout(module: str, param: str, base: BaseInfo) -> Layout | None:
    """How the base stores the fused ``module``.``param`` expert by expert, or None if it does not."""
    if param not in PER_EXPERT or not module.endswith(".experts"):
        return None
    parent = module[: -len(".experts")]
    roots = [module]
    if parent.endswith(".mlp"):  # Mixtral's checkpoint name for the block (transformers renames it .mlp.)
        roots.append(f"{parent[: -len('.mlp')]}.block_sparse_moe.experts")
    for root in roots:
        for leaves in PER_EXPERT[param]:
            layout: Layout = []
            while True:
                shapes = [base.shape(f"{root}.{len(layout)}.{leaf}.weight") for leaf in leaves]
                if any(shape is None or len(shape) != 2 for shape in shapes):
                    break
                layout.append([(f"{root}.{len(layout)}.{leaf}.weight", shape[0])  # type: ignore[index]
                               for leaf, shape in zip(leaves, shapes)])
            if layout:
                return layout
    return None


def fused_shape(layout: Layout, base: BaseInfo) -> tuple[int, int, int]:
    """The fused parameter's shape (E, Σ rows, in) the per-expert tensors make."""
    columns = base.shape(layout[0][0][0])[1]  # type: ignore[index]
    return (len(layout), sum(rows for _, rows in layout[0]), columns)


@dataclass(frozen=True)
class ExpertRowsModule(AdapterModule):
    """Rows ``first_row`` : ``first_row + out_features`` of expert ``expert``'s ΔW from LoRA factors of a fused
    parameter (A: (r·E) × in, B: out × (r·E), PEFT ``ParamWrapper``), stored (out, in)."""

    rank: int = 0
    alpha: float = 0.0
    scaling: float = 1.0
    experts: int = 1
    expert: int = 0
    first_row: int = 0

    own_layout: ClassVar[bool] = True

    def math_delta(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows) -> torch.Tensor:
        lora_a = tensors["A"].reshape(self.experts, self.rank, -1)[self.expert]  # (r, in)
        lora_b = tensors["B"].reshape(tensors["B"].shape[0], self.rank, self.experts)[:, :, self.expert]  # (out, r)
        start, stop = (self.first_row, self.first_row + self.out_features) if rows is None else (
            self.first_row + rows[0], self.first_row + rows[1])
        return (lora_b[start:stop] @ lora_a) * self.scaling
