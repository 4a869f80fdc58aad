"""PCA of trajectories and per-layer LoRA directions."""

import pytest
import torch

from em_lightning.phase import lora_direction, pca_2d


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def orthonormal(d, m, g):
    q, _ = torch.linalg.qr(randn(d, m, g=g))
    return q


# --- PCA -------------------------------------------------------------------------------------------


def test_points_on_a_line():
    g = gen(0)
    direction, offset = randn(5, g=g), randn(5, g=g)
    vectors = offset + randn(12, g=g)[:, None] * direction
    res = pca_2d(vectors)
    torch.testing.assert_close(res.explained_variance_ratio, torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert abs(res.components[0] @ direction / direction.norm()).item() == pytest.approx(1.0)
    torch.testing.assert_close(res.coords[:, 1], torch.zeros(12, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(res.mean + res.coords @ res.components, vectors)


def test_points_on_a_plane_reconstruct_exactly():
    g = gen(1)
    basis = orthonormal(10, 2, g)
    vectors = randn(20, 2, g=g) * torch.tensor([3.0, 1.0], dtype=torch.float64) @ basis.T + randn(10, g=g)
    res = pca_2d(vectors)
    assert res.coords.shape == (20, 2) and res.components.shape == (2, 10)
    torch.testing.assert_close(res.explained_variance_ratio.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(res.components @ res.components.T, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(res.mean + res.coords @ res.components, vectors)


def test_ratios_match_covariance_eigenvalues():
    vectors = randn(25, 6, g=gen(2)) * torch.arange(1, 7, dtype=torch.float64)
    centred = vectors - vectors.mean(0)
    eig = torch.linalg.eigvalsh(centred.T @ centred).flip(0)
    res = pca_2d(vectors)
    torch.testing.assert_close(res.explained_variance_ratio, eig[:2] / eig.sum())
    assert res.explained_variance_ratio[0] >= res.explained_variance_ratio[1]
    # The coordinates are the projections, with the variance of each component.
    torch.testing.assert_close(res.coords.square().sum(0), eig[:2])


def test_sign_is_deterministic():
    vectors = randn(15, 4, g=gen(3))
    a, b = pca_2d(vectors), pca_2d(-vectors)
    torch.testing.assert_close(a.components, b.components)
    torch.testing.assert_close(a.coords, -b.coords)
    for row in a.components:
        assert row[row.abs().argmax()] > 0


def test_edge_cases():
    one = pca_2d(torch.tensor([[1.0, 2.0, 3.0]]))  # n = 1: no variance, all zeros
    assert one.coords.shape == (1, 2) and not one.coords.any() and not one.components.any()
    assert not one.explained_variance_ratio.any() and one.coords.dtype == torch.float32
    same = pca_2d(torch.ones(4, 3))
    assert not same.components.any() and not same.explained_variance_ratio.any()
    line = pca_2d(torch.tensor([[1.0], [3.0], [2.0]]))  # d = 1: second component padded
    torch.testing.assert_close(line.explained_variance_ratio, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(line.components, torch.tensor([[1.0], [0.0]]))
    torch.testing.assert_close(line.coords, torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least one point"):
        pca_2d(torch.zeros(0, 3))


# --- LoRA directions -------------------------------------------------------------------------------


def test_rank1_is_normalised_b_and_a():
    g = gen(4)
    A, B = randn(1, 7, g=g), randn(5, 1, g=g)
    u, v, s = lora_direction(A, B)
    sign = 1.0 if (u @ B[:, 0]) > 0 else -1.0
    torch.testing.assert_close(u, sign * B[:, 0] / B.norm())
    torch.testing.assert_close(v, sign * A[0] / A.norm())
    assert s == pytest.approx((A.norm() * B.norm()).item())
    assert u[u.abs().argmax()] > 0  # the sign convention
    torch.testing.assert_close(s * torch.outer(u, v), B @ A)


def test_rank1_zero_b_keeps_a_direction():
    A = torch.tensor([[0.0, 3.0, -4.0]])
    u, v, s = lora_direction(A, torch.zeros(4, 1))
    assert s == 0.0 and not u.any()
    torch.testing.assert_close(v, torch.tensor([0.0, -0.6, 0.8]))  # A/|A|, flipped: largest |entry| > 0


def test_rank2_recovers_known_singular_vectors():
    g = gen(5)
    U, V = orthonormal(40, 2, g), orthonormal(30, 2, g)
    M = randn(2, 2, g=g) + 3 * torch.eye(2, dtype=torch.float64)  # hides the SVD inside the factors
    B = U @ torch.diag(torch.tensor([5.0, 2.0], dtype=torch.float64)) @ M
    A = torch.linalg.inv(M) @ V.T
    u, v, s = lora_direction(A, B)
    assert s == pytest.approx(5.0)
    assert abs(u @ U[:, 0]).item() == pytest.approx(1.0)
    assert abs(v @ V[:, 0]).item() == pytest.approx(1.0)
    assert (u @ U[:, 0]) * (v @ V[:, 0]) > 0  # u and v flip together


@pytest.mark.parametrize("shape", [(64, 48, 4), (10, 80, 8), (3, 5, 6)])  # d_out, d_in, r (r may exceed d)
def test_matches_full_svd_of_product(shape):
    d_out, d_in, r = shape
    g = gen(6)
    A, B = randn(r, d_in, g=g), randn(d_out, r, g=g)
    U, S, Vh = torch.linalg.svd(B @ A)
    u, v, s = lora_direction(A, B)
    assert s == pytest.approx(S[0].item())
    torch.testing.assert_close(s * torch.outer(u, v), S[0] * torch.outer(U[:, 0], Vh[0]))


def test_sign_is_stable_along_a_slow_path():
    g = gen(7)
    A0, B0 = randn(4, 30, g=g), randn(20, 4, g=g)
    dA, dB = randn(4, 30, g=g), randn(20, 4, g=g)
    prev = None
    for step in range(30):
        A, B = A0 + 0.02 * step * dA, B0 + 0.02 * step * dB
        u, v, _ = lora_direction(A, B, reference=prev)
        if prev is not None:
            assert (u @ prev) > 0.9  # no flip between consecutive steps
        prev = u
    # Same update through another factorisation, B R and R^-1 A: identical direction and sign.
    R = randn(4, 4, g=g) + 4 * torch.eye(4, dtype=torch.float64)
    u1, v1, s1 = lora_direction(A0, B0)
    u2, v2, s2 = lora_direction(torch.linalg.inv(R) @ A0, B0 @ R)
    torch.testing.assert_close(u1, u2)
    torch.testing.assert_close(v1, v2)
    assert s1 == pytest.approx(s2)
    # A reference pointing the other way flips u and v together.
    u3, v3, _ = lora_direction(A0, B0, reference=-u1)
    torch.testing.assert_close(u3, -u1)
    torch.testing.assert_close(v3, -v1)


def test_zero_product_and_bad_shapes():
    u, v, s = lora_direction(torch.randn(3, 6), torch.zeros(4, 3))
    assert s == 0.0 and not u.any() and not v.any()
    assert u.shape == (4,) and v.shape == (6,) and u.dtype == torch.float32
    with pytest.raises(ValueError, match="rank mismatch"):
        lora_direction(torch.randn(2, 6), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"\(r, d_in\)"):
        lora_direction(torch.randn(6), torch.randn(4, 1))
    with pytest.raises(ValueError, match="reference"):
        lora_direction(torch.randn(2, 6), torch.randn(4, 2), reference=torch.randn(5))
