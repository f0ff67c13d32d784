"""Writing a PEFT adapter folder: factors parked on disk between passes, then one safetensors file.

PEFT reads exactly ``adapter_config.json`` and ``adapter_model.safetensors`` (one file, never
shards), with keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (embedding
LoRA: ``lora_embedding_A`` / ``lora_embedding_B``), whole ``modules_to_save`` parameters as
``base_model.model.<module>.<param>`` and LoRA-layer biases (``bias="lora_only"``) as
``base_model.model.<module>.base_layer.bias``; see :mod:`deltakit.io.peft`.

Example::

    stage = FactorStage(tmp / ".staging")
    stage.put("model.layers.0.self_attn.q_proj", a, b)
    write_adapter(tmp, config, [AdapterTensor(key, shape, dtype, load), ...])
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltakit.distributed import Parallel, shared_writer
from deltakit.io.filenames import ADAPTER_CONFIG

ADAPTER_WEIGHTS_PREFIX = "adapter_model"


class FactorStage:
    """LoRA factors kept on disk (inside the output's temporary folder) until the adapter is assembled.

    Host memory then holds one matrix at a time whatever the adapter's size, and the model is
    read once for a fixed rank.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=False)
        self._files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], torch.dtype]] = {}

    def put(self, module: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        path = self.folder / f"{len(self._files):06d}.safetensors"
        save_file({"A": lora_a.detach().to("cpu").contiguous(), "B": lora_b.detach().to("cpu").contiguous()}, str(path))
        self._files[module] = path
        self._shapes[module] = (tuple(lora_a.shape), tuple(lora_b.shape), lora_a.dtype)

    def shapes(self, module: str) -> tuple[tuple[int, ...], tuple[int, ...], torch.dtype]:
        """(A shape, B shape, dtype) of a staged module, this process's or another's."""
        return self._shapes[module]

    def note(self, module: str, shapes: tuple[tuple[int, ...], tuple[int, ...], torch.dtype]) -> None:
        """Learn the shapes of a module another process staged (its factors stay with that process)."""
        self._shapes.setdefault(module, shapes)

    def get(self, module: str, which: str) -> torch.Tensor:
        """The staged "A" or "B" factor of ``module``."""
        with safe_open(str(self._files[module]), framework="pt") as handle:
            return handle.get_tensor(which)

    def __contains__(self, module: object) -> bool:
        return module in self._files

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class AdapterTensor:
    """One tensor of the adapter file: its PEFT key, shape, dtype, how to produce it, and which process does."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    owner: int = 0  # the process (torchrun rank) that holds it


def write_adapter(folder: Path, config: dict[str, Any], tensors: list[AdapterTensor],
                  progress: Callable[..., Any] | None = None, parallel: Parallel = Parallel(),
                  card: str | None = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (one file) into ``folder``.

    Under torchrun every process writes the tensors it owns into the one planned file;
    process 0 makes the file and writes the config, and ``card`` as README.md when given.
    """
    writer = shared_writer(parallel, folder, [(t.key, t.shape, t.dtype) for t in tensors],
                           max_shard_bytes=sys.maxsize, prefix=ADAPTER_WEIGHTS_PREFIX)
    mine = [t for t in tensors if t.owner == parallel.rank]
    items = progress(mine, len(mine), "writing adapter") if progress else mine
    for tensor in items:
        writer.write(tensor.key, tensor.load().to(tensor.dtype))
    writer.finish(expected=[t.key for t in mine])
    if parallel.is_main:
        (Path(folder) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if card is not None:
            (Path(folder) / "README.md").write_text(card)
