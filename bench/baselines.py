"""Baseline (a): the plain per-matrix loop anyone would write first, same device as deltakit.

    python -m bench.baselines rank    BASE FT --device auto --json OUT.json
    python -m bench.baselines extract BASE FT -o ADAPTER --rank 64 --device auto --json OUT.json
    python -m bench.baselines merge   BASE ADAPTER -o MERGED --device auto

For every 2-D tensor both checkpoints hold: read the pair with safetensors, ΔW = ft − base in
fp32 on the device, then ``torch.linalg.svdvals`` (rank) or ``torch.linalg.svd`` truncated to
r (extract: B = U_r √S_r, A = √S_r V_rᵀ, the Eckart–Young optimum, so its relative error
‖ΔW − BA‖_F / ‖ΔW‖_F = √(Σ_{i>r} σ_i²) / √(Σ σ_i²) is the best any rank-r adapter can do).
Merge reads the base one shard at a time, adds scaling·BA, writes the shard with
``save_file``. Deliberately no cleverness: this is the reference, not a competitor.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.lora_files import read_adapter, write_adapter  # noqa: E402

INDEX = "model.safetensors.index.json"
ENERGIES = (0.5, 0.9, 0.99)


def weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index or the single model.safetensors."""
    index = folder / INDEX
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    with safe_open(str(single), framework="pt") as fh:
        return {name: single for name in fh.keys()}


class Reader:
    """One open safetensors handle per shard; tensors read one at a time."""

    def __init__(self, folder: Path) -> None:
        self.map = weight_map(folder)
        self._handles: dict[Path, object] = {}

    def _handle(self, name: str):
        file = self.map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())


def paired_matrices(base: Reader, ft: Reader) -> list[str]:
    """Names of the 2-D tensors both checkpoints hold with the same shape, in base order."""
    return [name for name in base.map
            if name in ft.map and len(base.shape(name)) == 2 and base.shape(name) == ft.shape(name)]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def rank_at_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ energy · Σ σ_i²."""
    cumulative = torch.cumsum(singular_values.double() ** 2, 0)
    return int(torch.searchsorted(cumulative, energy * cumulative[-1]).item()) + 1


def run_rank(base_dir: Path, ft_dir: Path, device: torch.device) -> list[dict[str, object]]:
    base, ft = Reader(base_dir), Reader(ft_dir)
    records = []
    for name in paired_matrices(base, ft):
        delta = ft.get(name).to(device, torch.float32) - base.get(name).to(device, torch.float32)
        singular_values = torch.linalg.svdvals(delta)
        records.append({"name": name, "shape": list(delta.shape),
                        "fro_norm": float(torch.linalg.vector_norm(singular_values)),
                        **{f"rank_{int(e * 100)}": rank_at_energy(singular_values, e) for e in ENERGIES}})
    return records


def run_extract(base_dir: Path, ft_dir: Path, out: Path, rank: int, device: torch.device) -> list[dict[str, object]]:
    base, ft = Reader(base_dir), Reader(ft_dir)
    tensors: dict[str, torch.Tensor] = {}
    records, targets = [], []
    for name in paired_matrices(base, ft):
        base_weight = base.get(name)
        delta = ft.get(name).to(device, torch.float32) - base_weight.to(device, torch.float32)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.shape[0])
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        module = name.removesuffix(".weight")
        dtype = base_weight.dtype
        if "embed" in module:  # peft's Embedding stores the factors of ΔWᵀ
            tensors[f"base_model.model.{module}.lora_embedding_A"] = b.T.to(dtype).cpu().contiguous()
            tensors[f"base_model.model.{module}.lora_embedding_B"] = a.T.to(dtype).cpu().contiguous()
        else:
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype).cpu().contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype).cpu().contiguous()
        targets.append(module.rsplit(".", 1)[-1])
        energy = s.double() ** 2
        records.append({"name": name, "rank": r,
                        "rel_error": math.sqrt(float(energy[r:].sum() / energy.sum()))})
    write_adapter(out, tensors, rank, targets, str(base_dir))
    return records


def run_merge(base_dir: Path, adapter_dir: Path, out: Path, device: torch.device) -> None:
    _, factors, _ = read_adapter(adapter_dir)
    by_weight = {f.weight_name: f for f in factors.values()}
    out.mkdir(parents=True, exist_ok=True)
    shards: dict[Path, list[str]] = {}
    for name, file in weight_map(base_dir).items():
        shards.setdefault(file, []).append(name)
    for file, names in shards.items():
        merged: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt") as fh:
            for name in names:
                weight = fh.get_tensor(name)
                if name in by_weight:
                    updated = weight.to(device, torch.float32) + by_weight[name].delta(device)
                    weight = updated.to(weight.dtype).cpu()
                merged[name] = weight
        save_file(merged, str(out / file.name), metadata={"format": "pt"})
    for extra in (INDEX, "config.json"):
        if (base_dir / extra).is_file():
            shutil.copy(base_dir / extra, out / extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("rank", "extract"):
        p = sub.add_parser(command)
        p.add_argument("base", type=Path)
        p.add_argument("ft", type=Path)
        p.add_argument("--device", default="auto")
        p.add_argument("--json", type=Path, default=None)
        if command == "extract":
            p.add_argument("-o", "--output", type=Path, required=True)
            p.add_argument("--rank", type=int, default=64)
    p = sub.add_parser("merge")
    p.add_argument("base", type=Path)
    p.add_argument("adapter", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    if args.command == "rank":
        records = run_rank(args.base, args.ft, device)
    elif args.command == "extract":
        records = run_extract(args.base, args.ft, args.output, args.rank, device)
    else:
        run_merge(args.base, args.adapter, args.output, device)
        return 0
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "matrices": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
