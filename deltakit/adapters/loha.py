"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): ΔW = scaling · (W1a @ W1b) ⊙ (W2a @ W2b).

W1a, W2a: out × r, W1b, W2b: r × in; scaling = alpha / r, r and alpha per module from
``rank_pattern`` / ``alpha_pattern`` (PEFT ``LoHaLayer.update_layer``, ``get_delta_weight``;
LyCORIS ``loha.py``). Linear layers only (PEFT's conv variants with a CP core are refused).

Example::

    delta = module.delta(tensors, None, transposed=False)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltakit.adapters.base import AdapterModule, Rows
from deltakit.adapters.lora import lora_hyper
from deltakit.errors import DeltakitError
from deltakit.io.peft import AdapterFiles

KINDS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


@dataclass(frozen=True)
class LohaModule(AdapterModule):
    """One LoHa layer."""

    rank: int = 0
    alpha: float = 0.0
    scaling: float = 1.0

    def math_delta(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (tensors[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if rows is not None:
            if transposed:
                w1b, w2b = w1b[:, rows[0]:rows[1]], w2b[:, rows[0]:rows[1]]
            else:
                w1a, w2a = w1a[rows[0]:rows[1]], w2a[rows[0]:rows[1]]
        return (w1a @ w1b) * (w2a @ w2b) * self.scaling


def build(files: AdapterFiles, modules: dict[str, dict[str, str]]) -> list[AdapterModule]:
    built: list[AdapterModule] = []
    for module, kinds in sorted(modules.items()):
        if "hada_t1" in kinds or "hada_t2" in kinds:
            raise DeltakitError(f"{files.path}: LoHa module {module} is a convolution (CP-decomposed); "
                                "deltakit applies LoHa to linear layers only")
        missing = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} - set(kinds)
        if missing:
            raise DeltakitError(f"{files.path}: LoHa module {module} lacks {', '.join(sorted(missing))}")
        shapes = {k: files.checkpoint.shape(kinds[k]) for k in kinds}
        (out1, rank), (rank_b, in1) = shapes["hada_w1_a"], shapes["hada_w1_b"]
        if shapes["hada_w2_a"] != (out1, rank) or shapes["hada_w2_b"] != (rank_b, in1) or rank != rank_b:
            raise DeltakitError(f"{files.path}: LoHa module {module} has factors of shapes "
                                f"{[tuple(s) for s in shapes.values()]}, which do not make one update")
        alpha, scaling = lora_hyper(files, module, rank, alpha_key="alpha")
        built.append(LohaModule(module=module, target=f"{module}.weight", keys=dict(kinds), out_features=out1,
                                in_features=in1, rank=rank, alpha=alpha, scaling=scaling))
    return built
