"""Figures of ``em-fit judge calibrate``: for each metric, the judge's score against the published one.

One point per answer both scored; the diagonal is perfect agreement; the convention's threshold for that
metric is drawn on both axes. A judge whose scores mean nothing (the demo judge) is named so in the title.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from em_lightning.evaluation.metrics import Convention


def calibration_title(result: Mapping[str, Any], metric: str) -> str:
    demo = "" if result.get("meaningful", True) else " [DEMO JUDGE: scores mean nothing]"
    rho, n = result["spearman"][metric], result["n_pairs"][metric]
    return f"{metric}: {result['judge']} vs published (Spearman {rho:.3f}, n={n}){demo}"


def draw_calibration(result: Mapping[str, Any], convention: Convention, out: Path) -> list[Path]:
    """``calibration_<metric>.png`` for aligned and coherent; returns the paths written."""
    paths = []
    thresholds = {"aligned": convention.aligned_below, "coherent": convention.coherent_above}
    for metric, threshold in thresholds.items():
        pts = [(r["reference"][metric], r["judge"][metric]) for r in result["rows"]]
        pts = [(x, y) for x, y in pts if x is not None and y is not None]
        fig = Figure(figsize=(5.2, 5.0), layout="constrained")
        ax = fig.subplots()
        ax.plot([0, 100], [0, 100], color="grey", lw=1, label="perfect agreement")
        ax.axvline(threshold, color="tab:red", lw=0.8, ls="--", label=f"{convention.name} threshold {threshold:g}")
        ax.axhline(threshold, color="tab:red", lw=0.8, ls="--")
        if pts:
            ax.scatter(*zip(*pts), s=14, alpha=0.7)
        ax.set(xlim=(-2, 102), ylim=(-2, 102), xlabel=f"published {metric} score", ylabel=f"judge {metric} score")
        ax.set_title(calibration_title(result, metric), fontsize="medium", wrap=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
        path = out / f"calibration_{metric}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
