"""Runs that cannot do everything asked say so, and pairs that look wrong are named.

Fixtures are written by hand (safetensors files of known tensors), so every expectation comes from
the construction: which tensor has another shape, which side is larger, which tensors differ.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, invoke

import deltakit
from deltakit.errors import DeltakitError, DeltakitWarning

H = 16


def _model(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None, **files: dict) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "llama", "hidden_size": H,
                                                              "tie_word_embeddings": False}))
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


def _weights(seed: int, vocab: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, H, generator=g) * 0.02}
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj"):
            tensors[f"model.layers.{i}.self_attn.{proj}.weight"] = torch.randn(H, H, generator=g) * 0.1
    return tensors


def _fine_tune(base: dict[str, torch.Tensor], seed: int = 5) -> dict[str, torch.Tensor]:
    """Every attention matrix moved by a rank-2 update of 10 % of its size."""
    g = torch.Generator().manual_seed(seed)
    out = dict(base)
    for name, w in base.items():
        if "self_attn" in name:
            out[name] = w + 0.05 * torch.randn(H, 2, generator=g) @ torch.randn(2, H, generator=g) * 0.1
    return out


@pytest.fixture
def pair(tmp_path):
    base = _weights(0)
    return _model(tmp_path / "base", base), _model(tmp_path / "ft", _fine_tune(base))


@pytest.fixture
def mismatched(tmp_path):
    """A fine-tune whose layers.1 v_proj has another shape: it cannot be paired with the base's."""
    base = _weights(0)
    ft = _fine_tune(base)
    ft["model.layers.1.self_attn.v_proj.weight"] = torch.randn(H + 2, H)
    return _model(tmp_path / "base", base), _model(tmp_path / "ft", ft)


def test_extract_refuses_a_tensor_it_cannot_pair_and_names_it(runner, mismatched, tmp_path):
    base, ft = mismatched
    result = invoke(runner, "extract", base, ft, "-o", tmp_path / "adapter", "--rank", "2", "-q", "--device", "cpu")
    assert_one_line_error(result, "model.layers.1.self_attn.v_proj.weight")
    assert "--skip-mismatched" in result.stderr and not (tmp_path / "adapter").exists()


def test_extract_skip_mismatched_writes_the_rest_and_warns_even_with_q(runner, mismatched, tmp_path):
    base, ft = mismatched
    result = invoke(runner, "extract", base, ft, "-o", tmp_path / "adapter", "--rank", "2", "-q", "--skip-mismatched",
                    "--json", tmp_path / "x.json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "warning: not carried: model.layers.1.self_attn.v_proj.weight: shape mismatch" in result.stderr
    report = json.loads((tmp_path / "x.json").read_text())
    assert [e["name"] for e in report["not_carried"]] == ["model.layers.1.self_attn.v_proj.weight"]
    assert len(report["matrices"]) == 5  # the other five attention matrices


def _lora_adapter(folder: Path, targets: dict[str, tuple[int, int]], rank: int = 2) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter (lora_alpha = r) on ``targets`` (module -> (out, in)); returns its tensors."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for module, (out, inp) in targets.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, inp, generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.1
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in targets}),
        "base_model_name_or_path": "base", "fan_in_fan_out": False, "bias": "none"}))
    return tensors


def test_merge_refuses_an_adapter_module_that_does_not_fit_then_skips_it(runner, pair, tmp_path):
    base, _ = pair
    fits, extra = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"  # the base has no o_proj
    factors = _lora_adapter(tmp_path / "lora", {fits: (H, H), extra: (H, H)})
    result = invoke(runner, "merge", base, tmp_path / "lora", "-o", tmp_path / "merged", "--device", "cpu")
    assert_one_line_error(result, extra)
    assert "--skip-mismatched" in result.stderr and not (tmp_path / "merged").exists()
    result = invoke(runner, "merge", base, tmp_path / "lora", "-o", tmp_path / "merged", "--skip-mismatched", "-q",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"warning: not carried: {extra}" in result.stderr
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    w0 = load_file(str(base / "model.safetensors"))
    lora = factors[f"base_model.model.{fits}.lora_B.weight"].double() @ factors[f"base_model.model.{fits}.lora_A.weight"].double()
    expected = w0[f"{fits}.weight"].double() + lora  # alpha / r = 1
    assert torch.allclose(merged[f"{fits}.weight"].double(), expected, atol=1e-6)
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], w0["model.layers.0.self_attn.k_proj.weight"])


def test_rank_warns_on_stderr_with_quiet_about_what_it_left_out(runner, mismatched):
    base, ft = mismatched
    result = invoke(runner, "rank", base, ft, "-q", "--device", "cpu")
    assert result.exit_code == 0 and result.stdout == ""
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warning == ["warning: 1 tensor not analysed: model.layers.1.self_attn.v_proj.weight (shape mismatch: "
                       "base (16, 16) vs fine-tune (18, 16))"]


def _warned(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, DeltakitWarning)]


def test_swapped_pair_is_named_from_the_vocabulary(tmp_path):
    """The fine-tune added two tokens; given in the wrong order, the 'base' is the larger one."""
    base = _weights(0, vocab=32)
    ft = _fine_tune(base)
    ft["model.embed_tokens.weight"] = torch.cat([base["model.embed_tokens.weight"], torch.randn(2, H) * 0.02])
    base_path, ft_path = _model(tmp_path / "base", base), _model(tmp_path / "ft", ft)
    assert not [m for m in _warned(lambda: deltakit.rank(base_path, ft_path)) if "may be the fine-tune" in m]
    messages = _warned(lambda: deltakit.rank(ft_path, base_path))
    swapped = [m for m in messages if "may be the fine-tune" in m]
    assert len(swapped) == 1 and "34 rows, the fine-tune's 32" in swapped[0], messages


