"""Peer rows: what a user would run without deltakit, timed like deltakit's rows (through bench/child.py).

    peer svdvals BASE FT --json OUT [--device auto]      # the plain loop: ΔW in fp32, torch.linalg.svdvals
    peer peft-merge BASE ADAPTER -o OUT [--device auto]  # transformers + PEFT: merge_and_unload, save_pretrained
    peer lycoris-extract BASE FT -o OUT --rank R [--device auto]  # LyCORIS's extract_linear / extract_conv, a kohya file

``svdvals`` writes ``{"matrices": [{"name", "shape", "rank_at": {"0.9": k}}]}``, the fields of deltakit
rank's JSON that the rank check reads. mergekit-extract-lora, the third peer, is its own console script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pair import Checkpoint, rank_at


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def svdvals(base_path: Path, ft_path: Path, out: Path, device: torch.device) -> None:
    """Every weight both hold (a convolution as its (out, in·kh·kw) matrix): ΔW = ft − base in fp32 on
    ``device``, its singular values, rank@90%."""
    base, ft = Checkpoint(base_path), Checkpoint(ft_path)
    matrices = []
    for name in base.names():
        if name not in ft.files or len(base.shape(name)) < 2:
            continue
        delta = ft.get(name).to(device, torch.float32) - base.get(name).to(device, torch.float32)
        delta = delta.reshape(delta.shape[0], -1)
        squared = torch.linalg.svdvals(delta).double() ** 2
        matrices.append({"name": name, "shape": list(delta.shape), "rank_at": {"0.9": rank_at(squared.cpu(), 0.9)}})
    out.write_text(json.dumps({"device": str(device), "matrices": matrices}, indent=1) + "\n")


def peft_merge(base: Path, adapter: Path, out: Path, device: torch.device) -> None:
    """The PEFT way: load the model, wrap it with the adapter, merge_and_unload, save_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to(device)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")


def lycoris_extract(base_path: Path, ft_path: Path, out: Path, rank: int, device: torch.device) -> None:
    """What LyCORIS's extract_diff does per changed nn.Linear and nn.Conv2d, from the files: ΔW = ft − base
    in fp32 on ``device``, ``lycoris.utils.extract_linear(ΔW, "fixed", rank)`` (a full SVD; up = U·S,
    down = Vᵀ), or for a convolution ``extract_conv`` (the SVD of its (out, in·kh·kw) matrix; LoCon's down
    (r, in, kh, kw) and up (out, r, 1, 1), as ``extract_locon.py --disable_cp`` writes; 1×1 ones at the
    linear rank, as extract_diff does), the factors in the fine-tune's dtype with alpha = rank, one kohya
    file. A module from rank ≥ out / 2 on LyCORIS stores whole (``diff``)."""
    from lycoris.utils import extract_conv, extract_linear
    from safetensors.torch import save_file

    base, ft = Checkpoint(base_path), Checkpoint(ft_path)
    tensors = {}
    for name in base.names():
        if name not in ft.files or len(base.shape(name)) not in (2, 4):
            continue
        stored = ft.get(name)
        delta = stored.to(device, torch.float32) - base.get(name).to(device, torch.float32)
        if not bool(delta.any()):
            continue
        extract = extract_linear if delta.dim() == 2 else extract_conv
        result, mode = extract(delta, "fixed", rank, device)
        key = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
        if mode != "low rank":
            tensors[f"{key}.diff"] = result.to("cpu", stored.dtype).contiguous()
            continue
        down, up, _ = result
        tensors[f"{key}.lora_down.weight"] = down.to("cpu", stored.dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = up.to("cpu", stored.dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank)).to(stored.dtype)
    save_file(tensors, str(out))


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/child.py peer", description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=("svdvals", "peft-merge", "lycoris-extract"))
    parser.add_argument("base", type=Path)
    parser.add_argument("other", type=Path, help="FT (svdvals) or ADAPTER (peft-merge)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("-o", "--out", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args(sys.argv[1:])
    if args.peer == "svdvals":
        svdvals(args.base, args.other, args.json, _device(args.device))
    elif args.peer == "lycoris-extract":
        lycoris_extract(args.base, args.other, args.out, args.rank, _device(args.device))
    else:
        peft_merge(args.base, args.other, args.out, _device(args.device))


if __name__ == "__main__":
    main()
