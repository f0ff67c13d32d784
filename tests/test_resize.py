"""extract from adapters: factor-space resizing, weighted sums, --ratio, checked against fp64 SVDs of PEFT's ΔW.

The truth for every adapter is PEFT itself: ``merge_and_unload`` on a tiny transformers model
built from a config, minus the base, in float64. "Optimal" is the Eckart–Young error of the
best rank-r approximation of that ΔW, from its fp64 singular values.
"""

import copy
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from deltakit import DeltakitError, SpectralOptions
from deltakit.lora import RankChoice, extract_lora
from deltakit.lora.ranks import ratio_rank
from deltakit.lora.resize import LowRankDelta, lowrank_frobenius, lowrank_svd

from conftest import assert_one_line_error, invoke, low_rank, save, tiny_gpt2, tiny_llama

CPU = SpectralOptions(device="cpu")


# --- factor space, by construction ------------------------------------------------------------

@pytest.mark.parametrize("m, n, k", [(48, 40, 6), (7, 30, 12), (30, 5, 9), (64, 64, 64)])
def test_lowrank_svd_is_the_exact_svd_of_the_product(m, n, k):
    generator = torch.Generator().manual_seed(m * n + k)
    b = torch.randn(m, k, generator=generator, dtype=torch.float64)
    a = torch.randn(k, n, generator=generator, dtype=torch.float64)
    u, s, vh = lowrank_svd(b, a, scaling=0.37)
    delta = 0.37 * b @ a
    reference = torch.linalg.svdvals(delta)
    torch.testing.assert_close(s, reference[: s.numel()], rtol=1e-10, atol=1e-10 * float(reference[0]))
    assert s.numel() == min(m, n, k) and bool((s[:-1] >= s[1:]).all())
    torch.testing.assert_close((u * s) @ vh, delta, rtol=0, atol=1e-10 * float(reference[0]))
    eye = torch.eye(s.numel(), dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(vh @ vh.T, eye, rtol=0, atol=1e-12)
    assert math.isclose(lowrank_frobenius(b, a), float(torch.linalg.matrix_norm(b @ a)), rel_tol=1e-12)


def test_truncation_in_factor_space_is_eckart_young_optimal():
    # ΔW of exactly rank 10 with known singular values 10, 9, ..., 1, given as a product of rank-14 factors.
    delta = low_rank(50, 36, 10, seed=3)
    mixing = torch.randn(10, 14, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    left = (u[:, :10] * s[:10]) @ mixing
    right = torch.linalg.pinv(mixing) @ vh[:10]
    factored = LowRankDelta(left, right)
    torch.testing.assert_close(factored.dense(), delta, rtol=0, atol=1e-10)
    values = factored.singular_values()
    torch.testing.assert_close(values[:10], torch.arange(10, 0, -1, dtype=torch.float64), rtol=0, atol=1e-9)
    assert float(values[10:].abs().max()) < 1e-9
    for rank in (1, 4, 10):
        factors = factored.factors(rank)
        optimal = math.sqrt(sum(i * i for i in range(1, 11 - rank)))
        assert factors.b.shape == (50, rank) and factors.a.shape == (rank, 36)
        assert math.isclose(float(torch.linalg.matrix_norm(delta - factors.b @ factors.a)), optimal, rel_tol=1e-9,
                            abs_tol=1e-9)
        assert math.isclose(factored.residual_norm(factors), optimal, rel_tol=1e-9, abs_tol=1e-8)
        torch.testing.assert_close(factors.b.norm(dim=0), factors.a.norm(dim=1))  # √S split evenly
        rounded = factors.b.bfloat16().double() @ factors.a.bfloat16().double()  # as stored in bf16
        assert math.isclose(factored.residual_norm(factors, torch.bfloat16),
                            float(torch.linalg.matrix_norm(delta - rounded)), rel_tol=1e-6)
    # In fp32, an exact reconstruction reads as one: the residual is resolved far below ‖ΔW‖·sqrt(eps32).
    single = factored.to(dtype=torch.float32)
    assert single.residual_norm(single.factors(10)) < 1e-6 * single.frobenius()


def test_stacked_factors_are_the_weighted_sum_and_transpose_like_tensors():
    one, two = low_rank(20, 12, 3, seed=1), low_rank(20, 12, 5, seed=2)
    terms = [(0.7, LowRankDelta(one, torch.eye(12, dtype=torch.float64))),
             (-0.3, LowRankDelta(torch.eye(20, dtype=torch.float64), two))]
    summed = LowRankDelta.stack(terms)
    assert summed.inner == 32 and tuple(summed.shape) == (20, 12)
    torch.testing.assert_close(summed.dense(), 0.7 * one - 0.3 * two)
    torch.testing.assert_close(summed.T.dense(), (0.7 * one - 0.3 * two).T)
    with pytest.raises(ValueError, match="different shapes"):
        LowRankDelta.stack([(1.0, summed), (1.0, summed.T)])


# --- --ratio ----------------------------------------------------------------------------------

def test_ratio_rank_keeps_singular_values_at_or_above_the_ratio():
    spectrum = np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.0])
    assert ratio_rank(spectrum, 1.0, 6) == 1
    assert ratio_rank(spectrum, 0.5, 6) == 2  # 5 = 0.5·10 is kept
    assert ratio_rank(spectrum, 0.15, 6) == 3
    assert ratio_rank(spectrum, 0.01, 6) == 5  # never a zero singular value
    assert ratio_rank(spectrum, 0.01, 2) == 2  # the cap
    assert ratio_rank(spectrum[::-1], 0.15, 6) == 3  # any order
    assert ratio_rank(np.zeros(4), 0.5, 4) == 0
    # kohya's sv_ratio T keeps σ_i > σ_1 / T: the same count as --ratio 1/T off the boundary.
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = np.sort(rng.lognormal(size=20))[::-1]
        t = float(rng.uniform(1.5, 30))
        assert ratio_rank(s, 1 / t, 20) == int(np.sum(s > s[0] / t))


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 0.0}, "ratio 0 is outside (0, 1]"),
    ({"ratio": 4.0}, "kohya's sv_ratio 4 is --ratio 0.25"),
    ({"ratio": float("nan")}, "outside (0, 1]"),
    ({"rank": 4, "ratio": 0.5}, "exactly one of --rank, --energy, --budget or --ratio"),
])
def test_ratio_choice_refuses_bad_values(kwargs, message):
    with pytest.raises(DeltakitError) as info:
        RankChoice(**kwargs)
    assert message in str(info.value)


