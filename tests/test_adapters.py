"""Every weight-changing PEFT adapter type against PEFT itself: merge, rank, unmerge, several at once.

Ground truth: PEFT 0.21 loads the adapter folder it wrote onto a tiny transformers model built from
a config and merges it (``merge_and_unload``). Nothing is trained; every trainable value is set to
a non-trivial random value (DoRA magnitudes, VeRA lambdas and IA3 vectors moved away from their
initial values).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, invoke, save, tiny_gpt2

REL_TOL = 1e-5


def tiny(arch: str):
    """A tiny model with non-zero biases (IA3 scales them)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = (Qwen2ForCausalLM(Qwen2Config(**common)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**common)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


def peft_configs():
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig

    return {
        "lora": ("llama", LoraConfig(r=4, lora_alpha=7, use_rslora=True, rank_pattern={"down_proj": 2},
                                     alpha_pattern={"q_proj": 3.0}, target_modules=["q_proj", "down_proj", "lm_head",
                                                                                    "embed_tokens"])),
        "dora": ("llama", LoraConfig(r=4, lora_alpha=5, use_dora=True,
                                     target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])),
        "adalora": ("llama", AdaLoraConfig(init_r=6, target_r=3, total_step=10, lora_alpha=4,
                                           target_modules=["q_proj", "v_proj"])),
        "loha": ("llama", LoHaConfig(r=4, alpha=6, rank_pattern={"q_proj": 3}, target_modules=["q_proj", "down_proj"])),
        "lokr": ("llama", LoKrConfig(r=4, alpha=6, target_modules=["q_proj", "k_proj", "down_proj"])),
        "vera": ("llama", VeraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj"])),
        "ia3": ("qwen2", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
    }


def randomise(peft_model, seed: int) -> None:
    """Every trainable value non-trivial: factors random, vectors moved away from their initial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if any(k in name for k in ("magnitude", "lambda", "ia3_l")):
                param.add_(0.3 * noise * param.abs().mean().clamp(min=0.3))
            else:
                param.copy_(0.1 * noise)


def write_adapter(base_model, config, folder, seed: int = 1, adalora_keep: int | None = None):
    """Save a PEFT adapter of ``config`` with random values; AdaLoRA keeps ``adalora_keep`` ranks per module."""
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base_model), copy.deepcopy(config))
    randomise(peft_model, seed)
    if adalora_keep is not None:  # what AdaLoRA's budget allocation leaves: a rank pattern that cuts the factors
        pattern = {}
        for name, param in peft_model.base_model.model.named_parameters():
            if name.endswith("lora_E.default"):
                keep = [i < adalora_keep for i in range(param.shape[0])]
                keep[0], keep[-1] = False, True  # not just a prefix
                pattern[name] = keep
        peft_model.peft_config["default"].rank_pattern = pattern
    peft_model.save_pretrained(folder)
    return folder


def peft_merged(base_model, adapter_folder) -> dict[str, torch.Tensor]:
    """PEFT's own result: it loads the adapter folder onto the base and merges it."""
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_folder)
    return {k: v.detach().clone() for k, v in loaded.merge_and_unload().state_dict().items()}


def read_model(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_model(ours: dict, reference: dict) -> None:
    """Every tensor present, each within REL_TOL relative (Frobenius) of the reference."""
    assert set(ours) == set(reference), set(ours) ^ set(reference)
    for name, value in reference.items():
        diff = float((ours[name].double() - value.double()).norm())
        assert diff <= REL_TOL * max(float(value.double().norm()), 1e-12), (name, diff)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {arch: (save(tiny(arch), root / arch), tiny(arch)) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    """name -> (base folder, base model, adapter folder, PEFT's merged state dict)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, (arch, config) in peft_configs().items():
        folder, model = bases[arch]
        adapter = write_adapter(model, config, root / name, adalora_keep=4 if name == "adalora" else None)
        out[name] = (folder, model, adapter, peft_merged(model, adapter))
    return out


TYPES = list(peft_configs())


@pytest.mark.parametrize("name", TYPES)
def test_merge_equals_peft_merge_and_unload(adapters, runner, tmp_path, name):
    base_folder, base_model, adapter, reference = adapters[name]
    changed = [k for k, v in reference.items() if not torch.equal(v, base_model.state_dict()[k])]
    assert len(changed) >= 4, changed  # the adapter really changes the model
    result = invoke(runner, "merge", base_folder, adapter, "-o", tmp_path / "merged", "--device", "cpu",
                    "--json", tmp_path / "merge.json")
    assert result.exit_code == 0, result.output
    assert_same_model(read_model(tmp_path / "merged"), reference)
    report = json.loads((tmp_path / "merge.json").read_text())
    assert report["adapter_types"] == [{"dora": "DORA"}.get(name, peft_configs()[name][1].peft_type.value)]
    if name == "ia3":  # IA3 scales the biases of its non-feed-forward layers
        assert "model.layers.0.self_attn.k_proj.bias" in changed


def peft_deltas(base_model, reference) -> dict[str, np.ndarray]:
    base = base_model.state_dict()
    return {k: (v.double() - base[k].double()).numpy() for k, v in reference.items()
            if v.dim() == 2 and not torch.equal(v, base[k])}


def rank_at(delta: np.ndarray, energy: float) -> int:
    s = np.linalg.svd(delta, compute_uv=False)
    cumulative = np.cumsum(s**2) / np.sum(s**2)
    return int(np.searchsorted(cumulative, energy - 1e-12) + 1)


def numerical_rank(delta: np.ndarray) -> int:
    """Singular values of the float64 ΔW above the fp32 data's floor, max(m, n)·eps₃₂·σ₁ (numpy's matrix_rank)."""
    s = np.linalg.svd(delta, compute_uv=False)
    return int(np.count_nonzero(s > max(delta.shape) * float(np.finfo(np.float32).eps) * s[0]))


def gram_count(delta: np.ndarray) -> int:
    """Singular values above the fp32 Gram path's floor, 16·√eps₃₂·σ₁: what it could resolve."""
    s = np.linalg.svd(delta, compute_uv=False)
    return int(np.count_nonzero(s > 16 * np.sqrt(np.finfo(np.float32).eps) * s[0]))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FULL_RANK = ("dora", "lokr", "ia3")  # their ΔW is (nearly) full-rank, with small trailing values (LoHa: below)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TYPES)
def test_rank_reads_each_types_delta(adapters, runner, tmp_path, name, device):
    """rank@90% within 1 of PEFT's merged ΔW, and the numerical rank exactly its float64 count on the default path
    (the full-rank types' small values lie under the fp32 Gram path's floor: refined, and counted)."""
    base_folder, base_model, adapter, reference = adapters[name]
    result = invoke(runner, "rank", base_folder, adapter, "--device", device, "--json", tmp_path / "rank.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rank.json").read_text())
    matrices = {m["name"]: m for m in report["matrices"]}
    deltas = peft_deltas(base_model, reference)
    assert deltas and set(deltas) <= set(matrices)
    for tensor, delta in deltas.items():
        assert abs(matrices[tensor]["rank_at"]["0.9"] - rank_at(delta, 0.9)) <= 1, tensor
        assert matrices[tensor]["rank"] == numerical_rank(delta), (tensor, matrices[tensor]["rank"])
    if name in FULL_RANK:  # values the fp32 Gram path cannot resolve (under 16·√eps₃₂·σ₁) are there, and counted
        assert any(numerical_rank(d) > gram_count(d) for d in deltas.values())
        assert report["summary"]["refined_matrices"] >= 1
        assert matrices[tensor]["delta_fro"] == pytest.approx(float(np.linalg.norm(delta)), rel=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_full_rank_loha_reads_its_rank(bases, runner, tmp_path, device):
    """LoHa at r = 8 on 64-wide layers: ΔW = (B₁A₁) ⊙ (B₂A₂) has rank up to r² = 64, full, its small values under
    the fp32 Gram path's floor; the default path counts them (the float64 count of PEFT's merged ΔW)."""
    from peft import LoHaConfig

    base_folder, base_model = bases["llama"]
    adapter = write_adapter(base_model, LoHaConfig(r=8, alpha=8, target_modules=["q_proj", "o_proj"]), tmp_path / "a")
    deltas = peft_deltas(base_model, peft_merged(base_model, adapter))
    result = invoke(runner, "rank", base_folder, adapter, "--device", device, "--json", tmp_path / "rank.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rank.json").read_text())
    matrices = {m["name"]: m for m in report["matrices"]}
    assert len(deltas) == 4 and any(numerical_rank(d) > gram_count(d) for d in deltas.values())
    for tensor, delta in deltas.items():
        assert matrices[tensor]["rank"] == numerical_rank(delta), (tensor, matrices[tensor]["rank"])
    assert report["summary"]["refined_matrices"] >= 1


@pytest.mark.parametrize("name", [n for n in TYPES if n != "dora"])
def test_unmerge_restores_the_base(adapters, runner, tmp_path, name):
    base_folder, base_model, adapter, _ = adapters[name]
    invoke(runner, "merge", base_folder, adapter, "-o", tmp_path / "merged", "--device", "cpu")
    args = ["unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "base-again", "--device", "cpu"]
    if name in ("lora", "dora"):  # the embedding's base layer is carried whole; left as merged (it is the base)
        args.append("--keep-replaced")
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output
    assert_same_model(read_model(tmp_path / "base-again"), read_model(base_folder))


def test_dora_unmerge_needs_the_original_and_says_why(adapters, runner, tmp_path):
    base_folder, _, adapter, _ = adapters["dora"]
    invoke(runner, "merge", base_folder, adapter, "-o", tmp_path / "merged", "--device", "cpu")
    result = invoke(runner, "unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "out", "--keep-replaced")
    assert_one_line_error(result, "DORA cannot be unmerged from the merged weights and the adapter alone")
    assert not (tmp_path / "out").exists()
    result = invoke(runner, "unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "out", "--keep-replaced",
                    "--base", base_folder, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert_same_model(read_model(tmp_path / "out"), read_model(base_folder))


def test_several_adapters_merge_as_a_weighted_sum_in_one_pass(adapters, runner, tmp_path):
    """merge BASE A1 A2 --weights 0.7,0.3 = W0 + 0.7·ΔW1 + 0.3·ΔW2, each ΔW from PEFT; unmerge mirrors it."""
    base_folder, base_model, dora, dora_merged = adapters["dora"]
    _, _, loha, loha_merged = adapters["loha"]
    base = base_model.state_dict()
    expected = {k: base[k] + 0.7 * (dora_merged[k] - base[k]) + 0.3 * (loha_merged[k] - base[k]) for k in base}
    result = invoke(runner, "merge", base_folder, dora, loha, "--weights", "0.7,0.3", "-o", tmp_path / "merged",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "2 adapters (DoRA, LoHa)" in result.stdout
    assert_same_model(read_model(tmp_path / "merged"), expected)
    result = invoke(runner, "unmerge", tmp_path / "merged", dora, loha, "--weights", "0.7,0.3", "--base", base_folder,
                    "--keep-replaced", "-o", tmp_path / "base-again", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert_same_model(read_model(tmp_path / "base-again"), read_model(base_folder))


def test_scaling_and_additive_adapters_unmerge_without_the_original(adapters, bases, runner, tmp_path):
    """IA3 scales W0 and LoKr adds to it: W = W0 ⊙ (1 + 0.5·g) + 2·ΔW is inverted exactly."""
    from peft import LoKrConfig

    base_folder, base_model, ia3, ia3_merged = adapters["ia3"]
    lokr = write_adapter(base_model, LoKrConfig(r=2, alpha=3, target_modules=["k_proj", "o_proj"]), tmp_path / "lokr")
    lokr_merged = peft_merged(base_model, lokr)
    base = base_model.state_dict()
    expected = {k: base[k] + 0.5 * (ia3_merged[k] - base[k]) + 2 * (lokr_merged[k] - base[k]) for k in base}
    invoke(runner, "merge", base_folder, ia3, lokr, "--weights", "0.5,2", "-o", tmp_path / "merged", "--device", "cpu")
    assert_same_model(read_model(tmp_path / "merged"), expected)
    result = invoke(runner, "unmerge", tmp_path / "merged", ia3, lokr, "--weights", "0.5,2",
                    "-o", tmp_path / "base-again", "--check", base_folder, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert_same_model(read_model(tmp_path / "base-again"), read_model(base_folder))


def test_bad_input_is_one_error_line_and_nothing_written(adapters, runner, tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    base_folder, base_model, lora, _ = adapters["lora"]
    _, _, loha, _ = adapters["loha"]
    out = tmp_path / "out"
    result = invoke(runner, "merge", base_folder, lora, loha, "--weights", "0.7", "-o", out)
    assert_one_line_error(result, "1 weight(s) given for 2 adapter(s)")
    result = invoke(runner, "merge", base_folder, lora, "--weights", "a,b", "-o", out)
    assert_one_line_error(result, "cannot read --weights")
    prompt = tmp_path / "prompt"
    get_peft_model(copy.deepcopy(base_model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
                   ).save_pretrained(prompt)
    result = invoke(runner, "merge", base_folder, prompt, "-o", out)
    assert_one_line_error(result, "PROMPT_TUNING (prompt tuning) changes activations, not weights")
    result = invoke(runner, "rank", base_folder, prompt)
    assert_one_line_error(result, "PROMPT_TUNING")
    gpt2 = save(tiny_gpt2(), tmp_path / "gpt2")
    result = invoke(runner, "merge", gpt2, loha, "-o", out)
    assert_one_line_error(result, "does not fit")
    result = invoke(runner, "merge", base_folder, lora, loha, "-o", out, "--weights", "1,inf")
    assert_one_line_error(result, "finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "prompt"]


def test_orientation_is_decided_once_from_the_layer(bases, runner, tmp_path):
    """A LoRA saying fan_in_fan_out on square nn.Linear layers: PEFT ignores the flag there, and so do
    rank's stream and merge alike (the stream used to analyse (BA)ᵀ while merge wrote BA)."""
    from peft import LoraConfig

    from deltakit.delta import open_delta_source

    folder, model = bases["llama"]
    adapter = write_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "o_proj"]), tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    reference = peft_merged(model, adapter)
    base = model.state_dict()
    for item in open_delta_source(folder, adapter).stream():
        torch.testing.assert_close(item.delta, reference[item.pair.name] - base[item.pair.name], rtol=0, atol=1e-6)
    invoke(runner, "merge", folder, adapter, "-o", tmp_path / "merged", "--device", "cpu")
    assert_same_model(read_model(tmp_path / "merged"), reference)


def test_lora_on_fused_expert_parameters(runner, tmp_path):
    """PEFT's target_parameters on a tiny gpt-oss: merge equals merge_and_unload, ΔW is experts × a × b,
    unmerge restores the base; rank reads each expert's ΔW rank, as the fp64 rank of PEFT's ΔW slice."""
    from peft import LoraConfig
    from transformers import GptOssConfig, GptOssForCausalLM

    from deltakit.delta import open_delta_source

    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(
        vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"] * 2)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name:
                param.normal_(0.0, 0.02)
    base_folder = save(model, tmp_path / "base")
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    adapter = write_adapter(model, config, tmp_path / "adapter")
    reference = peft_merged(model, adapter)
    base = model.state_dict()
    changed = {k for k, v in reference.items() if not torch.equal(v, base[k])}
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"} <= changed
    result = invoke(runner, "merge", base_folder, adapter, "-o", tmp_path / "merged", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert_same_model(read_model(tmp_path / "merged"), reference)

    deltas = {item.pair.name: item.delta for item in open_delta_source(base_folder, adapter).stream()}
    gate_up = deltas["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (4, 64, 64)  # experts × hidden × 2·intermediate, input-major as gpt-oss stores it
    torch.testing.assert_close(gate_up, reference["model.layers.0.mlp.experts.gate_up_proj"] -
                               base["model.layers.0.mlp.experts.gate_up_proj"], rtol=0, atol=1e-6)
    assert deltas["model.layers.1.mlp.experts.down_proj"].shape == (4, 32, 64)

    result = invoke(runner, "unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "base-again", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert_same_model(read_model(tmp_path / "base-again"), read_model(base_folder))

    result = invoke(runner, "rank", base_folder, adapter, "--device", "cpu", "--json", tmp_path / "rank.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rank.json").read_text())
    expected = {"model.layers.0.self_attn.q_proj.weight": 2, "model.layers.1.self_attn.q_proj.weight": 2}
    for i in (0, 1):
        for p in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{p}"
            truth = (reference[name].double() - base[name].double())
            for e in range(truth.shape[0]):
                expected[f"{name}[{e}]"] = int(torch.linalg.matrix_rank(truth[e], rtol=1e-6))
    assert {m["name"]: m["rank"] for m in report["matrices"]} == expected
    assert any(v > 0 for k, v in expected.items() if "experts" in k)
    by_tensor = report["summary"]["by_tensor"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert by_tensor["count"] == 4 and not report["skipped"]


@pytest.mark.parametrize("name", TYPES)
def test_merge_in_row_blocks_equals_whole_tensors(adapters, tmp_path, monkeypatch, name):
    """Merge cuts tensors above PIECE_BYTES into row blocks; each type's rows of ΔW must be its ΔW's rows
    (DoRA on an embedding, whose norms need every row, stays whole)."""
    from deltakit.lora.merging import MergePlan, apply_plan

    base_folder, _, adapter, reference = adapters[name]
    apply_plan(MergePlan("merge", str(base_folder), (str(adapter),), str(tmp_path / "merged"), device="cpu",
                         piece_bytes=2048))  # 8 rows of a 64-wide fp32 matrix
    assert_same_model(read_model(tmp_path / "merged"), reference)


PEFT_PATH_TYPES = ["oft", "hra", "fourierft"]


def peft_path_config(name: str):
    from peft import FourierFTConfig, HRAConfig, OFTConfig

    return {"oft": OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj", "down_proj"]),
            "hra": HRAConfig(r=4, target_modules=["q_proj", "v_proj"]),
            "fourierft": FourierFTConfig(n_frequency=50, target_modules=["q_proj", "up_proj"])}[name]


@pytest.mark.parametrize("name", PEFT_PATH_TYPES)
def test_other_peft_types_apply_through_peft_one_layer_at_a_time(bases, runner, tmp_path, name):
    """Types without a native module go through PEFT's own layer (the optional extra): merge equals
    merge_and_unload, rank reads PEFT's ΔW, unmerge needs the original (the ΔW may multiply W0)."""
    base_folder, base_model = bases["llama"]
    adapter = write_adapter(base_model, peft_path_config(name), tmp_path / name)
    reference = peft_merged(base_model, adapter)
    result = invoke(runner, "merge", base_folder, adapter, "-o", tmp_path / "merged", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert_same_model(read_model(tmp_path / "merged"), reference)
    result = invoke(runner, "rank", base_folder, adapter, "--device", "cpu", "--json", tmp_path / "rank.json")
    assert result.exit_code == 0, result.output
    matrices = {m["name"]: m for m in json.loads((tmp_path / "rank.json").read_text())["matrices"]}
    for tensor, delta in peft_deltas(base_model, reference).items():
        assert abs(matrices[tensor]["rank_at"]["0.9"] - rank_at(delta, 0.9)) <= 1, tensor
    result = invoke(runner, "unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "out")
    assert_one_line_error(result, f"{name.upper()} cannot be unmerged")
    result = invoke(runner, "unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "out", "--base", base_folder,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert_same_model(read_model(tmp_path / "out"), read_model(base_folder))


def test_other_peft_types_without_peft_installed_name_the_extra(bases, runner, tmp_path, monkeypatch):
    from deltakit.adapters import peft_layer

    base_folder, base_model = bases["llama"]
    adapter = write_adapter(base_model, peft_path_config("hra"), tmp_path / "hra")
    monkeypatch.setattr(peft_layer, "_peft", lambda: None)
    result = invoke(runner, "merge", base_folder, adapter, "-o", tmp_path / "out")
    assert_one_line_error(result, "adapter type HRA is not read natively")
    assert "deltakit[peft]" in result.stderr and not (tmp_path / "out").exists()
