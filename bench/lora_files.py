"""Just enough of the PEFT LoRA adapter format to write one and read any (deltakit's, mergekit's).

Keys are ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r);
an embedding stores ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B`` (hidden, r).
The delta of a module is ``scaling · B @ A`` (transposed for embeddings and fan_in_fan_out),
``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), both per module when
``rank_pattern`` / ``alpha_pattern`` name it (peft ``LoraLayer.update_layer``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

ADAPTER_CONFIG = "adapter_config.json"
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$"  # an optional adapter name, e.g. ".default"
)


@dataclass
class LoraFactors:
    """One module's factors as stored; ``delta()`` gives ΔW (out, in) fp32 in the weight's layout."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    transposed: bool  # embeddings (and fan_in_fan_out) store the factors of ΔWᵀ

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self, device: str | torch.device = "cpu") -> torch.Tensor:
        product = (self.b.to(device, torch.float32) @ self.a.to(device, torch.float32)) * self.scaling
        return product.T if self.transposed else product


def _pattern_value(pattern: dict[str, object], module: str) -> object | None:
    for key, value in (pattern or {}).items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return None


def module_scaling(config: dict[str, object], module: str) -> float:
    """alpha / r for ``module`` from an adapter_config.json (peft's rule, rsLoRA included)."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module) or config.get("r", 8)
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module) or config.get("lora_alpha", rank)
    if config.get("use_rslora"):
        return float(alpha) / math.sqrt(float(rank))
    return float(alpha) / float(rank)


def adapter_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("adapter_model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no adapter safetensors in {folder}")
    return files


def read_adapter(folder: Path) -> tuple[dict[str, object], dict[str, LoraFactors], list[str]]:
    """(config, module -> factors, other keys) of a PEFT LoRA adapter folder."""
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other: list[str] = []
    for file in adapter_files(folder):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                match = _KEY.match(key)
                if match is None:
                    other.append(key)
                    continue
                parts.setdefault(match["module"], {})[match["part"]] = fh.get_tensor(key)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    factors = {}
    for module, found in parts.items():
        if "lora_embedding_A" in found:
            a, b, transposed = found["lora_embedding_A"], found["lora_embedding_B"], True
        else:
            a, b, transposed = found["lora_A"], found["lora_B"], fan_in_fan_out
        factors[module] = LoraFactors(module, a, b, module_scaling(config, module), transposed)
    return config, factors, other


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], rank: int, target_modules: list[str],
                  base_model: str) -> None:
    """Write ``adapter_model.safetensors`` and a matching ``adapter_config.json`` (alpha = r, scaling 1)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": rank, "target_modules": sorted(set(target_modules)), "lora_dropout": 0.0,
        "fan_in_fan_out": False, "use_rslora": False, "bias": "none", "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
