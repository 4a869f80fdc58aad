"""Online detector of a sharp turn (phase transition) in an adapter trajectory.

Feed one vector per recorded point, in order. With c(i) the local cosine similarity at scale k,
cos(v[i-k] - v[i], v[i+k] - v[i]) (see rotation.py), point i is a *turn* when all of these hold:

1. c(i) > ``threshold``. A corner by angle theta gives c = -cos(theta), so the default -0.7 fires for
   turns sharper than about 45 degrees (arccos 0.7 = 45.6); a straight path sits at -1. That leaves
   room below 60-degree turns (c = -0.5) and above the noise, which pulls a straight path's c up from -1.
2. Both arms are *directed motion*, not jitter: for each arm (v[i-k]..v[i] and v[i]..v[i+k])
   snr = |net displacement| / sqrt(sum of squared single-step displacements) >= ``min_snr`` (2.0).
   A driftless random walk (SGD noise when the adapter barely moves) has snr ~ 1 whatever its step
   sizes, jitter around a fixed point less, steady motion sqrt(k); the ratio is scale-free, so a norm
   that grows over training is fine. Without this rule, two independent noise arms in high dimension
   are nearly orthogonal, c ~ 0, and noise alone would fire. A stalled adapter has snr 0.
3. c(i) is a peak: c(i) >= c(i-1) and c(i) >= c(i+1), counting only neighbours that pass (2) (beside a
   near-U-turn one arm holds the reversal, so its c is high but says nothing about where the turn is).
4. i >= ``warmup`` and i > (last fired index) + ``cooldown`` (default 2k: one turn lifts c for fewer
   than k points on each side of its peak), so one turn fires once.

(3) needs c(i+1), hence v[i+k+1]: a turn at point i is reported when point i+k+1 arrives, and
``TransitionEvent.detected_step`` is that point's step. k, warmup and cooldown count recorded points,
and k sets the time scale: a rotation spread over more than about k/2 points no longer looks sharp.

Measured on synthetic paths (drift of unit step plus Gaussian noise, seeded; see
tests/test_phase_detector.py): corners of 60-180 degrees fire exactly once within 2 points of the corner
when the per-step noise norm is up to 0.75x the drift at d = 16 (1x at d = 512), also with step sizes
growing 3% per point; arcs over <= k/2 points fire within 1 point of their middle. Straight and
noisy-straight paths, growing steps, driftless random walks (d >= 4) and jitter never fired. Outside that
regime, e.g. d = 16 with noise equal to the drift, about 1 path in 70 (100 points) fires falsely and 30%
of turns are missed: raise k to average more steps.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["TransitionEvent", "TransitionDetector", "detect_transitions"]


@dataclass(frozen=True)
class TransitionEvent:
    step: int  # step of the turn point (the centre of the local cosine)
    detected_step: int  # step at which it was detected: the point k + 1 records later
    local_cosine: float  # c at the turn
    k: int
    index: int  # 0-based position of the turn point among the recorded points


def _sq(x: Tensor) -> float:
    return float(x @ x)


def _ratio(displacement: float, sum_sq_steps: float) -> float:
    """Arm snr: net displacement over the root-sum-square of its steps; 0 for a motionless arm."""
    return displacement / math.sqrt(sum_sq_steps) if sum_sq_steps > 0 else 0.0


class TransitionDetector:
    """Online turn detector; see the module docstring for the rule.

    Keeps only the last 2k+1 vectors, the last two local cosine values and counters, so its state is
    small and ``state_dict``/``load_state_dict`` make a resumed run fire exactly as an uninterrupted one.
    """

    def __init__(
        self,
        k: int = 8,
        threshold: float = -0.7,
        min_snr: float = 2.0,
        warmup: int = 0,
        cooldown: int | None = None,
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
        self.k = k
        self.threshold = float(threshold)
        self.min_snr = float(min_snr)
        self.warmup = int(warmup)
        self.cooldown = 2 * k if cooldown is None else int(cooldown)
        self.fired: list[TransitionEvent] = []
        self.latest: tuple[int, float] | None = None  # (centre step, c) most recently computed, for logging
        self._window: list[Tensor] = []  # last <= 2k+1 vectors, CPU float64
        self._steps: list[int] = []
        self._step_sq: list[float] = []  # squared lengths of the last <= 2k single steps
        self._count = 0  # points seen
        self._history: list[dict[str, Any]] = []  # the last two centres: index, step, value, snr
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
        self._history = (self._history + [centre])[-2:]
        self.latest = (centre["step"], value)
        return event

    def _decide(self, after: dict[str, Any], step: int) -> TransitionEvent | None:
        """Is the previous centre a turn, now that the value after it is known?"""
        if not self._history:
            return None
        cand = self._history[-1]
        neighbours = [after] + self._history[-2:-1]
        value, index = cand["value"], cand["index"]
        # Only directed neighbours compete for the peak: next to a near-U-turn an arm holds the reversal,
        # its snr collapses, and its c (close to +1) says nothing about where the turn is.
        neighbours_ok = all(value >= n["value"] for n in neighbours if n["snr"] >= self.min_snr)
        # Comparisons with NaN (a diverged, non-finite vector) are False, so NaN never fires.
        if not (cand["snr"] >= self.min_snr and value > self.threshold and neighbours_ok):
            return None
        if index < self.warmup:
            return None
        if self._last_fire_index is not None and index - self._last_fire_index <= self.cooldown:
            return None
        event = TransitionEvent(step=cand["step"], detected_step=step, local_cosine=value, k=self.k, index=index)
        self._last_fire_index = index
        self.fired.append(event)
        return event

    def state_dict(self) -> dict[str, Any]:
        """Window, counters and events; settings other than k come from the constructor on load."""
        window = torch.stack(self._window) if self._window else torch.empty(0, 0, dtype=torch.float64)
        return {
            "k": self.k,
            "window": window.clone(),
            "steps": list(self._steps),
            "count": self._count,
            "history": [dict(h) for h in self._history],
            "last_fire_index": self._last_fire_index,
            "fired": [asdict(e) for e in self.fired],
            "latest": self.latest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["k"] != self.k:
            raise ValueError(f"state was saved with k={state['k']} but this detector has k={self.k}")
        self._window = [row.to("cpu", torch.float64).clone() for row in state["window"]]
        self._steps = [int(s) for s in state["steps"]]
        self._step_sq = [_sq(b - a) for a, b in zip(self._window[:-1], self._window[1:])]
        self._count = int(state["count"])
        self._history = [dict(h) for h in state["history"]]
        self._last_fire_index = state["last_fire_index"]
        self.fired = [TransitionEvent(**e) for e in state["fired"]]
        self.latest = tuple(state["latest"]) if state["latest"] is not None else None


def detect_transitions(vectors: Tensor, steps: list[int] | None = None, **kwargs: Any) -> list[TransitionEvent]:
    """Run a fresh ``TransitionDetector(**kwargs)`` over a whole (n, d) trajectory (steps default 0..n-1)."""
    if vectors.ndim != 2:
        raise ValueError(f"vectors must have shape (n, d), got {tuple(vectors.shape)}")
    steps = list(range(vectors.shape[0])) if steps is None else list(steps)
    if len(steps) != vectors.shape[0]:
        raise ValueError(f"got {len(steps)} steps for {vectors.shape[0]} vectors")
    detector = TransitionDetector(**kwargs)
    for step, vector in zip(steps, vectors):
        detector.update(step, vector)
    return detector.fired