def test_ratio_on_a_full_fine_tune_follows_the_fp64_spectrum(tmp_path):
    base = tiny_llama()
    ft = copy.deepcopy(base)
    with torch.no_grad():  # ΔW with singular values (8, 7, ..., 1)·0.01 on q_proj of layer 0
        ft.model.layers[0].self_attn.q_proj.weight += low_rank(64, 64, 8, scale=0.01, seed=5).float()
        ft.model.layers[1].mlp.down_proj.weight += low_rank(64, 128, 3, scale=0.02, seed=6).float()
    save(base, tmp_path / "base")
    save(ft, tmp_path / "ft")
    report = extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "adapter", ratio=0.4, options=CPU)
    ranks = {m.name: m.rank for m in report.matrices}
    # σ_i ≥ 0.4·σ_1: q_proj 8, 7, 6, 5, 4 (≥ 3.2 of 8); down_proj 3, 2 (≥ 1.2 of 3)
    assert ranks == {"model.layers.0.self_attn.q_proj.weight": 5, "model.layers.1.mlp.down_proj.weight": 2}
    assert report.selection["mode"] == "ratio" and report.selection["ratio"] == 0.4 and report.passes == 2


# --- PEFT adapters: the truth from merge_and_unload ---------------------------------------------

def lora_adapter(model, folder: Path, targets: list[str], rank: int, seed: int, **config) -> Path:
    """A PEFT LoRA on ``model`` with trained-looking (non-zero, random) A and B, saved to ``folder``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model).float(), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(folder)
    return folder


def peft_deltas(base_model, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW of every weight PEFT's merge_and_unload changes (fp64), loading the adapter strictly."""
    from peft import PeftModel, get_peft_model_state_dict

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(copy.deepcopy(base_model).float(), adapter_dir)
    complaints = [str(w.message) for w in caught if "missing" in str(w.message).lower()
                  or "unexpected" in str(w.message).lower()]
    assert not complaints, complaints
    stored = load_file(adapter_dir / "adapter_model.safetensors")
    assert set(get_peft_model_state_dict(model)) == set(stored)
    merged = model.merge_and_unload().state_dict()
    base = base_model.state_dict()
    return {name: merged[name].double() - base[name].double() for name in base
            if not torch.equal(merged[name].double(), base[name].double())}


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    """Eckart–Young: ‖ΔW − ΔW_r‖_F of the best rank-r approximation, from fp64 singular values."""
    s = torch.linalg.svdvals(delta.double())
    return float(torch.sqrt(torch.sum(s[rank:] ** 2)))


