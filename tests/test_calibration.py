"""Extraction judged by what the model does: output errors on the fine-tune's layer inputs, the KL of
base + adapter, activation-aware factors, and `check` (issue 33).

The references are independent of deltakit's calibration code: the fine-tune and the base run in
float64 through transformers, layer inputs are caught with forward hooks and used whole (not their
covariance), base + adapter is PEFT's own model, and ΔW, A and B are read from the files.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_one_line_error, invoke, save, tiny_bert, tiny_llama

pytest.importorskip("transformers")
pytest.importorskip("peft")

VOCAB = 96
CHARS = "abcdefghijklmnopqrstuvwxyz .,"


def _fine_tune(model, seed: int = 1, scale: float = 0.02):
    """A copy with a dense random change of every linear weight (embeddings and head kept)."""
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if param.ndim == 2 and "embed" not in name and "lm_head" not in name:
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
    return tuned


def _anisotropic(model):
    """Norm gains spread over two decades: every layer's inputs are far from isotropic (as real models' are)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.logspace(0, -2, param.numel(), dtype=param.dtype))
    return model


def _tokenizer_into(folder: Path) -> None:
    """A character-level tokenizer (ids < VOCAB) saved beside the model, made without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<unk>": 1, **{ch: i + 2 for i, ch in enumerate(CHARS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny Llama base and a dense fine-tune of it (fp32), and 6 × 24 calibration token ids."""
    root = tmp_path_factory.mktemp("calibration")
    base = _anisotropic(tiny_llama())
    save(base, root / "base")
    save(_fine_tune(base, scale=0.05), root / "ft")
    _tokenizer_into(root / "ft")
    ids = torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(3))
    save_file({"input_ids": ids}, str(root / "calib.safetensors"))
    return root


@pytest.fixture(scope="module")
def extracted(pair):
    """The same rank-4 extraction plain and activation-aware (exact SVDs; on the GPU where there is one), with
    their reports."""
    from deltakit.lora import extract_lora
    from deltakit.spectral.options import SpectralOptions

    options = SpectralOptions(device="auto", exact=True)
    calib = pair / "calib.safetensors"
    plain = extract_lora(pair / "base", pair / "ft", pair / "plain", rank=4, calibration=calib, options=options)
    aware = extract_lora(pair / "base", pair / "ft", pair / "aware", rank=4, calibration=calib, options=options,
                         activation_aware=True)
    return plain, aware


def _load(folder: Path, causal: bool = True):
    from transformers import AutoModel, AutoModelForCausalLM

    return (AutoModelForCausalLM if causal else AutoModel).from_pretrained(folder).double().eval()


def _layer_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every nn.Linear's input rows (tokens × in), caught by forward hooks over all sequences."""
    caught: dict[str, list[torch.Tensor]] = {}
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: caught.setdefault(name, []).append(
        args[0].reshape(-1, args[0].shape[-1]))) for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(rows) for name, rows in caught.items()}


def _tensor(folder: Path, name: str) -> torch.Tensor:
    with safe_open(str(next(folder.glob("*.safetensors"))), framework="pt") as handle:
        return handle.get_tensor(name).to(torch.float64)


