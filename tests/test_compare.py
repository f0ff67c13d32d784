"""`deltakit compare`: cosine and subspace overlap against constructed truth and an fp64 numpy reference.

Fine-tunes are single .safetensors files of a few matrices whose ΔW is built with known
singular vectors; the expected overlap follows from the construction (s shared directions of k
give s/k) or from numpy's float64 SVD of the same ΔW.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_line_error, invoke, merged_lora_copy, save, tiny_gpt2, tiny_llama

from deltakit.analyses.compare import compare, compare_matrix
from deltakit.errors import DeltakitError
from deltakit.pairing import TensorPair
from deltakit.spectral.options import SpectralOptions
from deltakit.spectral.subspace import amplification_factor, delta_cosine, subspace_overlap, top_directions

Q = "model.layers.{}.self_attn.q_proj.weight"
V = "model.layers.{}.self_attn.v_proj.weight"


def orthonormal(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(m, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def from_factors(u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * sigma) @ v.T


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({name: t.to(torch.float32).contiguous() for name, t in tensors.items()}, str(path))
    return path


def shared_pair(m: int, n: int, k: int, shared: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW_A, ΔW_B of rank k + 4 whose top-k left singular subspaces share exactly ``shared`` directions.

    The first ``shared`` of B's top-k left vectors are A's; the others are orthogonal to all of
    A's. Singular values are distinct and the 4 extra directions are smaller than the top k.
    """
    basis = orthonormal(m, 2 * (k + 4), seed)
    u_a = basis[:, : k + 4]
    u_b = torch.cat([u_a[:, :shared], basis[:, k + 4: 2 * (k + 4) - shared]], dim=1)
    sigma = torch.cat([torch.linspace(3.0, 1.0, k), torch.linspace(0.5, 0.2, 4)]).double()
    v_a, v_b = orthonormal(n, k + 4, seed + 1), orthonormal(n, k + 4, seed + 2)
    return from_factors(u_a, sigma, v_a), from_factors(u_b, sigma * 0.7, v_b)


@pytest.mark.parametrize("shared", [0, 3, 8])
@pytest.mark.parametrize("exact", [False, True])
def test_shared_directions_give_s_over_k(shared, exact):
    delta_a, delta_b = shared_pair(96, 80, 8, shared)
    pair = TensorPair(Q.format(0), Q.format(0), (96, 80), torch.float32, torch.float32, "q", 0)
    [result] = compare_matrix(pair, [delta_a.float(), delta_b.float()], (8,), exact=exact)
    assert result.overlap_at[8] == pytest.approx(shared / 8, abs=1e-3)
    assert result.random_overlap_at[8] == pytest.approx(8 / 96)
    assert result.random_right_overlap_at[8] == pytest.approx(8 / 80)
    assert result.directions_a == result.directions_b == 8
    assert result.norm_ratio == pytest.approx(1 / 0.7, rel=1e-6)


