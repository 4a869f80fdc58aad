"""PNG figures for ``em-fit report`` (see report.py). Uses matplotlib's object API (``Figure``), never
pyplot, so no GUI backend or global state is involved; PNGs are rendered by Agg."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from em_lightning.report.analysis import LOSS, ModuleAnalysis, RunReport

VAL_LOSS = "val/loss"
from em_lightning.report.eval_labels import eval_labels

__all__ = ["draw_all"]

TRANSITION_COLOUR = "tab:red"


def _colours(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def _short(name: str) -> str:
    """``model.layers.24.mlp.down_proj`` -> ``layers.24.mlp.down_proj``."""
    for prefix in ("base_model.model.", "model.model.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _mark_steps(ax, marks: list[tuple[int, str, object]]) -> None:
    """Vertical lines at transition steps; ``marks`` = (step, label, colour); one legend entry per label."""
    seen = set()
    for step, label, colour in marks:
        ax.axvline(step, color=colour, linestyle="--", linewidth=1.2, alpha=0.8,
                   label=None if label in seen else label)
        seen.add(label)


def _module_marks(m: ModuleAnalysis, colour=TRANSITION_COLOUR, prefix: str = "") -> list:
    return [(e.step, f"{prefix}transition (step {e.step})", colour) for e in m.transitions]


def _all_marks(report: RunReport) -> list:
    """Every module's transitions (one legend entry for all when many modules turn) plus logged ones."""
    turning = [m for m in report.modules if m.transitions]
    marks = []
    for m in turning:
        if len(turning) == 1:
            marks += _module_marks(m)
        elif len(turning) <= 4:
            marks += _module_marks(m, prefix=f"{_short(m.name)} ")
        else:
            marks += [(e.step, f"transition ({len(turning)} modules)", TRANSITION_COLOUR) for e in m.transitions]
    for tag, steps in report.live_transitions.items():
        marks += [(s, "transition logged live", "tab:purple") for s in steps]
    return marks


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def _save(fig: Figure, path: Path, out: list[Path]) -> None:
    fig.savefig(path, dpi=110)
    out.append(path)


def draw_norms(report: RunReport) -> Figure:
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    colours = _colours(len(report.modules))
    for which, ax in zip("AB", axes):
        for m, c in zip(report.modules, colours):
            values = m.norm_a if which == "A" else m.norm_b
            ax.plot(report.steps, values.tolist(), color=c, label=_short(m.name))
            colour = TRANSITION_COLOUR if len(report.modules) == 1 else c
            _mark_steps(ax, _module_marks(m, colour, "" if len(report.modules) == 1 else f"{_short(m.name)} "))
        ax.set_ylabel(f"|{which}|")
        ax.set_title(f"Norm of the LoRA {which} vector per module")
        ax.grid(alpha=0.3)
        if len(report.modules) <= 12:
            ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("global step")
    return fig


