"""Rotation metrics and the local cosine similarity contract, against hand-computed values."""

import math

import pytest
import torch

from em_lightning.phase import (
    consecutive_cosine,
    cosine_to_lag,
    cumulative_rotation_degrees,
    local_cosine_similarity,
    norms,
    rotation_degrees,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def assert_values(actual, expected, atol=1e-12):
    """Equal entry by entry, NaN where expected is NaN."""
    expected = torch.tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), actual
    ok = ~torch.isnan(expected)
    torch.testing.assert_close(actual[ok].double(), expected[ok], atol=atol, rtol=0)


nan = math.nan


# --- local cosine similarity (contract) ------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_straight_line_is_minus_one_with_nan_edges(k):
    g = torch.Generator().manual_seed(0)
    direction, offset = torch.randn(7, generator=g), torch.randn(7, generator=g)
    steps = torch.rand(12, generator=g) + 0.1  # uneven but positive steps stay on the line
    vectors = offset + steps.cumsum(0)[:, None] * direction
    lcs = local_cosine_similarity(vectors, k)
    assert lcs.shape == (12,)
    assert torch.isnan(lcs[:k]).all() and torch.isnan(lcs[12 - k :]).all()
    torch.testing.assert_close(lcs[k : 12 - k], torch.full((12 - 2 * k,), -1.0), atol=1e-6, rtol=0)


def test_right_angle_turn_is_zero_at_corner():
    # Equal arms of length 2 around the corner (2, 0).
    vectors = t([[0, 0], [1, 0], [2, 0], [2, 1], [2, 2]])
    assert_values(local_cosine_similarity(vectors, 2), [nan, nan, 0.0, nan, nan])
    # At k=1 the corner is 0 and its straight neighbours are -1.
    assert_values(local_cosine_similarity(vectors, 1), [nan, -1.0, 0.0, -1.0, nan])


def test_unequal_arms_and_oblique_turn():
    # i=1: arms (-1, 0) and (1, 1) -> -1/sqrt(2); i=2: arms (-1, -1) and (3, 0) -> -1/sqrt(2).
    vectors = t([[0, 0], [1, 0], [2, 1], [5, 1]])
    assert_values(local_cosine_similarity(vectors, 1), [nan, -1 / math.sqrt(2), -1 / math.sqrt(2), nan])


def test_u_turn_is_plus_one():
    vectors = t([[0, 0], [1, 0], [2, 0], [1, 0], [0, 0]])
    assert_values(local_cosine_similarity(vectors, 2), [nan, nan, 1.0, nan, nan])


def test_zero_differences_give_zero():
    assert_values(local_cosine_similarity(torch.ones(5, 3), 1), [nan, 0.0, 0.0, 0.0, nan])
    # Only one arm is zero: still 0, not NaN.
    assert_values(local_cosine_similarity(t([[0, 0], [1, 0], [1, 0]]), 1), [nan, 0.0, nan])


def test_too_short_trajectory_is_all_nan():
    assert torch.isnan(local_cosine_similarity(torch.randn(4, 3), 2)).all()
    assert local_cosine_similarity(torch.randn(0, 3), 1).shape == (0,)


def test_matches_direct_formula_and_is_invariant():
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(30, 9, generator=g, dtype=torch.float64).cumsum(0)
    k = 4
    lcs = local_cosine_similarity(vectors, k)
    for i in range(k, 30 - k):
        expected = torch.nn.functional.cosine_similarity(vectors[i - k] - vectors[i], vectors[i + k] - vectors[i], dim=0)
        assert lcs[i].item() == pytest.approx(expected.item(), abs=1e-12)
    # Rotation, scaling and translation of the whole path change nothing.
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    moved = 3.5 * vectors @ q + torch.randn(9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(local_cosine_similarity(moved, k), lcs, equal_nan=True)


def test_dtype_and_integer_input():
    vectors = torch.tensor([[0, 0], [1, 0], [2, 0], [2, 1], [2, 2]])
    out = local_cosine_similarity(vectors, 1)
    assert out.dtype == torch.get_default_dtype()
    assert local_cosine_similarity(vectors.float(), 1).dtype == torch.float32
    assert local_cosine_similarity(vectors.double(), 1).dtype == torch.float64
    assert_values(out, [nan, -1.0, 0.0, -1.0, nan], atol=1e-6)


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "2"])
def test_bad_k_raises(k):
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        local_cosine_similarity(torch.randn(10, 3), k)


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4), ()])
def test_bad_shape_raises(shape):
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        local_cosine_similarity(torch.randn(shape), 1)


