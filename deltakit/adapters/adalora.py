"""AdaLoRA (Zhang et al. 2023): SVD-shaped LoRA, ΔW = scaling · B @ (A ⊙ E) / (ranknum + 1e-5).

A: r × in, E: r × 1 (the singular values), B: out × r; scaling = lora_alpha (or init_r when
lora_alpha is 0) and ranknum = init_r, the rank every module started with: PEFT keeps it when
``rank_pattern`` cuts a module's stored factors down to its allocated rank (PEFT
``AdaLoraLayer.update_layer``, ``AdaLoraModel.resize_modules_by_rank_pattern``,
``SVDLinear.get_delta_weight``; the 1e-5 is PEFT's).

Example::

    delta = module.delta(tensors, None, transposed=False)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltakit.adapters.base import AdapterModule, Rows
from deltakit.adapters.lora import PEFT_DEFAULT_ALPHA
from deltakit.errors import DeltakitError
from deltakit.io.peft import AdapterFiles

KINDS = ("lora_A", "lora_B", "lora_E")
RANKNUM_EPS = 1e-5  # PEFT adds it to ranknum
PEFT_DEFAULT_INIT_R = 12  # AdaLoraConfig


@dataclass(frozen=True)
class AdaloraModule(AdapterModule):
    """One AdaLoRA layer."""

    rank: int = 0  # rank as stored (after rank_pattern)
    init_r: int = 0
    scaling: float = 1.0

    def math_delta(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows) -> torch.Tensor:
        lora_a, lora_b = tensors["A"] * tensors["E"], tensors["B"]
        if rows is not None:
            lora_a, lora_b = (lora_a[:, rows[0]:rows[1]], lora_b) if transposed else (lora_a, lora_b[rows[0]:rows[1]])
        return (lora_b @ lora_a) * self.scaling / (self.init_r + RANKNUM_EPS)


def build(files: AdapterFiles, modules: dict[str, dict[str, str]]) -> list[AdapterModule]:
    config = files.config
    init_r = config.get("init_r", PEFT_DEFAULT_INIT_R)
    alpha = float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    scaling = alpha if alpha > 0 else float(init_r)
    built: list[AdapterModule] = []
    for module, kinds in sorted(modules.items()):
        missing = ", ".join(sorted(set(KINDS) - set(kinds)))
        if missing:
            raise DeltakitError(f"{files.path}: AdaLoRA module {module} lacks {missing}")
        a_shape, b_shape, e_shape = (files.checkpoint.shape(kinds[k]) for k in KINDS)
        matrices = len(a_shape) == len(b_shape) == 2 and tuple(e_shape[1:]) == (1,)  # E is (r, 1)
        if not matrices or not a_shape[0] == b_shape[1] == e_shape[0]:
            raise DeltakitError(f"{files.path}: AdaLoRA module {module} has A {a_shape}, B {b_shape}, E {e_shape}, "
                                "which do not multiply")
        if a_shape[0] > init_r:  # PEFT's budget only cuts a module's rank down from init_r
            raise DeltakitError(f"{files.path}: AdaLoRA module {module} has rank {a_shape[0]} but the config says "
                                f"init_r={init_r}")
        built.append(AdaloraModule(
            module=module, target=f"{module}.weight", keys={"A": kinds["lora_A"], "B": kinds["lora_B"],
                                                            "E": kinds["lora_E"]},
            out_features=b_shape[0], in_features=a_shape[1], rank=a_shape[0], init_r=init_r, scaling=scaling,
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False))))
    return built