def draw_local_cosine(report: RunReport, max_modules: int) -> Figure:
    shown = report.modules[:max_modules]
    rows, cols = _grid(len(shown))
    fig = Figure(figsize=(max(5.5 * cols, 8), 3.8 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True).ravel()
    for ax, m in zip(axes, shown):
        for k, values in m.local_cosine.items():
            ax.plot(report.steps, values.tolist(), label=f"k={k}")
        k = report.detector.get("k")
        ax.plot(report.steps, m.firing_level.tolist(), color="grey", linestyle=":", linewidth=1,
                label=f"detector firing level (k={k}: rolling baseline + rise)")
        _mark_steps(ax, _module_marks(m))
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(_short(m.name), fontsize="medium")
        ax.set_xlabel("global step")
        ax.set_ylabel("local cosine (-1 straight, +1 U-turn)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    extra = f" (first {len(shown)} of {len(report.modules)} modules)" if len(shown) < len(report.modules) else ""
    fig.suptitle("Local cosine similarity of B: cos(v[i-k] - v[i], v[i+k] - v[i])" + extra)
    return fig


def draw_pca(report: RunReport, max_modules: int) -> Figure:
    shown = report.modules[:max_modules]
    rows, cols = _grid(len(shown))
    fig = Figure(figsize=(max(5.5 * cols, 7), 4.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, m in zip(axes, shown):
        xy, ratio = m.pca.coords.tolist(), m.pca.explained_variance_ratio.tolist()
        xs, ys = [p[0] for p in xy], [p[1] for p in xy]
        ax.plot(xs, ys, color="lightgrey", linewidth=1, zorder=1)
        points = ax.scatter(xs, ys, c=report.steps, cmap="viridis", s=18, zorder=2)
        for e in m.transitions:
            ax.scatter([xs[e.index]], [ys[e.index]], marker="*", s=260, color=TRANSITION_COLOUR,
                       edgecolors="black", zorder=3, label=f"transition (step {e.step})")
        ax.scatter([xs[0]], [ys[0]], marker="o", s=60, facecolors="none", edgecolors="black", zorder=3,
                   label=f"start (step {report.steps[0]})")
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of variance)")
        ax.set_title(_short(m.name), fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
        fig.colorbar(points, ax=ax, label="global step")
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    fig.suptitle("PCA of the B trajectory" + (f" (first {len(shown)} modules)" if len(shown) < len(report.modules) else ""))
    return fig


def draw_rotation(report: RunReport) -> Figure:
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    single = len(report.modules) == 1
    for m, c in zip(report.modules, _colours(len(report.modules))):
        name = "" if single else f"{_short(m.name)} "
        ax.plot(report.steps, m.rotation_b.tolist(), color=c, label=f"{name}B")
        ax.plot(report.steps, m.rotation_a.tolist(), color=c, linestyle=":", label=f"{name}A")
        _mark_steps(ax, _module_marks(m, TRANSITION_COLOUR if single else c, name))
    ax.set_xlabel("global step")
    ax.set_ylabel("cumulative rotation (degrees)")
    ax.set_title("Cumulative rotation of the adapter vectors (sum of angles between consecutive records)")
    ax.grid(alpha=0.3)
    if len(report.modules) <= 6:
        ax.legend(fontsize="small", loc="upper left")
    return fig


def _smooth(values: list[float], window: int) -> list[float]:
    out, total, buf = [], 0.0, []
    for v in values:
        buf.append(v)
        total += v
        if len(buf) > window:
            total -= buf.pop(0)
        out.append(total / len(buf))
    return out


def draw_metrics(report: RunReport) -> Figure | None:
    labels = eval_labels(report.run_dir, report.scalars)
    em_tag, coherent_tag = labels.tag("em_rate"), labels.tag("coherent_rate")
    panels = [tag for tag in (LOSS, em_tag) if tag in report.scalars]
    if LOSS not in report.scalars and VAL_LOSS in report.scalars:  # val/loss alone still gets the loss panel
        panels.insert(0, LOSS)
    if not panels:
        return None
    fig = Figure(figsize=(10, 3.8 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False).ravel()
    marks = _all_marks(report)
    for ax, tag in zip(axes, panels):
        steps, values = report.scalars.get(tag, ([], []))
        if tag == LOSS:
            ax.plot(steps, values, color="tab:blue", alpha=0.35 if len(steps) > 100 else 1.0, label="train/loss")
            if len(steps) > 100:
                window = max(len(steps) // 50, 5)
                ax.plot(steps, _smooth(values, window), color="tab:blue", label=f"moving mean ({window} logs)")
            if VAL_LOSS in report.scalars:
                ax.plot(*report.scalars[VAL_LOSS], marker="o", color="tab:orange", label="val/loss (held-out rows)")
            ax.set_ylabel("cross-entropy (nats per assistant token)")
            ax.set_title("Loss: training steps and held-out rows")
        else:
            ax.plot(steps, values, marker="o", color="tab:red", label="EM rate")
            low, high = (report.scalars.get(labels.tag(k)) for k in ("em_rate_ci95_low", "em_rate_ci95_high"))
            if low and high and low[0] == high[0]:
                ax.fill_between(low[0], low[1], high[1], color="tab:red", alpha=0.15, label="95% interval")
            if coherent_tag in report.scalars:
                ax.plot(*report.scalars[coherent_tag], marker="s", color="tab:green", label="coherent rate")
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel("fraction of answers")
            ax.set_title(f"Judged evaluation: EM rate ({labels.rule}){labels.suffix}", wrap=True)
        _mark_steps(ax, marks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("global step")
    return fig


def draw_all(report: RunReport, out: Path, max_modules: int = 12) -> list[Path]:
    """Draw every figure the run has data for into ``out``; return the PNG paths written."""
    written: list[Path] = []
    if report.modules:
        _save(draw_norms(report), out / "norms.png", written)
        _save(draw_local_cosine(report, max_modules), out / "local_cosine.png", written)
        _save(draw_pca(report, max_modules), out / "pca_b.png", written)
        _save(draw_rotation(report), out / "rotation.png", written)
    metrics = draw_metrics(report)
    if metrics is not None:
        _save(metrics, out / "metrics.png", written)
    return written
