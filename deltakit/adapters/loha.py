"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): ΔW = scaling · (W1a @ W1b) ⊙ (W2a @ W2b).

W1a, W2a: out × r, W1b, W2b: r × in; scaling = alpha / r, r and alpha per module from
``rank_pattern`` / ``alpha_pattern`` (PEFT ``LoHaLayer.update_layer``, ``get_delta_weight``;
LyCORIS ``loha.py``). On a convolution ``in`` is in·∏kernel (the (out, in·∏kernel) matrix), or,
with ``use_effective_conv2d``, each Hadamard factor is a CP (Tucker-2) product of a core
T (r × r × k1 × k2; a Conv1d's k × 1) with W_a (r × out) and W_b (r × in):
ΔW[p, q, k, l] = scaling · Π_i Σ T_i[a, b, k, l] W_ib[b, q] W_ia[a, p] (PEFT ``make_weight_cp``),
read as its (out, in·∏kernel) matrix.

Example::

    delta = module.delta(tensors, None, transposed=False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltakit.adapters.base import AdapterModule, Rows
from deltakit.adapters.lora import lora_hyper
from deltakit.errors import DeltakitError
from deltakit.io.peft import AdapterFiles

KINDS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass(frozen=True)
class LohaModule(AdapterModule):
    """One LoHa layer (``cp``: its factors are CP products with cores hada_t1 / hada_t2)."""

    rank: int = 0
    alpha: float = 0.0
    scaling: float = 1.0
    cp: bool = False

    def math_delta(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (tensors[k] for k in FACTORS)
        if self.cp:  # W_a is r × out: its columns are the output rows
            if rows is not None:
                w1a, w2a = w1a[:, rows[0]:rows[1]], w2a[:, rows[0]:rows[1]]
            first = torch.einsum("ij...,jr,ip->pr...", tensors["hada_t1"], w1b, w1a)
            second = torch.einsum("ij...,jr,ip->pr...", tensors["hada_t2"], w2b, w2a)
            return (first * second * self.scaling).reshape(first.shape[0], -1)
        if rows is not None:
            if transposed:
                w1b, w2b = w1b[:, rows[0]:rows[1]], w2b[:, rows[0]:rows[1]]
            else:
                w1a, w2a = w1a[rows[0]:rows[1]], w2a[rows[0]:rows[1]]
        return (w1a @ w1b) * (w2a @ w2b) * self.scaling


def build(files: AdapterFiles, modules: dict[str, dict[str, str]]) -> list[AdapterModule]:
    built: list[AdapterModule] = []
    for module, kinds in sorted(modules.items()):
        missing = set(FACTORS) - set(kinds)
        cp = "hada_t1" in kinds or "hada_t2" in kinds
        if cp:
            missing |= {"hada_t1", "hada_t2"} - set(kinds)
        if missing:
            raise DeltakitError(f"{files.path}: LoHa module {module} lacks {', '.join(sorted(missing))}")
        shapes = {k: tuple(files.checkpoint.shape(kinds[k])) for k in kinds}
        described = [tuple(s) for s in shapes.values()]
        if cp:
            (rank, out1), (rank_b, in1), core = shapes["hada_w1_a"], shapes["hada_w1_b"], shapes["hada_t1"]
            fits = (len(core) == 4 and core[:2] == (rank, rank) and shapes["hada_t2"] == core
                    and shapes["hada_w2_a"] == (rank, out1) and shapes["hada_w2_b"] == (rank_b, in1))
            in_features = in1 * math.prod(core[2:])
        else:
            (out1, rank), (rank_b, in1) = shapes["hada_w1_a"], shapes["hada_w1_b"]
            fits = shapes["hada_w2_a"] == (out1, rank) and shapes["hada_w2_b"] == (rank_b, in1)
            in_features = in1
        if not fits or rank != rank_b:
            raise DeltakitError(f"{files.path}: LoHa module {module} has factors of shapes {described}, "
                                "which do not make one update")
        alpha, scaling = lora_hyper(files, module, rank, alpha_key="alpha")
        built.append(LohaModule(module=module, target=f"{module}.weight", keys=dict(kinds), out_features=out1,
                                in_features=in_features, rank=rank, alpha=alpha, scaling=scaling, cp=cp))
    return built
