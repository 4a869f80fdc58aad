"""Rotation metrics of an adapter trajectory.

A trajectory is an (n, d) tensor: one adapter vector (e.g. the B vector of a rank-1 LoRA) recorded at n
consecutive points. Every function computes in float64 on the CPU (trajectories are tiny, and some
accelerators lack float64) and returns an (n,) tensor in the input's floating dtype (the default dtype for
integer input) on the input's device. Entries without enough neighbours are NaN.

Zero vectors: a *cosine* involving a zero vector (or a zero difference) is 0, as the local cosine
similarity contract requires; an *angle between directions* is NaN, because a zero vector has no
direction. So ``rotation_degrees`` is not ``acos(consecutive_cosine)`` at such points: a LoRA B that
starts at zero gives NaN rotation at its first step, not a spurious 90 degrees.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

__all__ = [
    "local_cosine_similarity",
    "consecutive_cosine",
    "cosine_to_lag",
    "rotation_degrees",
    "cumulative_rotation_degrees",
    "norms",
    "pairwise_cosine",
    "pairwise_rotation_degrees",
]

_F64 = torch.float64


def _trajectory(vectors: Tensor) -> tuple[Tensor, torch.dtype, torch.device]:
    """Validate an (n, d) trajectory; return it as CPU float64 plus the dtype/device to return in."""
    if not isinstance(vectors, Tensor):
        raise TypeError(f"vectors must be a torch.Tensor of shape (n, d), got {type(vectors).__name__}")
    if vectors.ndim != 2:
        raise ValueError(
            f"vectors must have shape (n, d): one adapter vector per recorded point; got shape {tuple(vectors.shape)}"
        )
    out_dtype = vectors.dtype if vectors.is_floating_point() else torch.get_default_dtype()
    return vectors.detach().to("cpu", _F64), out_dtype, vectors.device


def _check_k(k: int) -> int:
    try:
        value = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be an integer >= 1, got {k!r}") from None
    if isinstance(k, bool) or value < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return value


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise unit vectors (zero rows stay zero) and a mask of the non-zero rows."""
    n = x.norm(dim=-1, keepdim=True)
    nonzero = n > 0
    # Dividing each vector by its own norm (not the dot by the product of norms) avoids underflow of
    # |a|*|b| for tiny vectors such as a LoRA B a few steps after its zero init.
    return x / torch.where(nonzero, n, torch.ones_like(n)), nonzero.squeeze(-1)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine, 0 where either row is zero."""
    ua, _ = _unit(a)
    ub, _ = _unit(b)
    return (ua * ub).sum(-1).clamp(-1.0, 1.0)


def _nan(n: int) -> Tensor:
    return torch.full((n,), math.nan, dtype=_F64)


def local_cosine_similarity(vectors: Tensor, k: int) -> Tensor:
    """Local cosine similarity of a trajectory at scale ``k`` (contract).

    Entry i is cos(v[i-k] - v[i], v[i+k] - v[i]) for k <= i < n-k, NaN elsewhere, and 0 where either
    difference is zero. A straight trajectory gives -1 (the two arms point in opposite directions); a
    turn by angle theta gives -cos(theta) at the corner, so a sharp turn rises toward +1 (a U-turn).
    """
    x, out_dtype, device = _trajectory(vectors)
    k = _check_k(k)
    n = x.shape[0]
    result = _nan(n)
    if n > 2 * k:
        centre = x[k : n - k]
        result[k : n - k] = _cosine(x[: n - 2 * k] - centre, x[2 * k :] - centre)
    return result.to(device, out_dtype)


def consecutive_cosine(vectors: Tensor) -> Tensor:
    """cos(v[i-1], v[i]); NaN at i = 0, and 0 where either vector is zero."""
    return cosine_to_lag(vectors, 1)


def cosine_to_lag(vectors: Tensor, k: int) -> Tensor:
    """cos(v[i-k], v[i]); NaN for i < k, and 0 where either vector is zero."""
    x, out_dtype, device = _trajectory(vectors)
    k = _check_k(k)
    result = _nan(x.shape[0])
    if x.shape[0] > k:
        result[k:] = _cosine(x[:-k], x[k:])
    return result.to(device, out_dtype)


def pairwise_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cos(a[i], b[i]) of two (n, d) tensors, float64 on the CPU; 0 where either row is zero."""
    return _cosine(a.detach().to("cpu", _F64), b.detach().to("cpu", _F64))


def pairwise_rotation_degrees(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise angle in degrees between the directions of a[i] and b[i], float64 on the CPU; NaN where
    either row is zero."""
    ua, a_ok = _unit(a.detach().to("cpu", _F64))
    ub, b_ok = _unit(b.detach().to("cpu", _F64))
    # 2*atan2(|ua-ub|, |ua+ub|) is accurate for tiny and near-180-degree angles, where acos is not.
    angle = torch.rad2deg(2 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1)))
    return torch.where(a_ok & b_ok, angle, torch.full_like(angle, math.nan))


def _rotation_degrees64(x: Tensor) -> Tensor:
    result = _nan(x.shape[0])
    if x.shape[0] > 1:
        result[1:] = pairwise_rotation_degrees(x[:-1], x[1:])
    return result


def rotation_degrees(vectors: Tensor) -> Tensor:
    """Angle in degrees (0..180) between the directions of v[i-1] and v[i].

    NaN at i = 0 and where either vector is zero (no direction).
    """
    x, out_dtype, device = _trajectory(vectors)
    return _rotation_degrees64(x).to(device, out_dtype)


def cumulative_rotation_degrees(vectors: Tensor) -> Tensor:
    """Running sum of ``rotation_degrees``: 0 at the first point, NaN steps count as no rotation."""
    x, out_dtype, device = _trajectory(vectors)
    steps = torch.nan_to_num(_rotation_degrees64(x), nan=0.0)
    return steps.cumsum(0).to(device, out_dtype)


def norms(vectors: Tensor) -> Tensor:
    """Euclidean norm of each recorded vector."""
    x, out_dtype, device = _trajectory(vectors)
    return x.norm(dim=1).to(device, out_dtype)
