"""Per-point cost of the live trajectory metrics (em_lightning.phase.online.OnlineTrajectory.update: norms,
rotations, lagged cosines, local cosines at k = 5, 10, 15, one detector per module) for several adapter
shapes, against the former form that called rotation.py once per module and metric. One thread.

    python scripts/bench_online_metrics.py [--points 60]

Last line: ``ratio: X.XXx`` = former / current time per point, for the largest shape (196 modules x 3584:
rank-32 all-linear on a 7B model's B directions).
"""

from __future__ import annotations

import argparse
import time

import torch

from em_lightning.phase.detector import TransitionDetector
from em_lightning.phase.online import OnlineTrajectory, _f64
from em_lightning.phase.rotation import cosine_to_lag, local_cosine_similarity, rotation_degrees

SHAPES = ((1, 896), (9, 5120), (196, 3584))  # (modules, vector size)


def former_metrics(traj: OnlineTrajectory, vectors: dict) -> None:
    """The metrics part as it was: a few torch calls per module and metric (detectors left out)."""
    window = list(traj.window)
    for name, (a, b) in vectors.items():
        a, b = _f64(a), _f64(b)
        float(a.norm()), float(b.norm())
        if len(window) > 1:
            float(rotation_degrees(torch.stack([window[-2][1][name], b]))[1])
        for j in sorted({1, *traj.k_values}):
            if len(window) > j:
                float(cosine_to_lag(torch.stack([window[-1 - j][1][name], b]), 1)[1])
        for k in traj.k_values:
            if len(window) >= 2 * k + 1:
                float(local_cosine_similarity(torch.stack([window[-1 - 2 * k][1][name], window[-1 - k][1][name], b]), 1)[1])


def time_per_point(modules: int, size: int, points: int, former: bool) -> float:
    g = torch.Generator().manual_seed(0)
    traj = OnlineTrajectory((5, 10, 15), {})
    series = [{f"m{i}": (torch.randn(size, generator=g), torch.randn(size, generator=g)) for i in range(modules)}
              for _ in range(points)]
    elapsed = 0.0
    for step, vectors in enumerate(series):
        start = time.perf_counter()
        if former:
            former_metrics(traj, vectors)
            for name, (_, b) in vectors.items():  # the detectors, as both forms run them
                traj.detectors.setdefault(name, TransitionDetector()).update(step, b)
            traj.window.append((step, {n: _f64(b) for n, (_, b) in vectors.items()}))
        else:
            traj.update(step, vectors)
        if step >= points // 2:  # a full window
            elapsed += time.perf_counter() - start
    return elapsed / (points - points // 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=60)
    args = p.parse_args()
    torch.set_num_threads(1)
    for modules, size in SHAPES:
        now = time_per_point(modules, size, args.points, former=False)
        before = time_per_point(modules, size, args.points, former=True)
        print(f"{modules:4d} modules x {size}: {now * 1e3:7.2f} ms per point (former {before * 1e3:7.2f} ms)")
    print(f"ratio: {before / now:.2f}x")


if __name__ == "__main__":
    main()
