"""`extract` of fused MoE expert tensors to PEFT's LoRA on parameters (target_parameters).

Ground truth: a tiny transformers gpt-oss (fused experts, input-major) with changes of known
rank written into single experts' slices; PEFT itself loads the extracted adapter and its
``merge_and_unload`` must give back the fine-tune, and deltakit's own merge must agree with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltakit.lora import extract_lora
from deltakit.lora.expert_params import nesting_order, parameter_keys, stack_factors
from deltakit.spectral.options import SpectralOptions

from conftest import invoke, low_rank, tiny_gpt_oss

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"  # (4, hidden 32, 2·inter 16): in = 32, out = 16
DOWN0 = "model.layers.0.mlp.experts.down_proj"  # (4, inter 8, hidden 32): in = 8, out = 32
DOWN1 = "model.layers.1.mlp.experts.down_proj"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
# (tensor, expert) -> rank of the planted change; every other expert slice is unchanged.
PLANTED = {(GATE_UP, 1): 2, (GATE_UP, 3): 3, (DOWN0, 0): 1, (DOWN1, 2): 2}


def _gpt_oss(folder: Path):
    model = tiny_gpt_oss(layers=2)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def gpt_oss_ft(tmp_path_factory):
    """(base folder, fine-tune folder, fine-tune tensors): PLANTED expert changes, q_proj rank 2, one expert bias."""
    root = tmp_path_factory.mktemp("experts")
    _gpt_oss(root / "base")
    shutil.copytree(root / "base", root / "ft")
    tensors = load_file(root / "base" / "model.safetensors")
    for seed, ((name, expert), rank) in enumerate(PLANTED.items()):
        rows, cols = tensors[name].shape[1:]
        tensors[name][expert] += low_rank(rows, cols, rank, scale=0.03, seed=seed).float()
    tensors[Q_PROJ] += low_rank(32, 32, 2, scale=0.05, seed=9).float()
    tensors["model.layers.0.mlp.experts.down_proj_bias"][1] += 0.1
    save_file(tensors, root / "ft" / "model.safetensors", metadata={"format": "pt"})
    return root / "base", root / "ft", tensors


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import GptOssForCausalLM

    model = PeftModel.from_pretrained(GptOssForCausalLM.from_pretrained(base).eval(), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_extract_experts_loads_in_peft_and_merges_back_to_the_fine_tune(gpt_oss_ft, runner, tmp_path):
    """--energy 1.0: each expert at its planted rank; PEFT's merge_and_unload and deltakit merge give the fine-tune."""
    base, ft, ft_tensors = gpt_oss_ft
    adapter = tmp_path / "adapter"
    result = invoke(runner, "extract", base, ft, "-o", adapter, "--energy", "1.0", "--experts", "--device", "cpu",
                    "--json", tmp_path / "extract.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "extract.json").read_text())
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted([GATE_UP, DOWN0, DOWN1])
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    ranks = {m["name"]: m["rank"] for m in report["matrices"]}
    for (name, expert), rank in PLANTED.items():
        assert ranks[f"{name}[{expert}]"] == rank
    assert {e["name"]: (e["rank"], e["factored_experts"]) for e in report["expert_parameters"]} == {
        GATE_UP: (3, [1, 3]), DOWN0: (1, [0]), DOWN1: (2, [2])}
    # only the one changed expert bias is reported: PEFT cannot carry a fused expert bias
    assert [n["name"] for n in report["not_carried"]] == ["model.layers.0.mlp.experts.down_proj_bias[1]"]
    assert report["parameters"] == 2 * (32 + 32) + sum(e["parameters"] for e in report["expert_parameters"])
    written = {e["name"]: e["parameters"] for e in report["expert_parameters"]}
    assert written[DOWN0] == 4 * 1 * (8 + 32)  # every expert at the tensor's rank (1), unchanged ones zero

    stored = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.mlp.experts"
    # gate_up_proj is defined first by the model class: PEFT nests it inside down_proj's wrapper.
    assert stored[f"{prefix}.base_layer.lora_A.weight"].shape == (4 * 3, 32)  # (experts·r, in)
    assert stored[f"{prefix}.base_layer.lora_B.weight"].shape == (16, 3 * 4)  # (out, r·experts)
    assert stored[f"{prefix}.lora_A.weight"].shape == (4 * 1, 8)

    merged = _peft_merged(base, adapter)
    base_tensors = load_file(base / "model.safetensors")
    for name in (GATE_UP, DOWN0, DOWN1, Q_PROJ):
        assert _relative(merged[name] - base_tensors[name], ft_tensors[name] - base_tensors[name]) < 1e-5, name
    result = invoke(runner, "merge", base, adapter, "-o", tmp_path / "merged", "--device", "cpu")
    assert result.exit_code == 0, result.output
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    for name, value in ours.items():
        torch.testing.assert_close(value, merged[name], rtol=1e-6, atol=1e-7)

    result = invoke(runner, "rank", base, adapter, "--device", "cpu", "--json", tmp_path / "rank.json")
    assert result.exit_code == 0, result.output
    read = {m["name"]: m["rank"] for m in json.loads((tmp_path / "rank.json").read_text())["matrices"]}
    expected = {f"{name}[{e}]": PLANTED.get((name, e), 0) for name in (GATE_UP, DOWN0, DOWN1) for e in range(4)}
    assert {k: v for k, v in read.items() if "experts" in k} == expected


def test_fixed_rank_below_an_experts_rank_is_its_best_fit(gpt_oss_ft, tmp_path):
    """--rank 1: each expert gets its own truncated SVD, the least-squares optimum of PEFT's layout (whose
    experts' factors are disjoint), so the merged slice is the fp64 rank-1 truncation of that expert's ΔW."""
    base, ft, ft_tensors = gpt_oss_ft
    report = extract_lora(base, ft, tmp_path / "adapter", rank=1, options=SpectralOptions(device="cpu", exact=True))
    base_tensors = load_file(base / "model.safetensors")
    merged = _peft_merged(base, tmp_path / "adapter")
    for expert, planted in ((3, 3), (1, 2)):
        delta = (ft_tensors[GATE_UP][expert] - base_tensors[GATE_UP][expert]).double()  # stored (in, out)
        u, s, vh = torch.linalg.svd(delta)
        best = s[0] * torch.outer(u[:, 0], vh[0])
        matrix = next(m for m in report.matrices if m.name == f"{GATE_UP}[{expert}]")
        assert matrix.rank == 1 and matrix.kind == "input_major"
        assert matrix.rel_error == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4) and planted > 1
        assert _relative(merged[GATE_UP][expert] - base_tensors[GATE_UP][expert], best) < 1e-5
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["rank_pattern"] == {}


