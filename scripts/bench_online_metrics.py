"""Per-point cost of the live trajectory metrics (em_lightning.phase.online.OnlineTrajectory.update: norms,
rotations, lagged cosines, local cosines at k = 5, 10, 15, one detector per module) for several adapter
shapes, against the former code: phase/online.py, rotation.py and detector.py as they were at commit
``--former`` (default 11e6bee~1, before "one rotation.py call per metric for all modules"), read with
``git show`` into a temporary package. Both run on the same points in lockstep (their order alternating
point by point, so drifting load hits both alike), their outputs are checked equal, one thread. Times are CPU
seconds of this process (what the work costs; a shared machine's other load inflates wall time, printed too).

    python scripts/bench_online_metrics.py [--points 60] [--former 11e6bee~1]

Last line: ``ratio: X.XXx`` = former / current CPU time per point, for the largest shape (196 modules x 3584:
rank-32 all-linear on a 7B model's B directions).
"""

from __future__ import annotations

import argparse
import importlib
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from em_lightning.phase.online import OnlineTrajectory

REPO = Path(__file__).resolve().parents[1]
SHAPES = ((1, 896), (9, 5120), (196, 3584))  # (modules, vector size)
FILES = ("online.py", "rotation.py", "detector.py")


def former_online(commit: str, folder: Path):
    """The former phase/online.py (with the rotation.py and detector.py of that commit) as a module."""
    package = folder / "former_phase"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in FILES:
        text = subprocess.run(["git", "show", f"{commit}:em_lightning/phase/{name}"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
        (package / name).write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("former_phase.online")


def same(a, b) -> bool:
    """Equal metrics to float rounding (the former code computed per module, the current one stacked). Names
    are compared without the ``phase/`` root, which the former code added itself."""
    def close(x, y):
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)

    a, b = _plain(a), _plain(b)

    return (a.now.keys() == b.now.keys() and all(close(a.now[k], b.now[k]) for k in a.now)
            and a.lagged.keys() == b.lagged.keys()
            and all(a.lagged[s].keys() == b.lagged[s].keys() and all(close(a.lagged[s][k], b.lagged[s][k])
                                                                      for k in a.lagged[s]) for s in a.lagged)
            and [(n, e.step) for n, e in a.events] == [(n, e.step) for n, e in b.events])


def _plain(point):
    def names(values: dict) -> dict:
        return {k.removeprefix("phase/"): v for k, v in values.items()}

    return SimpleNamespace(now=names(point.now), lagged={s: names(v) for s, v in point.lagged.items()},
                           events=point.events)


def time_per_point(former_cls, modules: int, size: int, points: int) -> dict[str, tuple[float, float]]:
    """{side: (CPU, wall) seconds per point} once the window is full, the two sides updated in lockstep."""
    g = torch.Generator().manual_seed(0)
    series = [{f"m{i}": (torch.randn(size, generator=g), torch.randn(size, generator=g)) for i in range(modules)}
              for _ in range(points)]
    sides = {"current": OnlineTrajectory((5, 10, 15), {}), "former": former_cls((5, 10, 15), {})}
    elapsed = {"current": [0.0, 0.0], "former": [0.0, 0.0]}
    for step, vectors in enumerate(series):
        order = ("current", "former") if step % 2 == 0 else ("former", "current")
        out = {}
        for side in order:
            cpu, wall = time.process_time(), time.perf_counter()
            out[side] = sides[side].update(step, vectors)
            if step >= points // 2:  # a full window
                elapsed[side][0] += time.process_time() - cpu
                elapsed[side][1] += time.perf_counter() - wall
        if not same(out["current"], out["former"]):
            raise SystemExit(f"step {step}: the former and current metrics differ; nothing to compare")
    n = points - points // 2
    return {side: (c / n, w / n) for side, (c, w) in elapsed.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=60)
    p.add_argument("--former", default="11e6bee~1", help="git commit whose phase/ code is the former side")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        former = former_online(args.former, Path(tmp))
        print(f"current: phase/online.py of the working tree; former: {args.former} "
              f"({subprocess.run(['git', 'rev-parse', '--short', args.former], cwd=REPO, capture_output=True, text=True).stdout.strip()}); "
              f"one thread, {args.points} points, timed over the last {args.points - args.points // 2}")
        for modules, size in SHAPES:
            t = time_per_point(former.OnlineTrajectory, modules, size, args.points)
            (now, now_wall), (before, before_wall) = t["current"], t["former"]
            print(f"{modules:4d} modules x {size}: {now * 1e3:7.2f} ms CPU per point (former {before * 1e3:7.2f} ms); "
                  f"wall {now_wall * 1e3:.2f} ms (former {before_wall * 1e3:.2f} ms)")
    print(f"ratio: {before / now:.2f}x")


if __name__ == "__main__":
    main()
