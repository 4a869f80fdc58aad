"""Online detector of a sharp turn (phase transition) in an adapter trajectory.

Feed one vector per recorded point, in order. With c(i) the local cosine similarity at scale k,
cos(v[i-k] - v[i], v[i+k] - v[i]) (see rotation.py), point i is a *turn* when c(i) stands out from the
trajectory's own recent c values, not when it crosses a fixed level. A real LoRA B path bends steadily and
its c drifts (SmolLM2-135M, rank 1, 300 steps: from -0.9 to -0.65 as the learning rate decays); a slow
drift of that baseline is not a phase transition, a distinct peak above it is. The rule:

1. Both arms are *directed motion*, not jitter: for each arm (v[i-k]..v[i] and v[i]..v[i+k])
   snr = |net displacement| / sqrt(sum of squared single-step displacements) >= ``min_snr`` (2.0).
   A driftless random walk (SGD noise when the adapter barely moves) has snr ~ 1 whatever its step
   sizes, jitter around a fixed point less, steady motion sqrt(k); the ratio is scale-free, so a norm that
   grows from zero or steps that shrink with the learning rate change nothing. A stalled adapter has snr 0.
2. *Baseline*: the median m and the robust spread s = 1.4826 * MAD of c over the last ``baseline`` (40)
   directed points (1) that end k points before i: c(j) for j <= i - k, which a corner at i cannot have
   raised yet (a corner lifts c only for |j - i| < k). Points within k of an earlier detection are kept
   out, so one turn does not hide the next. At least k values are needed, so nothing fires before point
   3k - 1 (23 for k = 8); that also skips the first steps of a B growing from zero (with LR warmup its
   first steps are tiny and c there is computed on a handful of them).
3. *Prominence*: c(i) - m >= max(``min_rise``, ``min_z`` * s), defaults 0.25 and 6. On a straight path a
   corner by theta lifts c from -1 to -cos(theta), a rise of 1 - cos(theta): 0.29 at 45 degrees, 0.5 at
   60, 1 at 90; so min_rise 0.25 means "sharper than ~41 degrees". The z part raises the bar where c
   wanders (noisy paths). The largest rise of c above its own baseline on the recorded real paths is 0.15.
4. c(i) is a peak: c(i) >= c(i-1) and c(i) >= c(i+1), counting only neighbours that pass (1) (beside a
   near-U-turn one arm holds the reversal, so its c is high but says nothing about where the turn is).
5. c(i) > ``threshold``, an optional absolute floor (default -1: off); i >= ``warmup``; and
   i > (last fired index) + ``cooldown`` (default 2k), so one turn fires once.

(4) needs c(i+1), hence v[i+k+1]: a turn at point i is reported when point i+k+1 arrives, and
``TransitionEvent.detected_step`` is that point's step. k, baseline, warmup and cooldown count recorded
points, and k sets the time scale: a rotation spread over more than about k/2 points no longer looks sharp.
State: the last 2k+1 vectors, the last k+1 and ``baseline`` values of c, counters: O(k + baseline).

Measured with ``scripts/detector_study.py --seeds 15 --real tests/data/trajectories`` (seeded; defaults;
paths of 120 points from zero, unit drift per point plus Gaussian noise of norm ``noise`` x the drift,
d = 16 and 512):

- False alarms (paths with any event). Straight, step sizes growing 3% per point, steps decaying
  linearly to 5% (as the LR), constant bends of 1, 2 and 5 degrees per point (at 5, c sits near -0.77),
  a turning rate ramping from 0 to 6 degrees per point (c drifts from -1 to -0.5), a heading that
  random-walks, noise 0-1x: 3 of 960, all on the ramp at d = 16 with noise 1x (3 of those 15); noise 2x:
  0 of 240; driftless random walks and jitter: 0 of 120. The former fixed rule (c > -0.7 at a peak; before
  commit 54e8b3c, measured there on the same paths) fired on 102 of the 960 (25-58% of the bend-5 and ramp paths) and on none of the others.
- Misses (anything but exactly one event within 2 points of a corner; straight, decaying, bending and
  wandering paths). Noise <= 0.5x: 45 degrees 4 of 144 missed, 60-180 degrees 0 of 720. Noise 1x,
  d = 512: 45 degrees 38%, 60-180 degrees 0%. Noise 1x, d = 16: 45 degrees 75%, 60 degrees 29%, 90-180
  degrees 12-25% (there an arm of 8 steps has snr ~ 2, the limit of rule 1).
- Real paths (SmolLM2-135M-Instruct rank-1 B on layer 15 and on layer 10, 301 points each,
  tests/data/trajectories/): no event on either (the former rule fired 3 times on the layer-15 path, at
  steps 189, 240, 280, where c rose at most 0.15 above its baseline); corners spliced into them at 13
  places each: 60-180 degrees 130 of 130 found exactly once within 2 points, 45 degrees 19 of 26.

With noise at or above the drift per point, raise k to average more steps.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["TransitionEvent", "TransitionDetector", "detect_transitions", "detection_trace"]

_MAD_TO_SIGMA = 1.4826  # MAD of a normal sample times this estimates its standard deviation


@dataclass(frozen=True)
class TransitionEvent:
    step: int  # step of the turn point (the centre of the local cosine)
    detected_step: int  # step at which it was detected: the point k + 1 records later
    local_cosine: float  # c at the turn
    k: int
    index: int  # 0-based position of the turn point among the recorded points
    baseline: float = math.nan  # median c of the trajectory's recent directed points before the turn
    spread: float = math.nan  # their robust spread (1.4826 * MAD)
    prominence: float = math.nan  # local_cosine - baseline


def _sq(x: Tensor) -> float:
    return float(x @ x)


def _ratio(displacement: float, sum_sq_steps: float) -> float:
    """Arm snr: net displacement over the root-sum-square of its steps; 0 for a motionless arm."""
    return displacement / math.sqrt(sum_sq_steps) if sum_sq_steps > 0 else 0.0


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class TransitionDetector:
    """Online turn detector; see the module docstring for the rule.

    Keeps only the last 2k+1 vectors, the last ``baseline`` + k + 1 local cosine values and counters, so
    its state is small and ``state_dict``/``load_state_dict`` make a resumed run fire exactly as an
    uninterrupted one.
    """

    def __init__(
        self,
        k: int = 8,
        threshold: float = -1.0,
        min_snr: float = 2.0,
        warmup: int = 0,
        cooldown: int | None = None,
        min_rise: float = 0.25,
        min_z: float = 6.0,
        baseline: int = 40,
    ) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if not -1.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [-1, 1), got {threshold}")
        if min_snr >= math.sqrt(k):
            # A perfectly straight arm of k equal steps has snr sqrt(k): nothing could ever fire.
            raise ValueError(f"min_snr must be below sqrt(k) = {math.sqrt(k):.3f}, got {min_snr}")
        if warmup < 0 or (cooldown is not None and cooldown < 0):
            raise ValueError(f"warmup and cooldown must be >= 0, got {warmup} and {cooldown}")
        if not 0.0 < min_rise < 2.0 or min_z < 0:
            raise ValueError(f"min_rise must be in (0, 2) and min_z >= 0, got {min_rise} and {min_z}")
        if isinstance(baseline, bool) or not isinstance(baseline, int) or baseline < k:
            raise ValueError(f"baseline must be an integer >= k = {k}, got {baseline!r}")
        self.k = k
        self.threshold = float(threshold)
        self.min_snr = float(min_snr)
        self.warmup = int(warmup)
        self.cooldown = 2 * k if cooldown is None else int(cooldown)
        self.min_rise = float(min_rise)
        self.min_z = float(min_z)
        self.baseline = int(baseline)
        self.fired: list[TransitionEvent] = []
        self.latest: tuple[int, float] | None = None  # (centre step, c) most recently computed, for logging
        # (candidate step, level its c had to exceed) most recently judged; the level is NaN while the
        # baseline has fewer than k values.
        self.latest_level: tuple[int, float] | None = None
        self._window: list[Tensor] = []  # last <= 2k+1 vectors, CPU float64
        self._steps: list[int] = []
        self._step_sq: list[float] = []  # squared lengths of the last <= 2k single steps
        self._count = 0  # points seen
        self._history: list[dict[str, Any]] = []  # the last k+1 centres: index, step, value, snr
        self._base: list[float] = []  # c of the last <= `baseline` directed centres ending k before the candidate
        self._last_fire_index: int | None = None

    def update(self, step: int, vector: Tensor) -> TransitionEvent | None:
        """Record the vector of ``step`` (strictly increasing); return the event it confirms, if any."""
        step = operator.index(step)
        if self._steps and step <= self._steps[-1]:
            raise ValueError(f"steps must increase: got {step} after {self._steps[-1]}")
        x = vector.detach().reshape(-1).to("cpu", torch.float64, copy=True)
        if self._window:
            if x.numel() != self._window[-1].numel():
                raise ValueError(f"vector has {x.numel()} entries, earlier ones had {self._window[-1].numel()}")
            self._step_sq = (self._step_sq + [_sq(x - self._window[-1])])[-2 * self.k :]
        size = 2 * self.k + 1
        self._window = (self._window + [x])[-size:]
        self._steps = (self._steps + [step])[-size:]
        self._count += 1
        if len(self._window) < size:
            return None

        k, w = self.k, self._window
        back, fwd = w[0] - w[k], w[-1] - w[k]
        nb, nf = math.sqrt(_sq(back)), math.sqrt(_sq(fwd))
        # Plain float math: a handful of tensor ops per update keeps a 1000-point run in milliseconds.
        value = max(-1.0, min(1.0, float(back @ fwd) / nb / nf)) if nb > 0 and nf > 0 else 0.0
        snr = min(_ratio(nb, sum(self._step_sq[:k])), _ratio(nf, sum(self._step_sq[k:])))
        centre = {"index": self._count - 1 - k, "step": self._steps[k], "value": value, "snr": snr}
        event = self._decide(centre, step)
        self._history = (self._history + [centre])[-(k + 1) :]
        self.latest = (centre["step"], value)
        return event

    def _admit(self, index: int) -> None:
        """Move centres with index <= ``index`` from the history into the baseline (directed ones only,
        none within k of the last detection)."""
        last = self._last_fire_index
        while self._history and self._history[0]["index"] <= index:
            h = self._history.pop(0)
            near_turn = last is not None and abs(h["index"] - last) < self.k
            if h["snr"] >= self.min_snr and math.isfinite(h["value"]) and not near_turn:
                self._base = (self._base + [h["value"]])[-self.baseline :]

    def _decide(self, after: dict[str, Any], step: int) -> TransitionEvent | None:
        """Is the previous centre a turn, now that the value after it is known?"""
        if not self._history:
            return None
        cand = self._history[-1]
        value, index = cand["value"], cand["index"]
        neighbours = [after] + self._history[-2:-1]
        self._admit(index - self.k)
        level, centre, spread = math.nan, math.nan, math.nan
        if len(self._base) >= self.k:
            centre = _median(self._base)
            spread = _MAD_TO_SIGMA * _median([abs(v - centre) for v in self._base])
            level = centre + max(self.min_rise, self.min_z * spread)
        self.latest_level = (cand["step"], level)
        # Only directed neighbours compete for the peak: next to a near-U-turn an arm holds the reversal,
        # its snr collapses, and its c (close to +1) says nothing about where the turn is.
        neighbours_ok = all(value >= n["value"] for n in neighbours if n["snr"] >= self.min_snr)
        # Comparisons with NaN (a diverged, non-finite vector; no baseline yet) are False: they never fire.
        if not (cand["snr"] >= self.min_snr and value >= level and value > self.threshold and neighbours_ok):
            return None
        if index < self.warmup:
            return None
        if self._last_fire_index is not None and index - self._last_fire_index <= self.cooldown:
            return None
        event = TransitionEvent(step=cand["step"], detected_step=step, local_cosine=value, k=self.k, index=index,
                                baseline=centre, spread=spread, prominence=value - centre)
        self._last_fire_index = index
        self.fired.append(event)
        return event

    def state_dict(self) -> dict[str, Any]:
        """Window, values, counters and events; settings other than k come from the constructor on load."""
        window = torch.stack(self._window) if self._window else torch.empty(0, 0, dtype=torch.float64)
        return {
            "k": self.k,
            "window": window.clone(),
            "steps": list(self._steps),
            "count": self._count,
            "history": [dict(h) for h in self._history],
            "base": list(self._base),
            "last_fire_index": self._last_fire_index,
            "fired": [asdict(e) for e in self.fired],
            "latest": self.latest,
            "latest_level": self.latest_level,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["k"] != self.k:
            raise ValueError(f"state was saved with k={state['k']} but this detector has k={self.k}")
        self._window = [row.to("cpu", torch.float64).clone() for row in state["window"]]
        self._steps = [int(s) for s in state["steps"]]
        self._step_sq = [_sq(b - a) for a, b in zip(self._window[:-1], self._window[1:])]
        self._count = int(state["count"])
        self._history = [dict(h) for h in state["history"]]
        # A state from before the baseline rule has none: the baseline refills from the coming points.
        self._base = [float(v) for v in state.get("base", [])][-self.baseline :]
        self._last_fire_index = state["last_fire_index"]
        self.fired = [TransitionEvent(**e) for e in state["fired"]]
        self.latest = tuple(state["latest"]) if state["latest"] is not None else None
        level = state.get("latest_level")
        self.latest_level = tuple(level) if level is not None else None


def _run(vectors: Tensor, steps: list[int] | None, kwargs: dict[str, Any]) -> tuple[TransitionDetector, list]:
    if vectors.ndim != 2:
        raise ValueError(f"vectors must have shape (n, d), got {tuple(vectors.shape)}")
    steps = list(range(vectors.shape[0])) if steps is None else list(steps)
    if len(steps) != vectors.shape[0]:
        raise ValueError(f"got {len(steps)} steps for {vectors.shape[0]} vectors")
    detector = TransitionDetector(**kwargs)
    levels = []
    for step, vector in zip(steps, vectors):
        detector.update(step, vector)
        levels.append(detector.latest_level)
    return detector, levels


def detect_transitions(vectors: Tensor, steps: list[int] | None = None, **kwargs: Any) -> list[TransitionEvent]:
    """Run a fresh ``TransitionDetector(**kwargs)`` over a whole (n, d) trajectory (steps default 0..n-1)."""
    return _run(vectors, steps, kwargs)[0].fired


def detection_trace(vectors: Tensor, steps: list[int] | None = None, **kwargs: Any) -> tuple[Tensor, list[TransitionEvent]]:
    """The level each point's local cosine had to reach to fire (an (n,) float64 tensor, NaN where the
    point was never judged or had no baseline yet), and the events: what a figure draws beside c."""
    detector, levels = _run(vectors, steps, kwargs)
    position = {s: i for i, s in enumerate(range(vectors.shape[0]) if steps is None else steps)}
    out = torch.full((vectors.shape[0],), math.nan, dtype=torch.float64)
    for level in levels:
        if level is not None:
            out[position[level[0]]] = level[1]
    return out, detector.fired
