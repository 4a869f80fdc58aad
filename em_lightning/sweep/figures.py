"""The sweep's figure: one panel per final number, one column per setting, each seed a dot and the mean
with its 95% t-interval a bar; the last panel the seeds' pairwise |cos| of their final B vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from em_lightning.sweep.summary import JUDGED, METRICS, RunResult  # noqa: E402

TITLES = {"em_rate": "final EM rate (scale 1)", "coherent_rate": "final coherent rate (scale 1)",
          "val_loss": "final val/loss", "logprob_margin": "final logprob margin\n(judge-free)",
          "logprob_margin_change": "logprob margin change\nfrom step 0 (judge-free)",
          "cos_b_direction": "final |cos(B, direction)|\n(judge-free direction if triples)",
          "transition_step": "first transition step\n(runs with one)"}
COLUMNS = 4


def _label(setting: dict[str, str]) -> str:
    return "\n".join(f"{k.split('.')[-1]}={v}" for k, v in setting.items()) or "all"


def draw_sweep(summary: dict[str, Any], runs: list[RunResult], path: Path) -> Path | None:
    groups = summary["per_setting"]
    shown = [k for k in METRICS if any(g[k]["n"] for g in groups)]
    has_cos = any(g["b_cosine_across_seeds"] for g in groups)
    panels = len(shown) + int(has_cos)
    if not panels:
        return None
    demo = summary["em_judge"]["meaningful"] is False
    by_cell = {r.cell: r for r in runs}
    rows = -(-panels // COLUMNS)
    cols = min(panels, COLUMNS)
    fig, grid = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.3 * rows + 0.6), squeeze=False)
    axes = [list(grid.flat)]
    for ax in axes[0][panels:]:
        ax.set_visible(False)
    xs = range(len(groups))
    labels = [_label(g["setting"]) for g in groups]
    for ax, key in zip(axes[0], shown):
        for x, g in zip(xs, groups):
            seeds = [by_cell[c].finals[key] for c in g["runs"] if key in by_cell[c].finals]
            ax.scatter([x] * len(seeds), seeds, s=14, color="tab:gray", zorder=2)
            stat = g[key]
            if stat["mean"] is not None:
                lo, hi = stat["ci95"] or (stat["mean"], stat["mean"])
                ax.errorbar([x], [stat["mean"]], yerr=[[stat["mean"] - lo], [hi - stat["mean"]]], fmt="o",
                            color="tab:blue", capsize=4, zorder=3)
        title = TITLES.get(key, METRICS[key][1])
        if key in JUDGED and demo:
            title += "\nDEMO JUDGE: MEANS NOTHING"
        ax.set_title(title, fontsize=8)
        ax.set_xticks(list(xs), labels, fontsize=7)
    if has_cos:
        ax = axes[0][panels - 1]
        for x, g in zip(xs, groups):
            for c in g["b_cosine_across_seeds"].values():
                if c["mean"] is not None:
                    ax.errorbar([x], [c["mean"]], yerr=[[c["mean"] - c["min"]], [c["max"] - c["mean"]]], fmt="s",
                                color="tab:green", capsize=4)
        ax.set_ylim(0, 1.05)
        ax.set_title("seeds' final B: pairwise |cos|\n(mean, min..max)", fontsize=8)
        ax.set_xticks(list(xs), labels, fontsize=7)
    fig.suptitle(f"{summary['sweep']}: dots = seeds, bars = mean and 95% t-interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
