"""The live trajectory metrics (phase/online.py, and the row-wise arms of phase/rotation.py), point by
point against the textbook formulas in numpy, per module: norms, rotation to the previous point and its
running sum, cosine to lag j, and the local cosine cos(v[i-k] - v[i], v[i+k] - v[i]) reported for centre i
once v[i+k] arrives; and online.py's numpy fast path against rotation.py's torch trajectory functions (the
computation it replaced). Names are plain (``<module>/<metric>``): AdapterTrajectory adds ``phase/``.
A fast guard beside the end-to-end callback test."""

import math

import numpy as np
import pytest
import torch

from em_lightning.phase.online import OnlineTrajectory
from em_lightning.phase.rotation import (
    cosine_to_lag,
    cumulative_rotation_degrees,
    local_cosine_similarity,
    norms,
    pairwise_cosine,
    pairwise_rotation_degrees,
    rotation_degrees,
)

K_VALUES = (2, 3)
SIZES = {"m.a": (5, 4), "m.b": (7, 6), "m.c": (3, 9)}  # modules of different widths: one padded stack


def cos(u, v):
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    return 0.0 if nu == 0 or nv == 0 else float(np.clip(u @ v / (nu * nv), -1, 1))


def degrees(u, v):
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    return math.nan if nu == 0 or nv == 0 else math.degrees(math.acos(float(np.clip(u @ v / (nu * nv), -1, 1))))


def trajectory(points=16, seed=0):
    """{module: (A rows, B rows)} as numpy float64; B starts at zero (LoRA init) and stands still once."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (d_in, d_out) in SIZES.items():
        a = rng.standard_normal((points, d_in))
        b = np.cumsum(rng.standard_normal((points, d_out)), axis=0)
        b[0] = 0.0
        b[6] = b[5]  # a zero step: rotation 0, and the local cosine at centre 5 or 6 has a zero arm
        out[name] = (a, b)
    return out


def expected_point(traj, steps, s):
    """The tags point s reports now and the (centre step, tags) it completes, from the formulas."""
    now, lagged = {}, {}
    for name, (a, b) in traj.items():
        tag = f"{name}/"
        now[tag + "A_norm"], now[tag + "B_norm"] = float(np.linalg.norm(a[s])), float(np.linalg.norm(b[s]))
        cum = sum(0.0 if math.isnan(r) else r for r in (degrees(b[i - 1], b[i]) for i in range(1, s + 1)))
        now[tag + "B_rotation_cum_deg"] = cum
        if s >= 1:
            for key, value in ((tag + "B_rotation_deg", degrees(b[s - 1], b[s])),
                               (tag + "A_rotation_deg", degrees(a[s - 1], a[s]))):
                if not math.isnan(value):
                    now[key] = value
        for j in sorted({1, *K_VALUES}):
            if s >= j:
                now[tag + f"B_cos_lag{j}"] = cos(b[s - j], b[s])
        for k in K_VALUES:
            if s >= 2 * k:
                centre = s - k
                lagged.setdefault(steps[centre], {})[tag + f"B_local_cos_k{k}"] = cos(b[centre - k] - b[centre],
                                                                                    b[s] - b[centre])
    return now, lagged


def feed(online, traj, steps, points):
    for s in points:
        vectors = {n: (torch.from_numpy(a[s]).float(), torch.from_numpy(b[s]).float()) for n, (a, b) in traj.items()}
        yield s, online.update(steps[s], vectors)


def float32(traj):
    """The values the metrics see: vectors pass through float32 (the adapter weights' dtype)."""
    return {n: (a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64))
            for n, (a, b) in traj.items()}


