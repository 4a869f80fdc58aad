"""Two-dimensional PCA of a trajectory, for phase-portrait plots of the adapter path."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from em_lightning.phase.lora_direction import canonical_sign
from em_lightning.phase.rotation import _trajectory

__all__ = ["PCAResult", "pca_2d"]


@dataclass(frozen=True)
class PCAResult:
    """Projection of an (n, d) trajectory on its first two principal components.

    ``vectors ~= mean + coords @ components`` (exact when the trajectory spans at most two dimensions).
    """

    coords: Tensor  # (n, 2) mean-centred points in the component basis
    components: Tensor  # (2, d) orthonormal rows (zero rows where a component does not exist)
    explained_variance_ratio: Tensor  # (2,) share of the total variance along each component
    mean: Tensor  # (d,)


def pca_2d(vectors: Tensor) -> PCAResult:
    """PCA of an (n, d) trajectory via ``torch.linalg.svd`` of the mean-centred points.

    Edge cases, padded with zeros (never NaN, so plots and logs need no special case): when
    min(n, d) < 2 the missing component is a zero row with zero coordinates and ratio 0 (so d = 1 gives
    ratios [1, 0]); when the points do not vary at all (n = 1, or all equal) there is no principal
    direction and components, coordinates and ratios are all zero. Each component's sign is fixed
    (largest-|entry| positive) so repeated plots of a growing trajectory do not mirror at random.
    """
    x, out_dtype, device = _trajectory(vectors)
    n, d = x.shape
    if n == 0:
        raise ValueError("pca_2d needs at least one point, got an empty (0, d) trajectory")
    mean = x.mean(dim=0)
    centred = x - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    variance = s.square()
    total = variance.sum()

    m = min(2, vh.shape[0])
    components = torch.zeros(2, d, dtype=torch.float64)
    ratio = torch.zeros(2, dtype=torch.float64)
    if total > 0:
        components[:m] = vh[:m]
        ratio[:m] = variance[:m] / total
        for row in components:
            row.mul_(canonical_sign(row))
    coords = centred @ components.T

    def out(t: Tensor) -> Tensor:
        return t.to(device, out_dtype)

    return PCAResult(out(coords), out(components), out(ratio), out(mean))
