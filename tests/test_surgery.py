"""extract / merge / unmerge against real PEFT and transformers on tiny Llama, GPT-2, Qwen2 and BERT.

Every fine-tune here is a PEFT LoRA with non-zero B merged by PEFT itself (``merge_and_unload``)
and saved with ``save_pretrained``; the adapters deltakit writes are loaded back with
``PeftModel.from_pretrained``.
"""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltakit import SpectralOptions
from deltakit.lora import extract_lora, merge, unmerge

from conftest import merged_lora_copy, save, tiny_bert, tiny_gpt2, tiny_llama

CPU = SpectralOptions(device="cpu")
RANK = 4


def tiny_qwen2(dtype: torch.dtype = torch.float32, seed: int = 0):
    """Biases on q/k/v, tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).to(dtype).eval()


ARCHS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "qwen2": (tiny_qwen2, ["q_proj", "k_proj", "o_proj"]),
    "bert": (tiny_bert, ["query", "value", "intermediate.dense"]),
}
INPUT_IDS = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=INPUT_IDS)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def model_class(model):
    return type(model.base_model.model if hasattr(model, "base_model") and hasattr(model, "peft_config") else model)


class Case:
    """A base model, a PEFT LoRA on it (non-zero B), PEFT's merge of it, all saved under one folder."""

    def __init__(self, folder: Path, arch: str, dtype: torch.dtype = torch.float32, **lora_kwargs):
        build, targets = ARCHS[arch]
        self.arch, self.folder = arch, folder
        self.base = build(dtype)
        self.merged, self.peft_model = merged_lora_copy(self.base, targets, RANK, fan_in_fan_out=arch == "gpt2",
                                                        **lora_kwargs)
        self.base_dir, self.ft_dir = save(self.base, folder / "base"), save(self.merged, folder / "ft")
        self.adapter_dir = folder / "peft-adapter"
        self.peft_model.save_pretrained(self.adapter_dir)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    built: dict[str, Case] = {}

    def get(arch: str) -> Case:
        if arch not in built:
            built[arch] = Case(tmp_path_factory.mktemp(arch), arch)
        return built[arch]

    return get


