"""report.md: the run's numbers around each detected transition, and the figures, in markdown."""

from __future__ import annotations

import math
from pathlib import Path

from em_lightning.phase import TransitionEvent
from em_lightning.report.analysis import COHERENT_RATE, EM_RATE, LOSS, ModuleAnalysis, RunReport


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


def _transition_section(report: RunReport, m: ModuleAnalysis, e: TransitionEvent) -> list[str]:
    k, steps = e.k, report.steps
    i_lo, i_hi = max(e.index - k, 0), min(e.index + k, len(steps) - 1)
    lo, hi = steps[i_lo], steps[i_hi]
    em_before, em_after = _eval_around(report.scalars.get(EM_RATE), e.step)
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
        f"| EM rate | {em_before} | | {em_after} |",
        f"| norm A | {_fmt(float(m.norm_a[i_lo]))} | {_fmt(float(m.norm_a[e.index]))} | {_fmt(float(m.norm_a[i_hi]))} |",
        f"| norm B | {_fmt(float(m.norm_b[i_lo]))} | {_fmt(float(m.norm_b[e.index]))} | {_fmt(float(m.norm_b[i_hi]))} |",
        "",
    ]


def write_summary(report: RunReport, figures: list[Path], path: Path) -> None:
    lines = [f"# Run report: `{report.run_dir}`", ""]
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
            lines += _transition_section(report, m, e)
    elif report.steps:
        lines += ["No transition detected.", ""]
    else:
        lines += ["No transition detected (no trajectory to analyse).", ""]
    for tag, steps in report.live_transitions.items():
        lines += [f"Logged live (`{tag}`): step(s) " + ", ".join(map(str, steps)), ""]
    if EM_RATE in report.scalars:
        coherent = dict(zip(*report.scalars.get(COHERENT_RATE, ([], []))))
        lines += ["## Evaluation", "", "| step | EM rate | coherent rate |", "|---|---|---|"]
        for s, v in zip(*report.scalars[EM_RATE]):
            lines.append(f"| {s} | {v:.3f} | {f'{coherent[s]:.3f}' if s in coherent else 'n/a'} |")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    path.write_text("\n".join(lines))
