"""Issue 17, item 5: the trajectory and its curves survive a resume.

After a resume (mid-run after a crash, of a finished run, extending a finished run) every ``phase/*`` tag has
exactly one value per step it has in the same run never interrupted, the checkpoint's step included
(tests/support/tb_scalars.py). A trajectory folder that lost records (a truncated data file, a deleted folder) is
repaired to its last complete record with a warning naming the file and the missing steps, never wiped
silently; the damaged files are kept beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from clirun import REPO
from em_lightning.model.adapters import AdapterSpec
from em_lightning.callbacks.adapter_trajectory import AdapterTrajectory
from em_lightning.callbacks.checkpointing import StepCheckpoint
from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.model.loading import ModelSpec
from em_lightning.lit.module import EMFineTune
from em_lightning.phase.reconstruct import export_step_adapter
from em_lightning.phase.store import read_trajectory
from em_lightning.model.tiny import TinySpec
from tb_scalars import assert_one_value_per_step, steps_by_tag

BASE = ModelSpec(name_or_path="tiny:qwen2", dtype="float32", tiny=TinySpec(hidden_size=64, intermediate_size=128))
MOD = "model.layers.1.mlp.down_proj"
STEPS = 12


class Crash(pl.Callback):
    """Raise after optimizer step ``at`` (past the last checkpoint): the run dies with values already logged."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("crash")


def next_second():
    """Wait for the clock's next whole second. TensorBoard reads a folder's event files in name order, and a
    name is the creation time in whole seconds, the pid, then a per-process counter compared as text: a
    resumed run's file made in the same second as the first run's, with counter 10 after 9, would be read
    first and its purge would miss the old values (a flake seen when this file ran after another one)."""
    time.sleep(1.0 - time.time() % 1.0)


def fit(root, max_steps, ckpt_path=None, crash_at=None, train_file=None, max_epochs=None):
    pl.seed_everything(0)
    module = EMFineTune(base=BASE, adapter=AdapterSpec(r=1, alpha=8, layers=[1]), lr=0.05, warmup_steps=0,
                        schedule_steps=16)
    train_file = train_file or REPO / "configs" / "data" / "unit_conversions.jsonl"
    data = ChatDataModule(train_files=[str(train_file)], batch_size=4, max_length=256, base=BASE, val_fraction=0.0)
    purge = {} if ckpt_path is None else {"purge_step": torch.load(ckpt_path, weights_only=False)["global_step"]}
    if ckpt_path is not None:
        next_second()
    callbacks = [AdapterTrajectory(k_values=(2, 3), detector_k=2, detector_min_snr=1.0, detector_baseline=2,
                                   detector_min_z=0.1, detector_min_rise=0.01), StepCheckpoint(every_n_train_steps=4)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=max_epochs, limit_val_batches=0,
        logger=TensorBoardLogger(root, name="run", version=0, **purge), enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, callbacks=callbacks + ([Crash(crash_at)] if crash_at else []),
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False)
    return root / "run" / "version_0"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run never interrupted: the tags and steps every resumed run must end with."""
    run = fit(tmp_path_factory.mktemp("reference"), STEPS)
    return run, steps_by_tag(run, "phase/")


def test_reference_has_lagged_values_and_transitions(reference):
    _, steps = reference
    assert steps[f"phase/{MOD}/B_local_cos_k3"] == list(range(3, STEPS - 2))  # centres 3..9 of points 0..12
    assert f"phase/{MOD}/B_norm" in steps and f"phase/{MOD}/A_grad_norm" in steps


def crashed(tmp_path, at=11):
    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path, STEPS, crash_at=at)  # checkpoints at 4 and 8; dies at step 11
    return tmp_path / "run" / "version_0"


def test_resume_after_a_crash_logs_each_phase_step_once(tmp_path, reference):
    run = crashed(tmp_path)
    fit(tmp_path, STEPS, ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    # Before: the checkpoint's point (9 tags at step 8) was purged and never logged again, and the local
    # cosines of steps 6-7 computed after the checkpoint (points 9-11) were logged twice.
    assert_one_value_per_step(run, "phase/", expected=reference[1])
    assert read_trajectory(run).steps.tolist() == list(range(STEPS + 1))


def test_resume_at_an_epoch_end_logs_each_phase_step_once(tmp_path):
    rows = tmp_path / "rows.jsonl"  # 32 rows: 8 optimizer steps per epoch; 2 epochs
    rows.write_text("".join((REPO / "configs" / "data" / "unit_conversions.jsonl").read_text().splitlines(True)[:32]))
    reference = fit(tmp_path / "reference", -1, train_file=rows, max_epochs=2)
    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path / "resumed", -1, crash_at=11, train_file=rows, max_epochs=2)  # last checkpoint: step 8, epoch 1's end
    run = tmp_path / "resumed" / "run" / "version_0"
    fit(tmp_path / "resumed", -1, ckpt_path=str(run / "checkpoints" / "last.ckpt"), train_file=rows, max_epochs=2)
    assert_one_value_per_step(run, "phase/", expected=steps_by_tag(reference, "phase/"))
    assert read_trajectory(run).steps.tolist() == list(range(17))


@pytest.mark.parametrize("extend_to", [8, STEPS], ids=["finished-run-again", "finished-run-extended"])
def test_resume_of_a_finished_run_logs_each_phase_step_once(tmp_path, reference, extend_to):
    run = fit(tmp_path, 8)
    before = steps_by_tag(run, "phase/")
    fit(tmp_path, extend_to, ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    expected = before if extend_to == 8 else reference[1]
    assert_one_value_per_step(run, "phase/", expected=expected)


def test_truncated_data_file_is_repaired_with_a_warning(tmp_path):
    run = crashed(tmp_path)
    b_file = run / "trajectory" / f"{MOD}.B.f32"
    os.truncate(b_file, 3 * 64 * 4 + 10)  # 3 complete records (d_out 64) of the 12 indexed, and a torn one
    a_before = (run / "trajectory" / f"{MOD}.A.f32").read_bytes()
    with pytest.warns(UserWarning, match=rf"{MOD}\.B\.f32: fewer records than the index's 12 .* steps 3-8 are "
                                         r"missing from the trajectory"):
        fit(tmp_path, STEPS, ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    traj = read_trajectory(run)
    assert traj.steps.tolist() == [0, 1, 2, 9, 10, 11, 12]  # never wiped: the complete records stay
    gaps = traj.meta["gaps"]
    assert [(g["first_step"], g["last_step"]) for g in gaps] == [(3, 8)]
    kept = run / "trajectory.damaged-1"
    assert (kept / f"{MOD}.A.f32").read_bytes() == a_before  # the intact file, as it was
    with pytest.raises(ValueError, match="step 5 is not recorded"):
        export_step_adapter(run, 5, tmp_path / "out")
    export_step_adapter(run, 10, tmp_path / "out")  # the steps on either side of the gap export


def test_deleted_trajectory_restarts_with_a_loud_warning(tmp_path):
    run = crashed(tmp_path)
    shutil.rmtree(run / "trajectory")
    with pytest.warns(UserWarning, match=r"holds no record \(deleted\?\); steps 0-8 are missing from the trajectory"):
        fit(tmp_path, STEPS, ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    meta = json.loads((run / "trajectory" / "meta.json").read_text())
    assert read_trajectory(run).steps.tolist() == [9, 10, 11, 12]
    assert [(g["first_step"], g["last_step"]) for g in meta["gaps"]] == [(0, 8)]