def test_no_experts_leaves_fused_tensors_out(gpt_oss_ft, runner, tmp_path):
    """--no-experts: reported per changed expert, never carried whole (not even with --save-modules)."""
    base, ft, _ = gpt_oss_ft
    result = invoke(runner, "extract", base, ft, "-o", tmp_path / "adapter", "--rank", "2", "--no-experts",
                    "--save-modules",
                    "--device", "cpu", "--json", tmp_path / "extract.json")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "target_parameters" not in config and config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    assert not config["modules_to_save"]
    not_carried = {n["name"]: n["reason"] for n in json.loads((tmp_path / "extract.json").read_text())["not_carried"]}
    assert sorted(n for n in not_carried if "[" in n) == sorted(
        [f"{name}[{e}]" for name, e in PLANTED] + ["model.layers.0.mlp.experts.down_proj_bias[1]"])
    assert "--no-experts" in not_carried[f"{GATE_UP}[1]"] and "--save-modules" not in not_carried[f"{GATE_UP}[1]"]
    assert set(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"}


def test_stacked_factors_are_each_experts_own_in_peft_layout():
    """stack_factors' (A, B) read back by PEFT's ParamWrapper reshapes give each expert's B_e @ A_e, zeros elsewhere."""
    g = torch.Generator().manual_seed(0)
    factors = {0: (torch.randn(2, 5, generator=g), torch.randn(7, 2, generator=g)),
               2: (torch.randn(1, 5, generator=g), torch.randn(7, 1, generator=g))}
    lora_a, lora_b = stack_factors(factors, experts=3, rank=2)
    assert lora_a.shape == (6, 5) and lora_b.shape == (7, 6)
    # PEFT ParamWrapper.get_delta_weight: einsum("o r e, e r i -> e o i") of the reshaped factors
    delta = torch.einsum("ore,eri->eoi", lora_b.reshape(7, 2, 3), lora_a.reshape(3, 2, 5))
    torch.testing.assert_close(delta[0], factors[0][1] @ factors[0][0])
    torch.testing.assert_close(delta[2], factors[2][1] @ factors[2][0])
    assert torch.count_nonzero(delta[1]) == 0


def test_nesting_follows_the_experts_class_definition_order():
    module = "model.layers.3.mlp.experts"
    assert nesting_order([f"{module}.down_proj", f"{module}.gate_up_proj"]) == [f"{module}.gate_up_proj",
                                                                               f"{module}.down_proj"]
    keys = parameter_keys([f"{module}.down_proj", f"{module}.gate_up_proj", "model.layers.4.mlp.experts.down_proj"])
    assert keys[f"{module}.gate_up_proj"][0] == f"base_model.model.{module}.base_layer.lora_A.weight"
    assert keys[f"{module}.down_proj"][1] == f"base_model.model.{module}.lora_B.weight"
    assert keys["model.layers.4.mlp.experts.down_proj"][0] == "base_model.model.model.layers.4.mlp.experts.lora_A.weight"


def test_budget_bounds_the_written_parameters_with_experts_sharing_a_rank(gpt_oss_ft, tmp_path):
    """The experts of a fused tensor share PEFT's r, so a budget buys ranks of the whole tensor: the
    file's LoRA numbers (zero-padded experts included) stay within the budget."""
    base, ft, _ = gpt_oss_ft
    for budget in (500, 1500):
        out = tmp_path / f"b{budget}"
        report = extract_lora(base, ft, out, budget=budget, options=SpectralOptions(device="cpu"))
        written = sum(t.numel() for t in load_file(out / "adapter_model.safetensors").values())
        assert written == report.parameters <= budget
        assert report.expert_parameters  # the budget reached at least one fused tensor
