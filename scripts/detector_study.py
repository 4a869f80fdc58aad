"""False-alarm and miss rates of the phase-transition detector (em_lightning.phase.TransitionDetector).

Seeded synthetic paths, as in tests/phase/test_phase_detector.py: a unit drift step per point plus Gaussian noise
whose norm is ``noise`` times the drift, starting at zero like a LoRA B. Shapes without a turn (false
alarms): straight; step sizes growing 3% per point; steps decaying linearly to 5% (like the LR); constant
bends of 1, 2 and 5 degrees per point (the real SmolLM2 path turns ~45 degrees per 50 steps, ~1 per point;
at 5, c sits near -cos(40) = -0.77 even without noise); a turning rate that ramps from 0 to 6 degrees per
point (c drifts from -1 to about -0.5); a heading that random-walks by 1 degree per point; plus driftless
random walks and jitter. Sharp corners (misses) of 45-180 degrees in the middle of the straight, decaying,
bending and wandering paths. A corner is *found* when the detector fires exactly once, within 2 points of it.

With ``--real DIR`` it also runs on recorded trajectories (tests/data/trajectories/*.npz, written by
record_real_trajectory.py): events on each real path as recorded, and corners spliced into it at 13 places
(the rest of the path rotated about point s by theta, in the plane of the recent direction of motion and a
random orthogonal direction).

    python scripts/detector_study.py [--seeds 15] [--n 120] [--real tests/data/trajectories] [--set k=8 ...]

Prints one table per study and a final "false alarms: X/Y, misses: X/Y" line.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

from em_lightning.phase import detect_transitions
from record_real_trajectory import load_trajectory  # scripts/ is on sys.path when run as a script

TOLERANCE = 2


def synthetic(d: int, seed: int, n: int = 120, noise: float = 0.0, shape: str = "straight", angle: float = 0.0,
              turn: int | None = None) -> torch.Tensor:
    """(n, d) float64 path from 0: heading shaped by ``shape``, a corner by ``angle`` degrees at ``turn``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=torch.float64))
    i = torch.arange(n - 1, dtype=torch.float64)
    size = torch.ones(n - 1, dtype=torch.float64)
    bend = torch.zeros(n - 1, dtype=torch.float64)  # heading angle in the (q0, q1) plane, radians
    if shape == "growth":
        size = 1.03**i
    elif shape == "decay":
        size = 1 - 0.95 * i / (n - 2)
    elif shape.startswith("bend"):
        bend = math.radians(float(shape[4:])) * i
    elif shape == "ramp":  # turning rate 0 -> 6 degrees per point: c drifts from -1 to about -0.5
        bend = math.radians(6.0) * i**2 / (2 * (n - 2))
    dirs = torch.cos(bend)[:, None] * q[:, 0] + torch.sin(bend)[:, None] * q[:, 1]
    if shape == "wander":  # heading random walk, ~1 degree per point in a random direction
        u, rows = q[:, 0].clone(), []
        for _ in range(n - 1):
            kick = torch.randn(d, generator=g, dtype=torch.float64)
            kick -= (kick @ u) * u
            u = u + math.radians(1.0) * kick / kick.norm()
            u /= u.norm()
            rows.append(u)
        dirs = torch.stack(rows)
    if turn is not None and angle:
        # Rotate the headings after the corner by `angle` in the plane of the heading there and q2.
        h = dirs[turn]
        w = q[:, 2] - (q[:, 2] @ h) * h
        w /= w.norm()
        dirs = dirs.clone()
        dirs[turn:] = rotate(dirs[turn:], h, w, angle)
    noise_steps = noise * torch.randn(n - 1, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    steps = size[:, None] * (dirs + noise_steps)
    return torch.cat([torch.zeros(1, d, dtype=torch.float64), steps.cumsum(0)])


def rotate(x: torch.Tensor, u: torch.Tensor, w: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate the rows of x by ``angle`` degrees in the plane of orthonormal u, w (u toward w)."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    pu, pw = x @ u, x @ w
    return x + ((c - 1) * pu - s * pw)[:, None] * u + (s * pu + (c - 1) * pw)[:, None] * w


def splice_corner(path: torch.Tensor, at: int, angle: float, seed: int, lookback: int = 8) -> torch.Tensor:
    """The path with everything after point ``at`` rotated by ``angle`` about v[at], in the plane of the
    direction of motion over the last ``lookback`` points and a random direction orthogonal to it."""
    path = path.double()
    u = path[at] - path[at - lookback]
    u /= u.norm()
    w = torch.randn(path.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w -= (w @ u) * u
    w /= w.norm()
    out = path.clone()
    out[at + 1 :] = path[at] + rotate(path[at + 1 :] - path[at], u, w, angle)
    return out


def found(events, turn: int) -> bool:
    return len(events) == 1 and abs(events[0].index - turn) <= TOLERANCE


def table(title: str, rows: dict[tuple, list[int]], label: str) -> None:
    print(f"\n{title}")
    for key, (bad, total) in sorted(rows.items(), key=lambda kv: tuple(map(str, kv[0]))):
        print(f"  {' '.join(map(str, key)):<32} {label} {bad:>4}/{total:<4} ({100 * bad / total:5.1f}%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=15)
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--real", type=Path, default=None, help="folder of recorded B trajectories (.npz)")
    parser.add_argument("--set", nargs="*", default=[], help="detector settings, e.g. k=8 min_rise=0.3")
    args = parser.parse_args(argv)
    kwargs = {}
    for item in args.set:
        key, value = item.split("=")
        kwargs[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    k = kwargs.get("k", 8)
    torch.set_num_threads(1)
    fa_total = fa_bad = miss_total = miss_bad = 0

    # False alarms: no turn.
    rows = defaultdict(lambda: [0, 0])
    shapes = ["straight", "growth", "decay", "bend1", "bend2", "bend5", "ramp", "wander"]
    for d in (16, 512):
        for noise in (0.0, 0.25, 0.5, 1.0, 2.0):
            for shape in shapes:
                for seed in range(args.seeds):
                    events = detect_transitions(synthetic(d, seed, args.n, noise, shape), **kwargs)
                    r = rows[("noise<=1" if noise <= 1 else f"noise={noise}", f"d={d}", shape)]
                    r[0] += bool(events)
                    r[1] += 1
        for seed in range(args.seeds * 2):
            g = torch.Generator().manual_seed(10_000 + seed)
            walk = torch.randn(args.n, d, generator=g, dtype=torch.float64).cumsum(0) / math.sqrt(d)
            jitter = synthetic(d, seed, args.n, 0.0, "straight", 90, args.n // 2) * 0.01 + \
                torch.randn(args.n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
            for name, p in (("random walk", walk), ("jitter", jitter)):
                r = rows[("no drift", f"d={d}", name)]
                r[0] += bool(detect_transitions(p, **kwargs))
                r[1] += 1
    table("False alarms (paths with at least one event)", rows, "fired")
    for key, (bad, total) in rows.items():
        if key[0] != "noise=2.0":
            fa_bad, fa_total = fa_bad + bad, fa_total + total

    # Misses: one sharp corner.
    rows = defaultdict(lambda: [0, 0])
    for d in (16, 512):
        for noise in (0.0, 0.25, 0.5, 1.0):
            for shape in ("straight", "decay", "bend1", "wander"):
                for angle in (45, 60, 90, 120, 150, 180):
                    for seed in range(args.seeds // 3 + 1):
                        turn = args.n // 3 + (7 * seed + angle) % (args.n // 3)
                        events = detect_transitions(synthetic(d, seed, args.n, noise, shape, angle, turn), **kwargs)
                        ok = found(events, turn)
                        keys = [(f"{angle:>3} deg", f"noise={noise}"), (f"{angle:>3} deg", "all")]
                        if noise >= 1:
                            keys.append((f"{angle:>3} deg", f"noise={noise}", f"d={d}"))
                        for key in keys:
                            rows[key][0] += not ok
                            rows[key][1] += 1
                        miss_bad, miss_total = miss_bad + (not ok), miss_total + 1
    table("Misses (not exactly one event within 2 points of the corner)", rows, "missed")

    if args.real is not None:
        rows = defaultdict(lambda: [0, 0])
        for f in sorted(args.real.glob("*.npz")):
            _, b = load_trajectory(f)
            path = torch.from_numpy(b)
            events = detect_transitions(path, **kwargs)
            print(f"\n{f.name}: {len(path)} points, events at {[e.index for e in events]}")
            fa_bad, fa_total = fa_bad + bool(events), fa_total + 1
            n = len(path)
            for j, at in enumerate(range(3 * k + 2 * TOLERANCE, n - 2 * k, max(1, (n - 5 * k) // 12))):
                for angle in (45, 60, 90, 120, 150, 180):
                    spliced = splice_corner(path, at, angle, seed=j)
                    ok = found(detect_transitions(spliced, **kwargs), at)
                    rows[(f.stem, f"{angle:>3} deg")][0] += not ok
                    rows[(f.stem, f"{angle:>3} deg")][1] += 1
                    if angle >= 60:
                        miss_bad, miss_total = miss_bad + (not ok), miss_total + 1
        table("Corners spliced into real paths (missed)", rows, "missed")
    print(f"\nfalse alarms: {fa_bad}/{fa_total}, misses: {miss_bad}/{miss_total} (noise <= 1x the drift; real: >= 60 deg)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
