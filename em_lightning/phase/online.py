"""The trajectory metrics of each recorded point, computed as points arrive: the online form of
``rotation.py`` (its row-wise cosine and angle) plus one ``TransitionDetector`` per module. Pure (no Lightning);
``state_dict``/``load_state_dict`` make a resumed run continue exactly.

Per module ``m`` and point s (plain names; the caller that owns the namespace adds its prefix, e.g. ``phase/``):
  m/A_norm, m/B_norm, m/A_rotation_deg, m/B_rotation_deg (to the previous point), m/B_rotation_cum_deg,
  m/B_cos_lag{j} (cos(b[s - j], b[s])) for j in {1, *k_values}, and, for the point k back, m/B_local_cos_k{k}
  (the local cosine similarity contract, known once v[i + k] exists).

Fast path: a point's vectors are a few hundred to a few thousand floats, where a torch call costs more than its
math (~10 us against ~2 us for numpy) and right after a training step every call is several times slower
still. So the modules of a point are the rows of one float64 numpy matrix (zero-padded to one width: norms,
dot products and differences are unchanged), the last 2*max(k)+1 points live in one ring array with their
norms (read as views: copying whole points costs more than the math once modules x width is large), and
each metric is a few numpy calls for all modules at once (A's and B's rows together where both take part). The formulas are
rotation.py's (zero vectors give cosine 0 and no angle; angle = 2 atan2(|ua - ub|, |ua + ub|) of unit
vectors); tests/phase/test_phase_online.py checks every value against rotation.py's torch functions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from em_lightning.phase.detector import TransitionDetector, TransitionEvent


@dataclass
class PointMetrics:
    now: dict[str, float]  # name -> value at the new point (NaN values left out)
    lagged: dict[int, dict[str, float]]  # earlier step -> names that became computable now
    events: list[tuple[str, TransitionEvent]] = field(default_factory=list)  # (module, turn) detected now


def _f64(x) -> np.ndarray:
    """A vector (numpy array or tensor of any float dtype, on any device) as a flat float64 numpy array of
    its own (kept in the window: no memory shared with the caller's)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().reshape(-1).to("cpu", torch.float64).numpy()
    return np.array(x, dtype=np.float64).reshape(-1)


def _matrix(vectors: list[np.ndarray]) -> np.ndarray:
    """The vectors as rows, zero-padded to one width where sizes differ."""
    if len({v.size for v in vectors}) == 1:
        return np.stack(vectors)
    out = np.zeros((len(vectors), max(v.size for v in vectors)))
    for i, v in enumerate(vectors):
        out[i, : v.size] = v
    return out


def _dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Dot products along the last axis (the vectors), any leading axes (points, modules)."""
    return np.einsum("...d,...d->...", x, y)


def _unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors along the last axis (zero vectors stay zero) and the norms."""
    norm = np.sqrt(_dot(x, x))
    # Each vector divided by its own norm (not the dot by the product of norms): |a|*|b| of a LoRA B a few
    # steps after its zero init can underflow.
    return x / np.where(norm > 0, norm, 1.0)[..., None], norm


def _degrees(ua: np.ndarray, ub: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Angle between unit vectors; NaN where not ``ok`` (a zero vector: no direction)."""
    # 2*atan2(|ua-ub|, |ua+ub|) is accurate for tiny and near-180-degree angles, where acos is not.
    diff, total = ua - ub, ua + ub
    return np.where(ok, np.degrees(2 * np.arctan2(np.sqrt(_dot(diff, diff)), np.sqrt(_dot(total, total)))), np.nan)


class OnlineTrajectory:
    def __init__(self, k_values: tuple[int, ...], detector_args: dict):
        self.k_values = tuple(k_values)
        self.detector_args = dict(detector_args)
        self.size = 2 * max(self.k_values) + 1  # B points kept: the local cosine needs v[i-k], v[i], v[i+k]
        self._clear()

    def _clear(self) -> None:
        self.names: tuple[str, ...] = ()  # the modules, in row order; the same at every point
        self._sizes: dict[str, tuple[int, int]] = {}  # module -> (len(a), len(b)): the rows without padding
        self._ring: np.ndarray | None = None  # (size, modules, width): point number p in slot p % size
        self._ring_norm: np.ndarray | None = None  # (size, modules): their norms
        self._count = 0  # points added (slot arithmetic)
        self.steps: deque[int] = deque(maxlen=self.size)  # steps of the points held, oldest first
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # the newest point's unit rows and norms: A's, then B's
        self._last_a: np.ndarray | None = None  # the newest A rows (for the state)
        self.cum_rotation = np.zeros(0)
        self.detectors: dict[str, TransitionDetector] = {}
        self.last_now: dict[str, float] = {}  # the last point's ``now`` values (a resumed run logs them again)

    @property
    def last_step(self) -> int | None:
        return self.steps[-1] if self.steps else None

    def _slots(self, back: list[int]) -> list[int]:
        """Ring slots of the points ``back`` places before the newest (0: the newest)."""
        return [(self._count - 1 - j) % self.size for j in back]

    def last_b(self, name: str) -> torch.Tensor | None:
        if not self.steps or name not in self._sizes:
            return None
        row = self._ring[self._slots([0])[0], self.names.index(name), : self._sizes[name][1]]
        return torch.from_numpy(row.copy())

    def _add(self, step: int, a: list[np.ndarray], b: list[np.ndarray]) -> None:
        """Put a point's A and B vectors into the state (the first point fixes the ring's shape). A's and B's
        rows share one matrix: their norms, unit vectors and rotations are one set of numpy calls."""
        m, width = len(b), max(v.size for v in b)
        if self._ring is None:
            self._ring, self._ring_norm, self.cum_rotation = np.zeros((self.size, m, width)), np.zeros((self.size, m)), np.zeros(m)
        rows = _matrix(a + b)
        unit, norm = _unit(rows)
        slot = self._count % self.size
        self._ring[slot], self._ring_norm[slot] = rows[m:, :width], norm[m:]
        self._last, self._last_a = (unit, norm), rows[:m]
        self.steps.append(step)
        self._count += 1

    def update(self, step: int, vectors: dict[str, tuple]) -> PointMetrics:
        """Add point ``step`` ({module: (a, b)}, 1-D numpy arrays or tensors) and return what it makes computable."""
        names = tuple(vectors)
        if self.names and names != self.names:
            raise ValueError(f"trajectory point has modules {list(names)}; earlier points had {list(self.names)}")
        pairs = [(_f64(a), _f64(b)) for a, b in vectors.values()]
        self.names, self._sizes = names, {n: (a.size, b.size) for n, (a, b) in zip(names, pairs)}
        before = self._last
        held = len(self.steps)  # points before this one
        self._add(step, [a for a, _ in pairs], [b for _, b in pairs])
        (unit, norm), m = self._last, len(names)
        columns: dict[str, np.ndarray] = {"A_norm": norm[:m], "B_norm": norm[m:]}
        if before is not None:  # rotation to the previous point, A's rows and B's
            rotation = _degrees(before[0], unit, (before[1] > 0) & (norm > 0))
            b_rot = rotation[m:]
            columns["B_rotation_deg"], columns["A_rotation_deg"] = b_rot, rotation[:m]
            self.cum_rotation = self.cum_rotation + np.where(b_rot == b_rot, b_rot, 0.0)  # NaN: no rotation
        columns["B_rotation_cum_deg"] = self.cum_rotation
        lags = [j for j in sorted({1, *self.k_values}) if j <= held]
        ub = unit[m:, : self._ring.shape[2]]
        for j, slot in zip(lags, self._slots(lags)):  # cos(b[s - j], b[s]); ring rows are views, not copies
            norm = self._ring_norm[slot]
            columns[f"B_cos_lag{j}"] = np.clip(_dot(self._ring[slot], ub) / np.where(norm > 0, norm, 1.0), -1.0, 1.0)
        out = PointMetrics(self._named(columns), {})
        for k in self.k_values:  # the point k back is now a centre i: cos(v[i-k] - v[i], v[i+k] - v[i])
            if 2 * k <= held:
                before, centre, now = (self._ring[slot] for slot in self._slots([2 * k, k, 0]))
                arms, _ = _unit(np.stack([before - centre, now - centre]))
                cos = np.clip(_dot(arms[0], arms[1]), -1.0, 1.0)
                out.lagged.setdefault(self.steps[-1 - k], {}).update(self._named({f"B_local_cos_k{k}": cos}))
        for name, (_, b) in zip(self.names, pairs):
            if name not in self.detectors:
                self.detectors[name] = TransitionDetector(**self.detector_args)
            event = self.detectors[name].update(step, torch.from_numpy(b))
            if event is not None:
                out.events.append((name, event))
        self.last_now = dict(out.now)
        return out

    def _named(self, columns: dict[str, np.ndarray]) -> dict[str, float]:
        """{module/metric: value} of per-module columns, NaN left out."""
        out = {}
        for metric, values in columns.items():
            for name, value in zip(self.names, values.tolist()):
                if value == value:
                    out[f"{name}/{metric}"] = value
        return out

    # -- state: per-module float32 tensors, the format of the checkpoints written before the fast path --------
    def _per_module(self, rows: np.ndarray, side: int) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(rows[i, : self._sizes[n][side]].copy()).float() for i, n in enumerate(self.names)}

    def state_dict(self) -> dict:
        # float32 halves the checkpoint and is exact: the vectors come from float32 (or narrower) weights.
        held = list(reversed(range(len(self.steps))))  # oldest first
        return {
            "window": [(s, self._per_module(self._ring[slot], 1)) for s, slot in zip(self.steps, self._slots(held))],
            "last_a": self._per_module(self._last_a, 0) if self._last_a is not None else {},
            "cum_rotation": dict(zip(self.names, self.cum_rotation.tolist())),
            "detectors": {n: d.state_dict() for n, d in self.detectors.items()},
            "last_now": dict(self.last_now),
        }

    def load_state_dict(self, state: dict) -> None:
        self._clear()
        window = state["window"][-self.size :]
        if window:
            self.names = tuple(window[-1][1])
            last_a = {n: _f64(v) for n, v in state["last_a"].items()}
            for step, vectors in window:
                b = {n: _f64(v) for n, v in vectors.items()}
                self._sizes = {n: (last_a[n].size, b[n].size) for n in self.names}
                self._add(int(step), [last_a[n] for n in self.names], [b[n] for n in self.names])
        self.cum_rotation = np.array([state["cum_rotation"].get(n, 0.0) for n in self.names], dtype=np.float64)
        # Checkpoints written before the phase library returned plain names hold "phase/<module>/..." here.
        self.last_now = {k.removeprefix("phase/"): v for k, v in state.get("last_now", {}).items()}
        for name, det_state in state["detectors"].items():
            self.detectors[name] = TransitionDetector(**self.detector_args)
            self.detectors[name].load_state_dict(det_state)
