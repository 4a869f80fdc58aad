"""Online transition detector on seeded synthetic trajectories.

A path moves by a unit drift step per point plus Gaussian noise whose norm is ``noise`` times the drift,
then turns by ``angle`` degrees at point ``turn`` (over ``span`` points: 0 is a sharp corner). It starts
at zero, like a LoRA B, and ``growth`` makes step sizes grow geometrically, like a growing adapter norm.
"""

import io
import math

import pytest
import torch

from em_lightning.phase import TransitionDetector, detect_transitions, local_cosine_similarity

TOLERANCE = 2  # points between the true corner and the fired one
N = 80


def path(d, seed, angle=0.0, turn=10**9, noise=0.0, growth=0.0, span=0, drift=1.0, n=N):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    i = torch.arange(n - 1, dtype=torch.float64)
    frac = ((i + 0.5 - (turn - span / 2)) / span).clamp(0, 1) if span else (i >= turn).double()
    heading = math.radians(angle) * frac
    dirs = torch.cos(heading)[:, None] * q[:, 0] + torch.sin(heading)[:, None] * q[:, 1]
    noise_steps = noise * torch.randn(n - 1, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    steps = (1 + growth) ** i[:, None] * (drift * dirs + noise_steps)
    return torch.cat([torch.zeros(1, d, dtype=torch.float64), steps.cumsum(0)])


def steps_of(n):
    return [5 + 10 * i for i in range(n)]  # recorded every 10 training steps


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
            assert event.local_cosine > -0.7 and event.k == k


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


def test_gentle_turn_below_threshold_does_not_fire():
    # A 30-degree corner gives c = -cos(30) = -0.87 < -0.7.
    assert detect_transitions(path(16, 0, angle=30, turn=40)) == []


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


def test_invalid_arguments():
    with pytest.raises(ValueError, match="k must be"):
        TransitionDetector(k=0)
    with pytest.raises(ValueError, match="min_snr"):
        TransitionDetector(k=4, min_snr=2.0)  # sqrt(4) = 2: nothing could fire
    with pytest.raises(ValueError, match="threshold"):
        TransitionDetector(threshold=1.0)
    with pytest.raises(ValueError, match="warmup"):
        TransitionDetector(cooldown=-1)
    detector = TransitionDetector()
    detector.update(3, torch.zeros(4))
    with pytest.raises(ValueError, match="steps must increase"):
        detector.update(3, torch.zeros(4))
    with pytest.raises(ValueError, match="entries"):
        detector.update(4, torch.zeros(5))
    with pytest.raises(ValueError, match="k=8"):
        TransitionDetector(k=5).load_state_dict(detector.state_dict())