def test_orthogonal_right_factors_cosine_zero_left_overlap_one(tmp_path):
    m, n, r = 64, 72, 6
    u, sigma = orthonormal(m, r, 1), torch.linspace(2.0, 1.0, r).double()
    right = orthonormal(n, 2 * r, 2)  # V_A ⟂ V_B
    base = torch.randn(m, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    write(tmp_path / "base.safetensors", {Q.format(0): base})
    write(tmp_path / "a.safetensors", {Q.format(0): base + from_factors(u, sigma, right[:, :r])})
    write(tmp_path / "b.safetensors", {Q.format(0): base + from_factors(u, sigma, right[:, r:])})
    report = compare(tmp_path / "base.safetensors", [tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                     top=(1, r), options=SpectralOptions(device="cpu"))
    [m0] = report.matrices
    assert abs(m0.cosine) < 1e-6
    assert m0.overlap_at[r] == pytest.approx(1.0, abs=1e-3)
    assert m0.right_overlap_at[r] == pytest.approx(0.0, abs=1e-3)
    assert m0.norm_ratio == pytest.approx(1.0, rel=1e-5)


def random_pair(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random m×n matrices with singular values max(0.7^i, 0.02) and correlated singular vectors.

    The spectrum decays fast and then stays well above fp32 noise, so every top-k subspace is
    well separated from the rest; B's singular vectors are A's tilted by Gaussian noise, so the
    overlaps fall between the random baseline and 1.
    """
    p = min(m, n)
    sigma = torch.clamp(0.7 ** torch.arange(p, dtype=torch.float64), min=0.02)
    u_a, v_a = orthonormal(m, p, seed), orthonormal(n, p, seed + 1)
    noise = torch.Generator().manual_seed(seed + 2)
    u_b = torch.linalg.qr(u_a + 0.4 * torch.randn(m, p, generator=noise, dtype=torch.float64))[0]
    v_b = torch.linalg.qr(v_a + 0.4 * torch.randn(n, p, generator=noise, dtype=torch.float64))[0]
    return from_factors(u_a, sigma, v_a), from_factors(u_b, sigma, v_b)


def numpy_reference(delta_a: np.ndarray, delta_b: np.ndarray, k: int) -> tuple[float, float, float]:
    """cosine, left φ@k, right φ@k in float64 by numpy's SVD."""
    cosine = float(np.sum(delta_a * delta_b) / (np.linalg.norm(delta_a) * np.linalg.norm(delta_b)))
    ua, _, vta = np.linalg.svd(delta_a, full_matrices=False)
    ub, _, vtb = np.linalg.svd(delta_b, full_matrices=False)
    k = min(k, *delta_a.shape)
    left = float(np.sum((ua[:, :k].T @ ub[:, :k]) ** 2) / k)
    right = float(np.sum((vta[:k] @ vtb[:k].T) ** 2) / k)
    return cosine, left, right


@pytest.mark.parametrize("exact,precision,tolerance", [(False, "fp32", 1e-3), (True, "fp32", 1e-6), (True, "fp64", 1e-9)])
def test_random_pairs_match_float64_numpy(tmp_path, exact, precision, tolerance):
    shapes = {Q.format(0): (48, 40), V.format(0): (40, 56), Q.format(1): (64, 64)}
    base, fa, fb = {}, {}, {}
    for i, (name, (m, n)) in enumerate(shapes.items()):
        delta_a, delta_b = random_pair(m, n, 10 * i)
        base[name] = torch.randn(m, n, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
        fa[name], fb[name] = base[name] + delta_a, base[name] + delta_b
    paths = [write(tmp_path / f"{label}.safetensors", t) for label, t in (("base", base), ("a", fa), ("b", fb))]
    report = compare(paths[0], paths[1:], top=(1, 8, 64), options=SpectralOptions(device="cpu", exact=exact,
                                                                                 precision=precision))
    assert [m.name for m in report.matrices] == sorted(shapes)
    for m in report.matrices:
        stored = {label: t[m.name].float().double().numpy() for label, t in (("base", base), ("a", fa), ("b", fb))}
        delta_a, delta_b = stored["a"] - stored["base"], stored["b"] - stored["base"]
        for k in (1, 8, 64):
            cosine, left, right = numpy_reference(delta_a, delta_b, k)
            assert m.cosine == pytest.approx(cosine, abs=1e-6)
            assert m.overlap_at[k] == pytest.approx(left, abs=tolerance), (m.name, k)
            assert m.right_overlap_at[k] == pytest.approx(right, abs=tolerance), (m.name, k)
        assert m.delta_fro_a / m.delta_fro_b == pytest.approx(np.linalg.norm(delta_a) / np.linalg.norm(delta_b), rel=1e-6)
        assert m.directions_a == m.directions_b == min(m.shape)  # 64 is capped by the shape


def test_pure_functions_on_small_matrices():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert delta_cosine(a, a) == pytest.approx(1.0)
    assert delta_cosine(a, torch.tensor([[0.0, 1.0], [0.0, 0.0]])) == 0.0
    assert delta_cosine(a, torch.zeros(2, 2)) is None
    e = torch.eye(4, dtype=torch.float64)
    assert subspace_overlap(e[:, :2], e[:, :3]) == pytest.approx(1.0)  # φ divides by min(i, j)
    assert subspace_overlap(e[:, :2], e[:, 2:]) == 0.0
    u, s, vh = top_directions(torch.diag(torch.tensor([3.0, 2.0, 0.0, 0.0])), 4, exact=True)
    assert u.shape == (4, 2) and s.tolist() == [3.0, 2.0]  # zero singular values carry no direction


def test_amplification_factor_against_numpy():
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    delta = from_factors(orthonormal(30, 3, 1), torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), orthonormal(20, 3, 2))
    u, _, vh = top_directions(delta, 3, exact=True, dtype=torch.float64)
    un, _, vtn = np.linalg.svd(delta.numpy())
    expected = np.linalg.norm(delta.numpy()) / np.linalg.norm(un[:, :3].T @ w.numpy() @ vtn[:3].T)
    assert amplification_factor(w, float(torch.linalg.norm(delta)), u, vh) == pytest.approx(expected, rel=1e-9)


def test_rank_json_has_amplification_with_the_lora_rank(tmp_path, runner):
    m, n, r = 48, 40, 4
    base = torch.randn(m, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    delta = from_factors(orthonormal(m, r, 1), torch.linspace(2.0, 1.0, r).double(), orthonormal(n, r, 2))
    write(tmp_path / "base.safetensors", {Q.format(0): base, V.format(0): base})
    write(tmp_path / "ft.safetensors", {Q.format(0): base + delta, V.format(0): base})
    result = invoke(runner, "rank", tmp_path / "base.safetensors", tmp_path / "ft.safetensors", "--json", "-",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    matrices = {m["name"]: m for m in json.loads(result.stdout)["matrices"]}
    stored_delta = (base + delta).float().double().numpy() - base.float().double().numpy()
    un, _, vtn = np.linalg.svd(stored_delta)
    expected = np.linalg.norm(stored_delta) / np.linalg.norm(un[:, :r].T @ base.float().double().numpy() @ vtn[:r].T)
    assert matrices[Q.format(0)]["amplification"]["k"] == r
    assert matrices[Q.format(0)]["amplification"]["value"] == pytest.approx(expected, rel=1e-4)
    assert matrices[V.format(0)]["amplification"] is None  # unchanged


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    """A tiny Llama base, two merged LoRAs (rank 4 and 8 on q/v) and the rank-4 one as a PEFT adapter."""
    folder = tmp_path_factory.mktemp("family")
    base = tiny_llama()
    save(base, folder / "base")
    merged4, peft4 = merged_lora_copy(base, ["q_proj", "v_proj"], 4, seed=1)
    merged8, _ = merged_lora_copy(base, ["q_proj", "v_proj"], 8, seed=2)
    save(merged4, folder / "lora4")
    save(merged8, folder / "lora8")
    peft4.save_pretrained(folder / "adapter4")
    return folder


def test_cli_three_fine_tunes_all_pairs_json_and_plot(llama_family, tmp_path, runner):
    f = llama_family
    result = invoke(runner, "compare", f / "base", f / "lora4", f / "adapter4", f / "lora8", "--top", "4", "--top", "8",
                    "--json", tmp_path / "c.json", "--plot", tmp_path / "c.png", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["pairs"] == [[0, 1], [0, 2], [1, 2]] and data["top"] == [4, 8]
    assert {"base", "fts", "device", "method", "matrices", "skipped", "summary"} <= set(data)
    # every matrix present in all three: the adapter's 4 modules (q, v of 2 layers)
    assert data["summary"]["matrices"] == 4 and len(data["matrices"]) == 12
    same = [m for m in data["matrices"] if (m["a"], m["b"]) == (0, 1)]  # the merged LoRA and its own adapter
    for m in same:
        assert m["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert m["overlap_at"]["4"] == pytest.approx(1.0, abs=1e-4) and m["directions_a"] == 4
        assert m["norm_ratio"] == pytest.approx(1.0, abs=1e-4)
    other = [m for m in data["matrices"] if (m["a"], m["b"]) == (0, 2)]
    assert all(m["directions_a"] == 4 and m["directions_b"] == 8 for m in other)
    assert all(abs(m["cosine"]) < 0.5 for m in other)  # independent random LoRAs
    pair = data["summary"]["pairs"][0]
    assert set(pair["by_module_type"]) == {"q", "v"} and set(pair["by_layer"]) == {"0", "1"}
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "fine-tune 0 vs 2" in result.output and "by module type" in result.output


def test_unchanged_matrices_have_no_overlap(llama_family):
    f = llama_family
    report = compare(f / "base", [f / "lora4", f / "lora8"], top=(8,), options=SpectralOptions(device="cpu"))
    unchanged = [m for m in report.matrices if m.module_type in ("k", "o", "gate", "up", "down")]
    assert unchanged and all(m.cosine is None and m.overlap_at[8] is None for m in unchanged)
    json.dumps(report.to_dict(), allow_nan=False)


def test_one_fine_tune_is_a_user_error(llama_family, runner):
    assert_one_line_error(invoke(runner, "compare", llama_family / "base", llama_family / "lora4"), "at least 2")
    with pytest.raises(DeltakitError):
        compare(llama_family / "base", [llama_family / "lora4"])


def test_mismatched_models_are_a_user_error(llama_family, tmp_path, runner):
    save(tiny_gpt2(), tmp_path / "gpt2")
    result = invoke(runner, "compare", llama_family / "base", llama_family / "lora4", tmp_path / "gpt2")
    assert_one_line_error(result, "fine-tune 1")
    bigger = tiny_llama()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    save(LlamaForCausalLM(config), tmp_path / "other")
    del bigger
    assert_one_line_error(invoke(runner, "compare", llama_family / "base", llama_family / "lora4", tmp_path / "other"),
                          "fine-tune 1")
    assert_one_line_error(invoke(runner, "compare", llama_family / "base", llama_family / "lora4", llama_family / "lora8",
                                 "--top", "0"), "--top")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_match_single_process(llama_family, tmp_path):
    import os

    f = llama_family
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = ["compare", f / "base", f / "lora4", f / "lora8", "-q", "--device", "cpu", "--top", "4"]
    single = [sys.executable, "-m", "deltakit_cli.main", *common, "--json", tmp_path / "one.json"]
    multi = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "deltakit_cli.main", *common,
             "--json", tmp_path / "two.json"]
    for command in (single, multi):
        done = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    for data in (one, two):
        data.pop("elapsed_s")
    assert one == two
