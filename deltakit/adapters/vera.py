"""VeRA (Kopiczko et al. 2024): ΔW = (λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in]).

A (r × in_max) and B (out_max × r) are random projections shared by every layer, saved once in
the adapter as ``base_model.vera_A`` / ``base_model.vera_B`` (``save_projection``, PEFT's default);
each layer trains λ_d (r) and λ_b (out) (PEFT ``vera.Linear.get_delta_weight``). There is no
alpha / r scaling. An adapter saved without its projections is refused: regenerating them from
``projection_prng_key`` would tie deltakit to PEFT's initialiser.

Example::

    delta = module.delta(tensors, None, transposed=False)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltakit.adapters.base import AdapterModule, BaseInfo, Rows
from deltakit.errors import DeltakitError
from deltakit.io.peft import AdapterFiles

KINDS = ("vera_lambda_b", "vera_lambda_d")
SHARED = ("vera_A", "vera_B")
PEFT_DEFAULT_R = 256  # VeraConfig


@dataclass(frozen=True)
class VeraModule(AdapterModule):
    """One VeRA layer; its keys include the shared projections."""

    rank: int = 0

    def math_delta(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows) -> torch.Tensor:
        lambda_b, lambda_d = tensors["vera_lambda_b"].reshape(-1, 1), tensors["vera_lambda_d"].reshape(-1, 1)
        left = lambda_b * tensors["vera_A_B"][: self.out_features]  # (out, r)
        right = lambda_d * tensors["vera_A_A"][:, : self.in_features]  # (r, in)
        if rows is not None:
            left, right = (left, right[:, rows[0]:rows[1]]) if transposed else (left[rows[0]:rows[1]], right)
        return left @ right


def shared_keys(files: AdapterFiles, whole: dict[str, str]) -> dict[str, str]:
    """Pop the shared projections out of the whole tensors: {"vera_A_A": key, "vera_A_B": key}."""
    found: dict[str, str] = {}
    for name in list(whole):
        for kind in SHARED:
            if name == f"base_model.{kind}" or name.startswith(f"base_model.{kind}."):
                found[f"vera_A_{kind[-1]}"] = whole.pop(name)
    if len(found) != 2:
        raise DeltakitError(f"{files.path}: the VeRA adapter was saved without its shared projections "
                            "(save_projection=false); deltakit needs vera_A and vera_B in the file")
    return found


def build(files: AdapterFiles, modules: dict[str, dict[str, str]], base: BaseInfo,
          whole: dict[str, str]) -> list[AdapterModule]:
    shared = shared_keys(files, whole)
    a_shape, b_shape = files.checkpoint.shape(shared["vera_A_A"]), files.checkpoint.shape(shared["vera_A_B"])
    r = files.config.get("r", PEFT_DEFAULT_R)
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
        raise DeltakitError(f"{files.path}: the VeRA projections A {a_shape} and B {b_shape} are not of the "
                            f"config's rank r={r}")
    built: list[AdapterModule] = []
    for module, kinds in sorted(modules.items()):
        missing = ", ".join(sorted(set(KINDS) - set(kinds)))
        if missing:
            raise DeltakitError(f"{files.path}: VeRA module {module} lacks {missing}")
        (out_features,), (rank,) = (files.checkpoint.shape(kinds[k]) for k in KINDS)
        weight = base.shape(f"{module}.weight")
        if weight is None or len(weight) != 2:
            raise DeltakitError(f"{files.path} does not fit the base: VeRA module {module} has no weight matrix there")
        in_features = weight[1] if weight[0] == out_features else weight[0]
        if rank != a_shape[0] or in_features > a_shape[1] or out_features > b_shape[0]:
            raise DeltakitError(f"{files.path}: VeRA module {module} (out {out_features}, in {in_features}, r {rank}) "
                                f"does not fit the shared projections A {a_shape} and B {b_shape}")
        built.append(VeraModule(module=module, target=f"{module}.weight", keys={**kinds, **shared},
                                out_features=out_features, in_features=in_features, rank=rank,
                                fan_in_fan_out=bool(files.config.get("fan_in_fan_out", False))))
    return built