def assert_near_optimal(truth: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], rank: int) -> list[float]:
    """Every matrix of ``ours`` within 1.01× the optimal rank-``rank`` error of ``truth``; returns the ratios."""
    assert set(ours) == set(truth), set(ours) ^ set(truth)
    ratios = []
    for name, delta in truth.items():
        best = optimal_error(delta, rank)
        error = float(torch.linalg.matrix_norm(delta - ours[name]))
        assert best > 1e-3 * float(torch.linalg.matrix_norm(delta)), name  # a real truncation
        assert error <= 1.01 * best, (name, error, best)
        ratios.append(error / best)
    return ratios


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(folder, model, truth): a tiny Llama (base/), a rank-8 LoRA on q/v/down (lora-r8/), a rank-4 rsLoRA on
    v/up/down (lora-r4/), and each adapter's ΔW by PEFT (truth["lora-r8"], truth["lora-r4"])."""
    folder = tmp_path_factory.mktemp("resize")
    model = tiny_llama()
    save(model, folder / "base")
    lora_adapter(model, folder / "lora-r8", ["q_proj", "v_proj", "down_proj"], 8, seed=1)
    lora_adapter(model, folder / "lora-r4", ["v_proj", "up_proj", "down_proj"], 4, seed=2, use_rslora=True)
    return folder, model, {name: peft_deltas(model, folder / name) for name in ("lora-r8", "lora-r4")}


def test_extract_lora_r8_at_rank_4_loads_in_peft_and_is_optimal(llama, runner, tmp_path):
    folder, model, truths = llama
    result = invoke(runner, "extract", folder / "base", folder / "lora-r8", "--rank", "4", "-o", tmp_path / "r4",
                    "--json", tmp_path / "r4.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r4.json").read_text())
    assert report["method"] == "factor-space" and report["adapters"] == [str(folder / "lora-r8")]
    assert report["weights"] == [1.0] and len(report["matrices"]) == 6 and not report["not_carried"]
    config = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["peft_type"] == "LORA"
    truth = truths["lora-r8"]
    ratios = assert_near_optimal(truth, peft_deltas(model, tmp_path / "r4"), 4)
    assert max(ratios) < 1 + 1e-4  # factor space is exact: only fp32 rounding separates it from optimal
    for matrix in report["matrices"]:  # the report's error is the one PEFT sees
        delta = truth[matrix["name"]]
        expected = optimal_error(delta, 4) / float(torch.linalg.matrix_norm(delta))
        assert math.isclose(matrix["rel_error"], expected, rel_tol=1e-4)


def test_dense_route_of_the_same_adapter_is_within_one_percent(llama, tmp_path):
    folder, model, truths = llama
    report = extract_lora(folder / "base", folder / "lora-r8", tmp_path / "dense", rank=4, options=CPU,
                          factor_space=False)
    assert report.method == "randomized"
    assert_near_optimal(truths["lora-r8"], peft_deltas(model, tmp_path / "dense"), 4)


