"""Gram/eigh fast path, exact SVD and randomized SVD against a float64 reference."""

import math

import numpy as np
import pytest
import torch

from deltakit.spectral import metrics, svd

from conftest import low_rank


def decaying(m, n, alpha=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -alpha
    return (u * s) @ v.T, s


@pytest.mark.parametrize("shape", [(5, 5), (96, 40), (40, 96), (300, 300)])
def test_gram_and_exact_agree_with_float64(shape):
    matrix, s_true = decaying(*shape, alpha=0.7)
    for method in ("gram", "exact"):
        s = svd.singular_values(matrix.float(), method)
        assert s.shape == (min(shape),)
        assert torch.all(s[:-1] >= s[1:])
        curve = metrics.energy_curve(s)
        reference = metrics.energy_curve(s_true)
        assert np.max(np.abs(curve - reference)) < 2e-5, method
        for fraction in (0.5, 0.9, 0.99):
            assert abs(metrics.rank_at_energy(s, fraction) - metrics.rank_at_energy(s_true, fraction)) <= 1


def test_five_by_five_known_values():
    matrix = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]))
    for method in ("gram", "exact"):
        assert torch.allclose(svd.singular_values(matrix, method), torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), atol=1e-5)


@pytest.mark.parametrize("shape,rank", [((64, 64), 4), ((512, 256), 32), ((256, 704), 8), ((1024, 1024), 16)])
def test_method_floor_separates_exact_low_rank(shape, rank):
    """Exact low-rank fp32 matrices: the floor lies between noise and signal on both paths."""
    matrix = (low_rank(*shape, rank, scale=0.01) ).float()
    for method in ("gram", "exact"):
        s = svd.singular_values(matrix, method)
        floor = svd.method_noise_floor(s[0].item(), shape, method, torch.float32)
        assert s[rank - 1].item() > 4 * floor, (method, s[rank - 1].item(), floor)
        assert s[rank].item() < floor / 4, (method, s[rank].item(), floor)
        assert metrics.numerical_rank(s, floor) == rank


def test_top_singular_triplets_match_exact():
    matrix, _ = decaying(120, 80, alpha=1.0, seed=3)
    for m in (matrix.float(), matrix.float().T.contiguous()):
        u, s, vh = svd.top_singular_triplets(m, 6, "gram")
        u_ref, s_ref, vh_ref = torch.linalg.svd(m.double(), full_matrices=False)
        assert torch.allclose(s.double(), s_ref[:6], rtol=1e-4)
        # vectors agree up to sign
        assert torch.allclose((u.double().T @ u_ref[:, :6]).diagonal().abs(), torch.ones(6, dtype=torch.float64), atol=1e-3)
        assert torch.allclose((vh.double() @ vh_ref[:6].T).diagonal().abs(), torch.ones(6, dtype=torch.float64), atol=1e-3)


@pytest.mark.parametrize("alpha", [0.3, 0.6, 1.0])
def test_randomized_svd_error_within_one_percent_of_exact(alpha):
    matrix, _ = decaying(400, 300, alpha=alpha, seed=1)
    matrix = (matrix + 1e-3 * torch.randn(400, 300, dtype=torch.float64)).float()
    rank = 32
    u, s, vh = svd.randomized_svd(matrix, rank, seed=0)
    approx = (u * s) @ vh
    error = torch.linalg.norm(matrix - approx) / torch.linalg.norm(matrix)
    s_all = torch.linalg.svdvals(matrix.double())
    optimal = math.sqrt(float((s_all[rank:] ** 2).sum() / (s_all**2).sum()))
    assert error.item() <= optimal * 1.01, (error.item(), optimal)
    u2, s2, vh2 = svd.randomized_svd(matrix, rank, seed=0)
    assert torch.equal(s, s2)  # seeded: reproducible


def test_singular_values_rejects_bad_input():
    with pytest.raises(ValueError):
        svd.singular_values(torch.ones(3))
    with pytest.raises(ValueError):
        svd.singular_values(torch.ones(3, 3), method="magic")


@pytest.mark.parametrize("decay", [0.0, 1.0, 3.0])
def test_cholesky_qr2_basis_is_orthonormal_and_spans_the_columns(decay):
    """The GPU's CholeskyQR2 path, run on the CPU: orthonormal, same span as Householder QR."""
    g = torch.Generator().manual_seed(0)
    columns = torch.randn(500, 40, generator=g) * torch.arange(1, 41).float() ** -decay
    q = svd.orthonormal_basis(columns, method="cholesky")
    assert torch.allclose(q.T @ q, torch.eye(40), atol=1e-4)
    q_ref = svd.orthonormal_basis(columns, method="householder")
    projector_gap = q @ q.T - q_ref @ q_ref.T
    assert torch.linalg.matrix_norm(projector_gap, ord=2) < 1e-3


@pytest.mark.parametrize("kappa", [1e2, 1e6, 1e9, math.inf])
def test_shifted_cholesky_qr_never_fails_and_two_passes_are_orthonormal(kappa):
    """The adaptive path's orthonormalisation (no host check, so no synchronisation), run on the CPU:
    after two passes orthonormal to ~fp32 rounding for any conditioning, even exactly dependent
    columns (kappa = inf: rank 4 of 64), and the columns' span is kept."""
    g = torch.Generator().manual_seed(1)
    if math.isinf(kappa):
        columns = torch.randn(2000, 4, generator=g) @ torch.randn(4, 64, generator=g)
    else:
        left, _ = torch.linalg.qr(torch.randn(2000, 64, generator=g))
        right, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
        columns = (left * torch.logspace(0, -math.log10(kappa), 64)) @ right.T
    q = svd.shifted_cholesky_qr(columns, passes=2)
    assert torch.isfinite(q).all()
    gap = q.T.double() @ q.double() - torch.eye(64, dtype=torch.float64)
    assert float(gap.abs().max()) < 1e-5
    kept = columns - q @ (q.T @ columns)
    assert float(torch.linalg.matrix_norm(kept) / torch.linalg.matrix_norm(columns)) < 1e-6
    one_pass = svd.shifted_cholesky_qr(columns, passes=1)
    assert torch.isfinite(one_pass).all()  # one pass keeps the span (power iterations) but not orthogonality
