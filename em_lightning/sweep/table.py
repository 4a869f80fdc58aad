"""sweep_summary.md: the per-setting table of a sweep summary (mean [95% interval], n)."""

from __future__ import annotations

from typing import Any

from em_lightning.sweep.summary import JUDGED, METRICS


def _cell(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "n/a"
    ci = f" [{stat['ci95'][0]:.3g}, {stat['ci95'][1]:.3g}]" if stat["ci95"] else ""
    return f"{stat['mean']:.3g}{ci} (n={stat['n']})"


def markdown_table(summary: dict[str, Any]) -> str:
    groups = summary["per_setting"]
    demo = summary["em_judge"]["meaningful"] is False
    keys = [k for k in METRICS if any(g[k]["n"] for g in groups)]
    head = [k + (" (demo judge: means nothing)" if k in JUDGED and demo else "") for k in keys]
    lines = [f"Sweep `{summary['sweep']}`. {summary['interval']}. EM judge: {summary['em_judge']['note']}.", "",
             "| setting | " + " | ".join(head) + " | runs with a transition | seeds' B pairwise abs cos |",
             "|---" * (len(keys) + 3) + "|"]
    for g in groups:
        setting = ", ".join(f"{k}={v}" for k, v in g["setting"].items()) or "all"
        frac = g["transition_fraction"]
        tr = "n/a" if frac["fraction"] is None else f"{frac['fraction']:.2f} of {frac['n']}"
        cos = "; ".join(f"{c['mean']:.3f} ({c['min']:.3f}..{c['max']:.3f})" for c in g["b_cosine_across_seeds"].values()
                        if c["mean"] is not None) or "n/a"
        lines.append(f"| {setting} | " + " | ".join(_cell(g[k]) for k in keys) + f" | {tr} | {cos} |")
    return "\n".join(lines) + "\n"
