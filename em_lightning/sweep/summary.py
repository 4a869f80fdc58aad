"""What a sweep found, across seeds: per cell's setting (its grid values other than the seed) and per grid
value, the mean and a 95% interval of each run's final numbers, and how alike the seeds' adapters end up.

Each run is read through ``report.analysis`` (TensorBoard scalars; transitions by the live callback's
rule on the recorded trajectory) and ``phase.store`` (the final B vectors). The interval is Student's t
across seeds (``scipy.stats.t``, n - 1 degrees of freedom, from the runs' final values; none for one
seed): it states the seed-to-seed spread, not the sampling error of each run's EM rate (and with few seeds
it may reach past [0, 1] for a rate). Only finished cells (status done) count. EM numbers carry
the judge that produced them; a judge whose scores mean nothing (the offline demo judge) is said so next
to every EM number."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from em_lightning.phase.store import read_trajectory
from em_lightning.report.analysis import analyse_run, read_scalars
from em_lightning.report.eval_labels import eval_labels
from em_lightning.sweep.grid import SEED_KEY, value_label
from em_lightning.sweep.plan import DONE, SweepPlan

INTERVAL = "95% Student t-interval across seeds (scipy.stats.t, n-1 dof) of the runs' final values"
VAL_LOSS, MARGIN = "val/loss", "mech/logprob_margin"
# metric -> (TensorBoard tag or None, what it is); each run contributes its value at its last logged step.
# The EM tags' root is the run's (eval/, or eval_demo/ for a judge whose scores mean nothing: report/eval_labels).
METRICS = {
    "em_rate": (None, "final EM rate (adapter scale 1)"),
    "coherent_rate": (None, "final coherent rate (adapter scale 1)"),
    "val_loss": (VAL_LOSS, "final val/loss"),
    "logprob_margin": (MARGIN, "final logprob margin, misaligned minus aligned (judge-free, triples file)"),
    "logprob_margin_change": (None, "logprob margin change, final minus step 0 (judge-free)"),
    "cos_b_direction": (None, "final |cos(B, misalignment direction)|, mean over modules (mech/<m>/cos_B_direction; "
                              "absolute: a rank-1 adapter's sign is arbitrary, flipping A and B gives the same adapter, "
                              "so signed values of different seeds do not average)"),
    "transition_step": (None, "first detected transition step (runs with one)"),
}
JUDGED = ("em_rate", "coherent_rate")


@dataclass
class RunResult:
    cell: str
    setting: dict[str, Any]
    values: dict[str, Any]
    run_dir: Path
    state: str
    finals: dict[str, float] = field(default_factory=dict)
    has_transition: bool | None = None
    b_final: dict[str, np.ndarray] = field(default_factory=dict)  # module -> final B vector
    judges: dict[str, str] = field(default_factory=dict)  # judge prompt name -> judge name
    demo_judge: bool = False  # its judge's scores mean nothing
    convention: str | None = None  # the EM rule its rates use
    notes: list[str] = field(default_factory=list)


def mean_interval(values: list[float]) -> dict[str, Any]:
    """n, mean, sd and the 95% t-interval (None below two values)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    out: dict[str, Any] = {"n": int(x.size), "mean": float(x.mean()) if x.size else None,
                           "sd": float(x.std(ddof=1)) if x.size > 1 else None, "ci95": None}
    if x.size > 1:
        sem = stats.sem(x)
        lo, hi = stats.t.interval(0.95, x.size - 1, loc=x.mean(), scale=sem) if sem > 0 else (x.mean(), x.mean())
        out["ci95"] = [float(lo), float(hi)]
    return out


def pairwise_abs_cos(vectors: list[np.ndarray]) -> dict[str, Any]:
    """|cos| between every pair of seeds' final B vectors (the sign of a rank-1 factor is arbitrary)."""
    cos = []
    for u, v in itertools.combinations(vectors, 2):
        den = float(np.linalg.norm(u) * np.linalg.norm(v))
        if den > 0:
            cos.append(abs(float(u @ v)) / den)
    if not cos:
        return {"pairs": 0, "mean": None, "min": None, "max": None}
    return {"pairs": len(cos), "mean": float(np.mean(cos)), "min": float(min(cos)), "max": float(max(cos))}


def _last(scalars: dict, tag: str) -> float | None:
    # a demo judge's eval/* metrics are logged under eval_demo/ (labelled here through _judges)
    series = scalars.get(tag) or scalars.get(tag.replace("eval/", "eval_demo/", 1))
    return float(series[1][-1]) if series and series[1] else None


def _judges(run_dir: Path) -> dict[str, str]:
    """The judges of the run's last judged evaluation point (its generations/*.meta.json)."""
    for meta in sorted((run_dir / "generations").glob("step_*.meta.json"), reverse=True):
        try:
            judges = json.loads(meta.read_text()).get("judges") or {}
        except (OSError, ValueError):
            continue
        if judges:
            return {str(k): str(v) for k, v in judges.items()}
    return {}


