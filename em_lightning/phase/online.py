"""The trajectory metrics of each recorded point, computed as points arrive: the online form of
``rotation.py`` (its row-wise cosine and angle, one call per metric for all modules) plus one ``TransitionDetector``
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
from .rotation import pairwise_cosine, pairwise_rotation_degrees


@dataclass
class PointMetrics:
    now: dict[str, float]  # tag -> value at the new point (NaN values left out)
    lagged: dict[int, dict[str, float]]  # earlier step -> tags that became computable now
    events: list[tuple[str, TransitionEvent]] = field(default_factory=list)  # (module, turn) detected now


def _f64(x) -> Tensor:
    return torch.as_tensor(x).detach().reshape(-1).to("cpu", torch.float64)


def _stack(vectors: list[Tensor]) -> Tensor:
    """The modules' vectors as rows of one tensor, zero-padded to one width where sizes differ (norms, dot
    products and differences, so every rotation metric, are unchanged): one call per metric for all
    modules, not one per module (a torch call costs more than its math at these sizes)."""
    if len({v.numel() for v in vectors}) == 1:
        return torch.stack(vectors)
    out = torch.zeros(len(vectors), max(v.numel() for v in vectors), dtype=torch.float64)
    for i, v in enumerate(vectors):
        out[i, : v.numel()] = v
    return out


class OnlineTrajectory:
    def __init__(self, k_values: tuple[int, ...], detector_args: dict):
        self.k_values = tuple(k_values)
        self.detector_args = dict(detector_args)
        # The last 2*max(k)+1 B vectors (local cosine needs v[i-k], v[i], v[i+k]) and each module's last A.
        self.window: deque[tuple[int, dict[str, Tensor]]] = deque(maxlen=2 * max(self.k_values) + 1)
        self.last_a: dict[str, Tensor] = {}
        self.cum_rotation: dict[str, float] = {}
        self.detectors: dict[str, TransitionDetector] = {}
        self.last_now: dict[str, float] = {}  # the last point's ``now`` values (a resumed run logs them again)

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
        names, a_now = list(vectors), {n: _f64(a) for n, (a, _) in vectors.items()}
        b_now = window[-1][1]
        tags = {n: f"phase/{n}/" for n in names}
        b_all = _stack([b_now[n] for n in names])
        for n, an, bn in zip(names, _stack([a_now[n] for n in names]).norm(dim=1).tolist(), b_all.norm(dim=1).tolist()):
            out.now[tags[n] + "A_norm"], out.now[tags[n] + "B_norm"] = an, bn
        turned = [n for n in names if previous and n in previous[-1][1]]
        if turned:  # rotation to the previous point
            b_rot = pairwise_rotation_degrees(_stack([previous[-1][1][n] for n in turned]),
                                              _stack([b_now[n] for n in turned])).tolist()
            a_rot = pairwise_rotation_degrees(_stack([self.last_a[n] for n in turned]),
                                              _stack([a_now[n] for n in turned])).tolist()
            for n, br, ar in zip(turned, b_rot, a_rot):
                self.cum_rotation[n] = self.cum_rotation.get(n, 0.0) + (0.0 if br != br else br)
                out.now[tags[n] + "B_rotation_deg"], out.now[tags[n] + "A_rotation_deg"] = br, ar
        for n in names:
            out.now[tags[n] + "B_rotation_cum_deg"] = self.cum_rotation.setdefault(n, 0.0)
        for j in sorted({1, *self.k_values}):
            if len(previous) >= j:
                cos = pairwise_cosine(_stack([previous[-j][1][n] for n in names]), b_all).tolist()
                for n, c in zip(names, cos):
                    out.now[tags[n] + f"B_cos_lag{j}"] = c
        for k in self.k_values:
            if len(window) >= 2 * k + 1:  # the point k back is now a centre: the local cosine contract there
                (_, before), (centre_step, centre) = window[-1 - 2 * k], window[-1 - k]
                c_all = _stack([centre[n] for n in names])
                cos = pairwise_cosine(_stack([before[n] for n in names]) - c_all, b_all - c_all).tolist()
                for n, c in zip(names, cos):
                    out.lagged.setdefault(centre_step, {})[tags[n] + f"B_local_cos_k{k}"] = c
        for n in names:
            self.last_a[n] = a_now[n]
            detector = self.detectors.setdefault(n, TransitionDetector(**self.detector_args))
            event = detector.update(step, b_now[n])
            if event is not None:
                out.events.append((n, event))
        out.now = {k: v for k, v in out.now.items() if v == v}
        self.last_now = dict(out.now)
        return out

    def state_dict(self) -> dict:
        # float32 halves the checkpoint and is exact: the vectors come from float32 (or narrower) weights.
        return {
            "window": [(s, {n: v.float() for n, v in vs.items()}) for s, vs in self.window],
            "last_a": {n: v.float() for n, v in self.last_a.items()},
            "cum_rotation": dict(self.cum_rotation),
            "detectors": {n: d.state_dict() for n, d in self.detectors.items()},
            "last_now": dict(self.last_now),
        }

    def load_state_dict(self, state: dict) -> None:
        self.window.clear()
        self.window.extend((int(s), {n: _f64(v) for n, v in vs.items()}) for s, vs in state["window"])
        self.last_a = {n: _f64(v) for n, v in state["last_a"].items()}
        self.cum_rotation = dict(state["cum_rotation"])
        self.last_now = dict(state.get("last_now", {}))  # absent in checkpoints written before it existed
        self.detectors = {}
        for name, det_state in state["detectors"].items():
            self.detectors[name] = TransitionDetector(**self.detector_args)
            self.detectors[name].load_state_dict(det_state)