def _lora(adapter: Path, module: str) -> torch.Tensor:
    """s·B·A of one module, read from the adapter's files (s = lora_alpha / r per module)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        a = handle.get_tensor(f"base_model.model.{module}.lora_A.weight").to(torch.float64)
        b = handle.get_tensor(f"base_model.model.{module}.lora_B.weight").to(torch.float64)
    key = module.replace(".", "\\.")
    rank = config.get("rank_pattern", {}).get(key, config["r"])
    alpha = config.get("alpha_pattern", {}).get(key, config["lora_alpha"])
    assert a.shape[0] == rank
    return (alpha / rank) * b @ a


def _mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_output_error_and_kl_equal_an_independent_float64_computation(pair, extracted):
    from peft import PeftModel

    with safe_open(str(pair / "calib.safetensors"), framework="pt") as handle:
        ids = handle.get_tensor("input_ids")
    ft_model = _load(pair / "ft")
    inputs = _layer_inputs(ft_model, ids)
    with torch.no_grad():
        ft_logits = ft_model(input_ids=ids).logits
        base_logits = _load(pair / "base")(input_ids=ids).logits
    for report, adapter in zip(extracted, (pair / "plain", pair / "aware")):
        assert report.matrices and all(m.output_error is not None for m in report.matrices)
        for m in report.matrices:
            x = inputs[m.module]
            delta = _tensor(pair / "ft", m.name) - _tensor(pair / "base", m.name)
            expected = float(torch.linalg.vector_norm((delta - _lora(adapter, m.module)) @ x.T)
                             / torch.linalg.vector_norm(delta @ x.T))
            assert m.output_error == pytest.approx(expected, rel=1e-5), m.name
        with torch.no_grad():
            peft_model = PeftModel.from_pretrained(_load(pair / "base"), adapter).double().eval()
            adapted_logits = peft_model(input_ids=ids).logits
        fidelity = report.fidelity
        assert fidelity["tokens"] == ids.numel() == report.calibration["tokens"]
        # deltakit runs the models in their fp32, the reference in float64
        assert fidelity["kl"] == pytest.approx(_mean_kl(ft_logits, adapted_logits), rel=1e-3)
        assert fidelity["kl_base"] == pytest.approx(_mean_kl(ft_logits, base_logits), rel=1e-3)
        assert 0 < fidelity["kl"] < fidelity["kl_base"]
    assert extracted[1].fidelity["kl"] < 0.8 * extracted[0].fidelity["kl"]  # the tolerance tells them apart


def test_activation_aware_is_never_worse_on_any_matrix_and_better_on_average(extracted):
    plain, aware = extracted
    by_name = {m.name: m for m in plain.matrices}
    assert [m.name for m in aware.matrices] == list(by_name)
    for m in aware.matrices:
        assert m.output_error <= by_name[m.name].output_error * (1 + 1e-9), m.name
        assert m.rel_error >= by_name[m.name].rel_error * (1 - 1e-9), m.name  # plain is the weight optimum
    assert aware.mean_output_error < 0.9 * plain.mean_output_error
    assert aware.fidelity["kl"] < plain.fidelity["kl"]
    assert aware.to_dict()["calibration"]["activation_aware"] is True


def test_energy_is_measured_in_the_whitened_space(pair, extracted):
    """--energy with --activation-aware: each rank is the energy rank of σ(ΔW·L), L·Lᵀ = C + λI from the
    hooked inputs, and the kept energy that spectrum's."""
    from deltakit.lora import extract_lora
    from deltakit.lora.whitening import RIDGE
    from deltakit.spectral.metrics import rank_at_energy
    from deltakit.spectral.options import SpectralOptions

    report = extract_lora(pair / "base", pair / "ft", pair / "aware-energy", energy=0.8, activation_aware=True,
                          calibration=pair / "calib.safetensors", options=SpectralOptions(device="cpu", exact=True))
    with safe_open(str(pair / "calib.safetensors"), framework="pt") as handle:
        inputs = _layer_inputs(_load(pair / "ft"), handle.get_tensor("input_ids"))
    ranks = []
    for m in report.matrices:
        c = inputs[m.module].T @ inputs[m.module]
        c += RIDGE * float(c.diagonal().mean()) * torch.eye(c.shape[0], dtype=c.dtype)
        delta = _tensor(pair / "ft", m.name) - _tensor(pair / "base", m.name)
        sigma = torch.linalg.svdvals(delta @ torch.linalg.cholesky(c))
        assert m.rank == rank_at_energy(sigma.numpy(), 0.8), m.name
        assert m.kept_energy == pytest.approx(float((sigma[:m.rank] ** 2).sum() / (sigma ** 2).sum()), rel=1e-5)
        ranks.append(m.rank)
    assert len(set(ranks)) > 1


