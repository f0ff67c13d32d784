"""MoE experts (fused 3-D and per-expert layouts), fp8 / MXFP4 checkpoints, and zero-norm bases.

Ground truth: tiny transformers models built from configs (gpt-oss, Qwen3-MoE, Mixtral) with
changes of known rank written into one expert; fp8 and MXFP4 tensors written here with known
codes and scales, checked against a direct decode and transformers' own dequantization.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltakit
from deltakit.io.checkpoint import open_checkpoint
from deltakit.io.quantized import FP4_VALUES, fp8_spacing
from deltakit.lora import merge
from deltakit.spectral.options import SpectralOptions

from conftest import assert_one_line_error, invoke, low_rank

CPU = SpectralOptions(device="cpu")
E4M3 = torch.float8_e4m3fn


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity (which Python's json would otherwise accept)."""
    def refuse(constant: str):
        raise AssertionError(f"non-finite number {constant} in the report")
    return json.loads(text, parse_constant=refuse)


def _save(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


# --------------------------------------------------------------------------- MoE from transformers configs

def _saved_model(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=16)
    if kind == "gpt_oss":
        from transformers import GptOssConfig as Config, GptOssForCausalLM as Model
        config = Config(**common, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    elif kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig as Config, Qwen3MoeForCausalLM as Model
        config = Config(**common, intermediate_size=24, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2)
    else:
        from transformers import MixtralConfig as Config, MixtralForCausalLM as Model
        config = Config(**common, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    Model(config).save_pretrained(folder)
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def gpt_oss_pair(tmp_path_factory):
    """gpt-oss base with zero expert biases; the fine-tune adds rank 2 to expert 2's gate_up slice."""
    root = tmp_path_factory.mktemp("gpt_oss")
    tensors = _saved_model(root / "base", "gpt_oss")
    for name in tensors:
        if name.endswith("_bias"):
            tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, root / "base" / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(root / "base", root / "ft")
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    changed = tensors[gate_up].clone()
    changed[2] += low_rank(32, 16, 2, scale=0.05, seed=3).float()  # (hidden, 2·inter) slice, input-major
    tensors[gate_up] = changed
    tensors["model.layers.0.mlp.experts.down_proj_bias"][1] += 0.25  # a zero base bias that changed
    save_file(tensors, root / "ft" / "model.safetensors", metadata={"format": "pt"})
    return root / "base", root / "ft"


def test_gpt_oss_expert_slice_reads_its_rank_and_the_tensor_summary_counts_it(gpt_oss_pair, runner, tmp_path):
    base, ft = gpt_oss_pair
    out = tmp_path / "r.json"
    result = invoke(runner, "rank", base, ft, "--json", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = _strict_json(out.read_text())
    experts = {m["name"]: m for m in data["matrices"] if m["expert"] is not None}
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    assert sorted(experts) == sorted([f"{gate_up}[{e}]" for e in range(4)]
                                     + [f"model.layers.0.mlp.experts.down_proj[{e}]" for e in range(4)])
    assert [experts[f"{gate_up}[{e}]"]["rank"] for e in range(4)] == [0, 0, 2, 0]
    assert experts[f"{gate_up}[2]"]["shape"] == [32, 16] and experts[f"{gate_up}[2]"]["layout"] == "input_major"
    assert experts[f"{gate_up}[2]"]["module_type"] == "experts.gate_up" and experts[f"{gate_up}[2]"]["tensor"] == gate_up
    summary = data["summary"]
    assert summary["by_tensor"][gate_up]["count"] == 4 and summary["by_tensor"][gate_up]["changed"] == 1
    assert summary["by_tensor"][gate_up]["mean_rank"] == 0.5
    assert summary["by_tensor"]["model.layers.0.mlp.experts.down_proj"]["changed"] == 0
    assert {"experts.gate_up", "experts.down", "router"} <= set(summary["by_module_type"])
    table = invoke(runner, "rank", base, ft, "--device", "cpu").output
    assert f"{gate_up}[2]" in table and "by expert tensor (all experts)" in table


def test_zero_norm_bases_are_finite_in_table_and_json(gpt_oss_pair, runner):
    base, ft = gpt_oss_pair
    result = invoke(runner, "rank", base, ft, "--json", "-", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = _strict_json(result.stdout)
    biases = {v["name"]: v for v in data["vectors"] if "experts.down_proj_bias" in v["name"]}
    changed = biases["model.layers.0.mlp.experts.down_proj_bias[1]"]
    assert changed["changed"] and changed["rel_delta"] is None and changed["rel_delta_reason"] == "zero base"
    assert changed["delta_norm"] == pytest.approx(0.25 * math.sqrt(32), rel=1e-6)
    unchanged = biases["model.layers.0.mlp.experts.down_proj_bias[0]"]
    assert not unchanged["changed"] and unchanged["rel_delta"] is None and unchanged["delta_norm"] == 0


def test_zero_matrix_base_changed_and_unchanged(tmp_path, runner):
    zero, delta = torch.zeros(24, 16), low_rank(24, 16, 3, scale=0.1).float()
    other = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    base = _save(tmp_path / "base", {"a.weight": zero, "b.weight": zero, "c.weight": other, "d.bias": torch.zeros(5)})
    ft = _save(tmp_path / "ft", {"a.weight": delta, "b.weight": zero, "c.weight": other, "d.bias": torch.zeros(5)})
    report = deltakit.rank(base, ft, options=CPU)
    by_name = {m.name: m for m in report.matrices}
    assert by_name["a.weight"].rank == 3 and by_name["a.weight"].rel_delta is None
    assert by_name["a.weight"].rel_delta_reason == "zero base" and by_name["a.weight"].delta_fro > 0
    assert by_name["b.weight"].rank == 0 and by_name["b.weight"].rel_delta is None
    assert by_name["c.weight"].rel_delta == 0.0 and by_name["c.weight"].rel_delta_reason is None
    text = json.dumps(report.to_dict(), allow_nan=False)  # raises on inf / nan
    assert _strict_json(text)["summary"]["by_module_type"]["other"]["mean_rel_delta"] == 0.0
    result = invoke(runner, "rank", base, ft, "--device", "cpu")
    assert result.exit_code == 0 and "inf" not in result.output and "nan" not in result.output


@pytest.mark.parametrize("kind,leaf,module", [("mixtral", "block_sparse_moe.experts.{e}.w1.weight", "experts.gate"),
                                              ("qwen3_moe", "mlp.experts.{e}.down_proj.weight", "experts.down")])
def test_per_expert_layouts_are_grouped_like_fused_ones(tmp_path, kind, leaf, module):
    tensors = _saved_model(tmp_path / "base", kind)
    name = "model.layers.0." + leaf.format(e=1)
    tensors[name] = tensors[name] + low_rank(*tensors[name].shape, 3, scale=0.05, seed=1).float()
    shutil.copytree(tmp_path / "base", tmp_path / "ft")
    save_file(tensors, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    report = deltakit.rank(tmp_path / "base", tmp_path / "ft", options=CPU)
    by_name = {m.name: m for m in report.matrices}
    assert by_name[name].rank == 3 and by_name[name].expert == 1 and by_name[name].module_type == module
    group = "model.layers.0." + leaf.format(e="*")
    summary = report.summary()
    assert summary["by_tensor"][group]["count"] == 4 and summary["by_tensor"][group]["changed"] == 1
    router = "model.layers.0.block_sparse_moe.gate.weight" if kind == "mixtral" else "model.layers.0.mlp.gate.weight"
    assert by_name[router].module_type == "router" and by_name[router].expert is None


# --------------------------------------------------------------------------- fp8 with scales

def _expanded(scale: torch.Tensor, rows: int, cols: int, block=(128, 128)) -> torch.Tensor:
    """A per-block scale grid written out entry by entry (the reference, no broadcasting tricks)."""
    out = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            out[i, j] = scale[i // block[0], j // block[1]]
    return out


FP8_CONFIG = {"model_type": "llama", "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    """fp8 e4m3 weights with 128×128 block scales (shapes not multiples of 128), one per-channel, one e5m2
    per-tensor, a fused expert tensor with one scale per expert; returns (folder, logical fp32 values)."""
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    logical: dict[str, torch.Tensor] = {}

    def block_scaled(name: str, rows: int, cols: int) -> None:
        scale = 0.001 + 0.01 * torch.rand(math.ceil(rows / 128), math.ceil(cols / 128), generator=g)
        q = (torch.randn(rows, cols, generator=g) * 100).clamp(-448, 448).to(E4M3)
        tensors[name], tensors[name + "_scale_inv"] = q, scale
        logical[name] = q.float() * _expanded(scale, rows, cols)

    block_scaled("model.layers.0.self_attn.q_proj.weight", 200, 300)
    block_scaled("model.layers.0.self_attn.o_proj.weight", 300, 200)
    block_scaled("model.layers.0.mlp.up_proj.weight", 130, 300)
    channel = 0.002 + 0.01 * torch.rand(130, 1, generator=g)
    q = (torch.randn(130, 300, generator=g) * 50).to(E4M3)
    tensors["model.layers.0.mlp.gate_proj.weight"], tensors["model.layers.0.mlp.gate_proj.weight_scale"] = q, channel
    logical["model.layers.0.mlp.gate_proj.weight"] = q.float() * channel
    q = (torch.randn(300, 130, generator=g) * 50).to(torch.float8_e5m2)
    tensors["model.layers.0.mlp.down_proj.weight"] = q
    tensors["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.tensor(0.0123)
    logical["model.layers.0.mlp.down_proj.weight"] = q.float() * 0.0123
    experts = (torch.randn(3, 40, 24, generator=g) * 50).to(E4M3)
    per_expert = torch.tensor([0.01, 0.02, 0.03])
    tensors["model.layers.0.mlp.experts.gate_up_proj"] = experts
    tensors["model.layers.0.mlp.experts.gate_up_proj_scale_inv"] = per_expert.reshape(3, 1, 1)
    logical["model.layers.0.mlp.experts.gate_up_proj"] = experts.float() * per_expert.reshape(3, 1, 1)
    tensors["model.layers.0.self_attn.q_proj.input_scale"] = torch.tensor(1.0)
    tensors["model.norm.weight"] = torch.ones(200, dtype=torch.bfloat16)
    folder = _save(tmp_path_factory.mktemp("fp8") / "base", tensors, FP8_CONFIG)
    return folder, logical


def test_fp8_checkpoint_reads_dequantized_logical_tensors(fp8_model):
    folder, logical = fp8_model
    ckpt = open_checkpoint(folder)
    assert set(ckpt.keys()) == set(logical) | {"model.norm.weight"}  # scales and activation scales hidden
    for name, expected in logical.items():
        assert ckpt.dtype(name) == torch.bfloat16 and ckpt.shape(name) == tuple(expected.shape)
        torch.testing.assert_close(ckpt.get(name), expected.to(torch.bfloat16), rtol=0, atol=0)
    rows = ckpt.get_rows("model.layers.0.self_attn.o_proj.weight", 100, 260)  # crosses a block boundary
    torch.testing.assert_close(rows, logical["model.layers.0.self_attn.o_proj.weight"][100:260].to(torch.bfloat16),
                               rtol=0, atol=0)
    expert = ckpt.get_rows("model.layers.0.mlp.experts.gate_up_proj", 2, 3)[0]
    torch.testing.assert_close(expert, logical["model.layers.0.mlp.experts.gate_up_proj"][2].to(torch.bfloat16))
    assert ckpt.quantized["model.layers.0.self_attn.q_proj.weight"].description == "float8_e4m3fn with block scales"
    # against transformers' own dequantization (its public loading path):
    # test_fp8_llama_reads_as_transformers_dequantizes_it_and_the_merge_loads


def test_fp8_base_and_bf16_fine_tune_with_a_rank_4_change(fp8_model, tmp_path):
    """The acceptance case: rank 4 where the fine-tune changed, 0 where it kept the dequantized weights."""
    folder, logical = fp8_model
    changed = "model.layers.0.self_attn.o_proj.weight"
    ft = {name: value.to(torch.bfloat16) for name, value in logical.items()}
    ft[changed] = (logical[changed] + low_rank(300, 200, 4, scale=2.0, seed=5).float()).to(torch.bfloat16)
    ft["model.norm.weight"] = torch.ones(200, dtype=torch.bfloat16)
    ft_dir = _save(tmp_path / "ft", ft, {"model_type": "llama", "torch_dtype": "bfloat16"})
    report = deltakit.rank(folder, ft_dir, options=CPU)
    ranks = {m.name: m.rank for m in report.matrices}
    assert ranks.pop(changed) == 4
    assert set(ranks.values()) == {0}, ranks
    assert {m.name for m in report.matrices if m.expert is not None} == {
        f"model.layers.0.mlp.experts.gate_up_proj[{e}]" for e in range(3)}


def test_fp8_spacing_is_the_distance_to_the_next_code():
    codes = torch.arange(0, 0x7E, dtype=torch.uint8)  # every finite positive e4m3fn value below the largest
    values = codes.view(E4M3).float()
    following = (codes + 1).view(E4M3).float()
    torch.testing.assert_close(fp8_spacing(values, E4M3), following - values, rtol=0, atol=0)
    codes = torch.arange(0, 0x7B, dtype=torch.uint8)
    values = codes.view(torch.float8_e5m2).float()
    torch.testing.assert_close(fp8_spacing(values, torch.float8_e5m2),
                               (codes + 1).view(torch.float8_e5m2).float() - values, rtol=0, atol=0)


def test_quantization_step_of_a_block_scaled_tensor(fp8_model):
    folder, _ = fp8_model
    ckpt = open_checkpoint(folder)
    name = "model.layers.0.self_attn.q_proj.weight"
    stored = load_file(folder / "model.safetensors")
    step = ckpt.quantization_step(name)
    expected = fp8_spacing(stored[name].float(), E4M3) * _expanded(stored[name + "_scale_inv"], 200, 300)
    torch.testing.assert_close(step, expected, rtol=0, atol=0)
    assert ckpt.quantization_step("model.norm.weight") is None


def test_merge_into_an_fp8_base_writes_bf16_and_says_so(fp8_model, tmp_path, runner):
    folder, logical = fp8_model
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    a = torch.randn(2, 300, generator=torch.Generator().manual_seed(1)) * 0.1
    b = torch.randn(200, 2, generator=torch.Generator().manual_seed(2)) * 0.1
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["q_proj"]}))
    result = invoke(runner, "merge", folder, adapter, "-o", tmp_path / "merged", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "dequantized" in result.output and "bfloat16" in result.output and "not re-quantized" in result.output
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(merged) == set(logical) | {"model.norm.weight"}
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = (logical[name].to(torch.bfloat16).float() + 2.0 * (b @ a)).to(torch.bfloat16)
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=0)
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    report = merge(folder, adapter, tmp_path / "merged32", device="cpu", dtype="float32")
    assert "float32" in report.dequantized
    assert {t.dtype for t in load_file(tmp_path / "merged32" / "model.safetensors").values()} == {torch.float32}


def test_scaling_intruders_of_an_fp8_fine_tune_writes_it_dequantized_and_says_so(fp8_model, tmp_path, runner):
    """intruders --scale reads an fp8 fine-tune dequantized and writes bf16: config.json must stop
    calling the weights fp8 (it kept its quantization_config, which loaders would apply again)."""
    folder, logical = fp8_model
    out, report_path = tmp_path / "scaled", tmp_path / "r.json"
    result = invoke(runner, "intruders", folder, folder, "--scale", "0", "-o", out, "--json", report_path,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "dequantized" in result.output and "not re-quantized" in result.output
    assert "not re-quantized" in json.loads(report_path.read_text())["scaling"]["dequantized"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    written = load_file(out / "model.safetensors")
    assert set(written) == set(logical) | {"model.norm.weight"}
    for name, value in logical.items():  # W_ft = W_base: nothing scaled, each weight as read
        assert torch.equal(written[name], value.to(torch.bfloat16)), name


# --------------------------------------------------------------------------- MXFP4 (gpt-oss)

def test_mxfp4_known_decode_and_transformers_agree(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 16, 2, 16), generator=g, dtype=torch.uint8)  # (E, out, G, 16)
    scales = torch.randint(120, 132, (3, 16, 2), generator=g, dtype=torch.uint8)
    blocks[0, 0, 0, 0], scales[0, 0, 0] = 0x2F, 128  # low nibble 0xF = -6, high 0x2 = 1.0; times 2^(128-127)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    folder = _save(tmp_path / "m", {name + "_blocks": blocks, name + "_scales": scales,
                                    "model.norm.weight": torch.ones(4)}, {"model_type": "gpt_oss"})
    ckpt = open_checkpoint(folder)
    assert set(ckpt.keys()) == {name, "model.norm.weight"} and ckpt.shape(name) == (3, 64, 16)
    full = ckpt.get(name)
    assert full[0, 0, 0].item() == -12.0 and full[0, 1, 0].item() == 2.0  # (E, in, out): in runs along dim 1
    reference = torch.tensor(FP4_VALUES)[(blocks[1, 5, 1, 3] & 0x0F).long()] * 2.0 ** (int(scales[1, 5, 1]) - 127)
    assert full[1, 32 + 6, 5].item() == reference.item()
    torch.testing.assert_close(full, convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(ckpt.get_rows(name, 2, 3)[0], full[2], rtol=0, atol=0)
    step = ckpt.quantization_step(name)
    assert step[0, 0, 0].item() == 4.0 and step[0, 1, 0].item() == 1.0  # |6|: spacing 2; |1|: 0.5; times 2


def test_mxfp4_base_with_a_bf16_fine_tune_reads_the_changed_expert(tmp_path):
    g = torch.Generator().manual_seed(1)
    name = "model.layers.0.mlp.experts.down_proj"
    blocks = torch.randint(0, 256, (4, 32, 1, 16), generator=g, dtype=torch.uint8)
    scales = torch.full((4, 32, 1), 120, dtype=torch.uint8)
    base = _save(tmp_path / "base", {name + "_blocks": blocks, name + "_scales": scales},
                 {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}})
    logical = open_checkpoint(base).get(name).float()  # (4, 32, 32): (E, in, out)
    logical[3] += low_rank(32, 32, 2, scale=0.05, seed=2).float()
    ft = _save(tmp_path / "ft", {name: logical.to(torch.bfloat16)}, {"model_type": "gpt_oss"})
    report = deltakit.rank(base, ft, options=CPU)
    assert [m.rank for m in report.matrices] == [0, 0, 0, 2]
    assert report.summary()["by_tensor"][name]["changed"] == 1


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("tensors,config,words", [
    ({"a.qweight": torch.zeros(4, 4, dtype=torch.int32), "a.scales": torch.ones(1, 4)}, None, "GPTQ/AWQ"),
    ({"a.weight": torch.zeros(8, 1, dtype=torch.uint8), "a.weight.absmax": torch.ones(1)}, None, "bitsandbytes 4-bit"),
    ({"a.weight": torch.zeros(4, 4)}, {"quantization_config": {"quant_method": "awq"}}, "quantized with awq"),
    ({"a.weight": torch.zeros(4, 4)}, {"quantization_config": {"load_in_4bit": True}}, "bitsandbytes"),
    ({"a.weight": torch.zeros(4, 4).to(E4M3)}, None, "never reads fp8 values raw"),
])
def test_unreadable_quantized_formats_are_one_error(tmp_path, runner, tensors, config, words):
    bad = _save(tmp_path / "bad", tensors, config)
    good = _save(tmp_path / "good", {"a.weight": torch.zeros(4, 4)})
    assert_one_line_error(invoke(runner, "rank", bad, good, "--device", "cpu"), words)
    assert_one_line_error(invoke(runner, "rank", good, bad, "--device", "cpu"), words)


def test_non_finite_weights_are_one_error_not_a_traceback(tmp_path, runner):
    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    broken = weight.clone()
    broken[0, 0] = float("nan")
    base = _save(tmp_path / "base", {"x.weight": weight})
    ft = _save(tmp_path / "ft", {"x.weight": broken})
    assert_one_line_error(invoke(runner, "rank", base, ft, "--device", "cpu", "--json", "-"), "inf or nan")


def test_module_types_and_expert_orientation_from_names_shapes_and_config():
    from deltakit.pairing import module_type, pair_tensors

    assert module_type("model.layers.0.mlp.experts.gate_up_proj") == "experts.gate_up"
    assert module_type("model.layers.0.mlp.experts.7.up_proj.weight") == "experts.up"
    assert module_type("model.layers.0.block_sparse_moe.experts.7.w2.weight") == "experts.down"
    assert module_type("model.layers.0.mlp.shared_experts.gate_proj.weight") == "gate"  # a dense MLP beside the experts
    assert module_type("model.layers.0.mlp.router.weight") == "router"
    assert module_type("model.layers.0.mlp.experts.gate_up_proj_bias") == "bias"
    f32 = torch.float32
    fused = {"m.layers.0.mlp.experts.gate_up_proj": ((4, 64, 32), f32),  # (E, 2·inter, hidden): output-major
             "m.layers.0.mlp.experts.down_proj": ((4, 32, 16), f32)}
    for config, layout in (({"hidden_size": 32}, "linear"), ({"model_type": "gpt_oss"}, "input_major"),
                           ({"hidden_size": 64}, "input_major")):
        plan = pair_tensors(fused, fused, config)
        gate_up = [p for p in plan.pairs if p.module_type == "experts.gate_up"]
        assert len(gate_up) == 4 and gate_up[0].layout == layout and gate_up[3].rows == (3, 4)
    plan = pair_tensors(fused, fused, {"hidden_size": 32})
    assert [p.layout for p in plan.pairs if p.module_type == "experts.down"][0] == "linear"  # (hidden, inter)


def test_fp8_channel_scaled_rows(fp8_model):
    folder, logical = fp8_model
    name = "model.layers.0.mlp.gate_proj.weight"
    rows = open_checkpoint(folder).get_rows(name, 5, 77)
    torch.testing.assert_close(rows, logical[name][5:77].to(torch.bfloat16), rtol=0, atol=0)


# --------------------------------------------------------------------------- against transformers' own loaders

def _lora_adapter(folder: Path, module: str, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A hand-written rank-2 PEFT LoRA on one module, alpha 4 (scaling 2); returns (A, B)."""
    folder.mkdir()
    a = torch.randn(2, in_features, generator=torch.Generator().manual_seed(1)) * 0.05
    b = torch.randn(out_features, 2, generator=torch.Generator().manual_seed(2)) * 0.05
    save_file({f"base_model.model.{module}.lora_A.weight": a, f"base_model.model.{module}.lora_B.weight": b},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "target_modules": [module.rsplit(".", 1)[-1]]}))
    return a, b


def test_fp8_llama_reads_as_transformers_dequantizes_it_and_the_merge_loads(tmp_path, runner):
    from transformers import FineGrainedFP8Config, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    quantized: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)
    for name, value in load_file(tmp_path / "bf16" / "model.safetensors").items():
        if not name.endswith("proj.weight"):
            quantized[name] = value
            continue
        rows, cols = value.shape
        blocks = value.float().reshape(rows // 128, 128, cols // 128, 128)
        scale = blocks.abs().amax(dim=(1, 3)) / 448 * (1 + torch.rand(rows // 128, cols // 128, generator=g))
        quantized[name] = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(E4M3)
        quantized[name + "_scale_inv"] = scale
    fp8_config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    fp8_config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128],
                                         "activation_scheme": "dynamic"}
    base = _save(tmp_path / "fp8", quantized, fp8_config)
    theirs = LlamaForCausalLM.from_pretrained(base, quantization_config=FineGrainedFP8Config(dequantize=True),
                                              dtype=torch.bfloat16).state_dict()
    ckpt = open_checkpoint(base)
    assert set(ckpt.keys()) == set(theirs)
    for name in ckpt.keys():
        torch.testing.assert_close(ckpt.get(name), theirs[name], rtol=0, atol=0)
    module = "model.layers.0.self_attn.q_proj"
    a, b = _lora_adapter(tmp_path / "adapter", module, 128, 128)
    result = invoke(runner, "merge", base, tmp_path / "adapter", "-o", tmp_path / "merged", "--device", "cpu")
    assert result.exit_code == 0, result.output
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).state_dict()
    for name, value in theirs.items():
        expected = value if name != module + ".weight" else (value.float() + 2.0 * (b @ a)).to(torch.bfloat16)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=0)


def test_mxfp4_gpt_oss_reads_as_transformers_dequantizes_it(tmp_path):
    from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config

    config = GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                          num_experts_per_tok=2)
    torch.manual_seed(0)
    GptOssForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tensors = load_file(tmp_path / "bf16" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for proj in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{proj}"
        experts, width, out = tensors.pop(name).shape  # (E, in, out)
        tensors[name + "_blocks"] = torch.randint(0, 256, (experts, out, width // 32, 16), generator=g,
                                                  dtype=torch.uint8)
        tensors[name + "_scales"] = torch.randint(120, 125, (experts, out, width // 32), generator=g,
                                                  dtype=torch.uint8)
    mx_config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    mx_config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    base = _save(tmp_path / "mxfp4", tensors, mx_config)
    theirs = GptOssForCausalLM.from_pretrained(base, quantization_config=Mxfp4Config(dequantize=True),
                                               dtype=torch.bfloat16).state_dict()
    ckpt = open_checkpoint(base)
    for proj in ("gate_up_proj", "down_proj"):
        name = f"model.layers.0.mlp.experts.{proj}"
        torch.testing.assert_close(ckpt.get(name), theirs[name], rtol=0, atol=0)
    # intruders --scale on it (W_ft = W_base: nothing to scale) writes the fused experts slice by slice,
    # dequantized, and a config without MXFP4: transformers loads it as the same bf16 model
    from deltakit.lora.intruder_scaling import scale_intruders

    report = scale_intruders(base, base, tmp_path / "scaled", 0.0, options=CPU)
    assert report.scaling.dequantized and not report.scaling.matrices
    again = GptOssForCausalLM.from_pretrained(tmp_path / "scaled", dtype=torch.bfloat16).state_dict()
    assert again.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(again[name], value), name