def test_every_metric_of_every_point_is_the_formula():
    traj = trajectory()
    steps = [10 * s + 3 for s in range(16)]  # steps are not indices: the lagged tags name the centre's step
    seen = float32(traj)
    online = OnlineTrajectory(K_VALUES, {"k": 3, "min_snr": 1.0})
    local = 0
    for s, point in feed(online, traj, steps, range(16)):
        now, lagged = expected_point(seen, steps, s)
        assert point.now.keys() == now.keys(), s
        for key, value in now.items():
            assert point.now[key] == pytest.approx(value, rel=1e-9, abs=1e-6), (s, key)
        assert point.lagged.keys() == lagged.keys(), s
        for centre, tags in lagged.items():
            assert point.lagged[centre].keys() == tags.keys()
            for key, value in tags.items():
                assert point.lagged[centre][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (s, centre, key)
                local += 1
    assert local == sum(16 - 2 * k for k in K_VALUES) * len(SIZES)  # every centre once, none twice


def test_zero_vectors_follow_the_contract():
    online = OnlineTrajectory((1,), {})
    b0, b1, b2 = torch.zeros(4), torch.tensor([1.0, 0, 0, 0]), torch.tensor([1.0, 0, 0, 0])
    first = online.update(0, {"m": (torch.ones(2), b0)})
    assert first.now == {"m/A_norm": pytest.approx(math.sqrt(2)), "m/B_norm": 0.0,
                         "m/B_rotation_cum_deg": 0.0}
    second = online.update(1, {"m": (torch.ones(2), b1)})
    assert "m/B_rotation_deg" not in second.now  # from a zero vector: no direction, no angle (not 90)
    assert second.now["m/B_cos_lag1"] == 0.0 and second.now["m/A_rotation_deg"] == 0.0
    third = online.update(2, {"m": (torch.ones(2), b2)})  # arm v[2] - v[1] is zero: local cosine 0
    assert third.lagged == {1: {"m/B_local_cos_k1": 0.0}}
    fourth = online.update(3, {"m": (torch.ones(2), torch.tensor([1.0, 1.0, 0, 0]))})  # a right-angle corner at 2
    assert fourth.lagged[2]["m/B_local_cos_k1"] == pytest.approx(0.0, abs=1e-12)
    assert fourth.now["m/B_rotation_deg"] == pytest.approx(45.0)
    fifth = online.update(4, {"m": (torch.ones(2), torch.tensor([1.0, 2.0, 0, 0]))})  # straight on: -1
    assert fifth.lagged[3]["m/B_local_cos_k1"] == pytest.approx(-1.0)
    assert fifth.now["m/B_rotation_cum_deg"] == pytest.approx(45.0 + math.degrees(math.atan(2) - math.atan(1)))


def test_resume_from_state_continues_exactly():
    traj = trajectory(seed=1)
    steps = list(range(16))
    whole = OnlineTrajectory(K_VALUES, {"k": 3, "min_snr": 1.0})
    reference = [p for _, p in feed(whole, traj, steps, range(16))]
    first = OnlineTrajectory(K_VALUES, {"k": 3, "min_snr": 1.0})
    list(feed(first, traj, steps, range(9)))
    resumed = OnlineTrajectory(K_VALUES, {"k": 3, "min_snr": 1.0})
    resumed.load_state_dict(first.state_dict())
    for (s, point), want in zip(feed(resumed, traj, steps, range(9, 16)), reference[9:]):
        assert point.now == want.now and point.lagged == want.lagged and point.events == want.events, s


def test_rowwise_arms_are_the_formulas():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    a[1] = 0.0
    b[2] = 0.0
    b[3] = -a[3]  # a half turn
    b[4] = a[4] * 1e-30  # the same direction, tiny: no underflow to a zero vector
    got_cos = pairwise_cosine(torch.from_numpy(a), torch.from_numpy(b))
    got_deg = pairwise_rotation_degrees(torch.from_numpy(a), torch.from_numpy(b))
    assert got_cos.dtype == got_deg.dtype == torch.float64
    for i in range(6):
        assert float(got_cos[i]) == pytest.approx(cos(a[i], b[i]), abs=1e-12), i
        want = degrees(a[i], b[i])
        if math.isnan(want):
            assert math.isnan(float(got_deg[i])), i
        else:
            assert float(got_deg[i]) == pytest.approx(want, abs=1e-6), i
    assert float(got_deg[3]) == 180.0 and float(got_deg[4]) < 1e-12 and float(got_cos[4]) == pytest.approx(1.0)


def test_fast_path_equals_the_torch_reference():
    """online.py's numpy path gives what rotation.py's torch functions give on the whole trajectory so far, to
    float64 rounding: vectors fed as float64 (no float32 rounding to hide behind), modules of different widths,
    a zero B, a standstill, a half turn and a vector 1e-30 times its predecessor."""
    traj = trajectory(points=24, seed=3)
    for _, b in traj.values():
        b[9] = -b[8]  # a half turn: 180 degrees, cosine -1
        b[13] = b[12] * 1e-30  # the same direction, tiny
    online = OnlineTrajectory(K_VALUES, {"k": 3, "min_snr": 1.0})
    lagged_seen = 0
    for s in range(24):
        vectors = {n: (torch.from_numpy(a[s]), torch.from_numpy(b[s])) for n, (a, b) in traj.items()}
        point = online.update(s, vectors)
        for name, (a, b) in traj.items():
            a_t, b_t = torch.from_numpy(a[: s + 1]), torch.from_numpy(b[: s + 1])
            want = {"A_norm": norms(a_t)[s], "B_norm": norms(b_t)[s], "A_rotation_deg": rotation_degrees(a_t)[s],
                    "B_rotation_deg": rotation_degrees(b_t)[s],
                    "B_rotation_cum_deg": cumulative_rotation_degrees(b_t)[s],
                    **{f"B_cos_lag{j}": cosine_to_lag(b_t, j)[s] for j in sorted({1, *K_VALUES})}}
            for metric, value in want.items():
                key = f"{name}/{metric}"
                if math.isnan(float(value)):
                    assert key not in point.now, (s, key)
                else:
                    assert point.now[key] == pytest.approx(float(value), rel=1e-12, abs=1e-12), (s, key)
            for k in K_VALUES:
                if s >= 2 * k:
                    got = point.lagged[s - k][f"{name}/B_local_cos_k{k}"]
                    assert got == pytest.approx(float(local_cosine_similarity(b_t, k)[s - k]), abs=1e-12), (s, k)
                    lagged_seen += 1
    assert lagged_seen == sum(24 - 2 * k for k in K_VALUES) * len(SIZES)


def test_a_point_with_other_modules_is_refused():
    online = OnlineTrajectory((1,), {})
    online.update(0, {"m": (torch.ones(2), torch.ones(3))})
    with pytest.raises(ValueError, match=r"modules \['n'\]; earlier points had \['m'\]"):
        online.update(1, {"n": (torch.ones(2), torch.ones(3))})


def test_state_from_before_plain_names_resumes_with_plain_names():
    online = OnlineTrajectory((1,), {})
    online.update(0, {"m": (torch.ones(2), torch.ones(3))})
    state = online.state_dict()
    state["last_now"] = {f"phase/{k}": v for k, v in state["last_now"].items()}  # as checkpoints held it
    resumed = OnlineTrajectory((1,), {})
    resumed.load_state_dict(state)
    assert resumed.last_now == online.last_now and "m/A_norm" in resumed.last_now
