"""phase/store.py: append/read round trip, crash tolerance (torn records), truncate_after, reopen."""

import json

import pytest
import torch

from em_lightning.phase.store import TrajectoryWriter, read_trajectory

MODS = {"model.layers.1.mlp.down_proj": (6, 4), "model.layers.3.mlp.down_proj": (5, 3)}
META = {"rank": 1, "alpha": 8.0, "use_rslora": True, "kind": "vectors", "base": "tiny:qwen2"}


def record(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {n: (torch.randn(d_in, generator=g), torch.randn(d_out, generator=g)) for n, (d_in, d_out) in MODS.items()}


def write(directory, steps, **kw) -> TrajectoryWriter:
    w = TrajectoryWriter(directory, META, **kw)
    for s in steps:
        w.append(s, record(s))
    return w


def check(traj, steps):
    assert traj.steps.tolist() == steps and traj.steps.dtype == torch.int64
    assert set(traj.a) == set(traj.b) == set(MODS)
    for i, s in enumerate(steps):
        for name, (a, b) in record(s).items():
            assert torch.equal(traj.a[name][i], a) and torch.equal(traj.b[name][i], b)
    for name, (d_in, d_out) in MODS.items():
        assert traj.a[name].shape == (len(steps), d_in) and traj.b[name].shape == (len(steps), d_out)
        assert traj.a[name].dtype == traj.b[name].dtype == torch.float32


def test_round_trip_multiple_modules_and_meta(tmp_path):
    w = write(tmp_path, [0, 1, 2, 5], fsync=True)
    check(read_trajectory(tmp_path), [0, 1, 2, 5])  # readable while the writer is open (running run)
    w.close()
    traj = read_trajectory(tmp_path)
    check(traj, [0, 1, 2, 5])
    assert {k: traj.meta[k] for k in META} == META
    assert traj.meta["modules"]["model.layers.3.mlp.down_proj"] == {"d_in": 5, "d_out": 3}
    assert len(read_trajectory(tmp_path.parent / tmp_path.name)) == 4


def test_accepts_run_directory_and_bfloat16(tmp_path):
    w = TrajectoryWriter(tmp_path / "trajectory", META)
    w.append(0, {"m": (torch.tensor([1.5, -2.0], dtype=torch.bfloat16), torch.tensor([0.25]))})
    w.close()
    traj = read_trajectory(tmp_path)  # the run directory
    assert torch.equal(traj.a["m"], torch.tensor([[1.5, -2.0]]))


def test_steps_must_increase_and_shapes_match(tmp_path):
    w = write(tmp_path, [3])
    with pytest.raises(ValueError, match="must increase"):
        w.append(3, record(3))
    bad = record(4)
    bad["model.layers.1.mlp.down_proj"] = (torch.zeros(7), torch.zeros(4))
    with pytest.raises(ValueError, match="differ"):
        w.append(4, bad)
    w.close()
    check(read_trajectory(tmp_path), [3])


def test_torn_last_record_is_ignored_and_cut_on_reopen(tmp_path):
    write(tmp_path, [0, 1, 2]).close()
    a_file = tmp_path / "model.layers.1.mlp.down_proj.A.f32"
    with open(a_file, "ab") as f:
        f.write(b"\x00" * 10)  # crash while writing the data of record 3
    with open(tmp_path / "index.jsonl", "ab") as f:
        f.write(b'{"step": 3, "rec')  # ... or while writing its index line
    check(read_trajectory(tmp_path), [0, 1, 2])
    w = write(tmp_path, [3, 4])  # a writer reopening the directory cuts the torn tail and appends
    w.close()
    check(read_trajectory(tmp_path), [0, 1, 2, 3, 4])
    assert a_file.stat().st_size == 5 * 6 * 4


def test_index_line_without_data_is_ignored(tmp_path):
    # Without fsync an OS crash can keep an index line whose data never reached the disk.
    write(tmp_path, [0, 1]).close()
    b_file = tmp_path / "model.layers.3.mlp.down_proj.B.f32"
    b_file.write_bytes(b_file.read_bytes()[: 3 * 4 + 5])
    check(read_trajectory(tmp_path), [0])


def test_truncate_after(tmp_path):
    w = write(tmp_path, [0, 2, 4, 6, 8])
    w.truncate_after(5)
    check(read_trajectory(tmp_path), [0, 2, 4])
    w.append(5, record(5))  # the resumed run re-records: no gap, no duplicate
    w.append(6, record(6))
    w.truncate_after(100)  # nothing after: unchanged
    check(read_trajectory(tmp_path), [0, 2, 4, 5, 6])
    assert [json.loads(line)["step"] for line in (tmp_path / "index.jsonl").read_text().splitlines()] == [0, 2, 4, 5, 6]
    w.truncate_after(-1)  # a fresh run: empty, and free to record other modules
    w.append(0, {"other": (torch.ones(2), torch.ones(3))})
    w.close()
    traj = read_trajectory(tmp_path)
    assert traj.steps.tolist() == [0] and list(traj.a) == ["other"]
    assert not (tmp_path / "model.layers.1.mlp.down_proj.A.f32").exists()


def test_reopen_continues_and_refuses_other_kind(tmp_path):
    write(tmp_path, [0, 1]).close()
    w = TrajectoryWriter(tmp_path, {**META, "note": "resumed"})
    assert w.steps == [0, 1]
    w.append(2, record(2))
    w.close()
    traj = read_trajectory(tmp_path)
    check(traj, [0, 1, 2])
    assert traj.meta["note"] == "resumed"
    with pytest.raises(ValueError, match="'vectors' records"):
        TrajectoryWriter(tmp_path, {**META, "kind": "direction"})


def test_empty_and_missing(tmp_path):
    TrajectoryWriter(tmp_path / "t", META).close()
    traj = read_trajectory(tmp_path / "t")
    assert len(traj) == 0 and traj.a == {}
    with pytest.raises(FileNotFoundError):
        read_trajectory(tmp_path / "nothing")
