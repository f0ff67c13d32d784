"""The one interface every adapter type implements: read one module's tensors, give its ΔW.

A module adapts one tensor of the model (its ``target``, e.g. ``model.layers.0.mlp.down_proj.weight``).
Its math is written, as in PEFT, for the layer's (out, in) matrix; the tensor may be stored
transposed (GPT-2 Conv1D, embeddings, input-major experts), and a convolution's (out, in, *kernel)
weight is its (out, in·∏kernel) matrix (``in_features`` counts its columns; the pair reshapes,
:meth:`deltakit.pairing.TensorPair.as_matrix`). That is decided once, on the pair
(:attr:`deltakit.pairing.TensorPair.transposed`), and every type returns ΔW in the stored orientation, for all rows
or for stored rows ``start:stop`` (merge works on row blocks of large tensors).

How ΔW depends on the original weight W0, which unmerge needs to know:

- ``additive``: ΔW does not depend on W0 (LoRA, AdaLoRA, LoHa, LoKr, VeRA);
- ``scaling``: ΔW = W0 ⊙ g for a broadcast gain g (IA3: g = l − 1), so W0 = W / (1 + g);
- ``base``: anything else (DoRA's norms of W0 + s·BA): W0 must be given to undo it.

Example::

    tensors = module.load(adapter.checkpoint, "cpu")
    delta = module.delta(tensors, base_weight.float(), transposed=False)   # ΔW, fp32, as stored
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from deltakit.pairing import canonical_name

Rows = tuple[int, int] | None


@dataclass(frozen=True)
class AdapterModule:
    """One adapted tensor of the model; subclasses hold their hyper-parameters and the formula."""

    module: str  # module path in the model, e.g. "model.layers.0.self_attn.q_proj"
    target: str  # the tensor it changes, e.g. "model.layers.0.self_attn.q_proj.weight"
    keys: dict[str, str] = field(compare=False)  # tensor kind -> key in the adapter file
    out_features: int  # rows of the layer's (out, in) matrix
    in_features: int
    embedding: bool = False  # an nn.Embedding: stored (vocab, dim), the math matrix is (dim, vocab)
    fan_in_fan_out: bool = False  # the adapter's config says the layer stores (in, out) (PEFT's flag for Conv1D)
    kernel: tuple[int, ...] = ()  # the convolution kernel the adapter's tensors are shaped for; () if they do not say

    kind: ClassVar[str] = "additive"  # "additive" | "scaling" | "base"; see the module docstring
    own_layout: ClassVar[bool] = False  # True: stored_shape ignores ``transposed`` (the type knows its layout)

    def load(self, checkpoint, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """This module's tensors from the adapter file, as stored (meant for the reading threads)."""
        return {kind: checkpoint.get(key, device) for kind, key in self.keys.items()}

    def stored_shape(self, transposed: bool) -> tuple[int, ...]:
        """Shape of the target as the model stores it."""
        return (self.in_features, self.out_features) if transposed else (self.out_features, self.in_features)

    def splits_rows(self, transposed: bool) -> bool:
        """Whether ΔW's stored rows can be computed one block at a time from the same rows of W0."""
        return True

    def delta(self, tensors: dict[str, torch.Tensor], base: torch.Tensor | None, transposed: bool,
              rows: Rows = None) -> torch.Tensor:
        """ΔW (stored rows ``rows`` of it, default all) in the dtype of ``base`` (fp32 when no base).

        ``base`` holds the same rows of W0; additive types ignore it.
        """
        dtype = base.dtype if base is not None else torch.float32
        device = base.device if base is not None else next(iter(tensors.values())).device
        math_delta = self.math_delta({k: v.to(device, dtype) for k, v in tensors.items()}, transposed, rows)
        return math_delta.T if transposed else math_delta

    def apply(self, tensors: dict[str, torch.Tensor], base: torch.Tensor, transposed: bool, rows: Rows,
              weight: float) -> torch.Tensor:
        """W0 + weight·ΔW for the stored rows ``rows``; may work in place on ``base`` (merge owns it)."""
        return base.add_(self.delta(tensors, base, transposed, rows), alpha=weight)

    def math_delta(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows) -> torch.Tensor:
        """The (out, in) ΔW restricted to what becomes stored rows ``rows``: its rows when the
        tensor is stored as is, its columns when stored transposed."""
        raise NotImplementedError

    def change(self) -> str | None:
        """How the adapter changes its tensor, where that is not by adding a ΔW it computes (rows or a whole
        tensor set by the adapter); None for the usual update."""
        return None

    def gain(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        """For ``scaling`` types: g, broadcastable to the stored rows, with ΔW = W0 ⊙ g."""
        raise NotImplementedError(f"{type(self).__name__} is not a scaling adapter")


def row_slice(matrix: torch.Tensor, rows: Rows, transposed: bool) -> torch.Tensor:
    """The part of an (out, in) matrix that becomes stored rows ``rows``."""
    if rows is None:
        return matrix
    return matrix[:, rows[0]:rows[1]] if transposed else matrix[rows[0]:rows[1]]


@dataclass
class BaseInfo:
    """What an adapter type may need to know of the model it applies to: tensor shapes and config.json."""

    shapes: Mapping[str, tuple[int, ...]]
    config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self._canonical = {canonical_name(name): shape for name, shape in self.shapes.items()}

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of the model's tensor ``name`` (matched without wrapper prefixes), or None."""
        found = self.shapes.get(name)
        return tuple(found) if found is not None else (
            tuple(self._canonical[canonical_name(name)]) if canonical_name(name) in self._canonical else None)