def test_the_adapter_loads_in_peft_and_merges_to_base_plus_scaled_ba(pair, extracted):
    from peft import PeftModel

    adapter = pair / "aware"
    peft_model = PeftModel.from_pretrained(_load(pair / "base").float(), adapter)
    merged = peft_model.merge_and_unload().state_dict()
    report = extracted[1]
    for m in report.matrices:
        expected = _tensor(pair / "base", m.name) + _lora(adapter, m.module)
        assert torch.allclose(merged[m.name].double(), expected, atol=1e-6), m.name
    untouched = "model.embed_tokens.weight"
    assert torch.equal(merged[untouched].double(), _tensor(pair / "base", untouched))


def test_isotropic_inputs_give_the_plain_factors():
    from deltakit.lora.factors import svd_factors
    from deltakit.lora.whitening import InputCovariance

    delta = torch.randn(48, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    isotropic = InputCovariance(torch.eye(40) * 7.3)
    for exact, dtype, tolerance in ((True, torch.float64, 1e-12), (False, torch.float64, 1e-12),
                                    (False, torch.float32, 1e-5)):
        plain = svd_factors(delta, 6, exact=exact, seed=2, dtype=dtype)
        whitened = isotropic.factors(delta, 6, exact=exact, seed=2, dtype=dtype)
        assert torch.allclose(whitened.b, plain.b, atol=tolerance) and torch.allclose(whitened.a, plain.a, atol=tolerance)


def test_anisotropic_inputs_whitened_factors_reach_the_output_optimum():
    """‖(ΔW − BA)·L‖² is the tail Σ_{i>r} σ_i(ΔW·L)² (Eckart–Young in the whitened space), and the output error
    is below the plain factors' on every seed; B·A is unchanged by the balancing (‖B_k‖ = ‖A_k‖)."""
    from deltakit.lora.factors import svd_factors
    from deltakit.lora.whitening import InputCovariance

    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        delta = torch.randn(32, 24, generator=generator, dtype=torch.float64)
        x = torch.randn(200, 24, generator=generator, dtype=torch.float64) * torch.logspace(1, -2, 24, dtype=torch.float64)
        inputs = InputCovariance(x.T @ x)
        factors = inputs.factors(delta, 5, exact=True, dtype=torch.float64)
        sigma = torch.linalg.svdvals(delta @ inputs.cholesky)
        residual = float(torch.linalg.vector_norm((delta - factors.b @ factors.a) @ inputs.cholesky) ** 2)
        assert residual == pytest.approx(float((sigma[5:] ** 2).sum()), rel=1e-9)
        assert torch.allclose(torch.linalg.vector_norm(factors.b, dim=0), torch.linalg.vector_norm(factors.a, dim=1))
        plain = svd_factors(delta, 5, exact=True, dtype=torch.float64)
        aware_error = inputs.output_error(delta, factors.b, factors.a)
        plain_error = inputs.output_error(delta, plain.b, plain.a)
        direct = float(torch.linalg.vector_norm((delta - factors.b @ factors.a) @ x.T) / torch.linalg.vector_norm(delta @ x.T))
        assert aware_error == pytest.approx(direct, rel=1e-9)
        assert aware_error < 0.9 * plain_error


def test_covariances_are_shared_by_modules_reading_one_input_and_independent_of_the_budget(pair, tmp_path):
    """q/k/v share one C and gate/up one; a budget that forces one run per group, and covariances parked on
    disk instead of kept in memory, give the same C."""
    from deltakit.calibration import calibrate, read_calibration

    tokens = read_calibration(pair / "calib.safetensors", None, VOCAB, batch_tokens=48)
    assert len(tokens.batches) == 3
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")]
    device = torch.device("cpu")
    one = calibrate(pair / "ft", tokens, names, device, tmp_path / "one", "kl")
    many = calibrate(pair / "ft", tokens, names, device, tmp_path / "many", "kl", budget_bytes=1, host_bytes=0)
    assert all(isinstance(f, Path) and f.is_file() for f in many.covariances.files.values())
    assert not any(isinstance(f, Path) for f in one.covariances.files.values())
    assert one.covariances.groups[:4] == [names[:3], [names[3]], names[4:6], [names[6]]]
    assert len({id(one.covariances.files[n]) for n in names}) == 8 and not one.missing
    with safe_open(str(pair / "calib.safetensors"), framework="pt") as handle:
        inputs = _layer_inputs(_load(pair / "ft"), handle.get_tensor("input_ids"))
    for name in names:
        c = one.covariances.get(name).double()
        assert torch.equal(c, many.covariances.get(name).double()), name
        expected = inputs[name].T @ inputs[name]
        assert torch.allclose(c, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())), name