def test_extract_dora_adapter_at_rank_8_loads_in_peft_and_is_optimal(llama, runner, tmp_path):
    """A DoRA adapter (magnitudes moved off their init) as FT: its ΔW depends on W0 through the column
    norms, so it takes the dense route; PEFT loads the plain LoRA written, and its merged ΔW is within
    1.01× the optimal rank-8 error of PEFT's own DoRA ΔW, matrix by matrix."""
    from peft import LoraConfig, get_peft_model

    folder, model, _ = llama
    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(model).float(), LoraConfig(
        r=16, lora_alpha=24, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
        use_dora=True))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.1 * torch.rand_like(param))
    peft_model.save_pretrained(tmp_path / "dora")
    truth = peft_deltas(model, tmp_path / "dora")
    result = invoke(runner, "extract", folder / "base", tmp_path / "dora", "--rank", "8", "-o", tmp_path / "r8",
                    "--json", tmp_path / "r8.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r8.json").read_text())
    assert report["method"] == "randomized"
    config = json.loads((tmp_path / "r8" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA" and not config.get("use_dora")
    assert_near_optimal(truth, peft_deltas(model, tmp_path / "r8"), 8)


def test_weighted_sum_of_two_adapters_is_optimal_for_the_sum(llama, runner, tmp_path):
    folder, model, truths = llama
    one, two = truths["lora-r8"], truths["lora-r4"]
    truth = {name: 0.7 * one.get(name, 0) + 0.3 * two.get(name, 0) for name in set(one) | set(two)}
    result = invoke(runner, "extract", folder / "base", folder / "lora-r8", folder / "lora-r4", "--weights", "0.7,0.3",
                    "--rank", "3", "-o", tmp_path / "sum", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["weights"] == [0.7, 0.3] and len(report["matrices"]) == 4 * 2
    ratios = assert_near_optimal(truth, peft_deltas(model, tmp_path / "sum"), 3)
    assert max(ratios) < 1 + 1e-4
    # The dense route (each adapter's ΔW from its stream, weighted and added) agrees.
    dense = extract_lora(folder / "base", [folder / "lora-r8", folder / "lora-r4"], tmp_path / "dense", rank=3,
                         weights=[0.7, 0.3], options=CPU, factor_space=False)
    assert dense.method == "randomized"
    assert_near_optimal(truth, peft_deltas(model, tmp_path / "dense"), 3)


def test_energy_one_recovers_each_module_rank_and_budget_and_ratio_work(llama, tmp_path):
    folder, model, truths = llama
    paths = [folder / "lora-r8", folder / "lora-r4"]
    report = extract_lora(folder / "base", paths, tmp_path / "energy", energy=1.0, options=CPU)
    ranks = {m.name.split("layers.")[1]: m.rank for m in report.matrices if m.name.startswith("model.layers.0")}
    # q: r8 only; v and down: r8 + r4 stacked (rank 12 ≤ min(m, n)); up: r4 only
    assert ranks == {"0.self_attn.q_proj.weight": 8, "0.self_attn.v_proj.weight": 12,
                     "0.mlp.up_proj.weight": 4, "0.mlp.down_proj.weight": 12}, ranks
    assert report.relative_error < 1e-5
    one, two = truths["lora-r8"], truths["lora-r4"]
    truth = {name: one.get(name, 0) + two.get(name, 0) for name in set(one) | set(two)}
    ours = peft_deltas(model, tmp_path / "energy")
    for name, delta in truth.items():
        assert float(torch.linalg.matrix_norm(delta - ours[name])) < 1e-5 * float(torch.linalg.matrix_norm(delta))
    ratio = extract_lora(folder / "base", paths[0], tmp_path / "ratio", ratio=0.5, options=CPU)
    for matrix in ratio.matrices:
        s = torch.linalg.svdvals(one[matrix.name])
        assert matrix.rank == int(torch.sum(s >= 0.5 * s[0]))
    budget = extract_lora(folder / "base", paths[0], tmp_path / "budget", budget=4000, options=CPU)
    assert budget.parameters <= 4000 and budget.spectrum_method == "factor-space"


def test_fan_in_fan_out_and_embedding_lora_agree_with_the_dense_route(tmp_path):
    """GPT-2 Conv1D (fan_in_fan_out) and a Llama embedding LoRA: factor space = dense exact SVD, and = PEFT."""
    gpt2, llama_model = tiny_gpt2(), tiny_llama()
    cases = [
        (gpt2, lora_adapter(gpt2, tmp_path / "gpt2-lora", ["c_attn", "c_fc"], 6, seed=3, fan_in_fan_out=True)),
        (llama_model, lora_adapter(llama_model, tmp_path / "embed-lora", ["embed_tokens", "o_proj"], 6, seed=4)),
    ]
    for index, (model, adapter) in enumerate(cases):
        save(model, tmp_path / f"base{index}")
        factored = extract_lora(tmp_path / f"base{index}", adapter, tmp_path / f"f{index}", rank=3, options=CPU)
        dense = extract_lora(tmp_path / f"base{index}", adapter, tmp_path / f"d{index}", rank=3, factor_space=False,
                             options=SpectralOptions(device="cpu", exact=True))
        assert factored.method == "factor-space" and dense.method == "exact" and not factored.not_carried
        assert {m.kind for m in factored.matrices} == ({"conv1d"} if index == 0 else {"embedding", "linear"})
        truth = peft_deltas(model, adapter)
        ours, theirs = peft_deltas(model, tmp_path / f"f{index}"), peft_deltas(model, tmp_path / f"d{index}")
        assert_near_optimal(truth, ours, 3)
        for name in truth:
            torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5 * float(truth[name].abs().max()))


def test_zero_modules_unchanged_whole_tensors_reported_bf16_kept(llama, tmp_path):
    folder, _, _ = llama
    stored = load_file(folder / "lora-r8" / "adapter_model.safetensors")
    zeroed = {k: (torch.zeros_like(v) if "layers.1.self_attn.q_proj.lora_B" in k else v).to(torch.bfloat16)
              for k, v in stored.items()}
    zeroed["base_model.model.model.norm.modules_to_save.default.weight"] = torch.ones(64, dtype=torch.bfloat16)
    config = json.loads((folder / "lora-r8" / "adapter_config.json").read_text())
    write_adapter(tmp_path / "bf16", {**config, "modules_to_save": ["model.norm"]}, zeroed)
    report = extract_lora(folder / "base", tmp_path / "bf16", tmp_path / "out", rank=2, options=CPU)
    assert report.unchanged == ["model.layers.1.self_attn.q_proj.weight"] and len(report.matrices) == 5
    assert [entry["name"] for entry in report.not_carried] == ["model.norm.weight"]
    assert "replaced whole by adapter" in report.not_carried[0]["reason"]
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {v.dtype for v in written.values()} == {torch.bfloat16}


# --- bad input: one line, nothing written -------------------------------------------------------

def write_adapter(folder: Path, config: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_bad_adapter_inputs_are_one_line_errors_and_nothing_is_written(llama, runner, tmp_path):
    folder, _, _ = llama
    base, r8, r4 = folder / "base", folder / "lora-r8", folder / "lora-r4"
    gpt2_lora = lora_adapter(tiny_gpt2(), tmp_path / "gpt2-lora", ["c_attn"], 2, seed=0, fan_in_fan_out=True)
    unsupported = write_adapter(tmp_path / "prompt", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
                                {"prompt_embeddings": torch.zeros(4, 64)})
    cases = [
        ([r8, r4, "--weights", "0.7,0.2,0.1", "--rank", "2"], "--weights has 3 value(s) for 2 adapter(s)"),
        ([r8, "--weights", "0.5,0.5", "--rank", "2"], "--weights has 2 value(s) for 1 adapter(s)"),
        ([r8, "--weights", "a,b", "--rank", "2"], "cannot read --weights"),
        ([r8, "--weights", "inf", "--rank", "2"], "must be finite"),
        ([r8, gpt2_lora, "--rank", "2"], "does not fit"),
        ([gpt2_lora, "--rank", "2"], "does not fit"),
        ([r8, unsupported, "--rank", "2"], "PROMPT_TUNING"),
        ([r8, base, "--rank", "2"], "is not a PEFT adapter; extract takes one fine-tuned model, or one or more"),
        ([base, base, "--rank", "2"], "2 fine-tuned models given"),
        ([base, "--weights", "0.5", "--rank", "2"], "--weights weighs adapters"),
        ([r8, "--save-modules", "--rank", "2"], "--save-modules carries tensors of a fine-tuned model"),
        ([r8, "--ratio", "2"], "kohya's sv_ratio 2 is --ratio 0.5"),
        ([r8, "--rank", "2", "--ratio", "0.5"], "exactly one of --rank, --energy, --budget or --ratio"),
    ]
    for args, message in cases:
        result = invoke(runner, "extract", base, *args, "-o", tmp_path / "out")
        assert_one_line_error(result, message)
        assert not (tmp_path / "out").exists()
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    result = invoke(runner, "extract", r8, r4, "--rank", "2", "-o", tmp_path / "out")
    assert_one_line_error(result, f"BASE {r8} is a PEFT adapter")
    for command in ("merge", "unmerge"):  # one reading of --weights on every command that takes it
        result = invoke(runner, command, base, r8, r4, "--weights", "a,b", "-o", tmp_path / "out")
        assert_one_line_error(result, "cannot read --weights 'a,b'; give numbers separated by commas")
        assert not (tmp_path / "out").exists()


# --- several processes -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_write_what_one_writes_from_adapters(llama, tmp_path):
    """torchrun: each process factors its share of the summed modules; the files equal one process's."""
    folder, _, _ = llama
    adapters = [folder / "lora-r8", folder / "lora-r4"]
    one = extract_lora(folder / "base", adapters, tmp_path / "one", energy=0.9, weights=[0.7, 0.3], options=CPU)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "deltakit_cli.main", "extract", folder / "base", *adapters, "--weights",
               "0.7,0.3", "--energy", "0.9", "--device", "cpu", "-o", tmp_path / "two", "--json", tmp_path / "two.json"]
    result = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    two = json.loads((tmp_path / "two.json").read_text())
    expected = json.loads(json.dumps(one.to_dict()))
    for report in (expected, two):
        report.pop("elapsed_s"), report.pop("adapter")
    assert two == expected and two["method"] == "factor-space" and len(two["matrices"]) == 8
