"""The PEFT adapter format deltakit writes and reads, checked against PEFT itself."""

import copy
import json

import torch
from safetensors.torch import load_file

import deltakit
from deltakit import SpectralOptions
from deltakit.adapters import open_adapter
from deltakit.io.peft import adapter_config, adapter_keys, whole_tensor_key
from deltakit.lora import extract_lora, merge

from conftest import merged_lora_copy, save, tiny_gpt2, tiny_llama

CPU = SpectralOptions(device="cpu")


def test_key_names():
    assert adapter_keys("model.layers.0.self_attn.q_proj") == (
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    assert adapter_keys("model.embed_tokens", embedding=True) == (
        "base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B")
    assert whole_tensor_key("model.norm.weight") == "base_model.model.model.norm.weight"
    assert whole_tensor_key("model.layers.0.self_attn.q_proj.bias", lora_bias=True) == (
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias")


def test_rank_pattern_is_applied_by_peft_exactly_per_module():
    """Layer 1's pattern must not leak into layer 11 (PEFT's patterns are regexes matched on a suffix)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    ranks = {f"model.layers.{i}.self_attn.q_proj": 4 for i in range(12)}
    ranks["model.layers.1.self_attn.q_proj"] = 2
    ranks["model.layers.11.mlp.down_proj"] = 7
    config = adapter_config(ranks)
    assert config["r"] == 4 and config["lora_alpha"] == 4
    assert config["rank_pattern"] == {r"model\.layers\.1\.self_attn\.q_proj": 2, r"model\.layers\.11\.mlp\.down_proj": 7}
    fields = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    peft_model = get_peft_model(model, LoraConfig(**fields))
    for module, rank in ranks.items():
        layer = peft_model.get_submodule(f"base_model.model.{module}")
        assert layer.lora_A["default"].weight.shape[0] == rank, module
        assert layer.scaling["default"] == 1.0
    assert not hasattr(peft_model.get_submodule("base_model.model.model.layers.1.mlp.down_proj"), "lora_A")


def test_extracted_adapter_reads_back_with_scaling_one(tmp_path):
    base = tiny_gpt2()
    merged, _ = merged_lora_copy(base, ["c_attn"], 3, fan_in_fan_out=True)
    save(base, tmp_path / "base")
    save(merged, tmp_path / "ft")
    extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "adapter", rank=3, options=CPU)
    adapter = open_adapter(tmp_path / "adapter")
    assert adapter.config["fan_in_fan_out"] is True and adapter.config["task_type"] == "CAUSAL_LM"
    assert sorted(adapter.modules) == ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]
    for module in adapter.modules.values():
        assert module.rank == 3 and module.scaling == 1.0 and module.fan_in_fan_out
        a, b = adapter.factors(module)
        assert a.shape == (3, 64) and b.shape == (192, 3)  # A: r × in, B: out × r, Conv1D weight is (64, 192)
    # `deltakit rank` reads the extracted adapter directly: exactly rank 3 where the LoRA was
    report = deltakit.rank(tmp_path / "base", tmp_path / "adapter", options=CPU)
    assert [m.rank for m in report.matrices] == [3, 3]


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False)).eval()


def test_peft_bias_and_modules_to_save_adapters_merge_like_peft(tmp_path):
    """PEFT's own keys: base_layer.bias (bias='lora_only') and modules_to_save parameters replace the base's."""
    from peft import LoraConfig, get_peft_model

    base = tiny_qwen2()
    save(base, tmp_path / "base")
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, lora_alpha=5, init_lora_weights=False, target_modules=["q_proj", "v_proj"], bias="lora_only",
        modules_to_save=["model.norm", "model.layers.0.mlp.up_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or name.endswith("base_layer.bias") or "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "adapter")
    stored = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in stored
    adapter = open_adapter(tmp_path / "adapter")
    assert {"model.layers.0.self_attn.q_proj.bias", "model.norm.weight",
            "model.layers.0.mlp.up_proj.weight"} <= set(adapter.whole_tensors)
    reference = peft_model.merge_and_unload()
    report = merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", device="cpu")
    assert "model.norm.weight" in report.replaced
    ours = type(base).from_pretrained(tmp_path / "merged").state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(ours[name], value, atol=1e-5, rtol=0, msg=name)


def test_extract_config_is_a_loadable_lora_config(tmp_path):
    from peft import LoraConfig

    base = tiny_llama()
    merged, _ = merged_lora_copy(base, ["q_proj", "o_proj"], 2)
    save(base, tmp_path / "base")
    save(merged, tmp_path / "ft")
    extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "adapter", budget=600, options=CPU)
    config = LoraConfig.from_pretrained(tmp_path / "adapter")
    stored = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config.peft_type == "LORA" and config.target_modules == set(stored["target_modules"])
    assert all(module.startswith("model.layers.") for module in stored["target_modules"])
    assert stored["lora_alpha"] == stored["r"] and stored["alpha_pattern"] == stored["rank_pattern"]
    assert stored["bias"] == "none" and not stored["use_rslora"] and not stored["use_dora"]