def load_with_peft(base_model, adapter_dir: Path):
    """PeftModel.from_pretrained, asserting no missing and no unexpected keys, and that PEFT would save the same file."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(copy.deepcopy(base_model).float(), adapter_dir)
    complaints = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                  or "unexpected" in str(w.message).lower()]
    assert not complaints, complaints
    stored = load_file(adapter_dir / "adapter_model.safetensors")
    saved = get_peft_model_state_dict(model)
    assert set(saved) == set(stored), (set(saved) ^ set(stored))
    for key, value in stored.items():
        torch.testing.assert_close(saved[key].float(), value.float(), rtol=0, atol=0)
    result = set_peft_model_state_dict(model, stored)
    assert not result.unexpected_keys, result.unexpected_keys
    return model.eval()


def state_dict_distance(ours, theirs) -> float:
    ours, theirs = ours.state_dict(), theirs.state_dict()
    assert set(ours) == set(theirs)
    return max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours if ours[k].is_floating_point())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_extract_loads_in_peft_and_reproduces_the_fine_tune(cases, arch, tmp_path):
    case = cases(arch)
    report = extract_lora(case.base_dir, case.ft_dir, tmp_path / "adapter", rank=RANK, options=CPU)
    targeted = 2 * len(ARCHS[arch][1])
    assert len(report.matrices) == targeted and all(m.rank == RANK for m in report.matrices)
    assert report.relative_error < 1e-5 and not report.not_carried
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RANK and config["lora_alpha"] == RANK
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert len(config["target_modules"]) == targeted and config["base_model_name_or_path"] == str(case.base_dir)
    model = load_with_peft(case.base, tmp_path / "adapter")
    difference = float((outputs(model) - outputs(case.merged)).abs().max())
    assert difference < 1e-4, difference
    print(f"{arch}: extract rank {RANK} -> PEFT logits max |Δ| {difference:.2e}")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_merge_equals_peft_merge_and_unload(cases, arch, tmp_path):
    case = cases(arch)
    report = merge(case.base_dir, case.adapter_dir, tmp_path / "merged", device="cpu")
    assert report.lora_modules == 2 * len(ARCHS[arch][1])
    ours = model_class(case.base).from_pretrained(tmp_path / "merged").eval()
    weights = state_dict_distance(ours, case.merged)
    logits = float((outputs(ours) - outputs(case.merged)).abs().max())
    assert weights < 1e-5 and logits < 1e-4, (weights, logits)
    for name in ("config.json",) + (("generation_config.json",) if arch != "bert" else ()):
        assert (tmp_path / "merged" / name).is_file()
    print(f"{arch}: merge vs PEFT merge_and_unload: weights max |Δ| {weights:.2e}, logits {logits:.2e}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unmerge_of_merge_is_the_base_fp32(cases, arch, tmp_path):
    case = cases(arch)
    merge(case.base_dir, case.adapter_dir, tmp_path / "merged", device="cpu")
    report = unmerge(tmp_path / "merged", case.adapter_dir, tmp_path / "base-again", check=case.base_dir, device="cpu")
    assert report.check_max_abs < 1e-5 and report.check_rel_fro < 1e-6, report.to_dict()
    again = model_class(case.base).from_pretrained(tmp_path / "base-again")
    assert state_dict_distance(again, case.base) < 1e-5
    print(f"{arch}: unmerge(merge(base)) max |Δ| {report.check_max_abs:.2e}")


def test_unmerge_of_merge_is_the_base_within_bf16_rounding(tmp_path):
    case = Case(tmp_path / "case", "llama", dtype=torch.bfloat16)
    merge(case.base_dir, case.adapter_dir, tmp_path / "merged", device="cpu")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    unmerge(tmp_path / "merged", case.adapter_dir, tmp_path / "base-again", check=case.base_dir, device="cpu")
    again = load_file(tmp_path / "base-again" / "model.safetensors")
    base = load_file(case.base_dir / "model.safetensors")
    unit_roundoff = 2.0 ** -8
    worst = 0.0
    for name, original in base.items():
        restored = again[name].float()
        bound = unit_roundoff * (2 * original.float().abs() + (merged[name].float() - original.float()).abs()) + 1e-30
        excess = float(((restored - original.float()).abs() / bound).max())
        worst = max(worst, excess)
    assert worst <= 1.0, worst


def test_rslora_alpha_pattern_and_regex_targets_merge_like_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    save(base, tmp_path / "base")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                        target_modules=r".*\.(q_proj|v_proj|down_proj)",
                        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                        alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\.down_proj": 16})
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = peft_model.merge_and_unload()
    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", device="cpu")
    ours = type(base).from_pretrained(tmp_path / "merged")
    assert state_dict_distance(ours, reference) < 1e-5


def test_merge_scale_and_sharded_output(tmp_path):
    case = Case(tmp_path / "case", "llama")
    sharded = save(case.base, tmp_path / "base-sharded", max_shard_size="40KB")
    (sharded / "tokenizer_config.json").write_text("{}\n")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    report = merge(sharded, case.adapter_dir, tmp_path / "merged", scale=0.5, device="cpu")
    out = tmp_path / "merged"
    assert report.shards > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer_config.json").is_file() and (out / "config.json").is_file()
    assert report.shard_bytes == max(sum(t.numel() * t.element_size() for t in load_file(s).values()) for s in shards)
    ours = type(case.base).from_pretrained(out)
    base_sd, merged_sd, ours_sd = case.base.state_dict(), case.merged.state_dict(), ours.state_dict()
    for name, value in ours_sd.items():
        expected = base_sd[name] + 0.5 * (merged_sd[name] - base_sd[name])
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=0)


def uneven_case(folder: Path):
    """A Llama fine-tune whose modules carry LoRAs of different true ranks and sizes."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    torch.manual_seed(5)
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "down_proj", "up_proj"],
                        rank_pattern={"down_proj": 12, "up_proj": 6, "layers.1.self_attn.q_proj": 8})
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3 if "down_proj" in name else 0.05)
            if "lora_A" in name:  # a decaying spectrum inside each module
                param.mul_(torch.linspace(1.0, 0.1, param.shape[0])[:, None])
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return base, merged, save(base, folder / "base"), save(merged, folder / "ft")


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return uneven_case(tmp_path_factory.mktemp("uneven"))


