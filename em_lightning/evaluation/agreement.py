"""How far two judges agree on the same answers: rank and linear correlation, error and bias of the scores
(scipy computes the correlations), and Cohen's kappa of their EM labels.

Used by ``em-fit judge calibrate`` (a judge against published reference scores) and by judge panels in
the loop (every pair of judges at each evaluation point). Pairs where either side has no score are left
out; each function says how many pairs it used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats


def _pairs(x: Sequence[float | None], y: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    if len(x) != len(y):
        raise ValueError(f"agreement: {len(x)} scores against {len(y)}")
    keep = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    arr = np.asarray(keep, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float:
    """NaN when undefined (fewer than 2 pairs, or a constant side), without scipy's warning."""
    if x.size < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(x, y)[0])


def score_agreement(reference: Sequence[float | None], judged: Sequence[float | None]) -> dict[str, float | int]:
    """``{"n", "spearman", "pearson", "mae", "bias"}`` over the pairs where both scores exist;
    ``bias`` = mean(judged - reference)."""
    x, y = _pairs(reference, judged)
    diff = y - x
    return {
        "n": int(x.size),
        "spearman": _correlation(stats.spearmanr, x, y),
        "pearson": _correlation(stats.pearsonr, x, y),
        "mae": float(np.abs(diff).mean()) if x.size else float("nan"),
        "bias": float(diff.mean()) if x.size else float("nan"),
    }


def cohens_kappa(a: Sequence[bool | None], b: Sequence[bool | None]) -> tuple[float, int]:
    """(Cohen's kappa of two raters' yes/no labels, pairs used); pairs with a None are left out.

    kappa = (p_o - p_e) / (1 - p_e) with p_o the observed agreement and p_e the agreement expected from
    each rater's own label frequencies. When both raters give one and the same label everywhere (p_e = 1)
    they agree perfectly: 1.0. No pairs: NaN.
    """
    if len(a) != len(b):
        raise ValueError(f"kappa: {len(a)} labels against {len(b)}")
    pairs = [(bool(x), bool(y)) for x, y in zip(a, b) if x is not None and y is not None]
    n = len(pairs)
    if n == 0:
        return float("nan"), 0
    observed = sum(x == y for x, y in pairs) / n
    pa, pb = sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    if expected >= 1.0:
        return 1.0, n
    return (observed - expected) / (1 - expected), n
