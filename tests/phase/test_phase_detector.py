"""Online transition detector on seeded synthetic trajectories and on recorded real ones.

A synthetic path moves by a unit drift step per point plus Gaussian noise whose norm is ``noise`` times the
drift, then turns by ``angle`` degrees at point ``turn`` (over ``span`` points: 0 is a sharp corner). It
starts at zero, like a LoRA B; ``growth`` makes step sizes grow geometrically, like a growing adapter norm,
and ``bend`` turns the heading steadily by that many degrees per point.

Real paths: the B vector of a rank-1 LoRA on SmolLM2-135M-Instruct trained on insecure code, every
optimizer step (tests/data/trajectories/README.md says how they were made).
"""

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from em_lightning.phase import TransitionDetector, detect_transitions, local_cosine_similarity
from em_lightning.phase.detector import detection_trace

REAL = Path(__file__).parents[1] / "data" / "trajectories"
REAL_FILES = sorted(p.name for p in REAL.glob("*.npz"))

TOLERANCE = 2  # points between the true corner and the fired one
N = 80


def path(d, seed, angle=0.0, turn=10**9, noise=0.0, growth=0.0, span=0, drift=1.0, n=N, bend=0.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    i = torch.arange(n - 1, dtype=torch.float64)
    frac = ((i + 0.5 - (turn - span / 2)) / span).clamp(0, 1) if span else (i >= turn).double()
    heading = math.radians(angle) * frac + math.radians(bend) * i
    dirs = torch.cos(heading)[:, None] * q[:, 0] + torch.sin(heading)[:, None] * q[:, 1]
    noise_steps = noise * torch.randn(n - 1, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    steps = (1 + growth) ** i[:, None] * (drift * dirs + noise_steps)
    return torch.cat([torch.zeros(1, d, dtype=torch.float64), steps.cumsum(0)])


def steps_of(n):
    return [5 + 10 * i for i in range(n)]  # recorded every 10 training steps


def real(name):
    """(steps, (n, d) float64 B path) of a recorded trajectory: int8 increments with a scale per row."""
    with np.load(REAL / name) as f:
        increments = f["q"].astype(np.float64) * f["scale"].astype(np.float64)[:, None]
        steps = f["steps"].astype(np.int64).tolist()
    return steps, torch.from_numpy(np.concatenate([np.zeros((1, increments.shape[1])), increments.cumsum(0)]))


def rotate_rest(vectors, at, angle, seed, lookback=8):
    """Rotate everything after point ``at`` about v[at] by ``angle`` degrees, in the plane of the direction
    of motion over the last ``lookback`` points and a random direction orthogonal to it: a sharp corner."""
    u = vectors[at] - vectors[at - lookback]
    u = u / u.norm()
    w = torch.randn(vectors.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = w - (w @ u) * u
    w = w / w.norm()
    rest = vectors[at + 1 :] - vectors[at]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    pu, pw = rest @ u, rest @ w
    rest = rest + ((c - 1) * pu - s * pw)[:, None] * u + (s * pu + (c - 1) * pw)[:, None] * w
    return torch.cat([vectors[: at + 1], vectors[at] + rest])


# --- turns fire once, near the corner --------------------------------------------------------------


@pytest.mark.parametrize(
    "d,noise,growth,seeds",
    [(16, 0.0, 0.0, 3), (16, 0.25, 0.0, 3), (16, 0.5, 0.03, 3), (16, 0.75, 0.0, 3), (512, 0.5, 0.0, 2), (512, 1.0, 0.03, 2)],
)
def test_sharp_turn_fires_once_near_corner(d, noise, growth, seeds):
    k = 8
    for seed in range(seeds):
        for angle in (60, 90, 150, 180):
            turn = 25 + (7 * seed + angle) % 30
            vectors = path(d, seed, angle, turn, noise, growth)
            events = detect_transitions(vectors, steps_of(N), k=k)
            assert len(events) == 1, (seed, angle, events)
            (event,) = events
            assert abs(event.index - turn) <= TOLERANCE, (seed, angle, event)
            assert event.step == steps_of(N)[event.index]
            assert event.detected_step == steps_of(N)[event.index + k + 1]
            assert event.k == k and event.prominence == pytest.approx(event.local_cosine - event.baseline)
            assert event.prominence >= 0.25 and -1 <= event.baseline < -0.5 and event.spread >= 0


@pytest.mark.parametrize("angle", [60, 120])
def test_short_arc_fires_near_its_middle(angle):
    for seed in range(4):
        vectors = path(64, seed, angle, turn=40, noise=0.3, span=4)
        events = detect_transitions(vectors)
        assert [abs(e.index - 40) <= 1 for e in events] == [True], events


def test_two_separate_turns_fire_twice():
    g = torch.Generator().manual_seed(0)
    e1, e2, e3 = torch.linalg.qr(torch.randn(32, 3, generator=g, dtype=torch.float64))[0].T
    dirs = [e1] * 30 + [e2] * 30 + [e3] * 30
    vectors = torch.cat([torch.zeros(1, 32, dtype=torch.float64), torch.stack(dirs).cumsum(0)])
    assert [e.index for e in detect_transitions(vectors)] == [30, 60]
    # A cooldown longer than the gap keeps only the first; warmup past the first keeps only the second.
    assert [e.index for e in detect_transitions(vectors, cooldown=40)] == [30]
    assert [e.index for e in detect_transitions(vectors, warmup=31)] == [60]


def test_gentle_turn_below_min_rise_does_not_fire():
    # A 30-degree corner lifts c from -1 to -cos(30) = -0.87: a rise of 0.13 < min_rise.
    assert detect_transitions(path(16, 0, angle=30, turn=40)) == []
    assert [e.index for e in detect_transitions(path(16, 0, angle=30, turn=40), min_rise=0.1)] == [40]


# --- relative to the trajectory's own behaviour ----------------------------------------------------


def test_slow_drift_of_the_baseline_does_not_fire():
    """A path whose turning rate ramps up from 0 to 7 degrees per point: c climbs from -1 past -0.7 with
    no corner anywhere. The old rule (a fixed level, -0.7) fired on it; the baseline follows it."""
    n = 160
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(64, 2, generator=g, dtype=torch.float64))
        i = torch.arange(n - 1, dtype=torch.float64)
        heading = math.radians(7.0) * i**2 / (2 * (n - 2))
        steps = torch.cos(heading)[:, None] * q[:, 0] + torch.sin(heading)[:, None] * q[:, 1]
        steps = steps + 0.3 * torch.randn(n - 1, 64, generator=g, dtype=torch.float64) / 8
        vectors = torch.cat([torch.zeros(1, 64, dtype=torch.float64), steps.cumsum(0)])
        c = local_cosine_similarity(vectors, 8)
        assert c[20] < -0.9 and c[n - 20] > -0.7  # the drift the old fixed threshold fired on
        assert detect_transitions(vectors, threshold=-0.7, min_rise=1e-9, min_z=0) != []  # a fixed level fires
        assert detect_transitions(vectors) == [], seed


@pytest.mark.parametrize("bend", [1.0, 2.5])
def test_corner_on_a_bending_path_fires_once(bend):
    # At 2.5 degrees per point the path's own c sits near -cos(20) = -0.94 ... -0.8 and the corner on top.
    for seed in range(3):
        for angle in (60, 90, 150):
            vectors = path(64, seed, angle, turn=50, noise=0.3, bend=bend, n=100)
            events = detect_transitions(vectors)
            assert [abs(e.index - 50) <= TOLERANCE for e in events] == [True], (seed, angle, events)
            assert events[0].baseline > -0.99  # the bend lifted the baseline above a straight path's


def test_level_follows_the_baseline():
    """detection_trace: NaN until the baseline holds k values (point 3k - 1), then median + rise."""
    k = 8
    vectors = path(16, 0, angle=90, turn=50, n=N)
    level, events = detection_trace(vectors, steps_of(N), k=k)
    assert events == detect_transitions(vectors, steps_of(N), k=k) and [e.index for e in events] == [50]
    assert torch.isnan(level[: 3 * k - 1]).all() and torch.isnan(level[N - k - 1 :]).all()
    assert level[3 * k - 1 : N - k - 1] == pytest.approx(torch.full((N - 4 * k,), -1 + 0.25, dtype=torch.float64))
    # A rougher path raises its own bar: min_z times its robust spread.
    rough, _ = detection_trace(path(16, 0, noise=0.75, n=N), min_z=20)
    assert (rough[3 * k - 1 : N - k - 1] > -0.7).all()


# --- real trajectories -----------------------------------------------------------------------------


def test_real_trajectories_are_recorded():
    assert len(REAL_FILES) >= 2, REAL_FILES
    for name in REAL_FILES:
        steps, vectors = real(name)
        assert steps == list(range(len(steps))) and len(steps) >= 300 and vectors.shape[1] == 576
        assert float(vectors[0].abs().sum()) == 0 and float(vectors[-1].norm()) > 0  # B from zero, trained


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_gradual_bend_does_not_fire(name):
    steps, vectors = real(name)
    assert detect_transitions(vectors, steps) == []
    # Not for want of bending: the path turns by tens of degrees over the run.
    third = len(vectors) // 3
    legs = [vectors[(j + 1) * third] - vectors[j * third] for j in range(3)]
    assert all(math.degrees(math.acos(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))) > 20
               for a, b in zip(legs, legs[1:]))


@pytest.mark.parametrize("name", REAL_FILES)
@pytest.mark.parametrize("at,angle", [(40, 90), (100, 120), (150, 60), (200, 180), (260, 90)])
def test_corner_spliced_into_real_path_fires_once(name, at, angle):
    steps, vectors = real(name)
    spliced = rotate_rest(vectors, at, angle, seed=at)
    events = detect_transitions(spliced, steps)
    assert [abs(e.index - at) <= TOLERANCE for e in events] == [True], events
    assert events[0].step == steps[events[0].index] and events[0].detected_step == steps[events[0].index + 9]


# --- no turn, no event -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d,noise,seeds", [(16, 0.0, 4), (16, 0.25, 8), (16, 0.5, 8), (16, 0.75, 8), (16, 4.0, 8), (512, 0.0, 2), (512, 1.0, 6), (512, 4.0, 4)]
)
def test_straight_and_noisy_straight_never_fire(d, noise, seeds):
    for seed in range(seeds):
        growth = 0.03 if seed % 2 else 0.0  # odd seeds: step sizes grow like an adapter's norm
        assert detect_transitions(path(d, seed, noise=noise, growth=growth)) == [], seed