def test_energy_one_gives_exact_per_module_ranks_with_rank_pattern(uneven, tmp_path):
    base, merged, base_dir, ft_dir = uneven
    report = extract_lora(base_dir, ft_dir, tmp_path / "adapter", energy=1.0, options=CPU)
    ranks = {m.module: m.rank for m in report.matrices}
    assert ranks["model.layers.0.mlp.down_proj"] == 12 and ranks["model.layers.1.self_attn.q_proj"] == 8
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.0.mlp.up_proj"] == 6
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] == config["rank_pattern"]
    model = load_with_peft(base, tmp_path / "adapter")
    for module, rank in ranks.items():
        assert model.get_submodule(f"base_model.model.{module}").lora_A["default"].weight.shape[0] == rank
    assert float((outputs(model) - outputs(merged)).abs().max()) < 1e-4


def test_energy_and_budget_adapters_load_in_peft(uneven, tmp_path):
    base, merged, base_dir, ft_dir = uneven
    energy = extract_lora(base_dir, ft_dir, tmp_path / "energy", energy=0.8, max_rank=6, options=CPU)
    assert all(m.kept_energy >= 0.8 or m.rank == 6 for m in energy.matrices)
    assert max(m.rank for m in energy.matrices) <= 6 and energy.passes == 2
    budget = 3000
    spent = extract_lora(base_dir, ft_dir, tmp_path / "budget", budget=budget, options=CPU)
    assert 0 < spent.parameters <= budget
    for folder, report in (("energy", energy), ("budget", spent)):
        model = load_with_peft(base, tmp_path / folder)
        for m in report.matrices:
            if m.rank:
                assert model.get_submodule(f"base_model.model.{m.module}").lora_A["default"].weight.shape[0] == m.rank


def test_budget_beats_uniform_rank_end_to_end(uneven, tmp_path):
    _, _, base_dir, ft_dir = uneven
    uniform = extract_lora(base_dir, ft_dir, tmp_path / "uniform", rank=3, options=CPU)
    budget = extract_lora(base_dir, ft_dir, tmp_path / "budget", budget=uniform.parameters, options=CPU)
    assert budget.parameters <= uniform.parameters
    assert budget.total_squared_error < 0.9 * uniform.total_squared_error, (budget.total_squared_error,
                                                                           uniform.total_squared_error)
    print(f"budget {budget.parameters} params: squared error {budget.total_squared_error:.4g} "
          f"vs uniform rank 3 {uniform.total_squared_error:.4g}")


def test_randomized_and_exact_extraction_agree_within_one_percent(uneven, tmp_path):
    _, _, base_dir, ft_dir = uneven
    fast = extract_lora(base_dir, ft_dir, tmp_path / "fast", rank=3, options=CPU)
    exact = extract_lora(base_dir, ft_dir, tmp_path / "exact", rank=3, options=SpectralOptions(device="cpu", exact=True))
    assert fast.method == "randomized" and exact.method == "exact"
    for ours, reference in zip(fast.matrices, exact.matrices):
        assert ours.rel_error <= 1.01 * reference.rel_error + 1e-7, (ours.name, ours.rel_error, reference.rel_error)


def test_output_dtype_follows_fine_tune_unless_asked(tmp_path):
    case = Case(tmp_path / "case", "llama", dtype=torch.bfloat16)
    extract_lora(case.base_dir, case.ft_dir, tmp_path / "bf16", rank=RANK, options=CPU)
    extract_lora(case.base_dir, case.ft_dir, tmp_path / "fp32", rank=RANK, options=CPU, dtype="float32")
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "adapter_model.safetensors").values()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(tmp_path / "fp32" / "adapter_model.safetensors").values()} == {torch.float32}