def test_check_reports_the_same_fidelity_for_any_adapter(pair, extracted, runner, tmp_path):
    plain = extracted[0]
    # on the extraction's device: a CPU's fp32 forward and a GPU's differ by ~1e-7 in the logits, 2e-6 in a KL of 1.6e-3
    result = invoke(runner, "check", pair / "base", pair / "ft", pair / "plain", "--calibration",
                    pair / "calib.safetensors", "--device", "auto", "--json", tmp_path / "check.json")
    assert result.exit_code == 0, result.output
    checked = json.loads((tmp_path / "check.json").read_text())
    assert checked["fidelity"]["kl"] == pytest.approx(plain.fidelity["kl"], rel=1e-5)
    assert checked["fidelity"]["kl_base"] == pytest.approx(plain.fidelity["kl_base"], rel=1e-5)
    by_name = {m["name"]: m for m in checked["matrices"]}
    for m in plain.matrices:
        assert by_name[m.name]["output_error"] == pytest.approx(m.output_error, rel=1e-5)
        assert by_name[m.name]["rel_error"] == pytest.approx(m.rel_error, rel=1e-5)
    assert "KL(ft ‖ base + adapter)" in result.output


def test_check_of_a_trained_ia3_adapter_equals_peft(pair, tmp_path):
    """Any adapter type: an IA3 adapter (scales rows of k/v, columns of down_proj) with trained-looking
    gains; KL(ft ‖ base + adapter) equals the float64 KL of PEFT's own IA3 model, and each output error
    the one computed from the hooked inputs and PEFT's merged weights."""
    from peft import IA3Config, PeftModel, get_peft_model

    from deltakit.lora.fidelity import check_adapter

    model = get_peft_model(_load(pair / "base").float(), IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    model.save_pretrained(tmp_path / "ia3")
    report = check_adapter(pair / "base", pair / "ft", tmp_path / "ia3", pair / "calib.safetensors")
    from deltakit.report import render_check

    assert str(report) == render_check(report) and len(repr(report)) < 300  # print(): `check`'s text, not a dump
    html = report._repr_html_()  # in a notebook: the same table
    assert html.count("<tr>") == 1 + len(report.matrices) and "KL(ft ‖ base + adapter)" in html
    assert all(f"<td>{m.name}</td>" in html for m in report.matrices)
    with safe_open(str(pair / "calib.safetensors"), framework="pt") as handle:
        ids = handle.get_tensor("input_ids")
    ft_model = _load(pair / "ft")
    inputs = _layer_inputs(ft_model, ids)
    peft_model = PeftModel.from_pretrained(_load(pair / "base"), tmp_path / "ia3").double().eval()
    with torch.no_grad():
        expected = _mean_kl(ft_model(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    assert report.fidelity["kl"] == pytest.approx(expected, rel=1e-3)
    merged = peft_model.merge_and_unload().state_dict()
    assert len(report.matrices) == 6
    for m in report.matrices:
        x = inputs[m.module]
        delta = _tensor(pair / "ft", m.name) - _tensor(pair / "base", m.name)
        adapter_delta = merged[m.name].double() - _tensor(pair / "base", m.name)
        want = float(torch.linalg.vector_norm((delta - adapter_delta) @ x.T) / torch.linalg.vector_norm(delta @ x.T))
        assert m.output_error == pytest.approx(want, rel=1e-5), m.name


def test_text_calibration_is_tokenised_with_the_fine_tunes_tokenizer(pair, runner, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    out = tmp_path / "lora"
    result = invoke(runner, "extract", pair / "base", pair / "ft", "-o", out, "--rank", "2", "--calibration", text,
                    "--device", "cpu", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["calibration"]["tokens"] == len(text.read_text()) + 1  # one character a token, and BOS
    assert report["fidelity"]["kl"] < report["fidelity"]["kl_base"]
    assert "output err." in result.output and not (out / ".calibration").exists()


def test_a_model_without_lm_head_reports_the_hidden_state_error(tmp_path):
    """BertModel: relative error of the final hidden states, against float64 runs of the three models."""
    from peft import PeftModel

    from deltakit.lora import extract_lora

    base = _anisotropic(tiny_bert())
    save(base, tmp_path / "base")
    save(_fine_tune(base), tmp_path / "ft")
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(5))
    save_file({"input_ids": ids}, str(tmp_path / "calib.safetensors"))
    report = extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "lora", rank=4, activation_aware=True,
                          calibration=tmp_path / "calib.safetensors")
    with torch.no_grad():
        ft_hidden = _load(tmp_path / "ft", causal=False)(input_ids=ids).last_hidden_state
        base_hidden = _load(tmp_path / "base", causal=False)(input_ids=ids).last_hidden_state
        adapted = PeftModel.from_pretrained(_load(tmp_path / "base", causal=False), tmp_path / "lora").double()
        adapted_hidden = adapted(input_ids=ids).last_hidden_state
    relative = lambda h: float(torch.linalg.vector_norm(ft_hidden - h) / torch.linalg.vector_norm(ft_hidden))  # noqa: E731
    assert set(report.fidelity) == {"tokens", "hidden_error", "hidden_error_base"}
    assert report.fidelity["hidden_error"] == pytest.approx(relative(adapted_hidden), rel=1e-4)
    assert report.fidelity["hidden_error_base"] == pytest.approx(relative(base_hidden), rel=1e-4)
    assert report.fidelity["hidden_error"] < report.fidelity["hidden_error_base"]


def test_without_calibration_the_report_is_as_before(pair, tmp_path):
    from deltakit.lora import extract_lora

    report = extract_lora(pair / "base", pair / "ft", tmp_path / "lora", rank=2).to_dict()
    assert "fidelity" not in report and "calibration" not in report
    assert "output_error" not in report["matrices"][0]


def _calibration_error(runner, pair, tmp_path, path, *extra):
    return invoke(runner, "extract", pair / "base", pair / "ft", "-o", tmp_path / "out", "--rank", "2",
                  "--calibration", path, "--device", "cpu", *extra)


def test_bad_calibration_input_is_one_error_line(pair, extracted, runner, tmp_path):
    empty_text = tmp_path / "empty.txt"
    empty_text.write_text("  \n")
    assert_one_line_error(_calibration_error(runner, pair, tmp_path, empty_text), "is empty")
    empty_tensors = tmp_path / "empty.safetensors"
    empty_tensors.write_bytes(b"")
    assert_one_line_error(_calibration_error(runner, pair, tmp_path, empty_tensors), "is empty")
    no_ids = tmp_path / "no-ids.safetensors"
    save_file({"tokens": torch.zeros(2, 3, dtype=torch.int64)}, str(no_ids))
    assert_one_line_error(_calibration_error(runner, pair, tmp_path, no_ids), "no input_ids")
    outside = tmp_path / "outside.safetensors"
    save_file({"input_ids": torch.tensor([[1, 2, VOCAB]])}, str(outside))
    assert_one_line_error(_calibration_error(runner, pair, tmp_path, outside), f"token id {VOCAB}")
    floats = tmp_path / "floats.safetensors"
    save_file({"input_ids": torch.ones(2, 3)}, str(floats))
    assert_one_line_error(_calibration_error(runner, pair, tmp_path, floats), "must be integers")
    text = tmp_path / "calib.txt"
    text.write_text("some text")
    untokenised = tmp_path / "ft-without-tokenizer"
    untokenised.mkdir()
    for file in (pair / "ft").iterdir():
        if file.is_file() and not file.name.startswith(("tokenizer", "special_tokens", "vocab")):
            (untokenised / file.name).write_bytes(file.read_bytes())
    result = invoke(runner, "extract", pair / "base", untokenised, "-o", tmp_path / "out", "--rank", "2",
                    "--calibration", text, "--device", "cpu")
    assert_one_line_error(result, "no tokenizer")
    assert_one_line_error(invoke(runner, "extract", pair / "base", pair / "ft", "-o", tmp_path / "out", "--rank", "2",
                                 "--activation-aware"), "needs calibration tokens")
    assert_one_line_error(invoke(runner, "extract", pair / "base", pair / "plain", "-o", tmp_path / "out", "--rank",
                                 "2", "--calibration", pair / "calib.safetensors"), "adapters")
    unknown = tmp_path / "unknown-model"
    unknown.mkdir()
    for file in (pair / "ft").iterdir():
        (unknown / file.name).write_bytes(file.read_bytes())
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    result = invoke(runner, "extract", pair / "base", unknown, "-o", tmp_path / "out", "--rank", "2",
                    "--calibration", pair / "calib.safetensors", "--device", "cpu")
    assert_one_line_error(result, "transformers cannot build")
    assert not (tmp_path / "out").exists()


def test_kl_of_a_model_without_lm_head_is_one_error_line(runner, tmp_path):
    from deltakit.lora import extract_lora

    base = tiny_bert()
    save(base, tmp_path / "base")
    save(_fine_tune(base), tmp_path / "ft")
    extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "lora", rank=2)
    save_file({"input_ids": torch.tensor([[1, 2, 3]])}, str(tmp_path / "calib.safetensors"))
    result = invoke(runner, "check", tmp_path / "base", tmp_path / "ft", tmp_path / "lora", "--calibration",
                    tmp_path / "calib.safetensors", "--metric", "kl", "--device", "cpu")
    assert_one_line_error(result, "KL needs a causal language model")


def test_a_ridge_keeps_singular_covariances_factorable():
    """Fewer tokens than inputs (C of rank 3 in 16 dimensions): the factors exist, are finite, and the
    error of the directions the inputs see is at the optimum of the ridged objective."""
    from deltakit.lora.whitening import InputCovariance

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, generator=generator, dtype=torch.float64)
    delta = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    inputs = InputCovariance(x.T @ x)
    factors = inputs.factors(delta, 3, exact=True, dtype=torch.float64)
    assert torch.isfinite(factors.a).all() and torch.isfinite(factors.b).all()
    assert inputs.output_error(delta, factors.b, factors.a) < 1e-3
    assert math.isfinite(inputs.output_error(delta, torch.zeros(8, 1, dtype=torch.float64),
                                             torch.zeros(1, 16, dtype=torch.float64)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bf16_inputs_accumulate_exactly_on_tf32_cores_and_the_setting_is_restored():
    """XᵀX of bf16 activations on the GPU equals the float64 product to fp32 accumulation, and only that
    product ran under TF32 (the model's own fp32 products, e.g. RoPE angles, must not)."""
    from deltakit.calibration.covariances import _accumulate

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    x = torch.randn(4, 512, 256, device="cuda").bfloat16()
    total = torch.zeros(256, 256, device="cuda")
    _accumulate(total)(None, (x,))
    rows = x.reshape(-1, 256).double()
    expected = rows.T @ rows
    assert torch.allclose(total.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    after = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    assert after == before
