"""LoKr (Edalati et al. 2022; LyCORIS): ΔW = scaling · W1 ⊗ W2 (Kronecker product).

W1 (out_l × in_m) and W2 (out_k × in_n) are stored whole (``lokr_w1`` / ``lokr_w2``) or as low-rank
products (``lokr_w1_a @ lokr_w1_b``, ``lokr_w2_a @ lokr_w2_b``); out = out_l·out_k, in = in_m·in_n;
scaling = alpha / r, r and alpha per module from ``rank_pattern`` / ``alpha_pattern``, whichever
factors are stored whole (PEFT ``LoKrLayer.update_layer``, ``get_delta_weight``, ``make_kron``).
Row i of W1 ⊗ W2 is W1[i // out_k] ⊗ W2[i % out_k], so row blocks need no full product.

Example::

    delta = module.delta(tensors, None, transposed=False)
"""

from __future__ import annotations

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
        w2 = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
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


def _factor_shape(files: AdapterFiles, module: str, kinds: dict[str, str],
                  name: str) -> tuple[tuple[int, int], int | None]:
    """(shape of W1 or W2, its rank when stored as a product)."""
    if name in kinds:
        shape = files.checkpoint.shape(kinds[name])
        if len(shape) != 2:
            raise DeltakitError(f"{files.path}: LoKr module {module} has a {len(shape)}-D {name}; "
                                "deltakit applies LoKr to linear layers only")
        return (shape[0], shape[1]), None
    if f"{name}_a" not in kinds or f"{name}_b" not in kinds:
        raise DeltakitError(f"{files.path}: LoKr module {module} has neither {name} nor {name}_a and {name}_b")
    a_shape, b_shape = files.checkpoint.shape(kinds[f"{name}_a"]), files.checkpoint.shape(kinds[f"{name}_b"])
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
        raise DeltakitError(f"{files.path}: LoKr module {module} has {name}_a {a_shape} and {name}_b {b_shape}; "
                            "deltakit applies LoKr to linear layers only")
    return (a_shape[0], b_shape[1]), a_shape[1]


def build(files: AdapterFiles, modules: dict[str, dict[str, str]]) -> list[AdapterModule]:
    built: list[AdapterModule] = []
    for module, kinds in sorted(modules.items()):
        if "lokr_t2" in kinds:
            raise DeltakitError(f"{files.path}: LoKr module {module} is a convolution (CP-decomposed); "
                                "deltakit applies LoKr to linear layers only")
        (out_l, in_m), rank1 = _factor_shape(files, module, kinds, "lokr_w1")
        (out_k, in_n), rank2 = _factor_shape(files, module, kinds, "lokr_w2")
        stored_ranks = {r for r in (rank1, rank2) if r is not None}
        if len(stored_ranks) > 1:
            raise DeltakitError(f"{files.path}: LoKr module {module} stores W1 and W2 as products of ranks "
                                f"{rank1} and {rank2}; PEFT gives both the module's r")
        # Both factors whole: the rank is the configured one (it still sets the scaling, as in PEFT).
        rank = stored_ranks.pop() if stored_ranks else pattern_value(files.config.get("rank_pattern", {}), module,
                                                                      files.config.get("r", PEFT_DEFAULT_R))
        alpha, scaling = lora_hyper(files, module, rank, alpha_key="alpha")
        built.append(LokrModule(module=module, target=f"{module}.weight", keys=dict(kinds),
                                out_features=out_l * out_k, in_features=in_m * in_n,
                                rank=rank, alpha=alpha, scaling=scaling))
    return built