def test_non_tensor_raises():
    with pytest.raises(TypeError, match="torch.Tensor"):
        local_cosine_similarity([[0.0, 1.0]] * 5, 1)


# --- other metrics ---------------------------------------------------------------------------------


def test_consecutive_cosine():
    vectors = t([[1, 0], [0, 2], [-3, 0], [-1, 0], [0, 0]])
    assert_values(consecutive_cosine(vectors), [nan, 0.0, 0.0, 1.0, 0.0])


def test_cosine_to_lag():
    vectors = t([[1, 0], [0, 1], [-1, 0], [0, -1], [1, 1]])
    s = 1 / math.sqrt(2)
    assert_values(cosine_to_lag(vectors, 2), [nan, nan, -1.0, -1.0, -s])  # (-1, 0) vs (1, 1)
    assert_values(cosine_to_lag(vectors, 1), consecutive_cosine(vectors).tolist())
    assert torch.isnan(cosine_to_lag(vectors, 5)).all()
    with pytest.raises(ValueError):
        cosine_to_lag(vectors, 0)


def test_quarter_turns_rotation_and_cumulative():
    # Norm grows while the direction turns by 90 degrees each point.
    angles = torch.arange(5, dtype=torch.float64) * math.pi / 2
    vectors = torch.stack([torch.cos(angles), torch.sin(angles)], 1) * torch.arange(1, 6)[:, None]
    assert_values(rotation_degrees(vectors), [nan, 90.0, 90.0, 90.0, 90.0], atol=1e-9)
    assert_values(cumulative_rotation_degrees(vectors), [0.0, 90.0, 180.0, 270.0, 360.0], atol=1e-9)


def test_rotation_uneven_angles_and_half_turn():
    vectors = t([[1, 0], [1, 1], [0, 1], [0, -1]])
    assert_values(rotation_degrees(vectors), [nan, 45.0, 45.0, 180.0], atol=1e-9)
    assert_values(cumulative_rotation_degrees(vectors), [0.0, 45.0, 90.0, 270.0], atol=1e-9)


def test_tiny_rotation_is_accurate():
    eps = 1e-7  # radians; acos(cos) would round this to 0
    vectors = t([[1, 0], [math.cos(eps), math.sin(eps)]])
    assert rotation_degrees(vectors)[1].item() == pytest.approx(math.degrees(eps), rel=1e-6)


def test_zero_vector_has_no_rotation():
    # A LoRA B starting at zero: no direction, so NaN rotation; the cumulative sum counts it as 0.
    vectors = t([[0, 0], [1, 0], [1, 1], [0, 0], [0, 3]])
    assert_values(rotation_degrees(vectors), [nan, nan, 45.0, nan, nan], atol=1e-9)
    assert_values(cumulative_rotation_degrees(vectors), [0.0, 0.0, 45.0, 45.0, 45.0], atol=1e-9)


def test_norms_and_empty():
    assert_values(norms(t([[3, 4], [0, 0], [1, 0]])), [5.0, 0.0, 1.0])
    assert cumulative_rotation_degrees(torch.zeros(0, 2)).shape == (0,)
    assert_values(cumulative_rotation_degrees(t([[1, 2]])), [0.0])
