"""The trajectory metrics of each recorded point, computed as points arrive: the online form of
``rotation.py`` (which it calls on the few vectors each metric needs) plus one ``TransitionDetector``
per module. Pure and torch-only; ``state_dict``/``load_state_dict`` make a resumed run continue exactly.

Per module ``m`` and point s (tags as AdapterTrajectory logs them, ``phase/m/...``):
  A_norm, B_norm, A_rotation_deg, B_rotation_deg (to the previous point), B_rotation_cum_deg,
  B_cos_lag{j} (cos(b[s - j], b[s])) for j in {1, *k_values}, and, for the point k back, B_local_cos_k{k}
  (the local cosine similarity contract, known once v[i + k] exists).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .detector import TransitionDetector, TransitionEvent
from .rotation import cosine_to_lag, local_cosine_similarity, rotation_degrees


@dataclass
class PointMetrics:
    now: dict[str, float]  # tag -> value at the new point (NaN values left out)
    lagged: dict[int, dict[str, float]]  # earlier step -> tags that became computable now
    events: list[tuple[str, TransitionEvent]] = field(default_factory=list)  # (module, turn) detected now


def _f64(x) -> Tensor:
    return torch.as_tensor(x).detach().reshape(-1).to("cpu", torch.float64)


def _value(x: Tensor) -> float:
    return float(x)


class OnlineTrajectory:
    def __init__(self, k_values: tuple[int, ...], detector_args: dict):
        self.k_values = tuple(k_values)
        self.detector_args = dict(detector_args)
        # The last 2*max(k)+1 B vectors (local cosine needs v[i-k], v[i], v[i+k]) and each module's last A.
        self.window: deque[tuple[int, dict[str, Tensor]]] = deque(maxlen=2 * max(self.k_values) + 1)
        self.last_a: dict[str, Tensor] = {}
        self.cum_rotation: dict[str, float] = {}
        self.detectors: dict[str, TransitionDetector] = {}

    @property
    def last_step(self) -> int | None:
        return self.window[-1][0] if self.window else None

    def last_b(self, name: str) -> Tensor | None:
        return self.window[-1][1].get(name) if self.window else None

    def update(self, step: int, vectors: dict[str, tuple]) -> PointMetrics:
        """Add point ``step`` ({module: (a, b)}, 1-D) and return what it makes computable."""
        previous = list(self.window)
        self.window.append((step, {n: _f64(b) for n, (_, b) in vectors.items()}))
        window = list(self.window)
        out = PointMetrics({}, {})
        for name, (a, _) in vectors.items():
            p, a, b = f"phase/{name}/", _f64(a), window[-1][1][name]
            out.now[p + "A_norm"], out.now[p + "B_norm"] = _value(a.norm()), _value(b.norm())
            if previous and name in previous[-1][1]:
                rot = _value(rotation_degrees(torch.stack([previous[-1][1][name], b]))[1])
                self.cum_rotation[name] = self.cum_rotation.get(name, 0.0) + (0.0 if rot != rot else rot)
                out.now[p + "B_rotation_deg"] = rot
                out.now[p + "A_rotation_deg"] = _value(rotation_degrees(torch.stack([self.last_a[name], a]))[1])
            out.now[p + "B_rotation_cum_deg"] = self.cum_rotation.setdefault(name, 0.0)
            for j in sorted({1, *self.k_values}):
                if len(previous) >= j:
                    out.now[p + f"B_cos_lag{j}"] = _value(cosine_to_lag(torch.stack([previous[-j][1][name], b]), 1)[1])
            for k in self.k_values:
                if len(window) >= 2 * k + 1:
                    (_, before), (centre_step, centre) = window[-1 - 2 * k], window[-1 - k]
                    arms = torch.stack([before[name], centre[name], b])
                    out.lagged.setdefault(centre_step, {})[p + f"B_local_cos_k{k}"] = _value(
                        local_cosine_similarity(arms, 1)[1])
            self.last_a[name] = a
            detector = self.detectors.setdefault(name, TransitionDetector(**self.detector_args))
            event = detector.update(step, b)
            if event is not None:
                out.events.append((name, event))
        out.now = {k: v for k, v in out.now.items() if v == v}
        return out

    def state_dict(self) -> dict:
        # float32 halves the checkpoint and is exact: the vectors come from float32 (or narrower) weights.
        return {
            "window": [(s, {n: v.float() for n, v in vs.items()}) for s, vs in self.window],
            "last_a": {n: v.float() for n, v in self.last_a.items()},
            "cum_rotation": dict(self.cum_rotation),
            "detectors": {n: d.state_dict() for n, d in self.detectors.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.window.clear()
        self.window.extend((int(s), {n: _f64(v) for n, v in vs.items()}) for s, vs in state["window"])
        self.last_a = {n: _f64(v) for n, v in state["last_a"].items()}
        self.cum_rotation = dict(state["cum_rotation"])
        self.detectors = {}
        for name, det_state in state["detectors"].items():
            self.detectors[name] = TransitionDetector(**self.detector_args)
            self.detectors[name].load_state_dict(det_state)
