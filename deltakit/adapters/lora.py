"""LoRA (Hu et al. 2021): ΔW = scaling · B @ A, A: r × in, B: out × r.

scaling = lora_alpha / r, or lora_alpha / √r with ``use_rslora`` (Kalajdzievski 2023), with r and
alpha per module from ``rank_pattern`` / ``alpha_pattern`` (PEFT ``LoraLayer.update_layer``). For
an nn.Embedding PEFT stores A as r × vocab and B as dim × r under ``lora_embedding_A`` /
``lora_embedding_B``; the weight is vocab × dim, so ΔW is stored transposed (PEFT
``Embedding.get_delta_weight``). On a convolution A is itself a convolution with the layer's
kernel, (r, in, *kernel), and B a 1×1 one, (out, r, 1, ...): ΔW is B @ A of their matrices,
(out, in·∏kernel) (PEFT ``_ConvNd.get_delta_weight``; kohya's LoCon stores the same factors as
``lora_down`` / ``lora_up``, LyCORIS's Tucker LoCon a core ``mid`` between them: :func:`factor_matrices`);
PEFT cannot merge a grouped convolution (B is then (out, r/groups, 1, ...)), and neither does deltakit.
DoRA and LoRA on parameters build on this module
(:mod:`deltakit.adapters.dora`, :mod:`deltakit.adapters.lora_params`).

Example::

    module = adapter.modules["model.layers.0.self_attn.q_proj.weight"]
    lora_a, lora_b = adapter.factors(module)      # ΔW = module.scaling · B @ A
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from deltakit.adapters.base import AdapterModule, BaseInfo, Rows
from deltakit.errors import DeltakitError
from deltakit.io.peft import AdapterFiles, lora_scaling, pattern_value

KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
PEFT_DEFAULT_R = 8  # LoraConfig, LoHaConfig and LoKrConfig: r = 8, lora_alpha / alpha = 8
PEFT_DEFAULT_ALPHA = 8

BIAS = "lora_B.bias"  # lora_bias: lora_B's own bias b, merged into the layer's bias as scaling · b

# Config switches that change the math in ways deltakit does not apply; refused rather than mis-applied.
UNSUPPORTED_SWITCHES = {
    "use_qalora": "QA-LoRA (use_qalora)",
    "layer_replication": "layer replication",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which changes activations after a "
                               "token sequence rather than weights",
}


@dataclass(frozen=True)
class LoraModule(AdapterModule):
    """One LoRA layer: where its factors are stored and how they scale."""

    rank: int = 0
    alpha: float = 0.0
    scaling: float = 1.0

    @property
    def a_key(self) -> str:
        return self.keys["A"]

    @property
    def b_key(self) -> str:
        return self.keys["B"]

    @property
    def weight_name(self) -> str:
        return self.target

    def math_delta(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows) -> torch.Tensor:
        lora_a, lora_b = factor_matrices(tensors["A"], tensors["B"], tensors.get("mid"))
        lora_a = lora_a.to(lora_b.dtype)
        if rows is not None:  # rows of B·A are rows of B; columns of B·A are columns of A
            lora_a, lora_b = (lora_a[:, rows[0]:rows[1]], lora_b) if transposed else (lora_a, lora_b[rows[0]:rows[1]])
        return (lora_b @ lora_a) * self.scaling


@dataclass(frozen=True)
class LoraBiasModule(AdapterModule):
    """PEFT's ``lora_bias``: lora_B carries a bias b, and merging adds scaling · b to the layer's bias
    (PEFT ``Linear.merge``, ``_ConvNd.merge``); ``out_features`` is its length."""

    scaling: float = 1.0

    def stored_shape(self, transposed: bool) -> tuple[int, ...]:
        return (self.out_features,)

    def delta(self, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, transposed: bool,
              rows: Rows = None) -> torch.Tensor:
        dtype = base.dtype if base is not None else torch.float32
        bias = tensors["b"].to(base.device if base is not None else tensors["b"].device, dtype) * self.scaling
        return bias if rows is None else bias[rows[0]:rows[1]]


def layer_weight(module: str, base: BaseInfo) -> str:
    """The tensor the LoRA layer at ``module`` changes: ``<module>.weight``, or an nn.MultiheadAttention's
    fused q/k/v projection ``in_proj_weight`` (PEFT ``lora.MultiheadAttention``, which saves the LoRA of
    the attention's ``out_proj`` under ``<module>.base_layer.out_proj``: that one changes ``out_proj.weight``)."""
    layer = module.replace(".base_layer.", ".")
    if base.shape(f"{layer}.weight") is None and base.shape(f"{layer}.in_proj_weight") is not None:
        return f"{layer}.in_proj_weight"
    return f"{layer}.weight"


# PEFT's lora.MultiheadAttention adds its out_proj's ΔW once by hand and once more through the
# out_proj layer's own merge, in merge() and so in every forward pass: the model an adapter was
# trained as, and PEFT's merge_and_unload, carry 2·ΔW there (peft#3774, open for PEFT ≤ 0.21).
MHA_OUT_PROJ_FACTOR = 2.0


def attention_out_projection(module: str, base: BaseInfo) -> bool:
    """Whether ``module`` is the LoRA PEFT puts on an nn.MultiheadAttention's out_proj (``<mha>.base_layer.out_proj``)."""
    parent, found, leaf = module.rpartition(".base_layer.")
    return bool(found) and leaf == "out_proj" and base.shape(f"{parent}.in_proj_weight") is not None


def bias_modules(files: AdapterFiles, modules: dict[str, dict[str, str]], built: list[AdapterModule]
                 ) -> list[AdapterModule]:
    """The ``lora_bias`` of every LoRA module that has one, on its layer's bias."""
    out: list[AdapterModule] = []
    for module in built:
        key = modules[module.module].get(BIAS)
        if key is None:
            continue
        shape = tuple(files.checkpoint.shape(key))
        if shape != (module.out_features,):
            raise DeltakitError(f"{files.path}: module {module.module}'s lora_B bias has shape {shape}, expected "
                                f"({module.out_features},)")
        out.append(LoraBiasModule(module=module.module, target=f"{module.target.rpartition('.')[0]}.bias",
                                  keys={"b": key}, out_features=module.out_features, in_features=1,
                                  scaling=getattr(module, "scaling", 1.0)))
    return out


def factors_multiply(a_shape: Sequence[int], b_shape: Sequence[int]) -> bool:
    """Whether A (r, in) and B (out, r), or a convolution's A (r, in, *kernel) and B (out, r, 1, ...), make B @ A
    (PEFT's lora_A / lora_B, kohya's lora_down / lora_up)."""
    return (len(a_shape) >= 2 and len(b_shape) == len(a_shape) and a_shape[0] == b_shape[1]
            and set(b_shape[2:]) <= {1})


def factor_matrices(lora_a: torch.Tensor, lora_b: torch.Tensor,
                    mid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as the matrices B @ A multiplies: a convolution's factors (r, in, *kernel) and (out, r, 1, ...)
    as r × (in·∏kernel) and out × r; a matrix as it is.

    ``mid`` is the Tucker core (r, r, *kernel) of LyCORIS's LoCon with ``use_tucker`` (``lora_mid``; A is
    then a 1×1 convolution (r, in, 1, ...)): ΔW[p, q, k] = Σ_ij mid[i, j, k]·up[p, i]·down[j, q]
    (``lycoris.functional.general.rebuild_tucker``), so B @ A with A[i, q, k] = Σ_j mid[i, j, k]·down[j, q],
    formed in at least fp32.
    """
    if mid is not None:
        dtype = torch.promote_types(mid.dtype, torch.float32)
        lora_a = torch.einsum("ij...,jq->iq...", mid.to(dtype), lora_a.reshape(lora_a.shape[0], -1).to(dtype))
    return lora_a.reshape(lora_a.shape[0], -1), lora_b.reshape(lora_b.shape[0], -1)


def check_switches(files: AdapterFiles, switches: dict[str, str]) -> None:
    for switch, label in switches.items():
        if files.config.get(switch):
            raise DeltakitError(f"{files.path}: {label} is not supported")


def lora_factor_keys(files: AdapterFiles, module: str, kinds: dict[str, str]) -> tuple[dict[str, str], bool]:
    """{"A": key, "B": key} of a module and whether it is an embedding LoRA; refuse half a pair."""
    embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
    a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if a_kind not in kinds or b_kind not in kinds:
        raise DeltakitError(f"{files.path}: module {module} has only one of its LoRA factors")
    a_shape, b_shape = files.checkpoint.shape(kinds[a_kind]), files.checkpoint.shape(kinds[b_kind])
    convolution = 3 <= len(a_shape) <= 5 and len(b_shape) == len(a_shape) and set(b_shape[2:]) == {1}
    if convolution and b_shape[1] < a_shape[0] and b_shape[1] and a_shape[0] % b_shape[1] == 0:
        raise DeltakitError(f"{files.path}: module {module} is a LoRA on a convolution with groups="
                            f"{a_shape[0] // b_shape[1]} (A {tuple(a_shape)}, B {tuple(b_shape)}); PEFT cannot merge "
                            "an adapter into a grouped convolution, and deltakit refuses it too")
    if len(a_shape) > 5 or not factors_multiply(a_shape, b_shape):
        raise DeltakitError(f"{files.path}: module {module} has factors of shapes {a_shape} and {b_shape}, "
                            "which do not multiply")
    return {"A": kinds[a_kind], "B": kinds[b_kind]}, embedding


def lora_hyper(files: AdapterFiles, module: str, rank: int, r_key: str = "r", alpha_key: str = "lora_alpha",
               check_rank: bool = True) -> tuple[float, float]:
    """(alpha, scaling) of one module from the config's r / alpha and their per-module patterns.

    ``rank`` is the factors' rank: 0 is refused (PEFT refuses r <= 0), and with ``check_rank``
    so is a rank the config does not declare for the module. Absent keys take PEFT's defaults
    (r = alpha = 8); the config's types were checked when it was read (deltakit.io.json_files).
    """
    if rank <= 0:
        raise DeltakitError(f"{files.path}: module {module} has factors of rank {rank}; PEFT refuses r <= 0")
    config = files.config
    declared = pattern_value(config.get("rank_pattern", {}), module, config.get(r_key, PEFT_DEFAULT_R))
    if check_rank and declared != rank:
        raise DeltakitError(f"{files.path}: module {module} has rank {rank} but the config says r={declared}")
    alpha = float(pattern_value(config.get("alpha_pattern", {}), module, config.get(alpha_key, PEFT_DEFAULT_ALPHA)))
    return alpha, lora_scaling(alpha, rank, bool(config.get("use_rslora", False)))


def lora_module_fields(files: AdapterFiles, module: str, kinds: dict[str, str]) -> dict[str, Any]:
    """The LoraModule fields of one module (shared by LoRA and DoRA)."""
    keys, embedding = lora_factor_keys(files, module, kinds)
    a_shape, b_shape = files.checkpoint.shape(keys["A"]), files.checkpoint.shape(keys["B"])
    rank = a_shape[0]
    alpha, scaling = lora_hyper(files, module, rank)
    return dict(module=module, target=f"{module}.weight", keys=keys, out_features=b_shape[0],
                in_features=math.prod(a_shape[1:]), kernel=tuple(a_shape[2:]),
                embedding=embedding, rank=rank, alpha=alpha, scaling=scaling,
                fan_in_fan_out=bool(files.config.get("fan_in_fan_out", False)) and not embedding)


def build(files: AdapterFiles, modules: dict[str, dict[str, str]]) -> list[AdapterModule]:
    """Plain LoRA modules of an adapter (DoRA and LoRA on parameters are dispatched by the registry)."""
    check_switches(files, UNSUPPORTED_SWITCHES)
    return [LoraModule(**lora_module_fields(files, module, kinds)) for module, kinds in sorted(modules.items())]
