"""What every command writes, pinned: JSON reports, tables, adapters and merged models on the demo pair
and on hand-built fixtures (GPT-2's Conv1D, gpt-oss's fused experts, LoHa and IA3 adapters) equal the
files recorded in tests/golden/ when the code was last changed on purpose.

JSON is compared key by key (floats to 1e-9 relative, everything else exactly; ``elapsed_s`` is left
out); tables line by line (their timing line left out); each tensor of a written safetensors file by
its sha256, or, where the bytes differ (another CPU's BLAS may round a last bit differently), by
shape, dtype and float64 sum and sum of squares to 1e-6 relative.

To record the files again after a change that is meant to change outputs::

    DELTAKIT_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import invoke

GOLDEN = Path(__file__).resolve().parent / "golden"
WRITE = os.environ.get("DELTAKIT_WRITE_GOLDEN") == "1"
VOLATILE = {"elapsed_s"}


# ---------------------------------------------------------------- fixtures written by hand (no library code)


def _save(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def gpt2_pair(root: Path) -> tuple[Path, Path]:
    """A 2-layer GPT-2 (Conv1D stored [in, out]) and a full fine-tune of it, fp32."""
    g = torch.Generator().manual_seed(11)
    h = 32
    base: dict[str, torch.Tensor] = {"transformer.wte.weight": torch.randn(64, h, generator=g) * 0.02,
                                     "transformer.wpe.weight": torch.randn(16, h, generator=g) * 0.02}
    for i in range(2):
        p = f"transformer.h.{i}."
        base |= {p + "attn.c_attn.weight": torch.randn(h, 3 * h, generator=g) * 0.02,
                 p + "attn.c_proj.weight": torch.randn(h, h, generator=g) * 0.02,
                 p + "mlp.c_fc.weight": torch.randn(h, 4 * h, generator=g) * 0.02,
                 p + "mlp.c_proj.weight": torch.randn(4 * h, h, generator=g) * 0.02,
                 p + "ln_1.weight": torch.ones(h), p + "ln_1.bias": torch.zeros(h)}
    ft = {k: v + (torch.randn(v.shape[0], 3, generator=g) @ torch.randn(3, v.shape[1], generator=g) * 1e-3
                  if v.ndim == 2 and "wte" not in k and "wpe" not in k else 0) for k, v in base.items()}
    ft["transformer.h.0.ln_1.bias"] = base["transformer.h.0.ln_1.bias"] + 0.01
    config = {"model_type": "gpt2", "n_embd": h, "n_layer": 2, "vocab_size": 64, "architectures": ["GPT2LMHeadModel"],
              "tie_word_embeddings": True}
    return _save(root / "gpt2-base", base, config), _save(root / "gpt2-ft", ft, config)


def experts_pair(root: Path) -> tuple[Path, Path]:
    """A gpt-oss-shaped layer (fused experts stored [experts, in, out]) and a fine-tune of two experts, bf16."""
    g = torch.Generator().manual_seed(12)
    hidden, inter, experts = 16, 8, 4
    base = {"model.layers.0.mlp.experts.gate_up_proj": torch.randn(experts, hidden, 2 * inter, generator=g) * 0.02,
            "model.layers.0.mlp.experts.down_proj": torch.randn(experts, inter, hidden, generator=g) * 0.02,
            "model.layers.0.mlp.experts.gate_up_proj_bias": torch.zeros(experts, 2 * inter),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(hidden, hidden, generator=g) * 0.02}
    ft = {k: v.clone() for k, v in base.items()}
    for e in (0, 2):
        ft["model.layers.0.mlp.experts.gate_up_proj"][e] += (torch.randn(hidden, 2, generator=g)
                                                             @ torch.randn(2, 2 * inter, generator=g)) * 0.01
    ft["model.layers.0.mlp.experts.gate_up_proj_bias"][1] += 0.01
    config = {"model_type": "gpt_oss", "hidden_size": hidden, "intermediate_size": inter, "num_local_experts": experts}
    return (_save(root / "experts-base", {k: v.bfloat16() for k, v in base.items()}, config),
            _save(root / "experts-ft", {k: v.bfloat16() for k, v in ft.items()}, config))


def demo_adapters(root: Path, base: Path) -> dict[str, Path]:
    """LoHa (q_proj, v_proj of layers 0-1) and IA3 (k_proj, down_proj) adapters of the demo base."""
    g = torch.Generator().manual_seed(13)
    h, i = 128, 344
    loha = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            p = f"base_model.model.model.layers.{layer}.self_attn.{proj}."
            loha |= {p + "hada_w1_a": torch.randn(h, 4, generator=g) * 0.1,
                     p + "hada_w1_b": torch.randn(4, h, generator=g) * 0.1,
                     p + "hada_w2_a": torch.randn(h, 4, generator=g) * 0.1,
                     p + "hada_w2_b": torch.randn(4, h, generator=g) * 0.1}
    ia3 = {}
    for layer in range(2):
        ia3[f"base_model.model.model.layers.{layer}.self_attn.k_proj.ia3_l"] = 1 + torch.randn(h, 1, generator=g) * 0.1
        ia3[f"base_model.model.model.layers.{layer}.mlp.down_proj.ia3_l"] = 1 + torch.randn(1, i, generator=g) * 0.1
    return {
        "loha": _adapter(root / "loha", {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                         "rank_pattern": {}, "alpha_pattern": {}}, loha),
        "ia3": _adapter(root / "ia3", {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"],
                                       "feedforward_modules": ["down_proj"], "fan_in_fan_out": False}, ia3),
    }


# ---------------------------------------------------------------- what the commands write


def tensor_digest(path: Path) -> dict[str, Any]:
    """Per tensor of a safetensors file: shape, dtype, sha256 of its bytes, float64 sum and sum of squares."""
    out = {}
    for name, tensor in sorted(load_file(str(path)).items()):
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        values = tensor.double()
        out[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                     "sha256": hashlib.sha256(raw).hexdigest(),
                     "sum": float(values.sum()), "sumsq": float((values * values).sum())}
    return out


def folder_outputs(folder: Path) -> dict[str, Any]:
    """Every file a command wrote into ``folder``: JSON parsed, safetensors digested, text as lines."""
    out: dict[str, Any] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            out[key] = tensor_digest(path)
        elif path.suffix == ".json":
            out[key] = json.loads(path.read_text())
        else:
            out[key] = path.read_text().splitlines()
    return out


def run(runner, *args: object) -> list[str]:
    result = invoke(runner, *args)
    assert result.exit_code == 0, (args, result.output, repr(result.exception))
    return [line for line in result.stdout.splitlines() if not line.rstrip().endswith(" s")]


def produce(runner, root: Path) -> dict[str, Any]:
    """Run every command on the fixtures in ``root`` (the current folder), with relative paths."""
    from deltakit.demo import write_demo_pair

    write_demo_pair("demo")
    gpt2_pair(Path("."))
    experts_pair(Path("."))
    adapters = demo_adapters(Path("."), Path("demo/base"))
    Path("r").mkdir()
    out: dict[str, Any] = {}
    cpu = ("--device", "cpu")
    out["demo rank table"] = run(runner, "rank", "demo/base", "demo/ft", "-e", "0.5", "-e", "0.9", "-e", "0.99",
                                 "--json", "r/rank.json", "--csv", "r/rank.csv", "--save-spectra", "r/spectra.safetensors",
                                 *cpu)
    out["demo intruders table"] = run(runner, "intruders", "demo/base", "demo/ft", "--json", "r/intruders.json", *cpu)
    run(runner, "extract", "demo/base", "demo/ft", "-o", "lora8", "--rank", "8", "--json", "r/extract8.json", *cpu)
    run(runner, "extract", "demo/base", "demo/ft", "-o", "lora-energy", "--energy", "0.9", "--json",
        "r/extract-energy.json", *cpu)
    run(runner, "extract", "demo/base", "demo/ft", "-o", "lora-budget", "--budget", "200000", "--json",
        "r/extract-budget.json", *cpu)
    out["demo compare table"] = run(runner, "compare", "demo/base", "demo/ft", "lora8", "--json", "r/compare.json", *cpu)
    run(runner, "trajectory", "demo/base", "lora8", "demo/ft", "--json", "r/trajectory.json", *cpu)
    run(runner, "rank", "demo/base", "lora8", "--json", "r/rank-adapter.json", *cpu)
    run(runner, "merge", "demo/base", "lora8", "-o", "merged", "--json", "r/merge.json", *cpu)
    run(runner, "unmerge", "merged", "lora8", "-o", "unmerged", "--check", "demo/base", "--json", "r/unmerge.json", *cpu)
    run(runner, "merge", "demo/base", "lora8", str(adapters["loha"]), str(adapters["ia3"]), "--weights", "0.5,1,1",
        "-o", "merged-mix", "--json", "r/merge-mix.json", *cpu)
    run(runner, "rank", "demo/base", str(adapters["loha"]), "--json", "r/rank-loha.json", *cpu)
    run(runner, "rank", "demo/base", str(adapters["ia3"]), "--json", "r/rank-ia3.json", *cpu)
    run(runner, "extract", "demo/base", "lora8", "-o", "lora8-to4", "--rank", "4", "--json", "r/resize.json", *cpu)
    run(runner, "intruders", "demo/base", "demo/ft", "--scale", "0.5", "-o", "scaled", "--json", "r/scaled.json", *cpu)
    run(runner, "rank", "gpt2-base", "gpt2-ft", "--json", "r/gpt2-rank.json", *cpu)
    run(runner, "intruders", "gpt2-base", "gpt2-ft", "--json", "r/gpt2-intruders.json", *cpu)
    run(runner, "extract", "gpt2-base", "gpt2-ft", "-o", "gpt2-lora", "--rank", "3", "--save-modules", "--json",
        "r/gpt2-extract.json", *cpu)
    run(runner, "merge", "gpt2-base", "gpt2-lora", "-o", "gpt2-merged", "--json", "r/gpt2-merge.json", *cpu)
    run(runner, "rank", "experts-base", "experts-ft", "--json", "r/experts-rank.json", *cpu)
    run(runner, "extract", "experts-base", "experts-ft", "-o", "experts-lora", "--energy", "0.99", "--json",
        "r/experts-extract.json", *cpu)
    for folder in ("r", "lora8", "lora-energy", "lora-budget", "merged", "unmerged", "merged-mix", "lora8-to4", "scaled",
                   "gpt2-lora", "gpt2-merged", "experts-lora"):
        for key, value in folder_outputs(Path(folder)).items():
            out[f"{folder}/{key}"] = value
    return out


# ---------------------------------------------------------------- comparison


def differences(expected: Any, found: Any, where: str = "") -> list[str]:
    """Where ``found`` differs from ``expected`` (floats to 1e-9 relative; tensor digests as the module says)."""
    if isinstance(expected, dict) and set(expected) >= {"sha256", "sum", "sumsq"} and isinstance(found, dict):
        if expected == found:
            return []
        same_layout = (expected["shape"], expected["dtype"]) == (found.get("shape"), found.get("dtype"))
        close = all(math.isclose(expected[k], found.get(k, math.nan), rel_tol=1e-6, abs_tol=1e-12)
                    for k in ("sum", "sumsq"))
        return [] if same_layout and close else [f"{where}: {found} != {expected}"]
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        for key in sorted((set(expected) | set(found)) - VOLATILE):
            if key not in found or key not in expected:
                out.append(f"{where}/{key}: {'missing' if key not in found else 'new'}")
            else:
                out += differences(expected[key], found[key], f"{where}/{key}")
        return out
    if isinstance(expected, list) and isinstance(found, list):
        if len(expected) != len(found):
            return [f"{where}: {len(found)} items != {len(expected)}"]
        return [d for i, (a, b) in enumerate(zip(expected, found)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(expected, float) and isinstance(found, (int, float)) and not isinstance(found, bool):
        return [] if math.isclose(expected, found, rel_tol=1e-9, abs_tol=1e-15) else [f"{where}: {found} != {expected}"]
    return [] if expected == found else [f"{where}: {found!r} != {expected!r}"]


@pytest.fixture(scope="module")
def produced(tmp_path_factory) -> dict[str, Any]:
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("golden")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        outputs = produce(CliRunner(), root)
    finally:
        os.chdir(cwd)
    if WRITE:
        GOLDEN.mkdir(exist_ok=True)
        (GOLDEN / "outputs.json").write_text(json.dumps(outputs, indent=1, sort_keys=True) + "\n")
    return outputs


def test_every_output_equals_the_recorded_one(produced):
    expected = json.loads((GOLDEN / "outputs.json").read_text())
    found = differences(expected, json.loads(json.dumps(produced)))
    assert not found, f"{len(found)} differences, first: " + "; ".join(found[:10])


def test_the_recorded_outputs_cover_every_command():
    expected = json.loads((GOLDEN / "outputs.json").read_text())
    reports = {key.split("/", 1)[1] for key in expected if key.startswith("r/")}
    for command in ("rank", "intruders", "extract8", "compare", "trajectory", "merge", "unmerge", "scaled"):
        assert f"{command}.json" in reports
    assert any(key.startswith("merged/model") and key.endswith(".safetensors") for key in expected)
