"""LoKr (Edalati et al. 2022; LyCORIS): ΔW = scaling · W1 ⊗ W2 (Kronecker product).

W1 (out_l × in_m) is stored whole (``lokr_w1``) or as a low-rank product (``lokr_w1_a @ lokr_w1_b``).
W2 (out_k × in_n) likewise, and on a convolution it is (out_k, in_n, *kernel) whole, a product
(out_k × r)(r × in_n·∏kernel), or with ``use_effective_conv2d`` a CP product of a core
``lokr_t2`` (r × r × k1 × k2) with ``lokr_w2_a`` (r × out_k) and ``lokr_w2_b`` (r × in_n).
out = out_l·out_k, in = in_m·in_n(·∏kernel); scaling = alpha / r, r and alpha per module from
``rank_pattern`` / ``alpha_pattern``, whichever factors are stored whole (PEFT
``LoKrLayer.update_layer``, ``get_delta_weight``, ``make_kron``, ``make_weight_cp``).

The product is PEFT's, read as the (out, in·∏kernel) matrix: for a 4-D W2, W1 is given two unit
dimensions, and W1 ⊗ W2's matrix is W1 ⊗ (W2's matrix); a Conv1d's whole 3-D W2 is multiplied as
``torch.kron`` does (W1 taken as 1 × out_l × in_m) and reshaped to the weight, as PEFT merges it.
Row i of W1 ⊗ W2 is W1[i // out_k] ⊗ W2[i % out_k], so row blocks need no full product.

Example::

    delta = module.delta(tensors, None, transposed=False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltakit.adapters.base import AdapterModule, Rows
from deltakit.adapters.lora import PEFT_DEFAULT_R, lora_hyper
from deltakit.errors import DeltakitError
from deltakit.io.peft import AdapterFiles, pattern_value

KINDS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass(frozen=True)
class LokrModule(AdapterModule):
    """One LoKr layer."""

    rank: int = 0
    alpha: float = 0.0
    scaling: float = 1.0

    def math_delta(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows) -> torch.Tensor:
        w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
        w2 = _second_factor(tensors)
        if w2.dim() == 3:  # PEFT's kron of a matrix with a Conv1d's whole 3-D W2, reshaped to the weight
            full = torch.kron(w1, w2).reshape(self.out_features, -1) * self.scaling
            return full if rows is None else full[rows[0]:rows[1]]
        w2 = w2.reshape(w2.shape[0], -1)  # a 4-D W2's matrix: W1 ⊗ W2 read as (out, in·∏kernel)
        if rows is None:
            return torch.kron(w1, w2) * self.scaling
        if transposed:  # columns of W1 ⊗ W2 are rows of W1ᵀ ⊗ W2ᵀ
            return self._rows(w1.T, w2.T, rows).T * self.scaling
        return self._rows(w1, w2, rows) * self.scaling

    @staticmethod
    def _rows(w1: torch.Tensor, w2: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
        index = torch.arange(rows[0], rows[1], device=w1.device)
        left, right = w1[index // w2.shape[0]], w2[index % w2.shape[0]]  # (n, in_m), (n, in_n)
        return (left.unsqueeze(2) * right.unsqueeze(1)).reshape(len(index), -1)


def _second_factor(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """W2: whole, a CP product (PEFT ``make_weight_cp``: (out_k, in_n, k1, k2)), or a matrix product."""
    if "lokr_w2" in tensors:
        return tensors["lokr_w2"]
    if "lokr_t2" in tensors:
        return torch.einsum("ij...,ip,jr->pr...", tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"])
    w2b = tensors["lokr_w2_b"]  # LyCORIS may store a convolution's as (r, in_n, *kernel): its matrix
    return tensors["lokr_w2_a"] @ w2b.reshape(w2b.shape[0], -1)


def _factor_shape(files: AdapterFiles, module: str, kinds: dict[str, str],
                  name: str) -> tuple[tuple[int, ...], int | None]:
    """(shape of W1 or W2 as PEFT forms it, its rank when stored as a product)."""
    def shape(kind: str) -> tuple[int, ...]:
        return tuple(files.checkpoint.shape(kinds[kind]))

    if name in kinds:
        whole = shape(name)
        if not 2 <= len(whole) <= (2 if name == "lokr_w1" else 4):
            raise DeltakitError(f"{files.path}: LoKr module {module} has a {len(whole)}-D {name}")
        return whole, None
    if f"{name}_a" not in kinds or f"{name}_b" not in kinds:
        raise DeltakitError(f"{files.path}: LoKr module {module} has neither {name} nor {name}_a and {name}_b")
    a_shape, b_shape = shape(f"{name}_a"), shape(f"{name}_b")
    if name == "lokr_w2" and "lokr_t2" in kinds:  # the CP core's r × r × k1 × k2, W_a r × out_k, W_b r × in_n
        core = shape("lokr_t2")
        if len(core) != 4 or core[0] != core[1] or len(a_shape) != 2 or len(b_shape) != 2 or \
                a_shape[0] != core[0] or b_shape[0] != core[0]:
            raise DeltakitError(f"{files.path}: LoKr module {module} has lokr_t2 {core}, {name}_a {a_shape} and "
                                f"{name}_b {b_shape}, which do not make one factor")
        return (a_shape[1], b_shape[1], *core[2:]), core[0]
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
        raise DeltakitError(f"{files.path}: LoKr module {module} has {name}_a {a_shape} and {name}_b {b_shape}, "
                            "which do not multiply")
    return (a_shape[0], b_shape[1]), a_shape[1]


def build(files: AdapterFiles, modules: dict[str, dict[str, str]]) -> list[AdapterModule]:
    built: list[AdapterModule] = []
    for module, kinds in sorted(modules.items()):
        (out_l, in_m), rank1 = _factor_shape(files, module, kinds, "lokr_w1")
        second, rank2 = _factor_shape(files, module, kinds, "lokr_w2")
        stored_ranks = {r for r in (rank1, rank2) if r is not None}
        if len(stored_ranks) > 1:
            raise DeltakitError(f"{files.path}: LoKr module {module} stores W1 and W2 as products of ranks "
                                f"{rank1} and {rank2}; PEFT gives both the module's r")
        # Both factors whole: the rank is the configured one (it still sets the scaling, as in PEFT).
        rank = stored_ranks.pop() if stored_ranks else pattern_value(files.config.get("rank_pattern", {}), module,
                                                                      files.config.get("r", PEFT_DEFAULT_R))
        alpha, scaling = lora_hyper(files, module, rank, alpha_key="alpha")
        built.append(LokrModule(module=module, target=f"{module}.weight", keys=dict(kinds),
                                out_features=out_l * second[0], in_features=in_m * math.prod(second[1:]),
                                rank=rank, alpha=alpha, scaling=scaling))
    return built
