"""VeRA (Kopiczko et al. 2024): ΔW = (λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in]).

A (r × in_max) and B (out_max × r) are random projections shared by every layer, saved once in
the adapter as ``base_model.vera_A`` / ``base_model.vera_B`` (``save_projection``, PEFT's default);
each layer trains λ_d (r) and λ_b (out) (PEFT ``vera.Linear.get_delta_weight``). There is no
alpha / r scaling. An adapter saved without its projections (``save_projection=false``) is read
with them regenerated as PEFT does (``VeraModel._init_vera_A_vera_B``): a CPU ``torch.Generator``
seeded with ``projection_prng_key`` draws A (r × in_max), then B (out_max × r), each uniform in
±√6 / √fan_in (Kaiming, fan_in = its second dimension), in_max and out_max the largest of the
adapted layers; tests check the result against PEFT's saved projections.

Example::

    delta = module.delta(tensors, None, transposed=False)
"""

from __future__ import annotations

import functools
import math
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
    """One VeRA layer; its keys include the shared projections, unless ``projection`` says how to
    regenerate them: (projection_prng_key, r, in_max, out_max)."""

    rank: int = 0
    projection: tuple[int, int, int, int] | None = None

    def load(self, checkpoint, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        tensors = super().load(checkpoint, device)
        if self.projection is not None:
            vera_a, vera_b = regenerated_projections(*self.projection)
            tensors |= {"vera_A_A": vera_a.to(device), "vera_A_B": vera_b.to(device)}
        return tensors

    def math_delta(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows) -> torch.Tensor:
        lambda_b, lambda_d = tensors["vera_lambda_b"].reshape(-1, 1), tensors["vera_lambda_d"].reshape(-1, 1)
        left = lambda_b * tensors["vera_A_B"][: self.out_features]  # (out, r)
        right = lambda_d * tensors["vera_A_A"][:, : self.in_features]  # (r, in)
        if rows is not None:
            left, right = (left, right[:, rows[0]:rows[1]]) if transposed else (left[rows[0]:rows[1]], right)
        return left @ right


@functools.lru_cache(maxsize=2)
def regenerated_projections(seed: int, rank: int, in_max: int, out_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's shared VeRA projections A (r × in_max) and B (out_max × r) from ``projection_prng_key``
    (read-only: callers form new tensors from them)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    drawn = []
    for shape in ((rank, in_max), (out_max, rank)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        drawn.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))
    return drawn[0], drawn[1]


def shared_keys(files: AdapterFiles, whole: dict[str, str]) -> dict[str, str]:
    """Pop the shared projections out of the whole tensors: {"vera_A_A": key, "vera_A_B": key}, or {} when
    the adapter was saved without them (``save_projection=false``)."""
    found: dict[str, str] = {}
    for name in list(whole):
        for kind in SHARED:
            if name == f"base_model.{kind}" or name.startswith(f"base_model.{kind}."):
                found[f"vera_A_{kind[-1]}"] = whole.pop(name)
    if found and len(found) != 2:
        raise DeltakitError(f"{files.path}: the VeRA adapter holds only one of its shared projections "
                            f"({', '.join(sorted(found))})")
    if not found and files.config.get("save_projection", True):
        raise DeltakitError(f"{files.path}: the VeRA adapter has no shared projections vera_A and vera_B, "
                            "though its config says save_projection")
    return found


def build(files: AdapterFiles, modules: dict[str, dict[str, str]], base: BaseInfo,
          whole: dict[str, str]) -> list[AdapterModule]:
    shared = shared_keys(files, whole)
    r = files.config.get("r", PEFT_DEFAULT_R)
    projection = None
    if shared:
        a_shape, b_shape = files.checkpoint.shape(shared["vera_A_A"]), files.checkpoint.shape(shared["vera_A_B"])
    else:  # regenerated: as large as the largest adapted layer, as PEFT's _find_dim makes them
        layers = [_layer_shape(files, module, kinds, base) for module, kinds in sorted(modules.items())]
        in_max, out_max = max((s[1] for s in layers), default=0), max((s[0] for s in layers), default=0)
        seed = files.config.get("projection_prng_key", 0)
        a_shape, b_shape, projection = (r, in_max), (out_max, r), (int(seed), int(r), in_max, out_max)
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
        raise DeltakitError(f"{files.path}: the VeRA projections A {a_shape} and B {b_shape} are not of the "
                            f"config's rank r={r}")
    built: list[AdapterModule] = []
    for module, kinds in sorted(modules.items()):
        out_features, in_features = _layer_shape(files, module, kinds, base)
        rank = files.checkpoint.shape(kinds["vera_lambda_d"])[0]
        if rank != a_shape[0] or in_features > a_shape[1] or out_features > b_shape[0]:
            raise DeltakitError(f"{files.path}: VeRA module {module} (out {out_features}, in {in_features}, r {rank}) "
                                f"does not fit the shared projections A {a_shape} and B {b_shape}")
        built.append(VeraModule(module=module, target=f"{module}.weight", keys={**kinds, **shared},
                                out_features=out_features, in_features=in_features, rank=rank, projection=projection,
                                fan_in_fan_out=bool(files.config.get("fan_in_fan_out", False))))
    return built


def _layer_shape(files: AdapterFiles, module: str, kinds: dict[str, str], base: BaseInfo) -> tuple[int, int]:
    """(out, in) of a VeRA layer: out is λ_b's length, in the base weight's other side (stored either way)."""
    missing = ", ".join(sorted(set(KINDS) - set(kinds)))
    if missing:
        raise DeltakitError(f"{files.path}: VeRA module {module} lacks {missing}")
    (out_features,) = files.checkpoint.shape(kinds["vera_lambda_b"])
    weight = base.shape(f"{module}.weight")
    if weight is None or len(weight) != 2 or out_features not in weight:
        raise DeltakitError(f"{files.path} does not fit the base: VeRA module {module} has no weight matrix there "
                            f"with {out_features} outputs")
    return out_features, weight[1] if weight[0] == out_features else weight[0]
