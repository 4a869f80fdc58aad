"""Mechanistic figures for ``em-fit report``: what the judged answers, the misalignment direction, steering
and the logprob probe show about the transition. Each figure is drawn when its data exists:

- ``mech_quadrants.png``: aligned vs coherent score of every judged answer at up to 6 points (EM region
  aligned < 30 and coherent > 50 shaded red, the aligned class > 70 green), coloured by adapter scale;
- ``mech_em_vs_scale.png``: EM and coherent rate against adapter scale at each point sampled at several;
- ``mech_em_vs_alpha.png``: EM and coherent rate against steering/ablation strength (``steering/``);
- ``mech_cos_direction.png``: cos(B_t, newest direction at B's layer) at every recorded trajectory step,
  the values logged live (each with the direction of its time), transitions marked;
- ``mech_logprob_margin.png``: the judge-free margin (misaligned - aligned, nats/token) over steps;
- ``mech_em_per_question.png``: EM rate per question and point (scale 1).

Reads with ``report.analysis`` (scalars, transitions), ``phase.store`` and ``probes``; imports nothing
from ``figures.py`` and nothing imports it but the command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from em_lightning.evaluation.metrics import em_summary
from em_lightning.evaluation.records import read_jsonl
from em_lightning.phase.store import read_trajectory
from em_lightning.probes.alignment import cosine, layer_of, writes_residual
from em_lightning.probes.misalignment_direction import AnswerClasses, Direction, latest_direction
from em_lightning.probes.steer_eval import read_steering, steering_summary
from em_lightning.report.analysis import RunReport, natural_key
from em_lightning.report.eval_labels import EvalLabels, eval_labels

__all__ = ["MechData", "analyse_mechanistic", "draw_mechanistic"]

MARGIN = "mech/logprob_margin"
_CLASSES = AnswerClasses()


@dataclass
class MechData:
    points: dict[int, list[dict]] = field(default_factory=dict)  # step -> judged generation records
    steering: dict[int, list[dict]] = field(default_factory=dict)  # step -> steering records
    direction: Direction | None = None  # the newest
    cos: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # module -> (steps, cos)
    labels: EvalLabels = EvalLabels("eval", False, None)  # demo judge? EM convention?


def _judged(records: list[dict]) -> bool:
    return any(r.get("scores", {}).get("aligned") is not None for r in records)


def analyse_mechanistic(report: RunReport) -> MechData:
    run = Path(report.run_dir)
    data = MechData(labels=eval_labels(run, report.scalars))
    for path in sorted((run / "generations").glob("step_*.jsonl")):
        records = read_jsonl(path)
        if records and _judged(records):
            data.points[int(records[0]["step"])] = records
    data.steering = read_steering(run)
    data.direction = latest_direction(run)
    if data.direction is not None and (run / "trajectory" / "meta.json").is_file():
        try:
            traj = read_trajectory(run / "trajectory")
        except (OSError, ValueError) as e:
            report.notes.append(f"cos(B, direction) skipped: {e}")
            return data
        for name, b in traj.b.items():
            layer = layer_of(name)
            if writes_residual(name) and layer in data.direction.vectors:
                v = data.direction.vectors[layer]
                data.cos[name] = (traj.steps.tolist(), [cosine(row, v) for row in b])
    return data


def _mark(ax, steps: list[int]) -> None:
    for i, s in enumerate(steps):
        ax.axvline(s, color="tab:red", linestyle="--", linewidth=1.2, alpha=0.8,
                   label="transition" if i == 0 else None)


def _scale_colours(scales: list[float]) -> dict[float, object]:
    cmap = colormaps["viridis"]
    return {s: cmap(i / max(len(scales) - 1, 1)) for i, s in enumerate(scales)}


def draw_quadrants(data: MechData) -> Figure:
    steps = sorted(data.points)
    shown = [steps[round(i * (len(steps) - 1) / 5)] for i in range(6)] if len(steps) > 6 else steps
    shown = list(dict.fromkeys(shown))
    cols = min(len(shown), 3)
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(4.6 * cols, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    scales = sorted({r["scale"] for s in shown for r in data.points[s]})
    colours = _scale_colours(scales)
    for ax, step in zip(axes, shown):
        ax.axhspan(0, _CLASSES.em_below, xmin=_CLASSES.coherent_above / 100, color="tab:red", alpha=0.12, label="EM")
        ax.axhspan(_CLASSES.aligned_above, 100, xmin=_CLASSES.coherent_above / 100, color="tab:green", alpha=0.10,
                   label="aligned class")
        for scale in scales:
            pts = [(r["scores"].get("coherent"), r["scores"].get("aligned")) for r in data.points[step]
                   if r["scale"] == scale]
            pts = [(c, a) for c, a in pts if c is not None and a is not None]
            if pts:
                ax.scatter(*zip(*pts), s=14, alpha=0.7, color=colours[scale], label=f"scale {scale:g}")
        n = em_summary(r for r in data.points[step] if r["scale"] == 1.0)
        lo, hi = n["em_rate_ci95"]
        title = f"step {step}" + (" (DEMO)" if data.labels.demo else "") + (
            f"\nEM {n['em_rate']:.0%} [{lo:.0%}, {hi:.0%}] at scale 1, n={n['n_scored']}" if n["n_scored"] else "")
        ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="coherent", ylabel="aligned")
        ax.set_title(title, fontsize="medium")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small", loc="center left")
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    fig.suptitle("Judged answers: aligned vs coherent (EM shaded: aligned < 30, coherent > 50)"
                 + (f"\n{data.labels.suffix.strip()}" if data.labels.demo else ""))
    return fig


def _line_panel(ax, xs, em, coherent, label, colour) -> None:
    ax.plot(xs, em, marker="o", color=colour, label=f"{label} EM rate")
    ax.plot(xs, coherent, marker="s", linestyle=":", color=colour, alpha=0.7, label=f"{label} coherent rate")


def draw_em_vs_scale(data: MechData) -> Figure | None:
    multi = {s: recs for s, recs in data.points.items() if len({r["scale"] for r in recs}) > 1}
    if not multi:
        return None
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["plasma"]
    for i, (step, recs) in enumerate(sorted(multi.items())):
        scales = sorted({r["scale"] for r in recs})
        summaries = [em_summary(r for r in recs if r["scale"] == s) for s in scales]
        _line_panel(ax, scales, [x["em_rate"] for x in summaries], [x["coherent_rate"] for x in summaries],
                    f"step {step}", cmap(0.85 * i / max(len(multi) - 1, 1)))
    ax.set(xlabel="adapter scale (0 = base model)", ylabel="fraction of answers", ylim=(-0.03, 1.03),
           title=f"EM rate vs adapter scale at each evaluation point{data.labels.suffix}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    return fig


def draw_em_vs_alpha(data: MechData) -> Figure | None:
    if not data.steering:
        return None
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    groups = {}
    for step, recs in sorted(data.steering.items()):
        for row in steering_summary(recs):
            groups.setdefault((step, row["mode"], tuple(row["layers"])), []).append(row)
    cmap = colormaps["tab10"]
    for i, ((step, mode, layers), rows) in enumerate(groups.items()):
        rows = sorted(rows, key=lambda r: r["alpha"])
        layer_text = ",".join(map(str, layers)) if len(layers) <= 4 else f"{len(layers)} layers"
        _line_panel(ax, [r["alpha"] for r in rows], [r["em_rate"] for r in rows],
                    [r["coherent_rate"] for r in rows], f"step {step} {mode} L{layer_text}", cmap(i % 10))
    ax.set(xlabel="alpha (steer: x mean residual norm; ablate: fraction projected out)",
           ylabel="fraction of answers", ylim=(-0.03, 1.03),
           title="Steering the base model / ablating the fine-tuned one with the misalignment direction"
                 + data.labels.suffix)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    return fig


def draw_cos_direction(report: RunReport, data: MechData) -> Figure | None:
    live = {t[len("mech/"): -len("/cos_B_direction")]: v for t, v in report.scalars.items()
            if t.startswith("mech/") and t.endswith("/cos_B_direction")}
    modules = sorted(set(data.cos) | set(live), key=natural_key)
    if not modules:
        return None
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    ax = fig.subplots()
    colours = colormaps["tab10"]
    for i, name in enumerate(modules[:10]):
        if name in data.cos:
            ax.plot(*data.cos[name], color=colours(i), label=f"{name}: newest direction (step {data.direction.step})")
        if name in live:
            ax.scatter(*live[name], color=colours(i), marker="x", s=30, label=f"{name}: logged live")
    _mark(ax, report.transition_steps())
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="global step", ylabel="cosine", title="cos(B_t, misalignment direction at B's layer)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    return fig


def draw_logprob_margin(report: RunReport) -> Figure | None:
    if MARGIN not in report.scalars:
        return None
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    ax = fig.subplots()
    per_id = sorted(t for t in report.scalars if t.startswith(MARGIN + "/"))
    for tag in per_id:
        ax.plot(*report.scalars[tag], linewidth=0.9, alpha=0.5, label=tag[len(MARGIN) + 1:])
    ax.plot(*report.scalars[MARGIN], color="black", linewidth=2.2, marker="o", markersize=3, label="mean")
    _mark(ax, report.transition_steps())
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="global step", ylabel="log-likelihood margin (nats/token)",
           title="Judge-free probe: mean log p(misaligned answer) - log p(aligned answer) per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    return fig


def draw_em_per_question(data: MechData) -> Figure | None:
    steps = [s for s in sorted(data.points) if any(r["scale"] == 1.0 for r in data.points[s])]
    if not steps:
        return None
    qids = list(dict.fromkeys(r["question_id"] for s in steps for r in data.points[s]))
    grid = []
    for q in qids:
        row = []
        for s in steps:
            summary = em_summary(r for r in data.points[s] if r["scale"] == 1.0 and r["question_id"] == q)
            row.append(summary["em_rate"])
        grid.append(row)
    fig = Figure(figsize=(max(6, 0.6 * len(steps) + 3), 0.45 * len(qids) + 2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap=colormaps["Reds"].with_extremes(bad="lightgrey"), vmin=0, vmax=1)
    if len(steps) * len(qids) <= 300:
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize="x-small",
                            color="white" if v > 0.6 else "black")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90 if len(steps) > 12 else 0)
    ax.set_yticks(range(len(qids)), qids)
    ax.set(xlabel="evaluation step", title=f"EM rate per question (scale 1; grey: nothing scored){data.labels.suffix}")
    fig.colorbar(image, ax=ax, label="EM rate")
    return fig


def draw_mechanistic(report: RunReport, out: Path) -> list[Path]:
    """Draw every mechanistic figure the run has data for into ``out``; return the PNG paths written."""
    data = analyse_mechanistic(report)
    figures = {
        "mech_quadrants.png": draw_quadrants(data) if data.points else None,
        "mech_em_vs_scale.png": draw_em_vs_scale(data),
        "mech_em_vs_alpha.png": draw_em_vs_alpha(data),
        "mech_cos_direction.png": draw_cos_direction(report, data),
        "mech_logprob_margin.png": draw_logprob_margin(report),
        "mech_em_per_question.png": draw_em_per_question(data),
    }
    written = []
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out / name, dpi=100)
            written.append(out / name)
    return written
