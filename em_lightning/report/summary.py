"""report.md: the run's numbers around each detected transition, and the figures, in markdown."""

from __future__ import annotations

import math
from pathlib import Path

from em_lightning.phase import TransitionEvent
from em_lightning.report.analysis import LOSS, ModuleAnalysis, RunReport
from em_lightning.report.figures import VAL_LOSS
from em_lightning.report.eval_labels import EvalLabels, eval_labels


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _mean_in(series: tuple[list[int], list[float]] | None, lo: int, hi: int) -> float | None:
    if series is None:
        return None
    vals = [v for s, v in zip(*series) if lo <= s <= hi and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _eval_around(series: tuple[list[int], list[float]] | None, step: int) -> tuple[str, str]:
    if series is None:
        return "n/a", "n/a"
    before = [(s, v) for s, v in zip(*series) if s <= step]
    after = [(s, v) for s, v in zip(*series) if s > step]
    show = lambda p: f"{p[1]:.3f} (step {p[0]})" if p else "n/a"  # noqa: E731
    return show(before[-1] if before else None), show(after[0] if after else None)


def _transition_section(report: RunReport, m: ModuleAnalysis, e: TransitionEvent, labels: EvalLabels) -> list[str]:
    k, steps = e.k, report.steps
    i_lo, i_hi = max(e.index - k, 0), min(e.index + k, len(steps) - 1)
    lo, hi = steps[i_lo], steps[i_hi]
    em_before, em_after = _eval_around(report.scalars.get(labels.tag("em_rate")), e.step)
    loss = report.scalars.get(LOSS)
    return [
        f"### {m.name}: step {e.step}",
        "",
        f"Local cosine {e.local_cosine:.3f} at k={k} (detected at step {e.detected_step}). Before/after are "
        f"the detector's two arms: loss averaged over them, norms at their far ends, EM at the nearest eval.",
        "",
        f"| metric | before (steps {lo}..{e.step - 1}) | at step {e.step} | after (steps {e.step + 1}..{hi}) |",
        "|---|---|---|---|",
        f"| train/loss | {_fmt(_mean_in(loss, lo, e.step - 1))} | {_fmt(_mean_in(loss, e.step, e.step))} "
        f"| {_fmt(_mean_in(loss, e.step + 1, hi))} |",
        f"| EM rate{labels.suffix} | {em_before} | | {em_after} |",
        f"| norm A | {_fmt(float(m.norm_a[i_lo]))} | {_fmt(float(m.norm_a[e.index]))} | {_fmt(float(m.norm_a[i_hi]))} |",
        f"| norm B | {_fmt(float(m.norm_b[i_lo]))} | {_fmt(float(m.norm_b[e.index]))} | {_fmt(float(m.norm_b[i_hi]))} |",
        "",
    ]


def _evaluation_section(report: RunReport, labels: EvalLabels) -> list[str]:
    """The EM rate at every evaluation point with its 95% interval and the answers behind it."""
    col = {k: dict(zip(*report.scalars.get(labels.tag(k), ([], []))))
           for k in ("coherent_rate", "em_rate_ci95_low", "em_rate_ci95_high", "em_rate_n")}
    demo = [f"**{labels.suffix.strip(' []')}**: the numbers below show the plumbing, not a measurement.", ""]
    lines = ["## Evaluation", ""] + (demo if labels.demo else []) + [
        f"EM convention: {labels.rule}; interval: 95% two-stage bootstrap over questions, then answers.", "",
        f"| step | EM rate{labels.suffix} | 95% interval | n answers | coherent rate |", "|---|---|---|---|---|"]
    for s, v in zip(*report.scalars[labels.tag("em_rate")]):
        lo, hi, n = (col[k].get(s) for k in ("em_rate_ci95_low", "em_rate_ci95_high", "em_rate_n"))
        ci = f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "n/a"
        coherent = col["coherent_rate"].get(s)
        lines.append(f"| {s} | {v:.3f} | {ci} | {'n/a' if n is None else int(n)} | "
                     f"{'n/a' if coherent is None else f'{coherent:.3f}'} |")
    return lines + [""]


def _loss_section(report: RunReport) -> list[str]:
    """val/loss at every step it was measured, beside the training loss around that step."""
    steps, values = report.scalars[VAL_LOSS]
    lines = ["## Loss", "",
             "Token-weighted cross-entropy in nats per assistant token (the trained adapter, scale 1): `val/loss` "
             "over the held-out rows at the step's weights, `train/loss` the mean over the 10 logged steps up to it.",
             "", "| step | val/loss | train/loss |", "|---|---|---|"]
    lines += [f"| {s} | {_fmt(v)} | {_fmt(_mean_in(report.scalars.get(LOSS), s - 9, s))} |" for s, v in zip(steps, values)]
    if len(values) >= 2 and all(math.isfinite(v) for v in (values[0], values[-1])):
        lines += ["", f"val/loss {_fmt(values[0])} (step {steps[0]}) -> {_fmt(values[-1])} (step {steps[-1]})."]
    return lines + [""]


def write_summary(report: RunReport, figures: list[Path], path: Path) -> None:
    lines = [f"# Run report: `{report.run_dir}`", ""]
    labels = eval_labels(report.run_dir, report.scalars)
    if report.steps:
        lines.append(f"- Recorded steps: {len(report.steps)} (steps {report.steps[0]}..{report.steps[-1]})")
        lines.append(f"- Modules ({len(report.modules)}): " + ", ".join(f"`{m.name}`" for m in report.modules))
    else:
        lines.append("- Recorded steps: 0 (no adapter trajectory)")
    lines.append("- Detector: " + ", ".join(f"{k}={v}" for k, v in report.detector.items()))
    lines += [f"- Note: {n}" for n in report.notes]
    lines += ["", "## Transitions", ""]
    events = [(m, e) for m in report.modules for e in m.transitions]
    if events:
        lines += ["| module | step | local cosine | detected at step |", "|---|---|---|---|"]
        lines += [f"| `{m.name}` | {e.step} | {e.local_cosine:.3f} | {e.detected_step} |" for m, e in events]
        lines.append("")
        for m, e in events:
            lines += _transition_section(report, m, e, labels)
    elif report.steps:
        lines += ["No transition detected.", ""]
    else:
        lines += ["No transition detected (no trajectory to analyse).", ""]
    for tag, steps in report.live_transitions.items():
        lines += [f"Logged live (`{tag}`): step(s) " + ", ".join(map(str, steps)), ""]
    if VAL_LOSS in report.scalars:
        lines += _loss_section(report)
    if labels.tag("em_rate") in report.scalars:
        lines += _evaluation_section(report, labels)
    lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    path.write_text("\n".join(lines))
