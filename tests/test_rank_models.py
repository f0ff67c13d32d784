"""`rank` on real architectures carrying a PEFT LoRA merged by PEFT itself: exactly r where targeted, 0 elsewhere."""


import pytest
import torch

import deltakit
from deltakit import SpectralOptions

from conftest import assert_one_line_error, invoke, merged_lora_copy, save, tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], {"q", "v", "down"}),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], {"qkv", "mlp_in"}),
    "bert": (tiny_bert, ["query", "value", "intermediate.dense"], {"q", "v", "mlp_in"}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", sorted(CASES))
def test_merged_lora_rank_is_exactly_r(tmp_path, arch, dtype):
    build, targets, target_types = CASES[arch]
    lora_rank = 4
    base = build(dtype)
    merged, _ = merged_lora_copy(base, targets, lora_rank, fan_in_fan_out=(arch == "gpt2"))
    base_dir, ft_dir = save(base, tmp_path / "base"), save(merged, tmp_path / "ft")
    report = deltakit.rank(base_dir, ft_dir, energy=(0.9, 1.0), options=SpectralOptions(device="cpu"))
    assert report.matrices, "no matrices analysed"
    targeted = [m for m in report.matrices if m.module_type in target_types]
    others = [m for m in report.matrices if m.module_type not in target_types]
    assert len(targeted) == 2 * len(targets)
    for m in targeted:
        assert m.rank == lora_rank, (m.name, m.rank, m.noise_floor)
        assert 1 <= m.rank_at[0.9] <= lora_rank and m.rank_at[1.0] <= m.shape[1]
        assert m.signal_rank_at[0.9] is not None and m.signal_rank_at[0.9] <= lora_rank
        assert m.random_rank_at[0.9] > 10 * lora_rank // 4
        if arch == "gpt2":
            assert m.layout == "conv1d"
    for m in others:
        assert m.rank == 0 and m.delta_fro == 0.0 and m.rank_at[0.9] == 0, m.name
    assert not any(v.changed for v in report.vectors)


@pytest.mark.parametrize("exact", [False, True], ids=["gram", "exact"])
def test_adapter_folder_analysed_directly(tmp_path, exact):
    base = tiny_llama()
    _, peft_model = merged_lora_copy(base, ["q_proj", "o_proj"], 3)
    peft_model.save_pretrained(tmp_path / "adapter")
    save(base, tmp_path / "base")
    report = deltakit.rank(tmp_path / "base", tmp_path / "adapter", options=SpectralOptions(device="cpu", exact=exact))
    assert sorted({m.module_type for m in report.matrices}) == ["o", "q"]
    assert all(m.rank == 3 for m in report.matrices)
    assert all(m.noise_model == "exact" and m.noise_share == 0 and m.signal_rank_at == m.rank_at for m in report.matrices)
    # the adapter's ΔW equals what PEFT merges
    merged = peft_model.merge_and_unload()
    q = merged.model.layers[0].self_attn.q_proj.weight - base.model.layers[0].self_attn.q_proj.weight
    got = next(m for m in report.matrices if m.name.endswith("layers.0.self_attn.q_proj.weight"))
    assert got.delta_fro == pytest.approx(torch.linalg.norm(q.double()).item(), rel=1e-5)


def test_sharded_checkpoint_same_as_single_file(tmp_path):
    base = tiny_llama()
    merged, _ = merged_lora_copy(base, ["k_proj"], 2)
    save(base, tmp_path / "base")
    save(merged, tmp_path / "ft_sharded", max_shard_size="40KB")
    save(merged, tmp_path / "ft_single")
    assert (tmp_path / "ft_sharded" / "model.safetensors.index.json").exists()
    a = deltakit.rank(tmp_path / "base", tmp_path / "ft_sharded", options=SpectralOptions(device="cpu"))
    b = deltakit.rank(tmp_path / "base", tmp_path / "ft_single", options=SpectralOptions(device="cpu"))
    assert sorted((m.name, m.rank, m.delta_fro) for m in a.matrices) == sorted((m.name, m.rank, m.delta_fro) for m in b.matrices)
    assert sum(m.rank == 2 for m in a.matrices) == 2


def test_adapter_for_another_model_is_refused(tmp_path, runner):
    llama = tiny_llama()
    _, peft_model = merged_lora_copy(tiny_gpt2(), ["c_attn"], 2, fan_in_fan_out=True)
    peft_model.save_pretrained(tmp_path / "gpt2_adapter")
    save(llama, tmp_path / "llama")
    result = invoke(runner, "rank", tmp_path / "llama", tmp_path / "gpt2_adapter", "--device", "cpu")
    assert_one_line_error(result, "does not fit")


def test_vocabulary_growth_reported(tmp_path):
    base = tiny_llama()
    ft = tiny_llama()
    ft.load_state_dict(base.state_dict())
    ft.resize_token_embeddings(100)
    save(base, tmp_path / "base")
    save(ft, tmp_path / "ft")
    report = deltakit.rank(tmp_path / "base", tmp_path / "ft", options=SpectralOptions(device="cpu"))
    embed = next(m for m in report.matrices if m.module_type == "embed")
    assert embed.added_rows == 4 and embed.shape == (96, 64) and embed.rank == 0
