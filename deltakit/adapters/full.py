"""A stored ΔW (LyCORIS's "full" algorithm, ``lycoris.modules.full.FullModule``): W' = W0 + ΔW.

LyCORIS's extraction stores a module whole, as ``<name>.diff`` with the weight's own shape, where the
rank asked for is at least half its output channels (``lycoris.utils.extract_linear`` /
``extract_conv`` return mode "full"); a convolution's diff is read as its (out, in·∏kernel) matrix.
No alpha scales it (``FullModule.get_diff_weight``).

Example::

    delta = module.delta({"diff": diff}, None, transposed=False)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltakit.adapters.base import AdapterModule, Rows, row_slice


@dataclass(frozen=True)
class FullModule(AdapterModule):
    """One stored ΔW (key ``diff``), in the layer's (out, in[, *kernel]) shape."""

    def math_delta(self, tensors: dict[str, torch.Tensor], transposed: bool, rows: Rows) -> torch.Tensor:
        diff = tensors["diff"]
        return row_slice(diff.reshape(diff.shape[0], -1), rows, transposed)