def test_save_modules_carries_biases_norms_and_tied_embeddings(tmp_path):
    """Qwen2: a LoRA-layer bias (bias='lora_only'), a bias of a layer without LoRA, a norm, the tied embedding."""
    case = Case(tmp_path / "case", "qwen2")
    ft = copy.deepcopy(case.merged)
    with torch.no_grad():
        ft.model.layers[0].self_attn.q_proj.bias.add_(0.1)  # q_proj has a LoRA
        ft.model.layers[1].self_attn.v_proj.bias.add_(0.1)  # v_proj has none
        ft.model.layers[1].post_attention_layernorm.weight.mul_(1.5)
        ft.model.embed_tokens.weight.add_(0.02 * torch.randn_like(ft.model.embed_tokens.weight))
    ft_dir = save(ft, tmp_path / "ft")

    plain = extract_lora(case.base_dir, ft_dir, tmp_path / "plain", rank=RANK, options=CPU)
    assert {e["name"] for e in plain.not_carried} >= {"model.layers.0.self_attn.q_proj.bias",
                                                      "model.embed_tokens.weight"}
    report = extract_lora(case.base_dir, ft_dir, tmp_path / "adapter", rank=RANK, save_modules=True, options=CPU)
    assert not report.not_carried and report.lora_bias
    assert report.modules_to_save == ["model.embed_tokens", "model.layers.1.post_attention_layernorm",
                                      "model.layers.1.self_attn.v_proj"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only" and config["ensure_weight_tying"] is True
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    model = load_with_peft(case.base, tmp_path / "adapter")
    difference = float((outputs(model) - outputs(ft)).abs().max())
    assert difference < 1e-4, difference

    merged = merge(case.base_dir, tmp_path / "adapter", tmp_path / "merged", device="cpu")
    assert "model.embed_tokens.weight" in merged.replaced and merged.skipped_tied == ["lm_head.weight"]
    ours = type(case.base).from_pretrained(tmp_path / "merged")
    assert float((outputs(ours) - outputs(ft)).abs().max()) < 1e-4
    with pytest.raises(Exception, match="cannot\\s+restore"):
        unmerge(tmp_path / "merged", tmp_path / "adapter", tmp_path / "refused", device="cpu")
    assert not (tmp_path / "refused").exists()
    kept = unmerge(tmp_path / "merged", tmp_path / "adapter", tmp_path / "kept", keep_replaced=True,
                   check=case.base_dir, device="cpu")
    assert "model.embed_tokens.weight" in kept.left_as_merged and kept.check_max_abs > 0.01


def test_embedding_lora_and_grown_vocabulary(tmp_path):
    """PEFT embedding LoRA on an untied Llama (--embeddings), then a fine-tune that added tokens (--save-modules)."""
    from peft import PeftModel

    case = Case(tmp_path / "case", "llama", )
    from conftest import merged_lora_copy as lora_on

    merged, peft_model = lora_on(case.base, ["embed_tokens", "q_proj"], RANK)
    ft_dir = save(merged, tmp_path / "ft")
    skipped = extract_lora(case.base_dir, ft_dir, tmp_path / "default", rank=RANK, options=CPU)
    assert any(e["name"] == "model.embed_tokens.weight" for e in skipped.not_carried)
    report = extract_lora(case.base_dir, ft_dir, tmp_path / "adapter", rank=RANK, embeddings=True, options=CPU)
    assert {m.kind for m in report.matrices} == {"embedding", "linear"}
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    model = load_with_peft(case.base, tmp_path / "adapter")
    assert float((outputs(model) - outputs(merged)).abs().max()) < 1e-4
    peft_model.save_pretrained(tmp_path / "peft-adapter")  # PEFT's own embedding LoRA merges like PEFT
    merge(case.base_dir, tmp_path / "peft-adapter", tmp_path / "merged", device="cpu")
    assert state_dict_distance(type(case.base).from_pretrained(tmp_path / "merged"), merged) < 1e-5

    grown = copy.deepcopy(case.merged)
    grown.resize_token_embeddings(104, mean_resizing=False)
    with torch.no_grad():
        grown.model.embed_tokens.weight[96:].normal_()
        grown.lm_head.weight[96:].normal_()
    grown_dir = save(grown, tmp_path / "grown")
    report = extract_lora(case.base_dir, grown_dir, tmp_path / "grown-adapter", rank=RANK, save_modules=True,
                          options=CPU)
    assert report.modules_to_save == ["lm_head", "model.embed_tokens"]
    resized = copy.deepcopy(case.base)
    resized.resize_token_embeddings(104, mean_resizing=False)
    model = PeftModel.from_pretrained(resized, tmp_path / "grown-adapter").eval()
    assert float((outputs(model) - outputs(grown)).abs().max()) < 1e-4
    result = merge(case.base_dir, tmp_path / "grown-adapter", tmp_path / "grown-merged", device="cpu")
    assert result.vocab_size == 104
    ours = type(case.base).from_pretrained(tmp_path / "grown-merged")
    assert float((outputs(ours) - outputs(grown)).abs().max()) < 1e-4


def _same_model(one: Path, two: Path) -> None:
    """The same files, tensors, shapes and dtypes; values equal up to fp32 rounding.

    B[rows] @ A and (B @ A)[rows] may round differently in the last bit (the matmul's blocking
    depends on the shapes), so row-block merges match whole merges to rounding, not to the bit.
    """
    from deltakit.io import open_checkpoint

    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    a, b = open_checkpoint(one), open_checkpoint(two)
    assert list(a.keys()) == list(b.keys())
    for name in a.keys():
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        ulp = torch.finfo(x.dtype).eps * float(x.abs().max())  # W + ΔW may cancel: scale by the tensor
        assert float((x - y).abs().max()) <= 4 * ulp, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_in_row_blocks_writes_the_same_bytes(cases, arch, tmp_path):
    """Tensors merged a few rows at a time (bounded memory) equal whole-tensor merges (to fp32 rounding).

    GPT-2's Conv1D weights are stored transposed, so their row blocks take columns of A.
    """
    from deltakit.lora.merging import MergePlan, apply_plan
    from deltakit.lora.tensor_merge import Step, pieces

    case = cases(arch)
    whole = merge(case.base_dir, case.adapter_dir, tmp_path / "whole", device="cpu")
    cut = pieces([Step(n, (64, 48), torch.float32) for n in ("a", "b")], 700)  # a few rows of every matrix at a time
    assert len(cut) == 2 * 22 and cut[0].rows == (0, 3) and cut[21].rows == (63, 64)
    blocks = apply_plan(MergePlan("merge", str(case.base_dir), (str(case.adapter_dir),), str(tmp_path / "blocks"),
                                  device="cpu", piece_bytes=700))
    _same_model(tmp_path / "whole", tmp_path / "blocks")
    assert blocks.lora_modules == whole.lora_modules and blocks.shards == whole.shards
    back = apply_plan(MergePlan("unmerge", str(tmp_path / "blocks"), (str(case.adapter_dir),), str(tmp_path / "back"),
                                check=str(case.base_dir), device="cpu", piece_bytes=700))
    back_whole = unmerge(tmp_path / "whole", case.adapter_dir, tmp_path / "back-whole", check=case.base_dir,
                         device="cpu")
    _same_model(tmp_path / "back", tmp_path / "back-whole")
    assert back.check_max_abs < 1e-5 and back.check_rel_fro < 1e-6  # unmerge(merge(base)) ≈ base, block by block
    assert back.check_rel_fro == pytest.approx(back_whole.check_rel_fro, rel=0.05, abs=1e-9)


def test_embedding_lora_and_grown_vocabulary_merge_in_row_blocks(tmp_path):
    """Embedding LoRA (stored transposed) and an adapter whose whole embedding grew the vocabulary."""
    from conftest import merged_lora_copy as lora_on

    from deltakit.lora.merging import MergePlan, apply_plan

    case = Case(tmp_path / "case", "llama")
    _, peft_model = lora_on(case.base, ["embed_tokens", "q_proj"], RANK)
    peft_model.save_pretrained(tmp_path / "emb-adapter")
    grown = copy.deepcopy(case.merged)
    grown.resize_token_embeddings(104, mean_resizing=False)
    with torch.no_grad():
        grown.model.embed_tokens.weight[96:].normal_()
    extract_lora(case.base_dir, save(grown, tmp_path / "grown"), tmp_path / "grown-adapter", rank=RANK,
                 save_modules=True, options=CPU)
    for adapter in ("emb-adapter", "grown-adapter"):
        merge(case.base_dir, tmp_path / adapter, tmp_path / f"{adapter}-whole", device="cpu")
        apply_plan(MergePlan("merge", str(case.base_dir), (str(tmp_path / adapter),), str(tmp_path / f"{adapter}-blocks"),
                             device="cpu", piece_bytes=1000))
        _same_model(tmp_path / f"{adapter}-whole", tmp_path / f"{adapter}-blocks")