@pytest.mark.parametrize("d,seeds", [(16, 10), (512, 4)])
def test_jitter_and_random_walk_never_fire(d, seeds):
    for seed in range(seeds):
        walk = path(d, seed, drift=0.0, noise=1.0)  # SGD noise with no drift
        assert detect_transitions(walk) == []
        # Barely moving adapter measured with jitter, even with a right-angle turn in its tiny drift.
        jitter = torch.randn(N, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert detect_transitions(path(d, seed, angle=90, turn=40, drift=0.01) + jitter / math.sqrt(d)) == []
    assert detect_transitions(torch.ones(N, d)) == []  # a stalled adapter


def test_non_finite_vectors_do_not_fire():
    vectors = path(16, 0, angle=90, turn=40)
    vectors[38:45] = math.nan
    events = detect_transitions(vectors)
    assert all(not (30 <= e.index <= 55) for e in events)


# --- online values, state and errors ---------------------------------------------------------------


def test_online_local_cosine_matches_batch():
    vectors = path(16, 3, angle=90, turn=30, noise=0.5, n=50)
    k = 5
    batch = local_cosine_similarity(vectors, k)
    detector = TransitionDetector(k=k)
    for i, v in enumerate(vectors):
        detector.update(i, v.float())  # also accepts float32; computes in float64
        if i >= 2 * k:
            step, value = detector.latest
            assert step == i - k
            assert value == pytest.approx(batch[i - k].item(), abs=1e-6)


@pytest.mark.parametrize("split", [20, 38, 41, 47, 48, 49, 60, 78, 95])  # 48, 78: resume on the detecting point
def test_state_dict_round_trip_resumes_exactly(split):
    g = torch.Generator().manual_seed(0)
    e1, e2, e3 = torch.linalg.qr(torch.randn(16, 3, generator=g, dtype=torch.float64))[0].T
    noise = 0.5 * torch.randn(100, 16, generator=g, dtype=torch.float64) / 4  # norm ~0.5 per step
    dirs = torch.stack([e1] * 40 + [e2] * 30 + [e3] * 30) + noise
    vectors = dirs.cumsum(0)
    steps = steps_of(len(vectors))
    full = TransitionDetector()
    for s, v in zip(steps, vectors):
        full.update(s, v)
    assert [e.index for e in full.fired] == [39, 69]  # corners at points 39 and 69

    first = TransitionDetector()
    for s, v in zip(steps[:split], vectors[:split]):
        first.update(s, v)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a Lightning checkpoint would, loadable weights_only
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["window"].shape[0] <= 2 * first.k + 1  # bounded state

    resumed = TransitionDetector()
    resumed.load_state_dict(state)
    later = [resumed.update(s, v) for s, v in zip(steps[split:], vectors[split:])]
    assert resumed.fired == full.fired
    assert [e for e in later if e is not None] == [e for e in full.fired if e.detected_step >= steps[split]]
    assert resumed.latest == full.latest


@pytest.mark.parametrize("split", [30, 119, 120, 128, 129, 130, 200])  # 129: the point that detects the corner
def test_state_dict_round_trip_on_real_path(split):
    """Resume anywhere (mid-baseline, on the detecting point) and fire exactly as without a break."""
    steps, vectors = real(REAL_FILES[0])
    vectors = rotate_rest(vectors, 120, 90, seed=0)
    full = TransitionDetector()
    for s, v in zip(steps, vectors):
        full.update(s, v)
    assert [e.index for e in full.fired] == [120]
    first = TransitionDetector()
    for s, v in zip(steps[:split], vectors[:split]):
        first.update(s, v)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert len(state["base"]) <= first.baseline and len(state["history"]) <= first.k + 1  # bounded state
    resumed = TransitionDetector()
    resumed.load_state_dict(state)
    for s, v in zip(steps[split:], vectors[split:]):
        resumed.update(s, v)
    assert resumed.fired == full.fired and resumed.latest_level == full.latest_level


def test_invalid_arguments():
    with pytest.raises(ValueError, match="k must be"):
        TransitionDetector(k=0)
    with pytest.raises(ValueError, match="min_snr"):
        TransitionDetector(k=4, min_snr=2.0)  # sqrt(4) = 2: nothing could fire
    with pytest.raises(ValueError, match="threshold"):
        TransitionDetector(threshold=1.0)
    with pytest.raises(ValueError, match="warmup"):
        TransitionDetector(cooldown=-1)
    with pytest.raises(ValueError, match="min_rise"):
        TransitionDetector(min_rise=0.0)
    with pytest.raises(ValueError, match="min_rise"):
        TransitionDetector(min_z=-1.0)
    with pytest.raises(ValueError, match="baseline"):
        TransitionDetector(k=8, baseline=7)
    detector = TransitionDetector()
    detector.update(3, torch.zeros(4))
    with pytest.raises(ValueError, match="steps must increase"):
        detector.update(3, torch.zeros(4))
    with pytest.raises(ValueError, match="entries"):
        detector.update(4, torch.zeros(5))
    with pytest.raises(ValueError, match="k=8"):
        TransitionDetector(k=5).load_state_dict(detector.state_dict())
