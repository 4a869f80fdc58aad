"""Export a run's recorded LoRA B trajectory as compact test data (tests/data/trajectories/*.npz).

    python scripts/record_real_trajectory.py RUN_DIR OUT.npz [--module NAME] [--note "how it was made"]

The file holds the B path of one module as its increments, each row scaled to int8 (``q``, int8 (n-1, d))
with one float32 scale per row (``scale``): b[0] = 0 (a LoRA B starts at zero; checked) and
b[i] = sum_{j<i} q[j] * scale[j]. That is 1 byte per value instead of 4, and its error is tiny against the
path's own motion: each step is kept to 1/254 of its largest entry (an error of ~0.5% of the step norm,
independent from step to step), whatever the step size, so the last steps of a linear LR decay (100x smaller
than the first) keep their precision, which float16 values of b would not. The script prints the largest
difference in local cosine (k = 5, 8, 15) and in detector events between the exact and the stored path.
Also stored: ``steps`` (int32), ``module``, ``note`` and the trajectory's meta.json (``meta``, JSON).

``load_trajectory(path)`` returns (steps, b) as numpy (int64, float64 (n, d)).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from em_lightning.phase import detect_transitions, local_cosine_similarity
from em_lightning.phase.store import read_trajectory


def encode(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 increments, float32 row scales) of an (n, d) path that starts at zero."""
    if np.any(b[0] != 0):
        raise ValueError("the path does not start at zero (a LoRA B does): cannot store it as increments")
    q, scale, at = [], [], np.zeros(b.shape[1])
    for row in b[1:].astype(np.float64):
        step = row - at  # increment from the *reconstructed* point: errors do not accumulate
        s = np.float32(np.abs(step).max() / 127.0)
        qi = np.clip(np.rint(step / s), -127, 127).astype(np.int8) if s > 0 else np.zeros(b.shape[1], np.int8)
        q.append(qi)
        scale.append(s)
        at = at + qi.astype(np.float64) * np.float64(s)
    return np.stack(q), np.asarray(scale, dtype=np.float32)


def decode(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    steps = q.astype(np.float64) * scale.astype(np.float64)[:, None]
    return np.concatenate([np.zeros((1, q.shape[1])), np.cumsum(steps, axis=0)])


def load_trajectory(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["steps"].astype(np.int64), decode(f["q"], f["scale"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--module", default=None, help="module name (default: the only one)")
    parser.add_argument("--note", default="", help="how the run was made (stored in the file)")
    args = parser.parse_args(argv)
    traj = read_trajectory(args.run_dir)
    names = sorted(traj.b)
    module = args.module or (names[0] if len(names) == 1 else None)
    if module not in traj.b:
        raise SystemExit(f"choose --module among {names}")
    exact = traj.b[module].double().numpy()
    q, scale = encode(exact)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, q=q, scale=scale, steps=traj.steps.numpy().astype(np.int32), module=module,
                        note=args.note, meta=json.dumps(traj.meta, sort_keys=True))
    steps, stored = load_trajectory(args.out)
    print(f"{args.out}: {len(steps)} points x {exact.shape[1]}, {args.out.stat().st_size / 1024:.0f} KB")
    for k in (5, 8, 15):
        a = local_cosine_similarity(torch.from_numpy(exact), k)
        b = local_cosine_similarity(torch.from_numpy(stored), k)
        print(f"  local cosine k={k}: max |exact - stored| = {float(np.nanmax(np.abs((a - b).numpy()))):.2e}")
    events = [detect_transitions(torch.from_numpy(p), steps.tolist()) for p in (exact, stored)]
    print(f"  detector events exact {[e.step for e in events[0]]}, stored {[e.step for e in events[1]]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