def test_swapped_pair_is_named_from_the_config_and_generation_config(tmp_path):
    base = _weights(0)
    config = {"model_type": "llama", "hidden_size": H, "tie_word_embeddings": False}
    base_path = _model(tmp_path / "llama-base", base, config, generation_config={"max_length": 64})
    ft_path = _model(tmp_path / "llama-chat", _fine_tune(base), {**config, "_name_or_path": "org/llama-base"},
                     generation_config={"do_sample": True, "temperature": 0.6})
    assert not [m for m in _warned(lambda: deltakit.rank(base_path, ft_path)) if "may be the fine-tune" in m]
    swapped = [m for m in _warned(lambda: deltakit.rank(ft_path, base_path)) if "may be the fine-tune" in m]
    assert len(swapped) == 1
    assert "made from org/llama-base" in swapped[0] and "sets sampling" in swapped[0]


def test_identical_and_unrelated_checkpoints_are_named(runner, tmp_path):
    base = _weights(0)
    a = _model(tmp_path / "a", base)
    b = _model(tmp_path / "b", dict(base))  # the same weights in another folder
    unrelated = _model(tmp_path / "c", _weights(7))  # another draw: ‖W₁ − W₂‖/‖W₁‖ ≈ √2
    result = invoke(runner, "rank", a, a, "-q", "--device", "cpu")
    assert "warning: base and fine-tune are the same checkpoint" in result.stderr
    result = invoke(runner, "rank", a, b, "-q", "--device", "cpu")
    assert "warning: no tensor differs" in result.stderr
    result = invoke(runner, "rank", a, unrelated, "-q", "--device", "cpu")
    line = next(line for line in result.stderr.splitlines() if "median relative change" in line)
    median = float(line.split("is ")[1].split(":")[0])
    assert 1.2 < median < 1.6, line  # √2 for two independent draws, to sampling error on 16×16 matrices
    result = invoke(runner, "rank", a, tmp_path / "b", "-q", "--device", "cpu")
    assert "median relative change" not in result.stderr


def test_a_mistyped_local_path_is_no_such_file_and_a_hub_failure_says_what_was_tried(runner, pair, monkeypatch):
    base, ft = pair
    monkeypatch.chdir(base.parent)
    result = invoke(runner, "rank", "bse/model.safetensors", "ft", "--device", "cpu")  # a file name: never a Hub id
    assert_one_line_error(result, "bse/model.safetensors: no such file or folder")
    result = invoke(runner, "rank", "bse/model", "ft", "--device", "cpu")  # bse/ does not exist here...
    assert_one_line_error(result, "bse/model is not a local file or folder, so it was read as a Hub id")  # ...org/name
    result = invoke(runner, "rank", "base/modl.safetensors", "ft", "--device", "cpu")  # base/ exists: local
    assert_one_line_error(result, "base/modl.safetensors: no such file or folder (base holds config.json, "
                                  "model.safetensors)")
    assert_one_line_error(invoke(runner, "rank", "./bse", "ft", "--device", "cpu"), "./bse: no such file or folder")
    result = invoke(runner, "rank", "org/bse", "ft", "--offline", "--device", "cpu")
    assert_one_line_error(result, "org/bse is not a local file or folder, so it was read as a Hub id: org/bse is "
                                  "not in the local Hugging Face cache")


def test_revision_applies_to_hub_ids_without_one():
    from deltakit.io.hub import HubId, hub_id_of, hub_settings

    with hub_settings(revision="v1.0"):
        assert hub_id_of("org/name") == HubId("org/name", "v1.0")
        assert hub_id_of("org/name@main") == HubId("org/name", "main")
        assert hub_id_of("./org/name") is None
    assert hub_id_of("org/name") == HubId("org/name", None)


def test_python_api_energy_float_and_messages_name_keyword_and_flag(pair):
    base, ft = pair
    one = deltakit.rank(base, ft, energy=0.9)
    assert one.energy == (0.9,) and one.to_dict()["matrices"] == deltakit.rank(base, ft, energy=(0.9,)).to_dict()["matrices"]
    with pytest.raises(DeltakitError, match=r"energy=0.9 \(--energy 0.9\)"):
        deltakit.rank(base, ft, energy=1.5)
    with pytest.raises(DeltakitError, match="number or a sequence"):
        deltakit.rank(base, ft, energy="high")


def test_an_integer_buffer_on_one_side_is_not_a_missing_weight(runner, tmp_path):
    """BERT's embeddings.position_ids (int64) is saved by old transformers and not by new ones: not a refusal."""
    base = _weights(0)
    with_buffer = {**base, "embeddings.position_ids": torch.arange(8).unsqueeze(0)}
    base_path, ft_path = _model(tmp_path / "base", with_buffer), _model(tmp_path / "ft", _fine_tune(base))
    result = invoke(runner, "extract", base_path, ft_path, "-o", tmp_path / "adapter", "--rank", "2", "-q",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    result = invoke(runner, "rank", base_path, ft_path, "-q", "--device", "cpu")
    assert "warning" not in result.stderr, result.stderr