def read_run(plan: SweepPlan, cell) -> RunResult:
    run_dir = plan.run_dir(cell)
    result = RunResult(cell.name, cell.setting, cell.values, run_dir, plan.status(cell).get("state", "not started"))
    if result.state != DONE:  # a running or failed run's last values are not its final ones
        result.notes.append(f"{result.state}: left out of the statistics")
        return result
    scalars = read_scalars(run_dir)
    labels = eval_labels(run_dir, scalars)
    result.demo_judge, result.convention = labels.demo, labels.convention
    for key, (tag, _) in METRICS.items():
        tag = labels.tag(key) if key in JUDGED else tag
        if tag is not None and (value := _last(scalars, tag)) is not None:
            result.finals[key] = value
    if MARGIN in scalars and len(scalars[MARGIN][1]) > 1:
        result.finals["logprob_margin_change"] = scalars[MARGIN][1][-1] - scalars[MARGIN][1][0]
    cos = [_last(scalars, t) for t in scalars if t.startswith("mech/") and t.endswith("/cos_B_direction")]
    if cos := [c for c in cos if c is not None and math.isfinite(c)]:
        result.finals["cos_b_direction"] = float(np.mean(np.abs(cos)))
    try:
        report = analyse_run(run_dir, ks=[])
        if report.steps:
            found = report.transition_steps()
            result.has_transition = bool(found)
            if found:
                result.finals["transition_step"] = float(found[0])
        result.notes += report.notes
    except ValueError as e:
        result.notes.append(str(e))
    if (run_dir / "trajectory").exists():
        try:
            traj = read_trajectory(run_dir / "trajectory")
            result.b_final = {name: b[-1].double().numpy() for name, b in traj.b.items() if len(b)}
        except Exception as e:  # a half-written trajectory: the other numbers still count
            result.notes.append(f"trajectory unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    result.judges = _judges(run_dir)
    return result


def judge_label(runs: list[RunResult]) -> dict[str, Any]:
    names = sorted({name for r in runs for name in r.judges.values()})
    demo = any(r.demo_judge for r in runs)
    judged = names or any(key in r.finals for r in runs for key in JUDGED)
    return {"judges": names, "meaningful": None if not judged else not demo,
            "convention": sorted({r.convention for r in runs if r.convention}),
            "note": ("DEMO JUDGE: a tiny random model rigged to answer with numbers; its EM and coherence numbers "
                     "MEAN NOTHING (plumbing only)") if demo else ("no judged evaluation points" if not judged else
                                                                    "judge scores as produced by the judges named")}


def _group(runs: list[RunResult], label: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": [r.cell for r in runs], "seeds": [r.values.get(SEED_KEY) for r in runs],
                           "finished": sum(r.state == DONE for r in runs)}
    for key, (_, what) in METRICS.items():
        entry = {"what": what, **mean_interval([r.finals.get(key) for r in runs])}
        if key in JUDGED and label["meaningful"] is False:
            entry["judge"] = "demo judge: means nothing"
        out[key] = entry
    with_info = [r for r in runs if r.has_transition is not None]
    out["transition_fraction"] = {"what": "fraction of runs with a detected transition (runs with a trajectory)",
                                  "n": len(with_info), "fraction": (sum(r.has_transition for r in with_info) /
                                                                    len(with_info)) if with_info else None}
    modules = sorted({m for r in runs for m in r.b_final})
    out["b_cosine_across_seeds"] = {m: pairwise_abs_cos([r.b_final[m] for r in runs if m in r.b_final])
                                    for m in modules}
    return out


def summarize(plan: SweepPlan) -> tuple[dict[str, Any], list[RunResult]]:
    runs = [read_run(plan, cell) for cell in plan.cells]
    label = judge_label(runs)
    settings: dict[str, list[RunResult]] = {}
    for r in runs:
        settings.setdefault(json.dumps(r.setting, sort_keys=True, default=str), []).append(r)
    per_setting = [{"setting": {k: value_label(k, v) for k, v in group[0].setting.items()}, **_group(group, label)}
                   for group in settings.values()]
    per_value: dict[str, dict[str, Any]] = {}
    for key, values in plan.grid.items():
        if key == SEED_KEY or len(values) < 2:
            continue
        per_value[key] = {value_label(key, v): _group([r for r in runs if r.values[key] == v], label) for v in values}
    summary = {
        "sweep": str(plan.out), "configs": plan.configs, "grid": plan.grid, "interval": INTERVAL,
        "em_judge": label,
        "b_cosine": "pairwise |cos| of the seeds' final B vectors (trajectory/), per module: 1 = one direction",
        "per_setting": per_setting, "per_grid_value": per_value,
        "runs": [{"cell": r.cell, "state": r.state, "run_dir": str(r.run_dir), "finals": r.finals,
                  "has_transition": r.has_transition, "judges": r.judges,
                  **({"em_judge": "demo judge: means nothing"} if r.demo_judge else {}), "notes": r.notes}
                 for r in runs],
    }
    return summary, runs
