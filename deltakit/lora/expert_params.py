"""Writing LoRA on fused expert parameters in PEFT's layout (``target_parameters``, ``lora.ParamWrapper``).

PEFT's ParamWrapper on a 3-D parameter (E experts) holds one A of shape (E·r, in) and one B of
shape (out, E·r), and expert e's update is ΔW_e = scaling · B_e @ A_e with

    A_e = A.reshape(E, r, in)[e]        (r × in)
    B_e = B.reshape(out, r, E)[:, :, e] (out × r)

(``ParamWrapper.get_delta_weight``; :mod:`deltakit.adapters.lora_params` reads it back). The
experts' factors are disjoint slices, so a rank-r ParamWrapper represents *any* set of
per-expert changes of rank ≤ r each, exactly: the best fit in PEFT's layout is each expert's
own truncated SVD, and an expert of lower rank (or unchanged) fills its slices with zeros.
Only r is shared by the experts of one parameter (the largest expert rank), so the file holds
E · r · (in + out) numbers where the experts' ranks need Σ_e r_e · (in + out).

Several parameters of one module (gpt-oss ``mlp.experts.gate_up_proj`` and ``down_proj``)
nest wrappers in the order the model class defines its parameters, the first one innermost;
the file keys of a wrapper with k wrappers around it carry ``.base_layer`` k times. The files
do not record that order; transformers' experts classes define the input projections first
(gate_up / gate / up) and the output projection (down) last, which :func:`nesting_order`
follows.

Example::

    keys = parameter_keys(["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"])
    a, b = stack_factors({2: (a_2, b_2)}, experts=4, rank=2)    # A (8, in), B (out, 8)
"""

from __future__ import annotations

from typing import Any

import torch

from deltakit.io.peft import PEFT_PREFIX
from deltakit.pairing import module_type

# transformers' experts classes define their input projections before the output projection.
DEFINITION_ORDER = ("experts.gate_up", "experts.gate", "experts.up", "experts.down")


def nesting_order(parameters: list[str]) -> list[str]:
    """The parameters of one module, innermost ParamWrapper first (the model class's definition order)."""
    def position(name: str) -> tuple[int, str]:
        kind = module_type(name)
        return (DEFINITION_ORDER.index(kind) if kind in DEFINITION_ORDER else len(DEFINITION_ORDER), name)
    return sorted(parameters, key=position)


def parameter_keys(parameters: list[str]) -> dict[str, tuple[str, str]]:
    """PEFT file keys (A, B) of each parameter path, with the ``.base_layer`` levels of nested wrappers."""
    by_module: dict[str, list[str]] = {}
    for parameter in parameters:
        by_module.setdefault(parameter.rpartition(".")[0], []).append(parameter)
    keys: dict[str, tuple[str, str]] = {}
    for module, members in by_module.items():
        ordered = nesting_order(members)
        for depth, parameter in enumerate(ordered):
            path = module + ".base_layer" * (len(ordered) - 1 - depth)
            keys[parameter] = (f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight")
    return keys


def stack_factors(factors: dict[int, tuple[torch.Tensor, torch.Tensor]], experts: int,
                  rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (A, B) of one 3-D parameter from per-expert factors {e: (A_e (r_e × in), B_e (out × r_e))}.

    A is (experts·rank, in) and B is (out, rank·experts); experts not in ``factors`` and the rows
    beyond each r_e are zero. Needs at least one expert's factors (for the shapes and dtype).
    """
    first_a, first_b = next(iter(factors.values()))
    lora_a = first_a.new_zeros((experts, rank, first_a.shape[1]))
    lora_b = first_b.new_zeros((first_b.shape[0], rank, experts))
    for expert, (a_e, b_e) in factors.items():
        lora_a[expert, : a_e.shape[0]] = a_e
        lora_b[:, : b_e.shape[1], expert] = b_e
    return lora_a.reshape(experts * rank, -1), lora_b.reshape(lora_b.shape[0], rank * experts)


def with_target_parameters(config: dict[str, Any], modules: dict[str, int], parameters: dict[str, int]) -> dict[str, Any]:
    """A LoRA config made by :func:`deltakit.io.peft.adapter_config` over ``modules`` and ``parameters``
    together, with the parameters moved from ``target_modules`` to ``target_parameters``.

    PEFT looks a ParamWrapper's rank and alpha up in rank_pattern / alpha_pattern by the full
    parameter path, so the escaped parameter paths there already say what they should.
    """
    if not parameters:
        return config
    config = dict(config)
    config["target_modules"] = sorted(modules)
    config["target_parameters"] = sorted(parameters)
    return config
