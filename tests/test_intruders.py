"""`deltakit intruders`: intruder dimensions (Shuttleworth et al. 2025) by construction, on real
architectures with PEFT (checked against PEFT's own reduce_intruder_dimension), and the scaling
intervention written as a loadable model."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltakit import SpectralOptions
from deltakit.analyses.intruders import find_intruder_directions, intruders, left_singular_basis, max_abs_cosine
from deltakit.lora.intruder_scaling import intruder_correction, scale_intruders

from conftest import assert_one_line_error, invoke, merged_lora_copy, save, tiny_gpt2, tiny_gpt_oss

CPU = SpectralOptions(device="cpu")
EXACT = SpectralOptions(device="cpu", exact=True, precision="fp64")
Q = "model.layers.0.self_attn.q_proj.weight"


# ---------------------------------------------------------------- helpers

def orthonormal(m: int, n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def known_base(m: int = 96, n: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W = U diag(s) Vᵀ with distinct singular values 10 → 1 (gaps ≥ 0.1); returns W, U, s, V."""
    p = min(m, n)
    u, v = orthonormal(m, p, seed), orthonormal(n, p, seed + 1)
    s = torch.linspace(10.0, 1.0, p, dtype=torch.float64)
    return (u * s) @ v.T, u, s, v


def rank1_intruder(u: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """σ·x·yᵀ with x, y spread evenly over the base's singular vectors 11…p: orthogonal to the top ten,
    |cos| = 1/√(p−10) with each of the rest."""
    x, y = u[:, 10:].sum(1), v[:, 10:].sum(1)
    return sigma * torch.outer(x / x.norm(), y / y.norm())


def write_pair(tmp_path, base: torch.Tensor, ft: torch.Tensor, name: str = Q):
    (tmp_path / "base").mkdir()
    (tmp_path / "ft").mkdir()
    save_file({name: base.float().contiguous()}, tmp_path / "base" / "model.safetensors")
    save_file({name: ft.float().contiguous()}, tmp_path / "ft" / "model.safetensors")
    return tmp_path / "base", tmp_path / "ft"


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0):
    """Wider than conftest's (hidden 192): in 64 dimensions even a random unit vector has max |cos| ≈ 0.4
    with some basis vector, too close to ε = 0.5 for a clean test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


def dense_perturbation(model, relative: float = 0.01, seed: int = 3):
    """A full-fine-tune-like change: every matrix moves by `relative` of its entry scale, in every direction."""
    changed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in changed.parameters():
            if param.ndim == 2:
                noise = torch.randn(param.shape, generator=generator) * param.float().std() * relative
                param.add_(noise.to(param.dtype))
    return changed


def spectrum(tensor: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(tensor.double())


# ---------------------------------------------------------------- the fast paths against exact SVD

@pytest.mark.parametrize("shape", [(72, 40), (40, 72), (56, 56)], ids=["tall", "wide", "square"])
def test_gram_basis_and_cosines_match_exact_svd(shape):
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=generator, dtype=torch.float64)
    u_gram, s_gram = left_singular_basis(w.float(), "gram")
    u_exact, s_exact = left_singular_basis(w, "exact", torch.float64)
    p = min(shape)
    assert u_gram.shape == u_exact.shape == (shape[0], p)  # the reduced U: p = min(m, n) vectors
    eye = torch.eye(p, dtype=torch.float64)
    assert torch.allclose(u_gram.double().T @ u_gram.double(), eye, atol=1e-5)
    assert torch.allclose(s_gram.double(), s_exact, atol=1e-4 * float(s_exact[0]))
    probes = torch.randn(shape[0], 10, generator=generator, dtype=torch.float64)
    fast, fast_idx = max_abs_cosine(probes.float(), u_gram)
    ref, ref_idx = max_abs_cosine(probes, u_exact)
    assert torch.allclose(fast.double(), ref, atol=1e-4) and torch.equal(fast_idx, ref_idx)
    # and against the definition itself: max_i |<u_i, x>| / |x| with numpy's SVD
    import numpy as np

    u_np = np.linalg.svd(w.numpy(), full_matrices=False)[0]
    by_hand = np.abs(u_np.T @ (probes.numpy() / np.linalg.norm(probes.numpy(), axis=0))).max(0)
    assert np.allclose(ref.numpy(), by_hand, atol=1e-12)


@pytest.mark.parametrize("shape", [(96, 80), (80, 96)])
def test_find_intruder_directions_gram_equals_exact(shape):
    base, u, _, v = known_base(*shape)
    ft = base + rank1_intruder(u, v, 25.0) + 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(2),
                                                                 dtype=torch.float64)
    fast = find_intruder_directions(base.float(), ft.float(), k=10, method="gram")
    ref = find_intruder_directions(base, ft, k=10, method="exact", dtype=torch.float64)
    assert torch.allclose(fast.s.double(), ref.s, rtol=1e-5)
    assert torch.allclose(fast.similarity.double(), ref.similarity, atol=1e-4)
    assert torch.equal(fast.intruder_mask(0.5), ref.intruder_mask(0.5))


# ---------------------------------------------------------------- by construction

def test_rank1_update_orthogonal_to_top_directions_is_one_intruder():
    base, u, s, v = known_base()
    ft = base + rank1_intruder(u, v, 3 * float(s[0]))
    d = find_intruder_directions(base, ft, k=10, method="exact", dtype=torch.float64)
    mask = d.intruder_mask(0.5)
    assert mask.tolist() == [True] + [False] * 9  # the new direction is the top one, and the only intruder
    assert float(d.similarity[0]) < 1.2 / (min(base.shape) - 10) ** 0.5  # ≈ 1/√70 ≈ 0.12
    assert torch.all(d.similarity[1:] > 0.999)  # the base's top nine are still there, untouched
    fast = find_intruder_directions(base.float(), ft.float(), k=10)
    assert fast.intruder_mask(0.5).tolist() == mask.tolist()


def test_small_update_inside_top_subspace_has_no_intruder():
    base, u, _, v = known_base()
    mix = 0.02 * torch.randn(10, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ft = base + u[:, :10] @ mix @ v[:, :10].T
    for method, dtype in (("gram", torch.float32), ("exact", torch.float64)):
        d = find_intruder_directions(base.to(dtype), ft.to(dtype), k=10, method=method, dtype=dtype)
        assert not d.intruder_mask(0.5).any() and float(d.similarity.min()) > 0.95, d.similarity


def test_null_space_direction_counts_as_intruder():
    """m > n: the m − n directions outside W_base's column space are not singular vectors of W_base
    (the paper's reduced SVD), so a fine-tune direction there has |cos| = 0 with all of them."""
    base, u, s, v = known_base(96, 40)
    outside = torch.linalg.qr(torch.cat([u, torch.randn(96, 1, dtype=torch.float64)], 1))[0][:, -1]
    ft = base + 20 * torch.outer(outside, v[:, -1])  # v: the base's weakest input direction (σ = 1)
    d = find_intruder_directions(base.float(), ft.float(), k=10)
    # the new top vector is (1·u₄₀ + 20·outside)/√401: its only overlap is with u₄₀, |cos| = 1/√401
    assert d.intruder_mask(0.5).tolist() == [True] + [False] * 9
    assert abs(float(d.similarity[0]) - 401 ** -0.5) < 1e-4 and int(d.closest[0]) == 39


def test_unchanged_and_scaled_update_report(tmp_path):
    base, u, s, v = known_base()
    base_dir, ft_dir = write_pair(tmp_path, base, base + rank1_intruder(u, v, 30.0))
    report = intruders(base_dir, ft_dir, k=10, epsilon=(0.5, 0.05), options=CPU)
    (m,) = report.matrices
    assert m.changed and m.k == 10 and m.count(0.5) == 1 and m.count(0.05) == 0
    assert m.intruders[0.5][0].rank == 1 and abs(m.intruders[0.5][0].singular_value - m.singular_values[0]) < 1e-9
    assert m.closest_base_ranks[1:] == list(range(1, 10))  # ft's 2nd..10th are the base's 1st..9th
    same = intruders(base_dir, base_dir, options=CPU).matrices[0]
    assert not same.changed and same.similarities == [1.0] * 10 and same.count(0.5) == 0


def test_correction_scales_exactly_the_intruder_singular_values():
    base, u, s, v = known_base()
    ft = base + rank1_intruder(u, v, 30.0)
    d = find_intruder_directions(base, ft, k=10, method="exact", dtype=torch.float64)
    mask = d.intruder_mask(0.5)
    before = spectrum(ft)
    for lam in (0.0, 0.5, 2.0):
        after = spectrum(ft + intruder_correction(d, mask, lam))
        expected = torch.cat([before[1:], lam * before[:1]]).sort(descending=True).values
        assert torch.allclose(after, expected, atol=1e-9), lam


# ---------------------------------------------------------------- real architectures with PEFT

@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def llama_lora(llama, tmp_path_factory):
    """(base dir, merged-LoRA dir, PEFT model before merging): r = 4 on q_proj and v_proj, B scaled up."""
    root = tmp_path_factory.mktemp("llama")
    base = llama
    merged, peft_model = merged_lora_copy(base, ["q_proj", "v_proj"], rank=4, b_scale=10.0)
    save(base, root / "base")
    save(merged, root / "ft")
    (root / "ft" / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "ft" / "special_tokens_map.json").write_text("{}")
    return root / "base", root / "ft", peft_model


def test_merged_lora_has_intruders_only_where_targeted(llama_lora):
    base_dir, ft_dir, _ = llama_lora
    report = intruders(base_dir, ft_dir, options=CPU)
    targeted = [m for m in report.matrices if m.module_type in ("q", "v")]
    assert len(targeted) == 4
    for m in targeted:
        assert 1 <= m.count(0.5) <= 4, (m.name, m.similarities)  # at most one per LoRA rank
        assert all(d.rank <= 6 for d in m.intruders[0.5]) and min(m.similarities) < 0.35
    for m in report.matrices:
        if m.module_type not in ("q", "v"):
            assert not m.changed and m.count(0.5) == 0, m.name
    summary = report.summary()
    assert summary["by_module_type"]["q"]["matrices_with_intruders"]["0.5"] == 2
    assert summary["by_module_type"]["k"]["intruders"]["0.5"] == 0


def test_counts_agree_with_peft_reduce_intruder_dimension(llama_lora):
    """PEFT ships the paper's procedure (peft.tuners.lora.intruders, top_k=10, ε=0.5): same counts."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    base_dir, ft_dir, peft_model = llama_lora
    messages: list[str] = []
    reduce_intruder_dimension(copy.deepcopy(peft_model), top_k=10, threshold_epsilon=0.5, logging_sink=messages.append)
    theirs = {}
    for line in messages:
        if ": Intruders: " in line or ": No intruders" in line:
            layer, _, tail = line.partition(": ")
            theirs[layer.removeprefix("base_model.model.") + ".weight"] = int(tail.split()[-1]) if "Intruders" in tail else 0
    assert len(theirs) == 4
    for options in (CPU, EXACT):
        ours = {m.name: m.count(0.5) for m in intruders(base_dir, ft_dir, options=options).matrices if m.name in theirs}
        assert ours == theirs, (options, ours, theirs)


def test_adapter_as_ft_matches_the_merged_model(llama_lora, tmp_path):
    base_dir, ft_dir, peft_model = llama_lora
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {m.name: m.count(0.5) for m in intruders(base_dir, ft_dir, options=CPU).matrices if m.changed}
    adapter = {m.name: m.count(0.5) for m in intruders(base_dir, tmp_path / "adapter", options=CPU).matrices}
    assert adapter == merged


def test_dense_small_perturbation_has_no_intruders(llama, llama_lora, tmp_path):
    save(dense_perturbation(llama), tmp_path / "ft")
    report = intruders(llama_lora[0], tmp_path / "ft", options=CPU)
    assert all(m.changed for m in report.matrices) and len(report.matrices) == 16
    assert report.summary()["intruders"]["0.5"] == 0
    assert min(min(m.similarities) for m in report.matrices) > 0.8


def test_gpt2_conv1d_is_analysed_in_linear_orientation(tmp_path):
    base = tiny_gpt2()
    merged, _ = merged_lora_copy(base, ["c_attn"], rank=4, b_scale=10.0, fan_in_fan_out=True)
    save(base, tmp_path / "base")
    save(merged, tmp_path / "ft")
    report = scale_intruders(tmp_path / "base", tmp_path / "ft", tmp_path / "out", scale=0.0, options=CPU,
                             include=["*c_attn*"])
    assert len(report.matrices) == 2
    for m in report.matrices:
        assert m.layout == "conv1d" and m.shape == (192, 64) and m.count(0.5) >= 1  # [out, in]
    name = "transformer.h.0.attn.c_attn.weight"
    stored_ft = load_file(tmp_path / "ft" / "model.safetensors")[name]
    stored_out = load_file(tmp_path / "out" / "model.safetensors")[name]
    (scaled,) = [s for s in report.scaling.matrices if s.name == name]
    before = spectrum(stored_ft)
    kept = [float(x) for i, x in enumerate(before) if i + 1 not in scaled.ranks]
    assert torch.allclose(spectrum(stored_out)[: len(kept)], torch.tensor(kept, dtype=torch.float64), atol=1e-4)


# ---------------------------------------------------------------- the scaling intervention, end to end

def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_scale_zero_removes_exactly_the_intruders(llama_lora, runner, tmp_path):
    base_dir, ft_dir, _ = llama_lora
    out, report_path = tmp_path / "scaled", tmp_path / "r.json"
    result = invoke(runner, "intruders", base_dir, ft_dir, "--scale", "0", "-o", out, "--json", report_path,
                    "--device", "cpu", "--max-shard-size", "300KB")
    assert result.exit_code == 0, result.output
    assert "scaled" in result.stdout and "by module type" in result.stdout
    data = json.loads(report_path.read_text())
    scaling = data["scaling"]
    assert scaling["scale"] == 0.0 and scaling["epsilon"] == 0.5 and scaling["changed_matrices"] == 4
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "special_tokens_map.json"):
        assert (out / name).is_file(), name
    ft, new = _tensors(ft_dir), _tensors(out)
    assert ft.keys() == new.keys()
    by_name = {m["name"]: m for m in data["matrices"]}
    for change in scaling["matrices"]:
        name, ranks = change["name"], change["ranks"]
        assert ranks == [d["rank"] for d in by_name[name]["intruders"]["0.5"]]
        before, after = spectrum(ft[name]), spectrum(new[name])
        kept = torch.tensor([float(x) for i, x in enumerate(before) if i + 1 not in ranks], dtype=torch.float64)
        expected = torch.cat([kept, torch.zeros(len(ranks), dtype=torch.float64)])
        assert torch.allclose(after, expected, atol=2e-5 * float(before[0])), name
    untouched = set(ft) - {c["name"] for c in scaling["matrices"]}
    assert untouched and all(torch.equal(ft[n], new[n]) for n in untouched)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    assert all(torch.equal(state[n], new[n]) for n in new)
    again = intruders(base_dir, out, options=CPU)  # what is left looks like the base
    assert sum(m.count(0.5) for m in again.matrices) < sum(m["intruder_count"]["0.5"] for m in data["matrices"])


def test_scale_one_returns_the_fine_tune_bit_identical_in_its_dtype(llama, tmp_path):
    base = copy.deepcopy(llama).to(torch.bfloat16)
    merged, _ = merged_lora_copy(base, ["q_proj", "v_proj"], rank=4, b_scale=10.0)
    save(base, tmp_path / "base")
    save(merged, tmp_path / "ft")
    report = scale_intruders(tmp_path / "base", tmp_path / "ft", tmp_path / "same", scale=1.0, options=CPU)
    assert report.summary()["intruders"]["0.5"] > 0 and report.scaling.matrices == []
    ft, same = _tensors(tmp_path / "ft"), _tensors(tmp_path / "same")
    assert ft.keys() == same.keys()
    assert all(same[n].dtype == ft[n].dtype and torch.equal(same[n].view(torch.uint8), ft[n].view(torch.uint8))
               for n in ft)
    scale_intruders(tmp_path / "base", tmp_path / "ft", tmp_path / "half", scale=0.5, options=CPU)
    half = _tensors(tmp_path / "half")
    assert all(t.dtype == torch.bfloat16 for t in half.values())
    assert not torch.equal(half[Q], ft[Q])

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "half")
    assert model.dtype == torch.bfloat16 and torch.equal(model.state_dict()[Q], half[Q])


# ---------------------------------------------------------------- CLI output and errors

def test_cli_table_json_and_sweep(tmp_path, runner):
    base, u, _, v = known_base()
    base_dir, ft_dir = write_pair(tmp_path, base, base + rank1_intruder(u, v, 30.0))
    result = invoke(runner, "intruders", base_dir, ft_dir, "-e", "0.5", "-e", "0.1", "-k", "5", "--device", "cpu",
                    "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "intr@0.5" in result.stdout and "intr@0.1" in result.stdout and Q in result.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["k"] == 5 and data["epsilon"] == [0.5, 0.1] and data["scaling"] is None
    (m,) = data["matrices"]
    assert {"name", "k", "similarities", "singular_values", "intruder_count", "intruders", "closest_base_ranks"} <= set(m)
    assert m["intruder_count"] == {"0.5": 1, "0.1": 0} and len(m["similarities"]) == 5
    assert m["intruders"]["0.5"][0]["rank"] == 1
    assert data["summary"]["by_module_type"]["q"]["intruders"] == {"0.5": 1, "0.1": 0}


@pytest.mark.parametrize("args, message", [
    (["-k", "0"], "k = 0"),
    (["-k", "-3"], "positive"),
    (["-e", "0"], "outside (0, 1]"),
    (["-e", "1.5"], "outside (0, 1]"),
    (["--scale", "-1", "-o", "OUT"], "≥ 0"),
    (["--scale", "0.5"], "--out"),
    (["-o", "OUT"], "--scale"),
    (["--max-shard-size", "lots", "--scale", "0", "-o", "OUT"], "shard size"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, runner, args, message):
    base, u, _, v = known_base(24, 20)
    base_dir, ft_dir = write_pair(tmp_path, base, base + rank1_intruder(u, v, 30.0))
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert_one_line_error(invoke(runner, "intruders", base_dir, ft_dir, *args), message)
    assert not (tmp_path / "out").exists()


def test_missing_path_and_existing_output_are_one_line_errors(tmp_path, runner):
    base, u, _, v = known_base(24, 20)
    base_dir, ft_dir = write_pair(tmp_path, base, base + rank1_intruder(u, v, 30.0))
    assert_one_line_error(invoke(runner, "intruders", tmp_path / "nope", ft_dir), "no such file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep me")
    assert_one_line_error(invoke(runner, "intruders", base_dir, ft_dir, "--scale", "0", "-o", out), "--force")
    assert (out / "keep.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1
    result = invoke(runner, "intruders", base_dir, ft_dir, "--scale", "0", "-o", out, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_adapter_cannot_be_scaled(llama_lora, tmp_path, runner):
    base_dir, _, peft_model = llama_lora
    peft_model.save_pretrained(tmp_path / "adapter")
    result = invoke(runner, "intruders", base_dir, tmp_path / "adapter", "--scale", "0", "-o", tmp_path / "out")
    assert_one_line_error(result, "adapter")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- fused MoE experts (gpt-oss)

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"  # (experts 4, in 32, out 16): stored input-major


def gpt_oss_intruder_pair(root: Path, expert: int = 2) -> tuple[Path, Path]:
    """A tiny transformers gpt-oss and a fine-tune with one planted intruder in ``expert``'s gate_up slice.

    In [out, in] terms the slice is B = U S Vᵀ (16×32). The fine-tune adds 5·S₁·u·vᵀ with u = Σ Uᵢ / 4
    (an output direction with |cos| = 1/4 to every base one: an intruder at ε = 0.5) and v = V₁₆, one
    of the base's input directions: read the other way round (stored [in, out]) the new top
    direction is v, the base's own (|cos| ≈ 1), and no intruder would be found.
    """
    model = tiny_gpt_oss(layers=1)
    model.save_pretrained(root / "base")
    shutil.copytree(root / "base", root / "ft")
    tensors = load_file(root / "base" / "model.safetensors")
    linear = tensors[GATE_UP][expert].double().T  # [out 16, in 32]
    u_base, s_base, vh_base = torch.linalg.svd(linear, full_matrices=False)
    u = u_base.sum(dim=1) / 4
    tensors[GATE_UP][expert] += (5 * s_base[0] * torch.outer(u, vh_base[-1])).T.float()
    save_file(tensors, root / "ft" / "model.safetensors", metadata={"format": "pt"})
    return root / "base", root / "ft"


def test_an_input_major_expert_slice_is_analysed_in_output_directions(tmp_path):
    base, ft = gpt_oss_intruder_pair(tmp_path)
    report = intruders(base, ft, options=CPU)
    by_name = {m.name: m for m in report.matrices}
    planted = by_name[f"{GATE_UP}[2]"]
    assert planted.shape == (16, 32) and planted.layout == "input_major"  # [out, in], as Linear's
    assert [d.rank for d in planted.intruders[0.5]] == [1]
    assert planted.similarities[0] < 0.4
    assert all(by_name[f"{GATE_UP}[{e}]"].count(0.5) == 0 for e in (0, 1, 3))  # unchanged experts


def test_scale_zero_removes_a_fused_experts_intruder_and_copies_every_other_slice(tmp_path, runner):
    base, ft = gpt_oss_intruder_pair(tmp_path)
    out, report_path = tmp_path / "scaled", tmp_path / "r.json"
    result = invoke(runner, "intruders", base, ft, "--scale", "0", "-o", out, "--json", report_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(report_path.read_text())
    assert [m["name"] for m in data["scaling"]["matrices"]] == [f"{GATE_UP}[2]"]
    assert not [s for s in data["skipped"] if "expert" in s.get("reason", "")]
    before, after = load_file(ft / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        if name != GATE_UP:
            assert torch.equal(before[name], after[name]), name
    for expert in (0, 1, 3):
        assert torch.equal(before[GATE_UP][expert], after[GATE_UP][expert]), expert
    # reference, float64: W_ft's top singular triplet removed, in [out, in] terms
    linear = before[GATE_UP][2].double().T
    u, s, vh = torch.linalg.svd(linear, full_matrices=False)
    expected = (linear - s[0] * torch.outer(u[:, 0], vh[0])).T
    assert torch.allclose(after[GATE_UP][2].double(), expected, atol=1e-6 * float(s[0]))
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert torch.equal(state[GATE_UP], after[GATE_UP])


def test_what_no_pair_writes_is_copied_whole_or_by_expert_slice():
    """A fused tensor's slices that no pair covers are copied one by one; tensors no pair reads, whole."""
    from deltakit.lora.intruder_scaling import _copies
    from deltakit.pairing import TensorPair

    def expert(e: int) -> TensorPair:
        return TensorPair(name=f"{GATE_UP}[{e}]", base_name=GATE_UP, shape=(32, 16), base_dtype=torch.float32,
                          ft_dtype=torch.float32, module_type="experts.gate_up", layer=0, layout="input_major",
                          expert=e, expert_slice=True)

    q = TensorPair(name="q.weight", base_name="q.weight", shape=(16, 32), base_dtype=torch.float32,
                   ft_dtype=torch.float32, module_type="q_proj", layer=0)
    plan = [(GATE_UP, (4, 32, 16), torch.float32), ("q.weight", (16, 32), torch.float32),
            ("norm.weight", (32,), torch.float32)]
    assert _copies(plan, [expert(0), expert(2), q]) == [
        (GATE_UP, (1, 2), 512.0), (GATE_UP, (3, 4), 512.0), ("norm.weight", None, 32.0)]
    assert _copies(plan, [expert(e) for e in range(4)]) == [("q.weight", None, 512.0), ("norm.weight", None, 32.0)]
