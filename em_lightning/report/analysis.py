"""What ``em-fit report`` shows about a run, finished or still running: read and computed, not drawn.

Reads what the run directory holds: the adapter trajectory (``trajectory/``, via
``em_lightning.phase.store``) and the run's scalars (``train/loss``, ``eval/em_rate``,
``eval/coherent_rate``, live transition scalars) from its TensorBoard event files, or from ``metrics.csv``
for a run logged with CSVLogger. Each figure is drawn when its data exists; a sharp turn
of each module's B vector is found with ``em_lightning.phase.detection_trace`` (the live callback's
rule and, when the trajectory's meta records them, its settings) and marked on every figure. Reading and
computing here know nothing of Lightning; ``figures.py`` draws it, ``summary.py`` writes report.md.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from em_lightning.training.finite import check_finite
from em_lightning.phase import (
    PCAResult,
    TransitionEvent,
    cumulative_rotation_degrees,
    detection_trace,
    local_cosine_similarity,
    norms,
    pca_2d,
)
from em_lightning.phase.store import read_trajectory
from em_lightning.run.config import RunConfig

__all__ = ["ModuleAnalysis", "RunReport", "analyse_run", "read_scalars"]

LOSS, EM_RATE, COHERENT_RATE = "train/loss", "eval/em_rate", "eval/coherent_rate"
DETECTOR_KEYS = ("k", "threshold", "min_snr", "warmup", "cooldown", "min_rise", "min_z", "baseline")
DEFAULT_DETECTOR_K = 8  # TransitionDetector's default


@dataclass
class ModuleAnalysis:
    name: str
    norm_a: Tensor  # (n,)
    norm_b: Tensor  # (n,)
    local_cosine: dict[int, Tensor]  # report scale k -> (n,) local cosine of B
    pca: PCAResult  # of B
    rotation_a: Tensor  # (n,) cumulative degrees
    rotation_b: Tensor
    transitions: list[TransitionEvent]
    firing_level: Tensor  # (n,) the level the detector's local cosine had to reach at each point (NaN: none)


@dataclass
class RunReport:
    run_dir: Path
    steps: list[int]  # recorded trajectory steps (empty without a trajectory)
    modules: list[ModuleAnalysis]
    scalars: dict[str, tuple[list[int], list[float]]]  # tag -> (steps, values), last value per step
    live_transitions: dict[str, list[int]]  # scalar tag -> transition steps it reports
    detector: dict
    notes: list[str] = field(default_factory=list)

    def transition_steps(self) -> list[int]:
        found = {e.step for m in self.modules for e in m.transitions}
        return sorted(found.union(*self.live_transitions.values()))


def natural_key(name: str) -> list:
    """Sort ``layers.3`` before ``layers.24``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_scalars(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar tag of the event files in ``run_dir`` (a resumed run's purged steps are dropped), or,
    for a run without event files, of its ``metrics.csv`` (CSVLogger)."""

    if not any(p.is_file() for p in run_dir.glob("events.out.tfevents.*")):
        return read_csv_scalars(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else {}
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        last = {int(e.step): float(e.value) for e in acc.Scalars(tag)}  # a re-logged step: keep the last
        if last:
            steps = sorted(last)
            out[tag] = (steps, [last[s] for s in steps])
    return out


def read_csv_scalars(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every column of a CSVLogger ``metrics.csv`` (one row per logged step and call; a blank cell: not logged
    there), in ``read_scalars``' shape. A resumed run's rows from its checkpoint's step on were replaced
    (``logger_compat.open_csv``); a step logged twice keeps its last value, as from TensorBoard."""
    last: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            for tag, value in row.items():
                if tag not in ("step", "epoch") and value not in ("", None):
                    last.setdefault(tag, {})[step] = float(value)
    return {tag: (sorted(by_step), [by_step[s] for s in sorted(by_step)]) for tag, by_step in last.items()}


def live_transitions(scalars: dict[str, tuple[list[int], list[float]]]) -> dict[str, list[int]]:
    """Transitions the run logged itself, leniently: a tag naming ``transition`` whose name ends in
    ``step`` holds transition steps as values; any other such tag marks the steps with a non-zero value."""
    out = {}
    for tag, (steps, values) in scalars.items():
        if "transition" not in tag.lower():
            continue
        if tag.lower().rstrip("s").endswith("step"):
            found = {int(v) for v in values if math.isfinite(v) and v >= 0}
        else:
            found = {s for s, v in zip(steps, values) if math.isfinite(v) and v != 0}
        if found:
            out[tag] = sorted(found)
    return out


def _callback_settings(run_dir: Path) -> dict:
    """The AdapterTrajectory callback's detector settings from the run's config.yaml, if it has one."""
    try:
        args = RunConfig(run_dir).callback_args("AdapterTrajectory") or {}
    except (ValueError, OSError, yaml.YAMLError):  # no (readable) config.yaml: the defaults apply
        return {}
    return {key: args[f"detector_{key}"] for key in DETECTOR_KEYS if f"detector_{key}" in args}


def _detector_settings(meta: dict, run_dir: Path, k: int | None) -> dict:
    """--detector-k, else the trajectory meta's "detector" dict, else the run's config.yaml, else defaults."""
    saved = meta.get("detector") if isinstance(meta.get("detector"), dict) else _callback_settings(run_dir)
    settings = {key: saved[key] for key in DETECTOR_KEYS if isinstance(saved.get(key), (int, float))}
    settings.setdefault("k", DEFAULT_DETECTOR_K)
    if k is not None:
        settings["k"] = k
    return settings


def analyse_module(name: str, steps: list[int], a: Tensor, b: Tensor, ks: list[int], detector: dict) -> ModuleAnalysis:
    a, b = a.double(), b.double()
    level, transitions = detection_trace(b, steps, **detector)
    return ModuleAnalysis(
        name=name,
        norm_a=norms(a),
        norm_b=norms(b),
        local_cosine={k: local_cosine_similarity(b, k) for k in ks},
        pca=pca_2d(b),
        rotation_a=cumulative_rotation_degrees(a),
        rotation_b=cumulative_rotation_degrees(b),
        transitions=transitions,
        firing_level=level,
    )


def analyse_run(run_dir: Path, ks: list[int], detector_k: int | None = None) -> RunReport:
    """Read and compute everything the report shows. ValueError when there is nothing to report."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory not found: {run_dir}")
    notes: list[str] = []
    traj, traj_error = None, None
    if (run_dir / "trajectory").exists():
        try:
            traj = read_trajectory(run_dir / "trajectory")
        except Exception as e:  # a half-written or foreign trajectory: report what else is there
            traj_error = f"cannot read trajectory in {run_dir / 'trajectory'}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            notes.append(traj_error)
    if traj is not None:  # a diverged run (before em-fit stopped at NaN): one line, not an SVD traceback
        check_finite({f"{name}.{ab}": t for ab, vectors in (("A", traj.a), ("B", traj.b)) for name, t in vectors.items()},
                     str(run_dir / "trajectory"))
    scalars = read_scalars(run_dir)
    if (traj is None or len(traj.steps) == 0) and not scalars:
        raise ValueError(traj_error or f"nothing to report in {run_dir}: no trajectory/, no TensorBoard event "
                         "files and no metrics.csv")

    detector = _detector_settings(traj.meta if traj is not None else {}, run_dir, detector_k)
    steps, modules = [], []
    if traj is not None and len(traj.steps) > 0:
        steps = [int(s) for s in traj.steps.tolist()]
        for name in sorted(set(traj.a) | set(traj.b), key=natural_key):
            if name not in traj.a or name not in traj.b:
                notes.append(f"module {name} has only one of its A/B vectors recorded; skipped")
                continue
            modules.append(analyse_module(name, steps, traj.a[name], traj.b[name], ks, detector))
        if len(steps) < 2 * detector["k"] + 2:
            notes.append(f"only {len(steps)} recorded points: a transition needs at least {2 * detector['k'] + 2} (k={detector['k']})")
    elif traj is not None:
        notes.append("the trajectory has no recorded points yet")
    return RunReport(run_dir, steps, modules, scalars, live_transitions(scalars), detector, notes)
