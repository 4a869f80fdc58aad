"""A run's numbers can be trusted (issue 17): a non-finite loss, gradient or weight stops the run and nothing
non-finite is written; SIGTERM / SIGUSR1 save the step reached and exit 128 + signal, and the resume is
bit-identical (one process and 2 gloo ranks); a resume with another config is refused field by field; the
curves keep one value per tag and step across resumes; a failed start leaves no run directory.

CLI runs are subprocesses of em-fit on the smoke config (6 steps); refusals, which fail before training,
run in this process (tests/e2e/test_faults.py's ``cli``)."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from clirun import REPO, SMOKE, em_fit, fake_slurm, ok, run_dirs, scalars
from em_lightning.cli import main
from em_lightning.run.fingerprint import compare, file_identity
from test_faults import arm, cli, copy_run, files, one_error_line, same_result, write_yaml

RUN = ["--trainer.max_steps", "6", "--checkpoint.every_n_train_steps", "10", "--trainer.val_check_interval", "4",
       "--trainer.enable_progress_bar", "false"]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
QUESTIONS = str(REPO / "configs" / "questions" / "demo_questions.yaml")


def tags(run: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return {t: [e.step for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def one_value_per_step(run: Path) -> dict[str, list[int]]:
    steps = tags(run)
    for tag, s in steps.items():
        assert len(s) == len(set(s)), f"{tag}: {s}"
    return steps


def signal_config(path: Path, at_step: int, signum: int = int(signal.SIGTERM)) -> str:
    return str(write_yaml(path, {"trainer": {"callbacks": [
        {"class_path": "fault_inject.SignalAtStep", "init_args": {"at_step": at_step, "signum": signum}}]}}))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 6-step smoke run (accumulation 2, val/loss at 0, 2, 4, 6)."""
    root = tmp_path_factory.mktemp("reference")
    ok(em_fit("fit", "--config", SMOKE, *RUN, "--trainer.default_root_dir", str(root)))
    (run,) = run_dirs(root)
    return run


# -- the fingerprint comparison, table-driven -----------------------------------------------------------------
SAVED = {"model.adapter.layers": [2], "model.lr": 0.01, "data.train_files.content": ["35947 bytes, sha256 c5"],
         "trainer.world_size": 2, "data.batch_size": 4, "trainer.accumulate_grad_batches": 1, "global_batch": 8,
         "callbacks.0.KLToBase.weight": 1.0}
CHANGES = [  # (changed fields, allowed, refused lines, accepted lines)
    ({}, [], [], []),
    ({"model.adapter.layers": [1]}, [], ["model.adapter.layers: checkpoint [2], config [1]"], []),
    ({"model.lr": 0.02, "model.adapter.layers": [1]}, [],
     ["model.adapter.layers: checkpoint [2], config [1]", "model.lr: checkpoint 0.01, config 0.02"], []),
    ({"model.adapter.layers": [1]}, ["model.adapter"], [], ["model.adapter.layers: checkpoint [2], config [1]"]),
    ({"model.lr": 0.02}, ["all"], [], ["model.lr: checkpoint 0.01, config 0.02"]),
    ({"data.train_files.content": ["35947 bytes, sha256 ff"]}, [],
     ['data.train_files.content: checkpoint ["35947 bytes, sha256 c5"], config ["35947 bytes, sha256 ff"]'], []),
    # devices 2 -> 1 with accumulation 1 -> 2: the same global batch, the same run
    ({"trainer.world_size": 1, "trainer.accumulate_grad_batches": 2}, [], [], []),
    # devices 2 -> 1 alone: the global batch halves
    ({"trainer.world_size": 1, "global_batch": 4}, [],
     ["global_batch: checkpoint 8, config 4", "trainer.world_size: checkpoint 2, config 1"], []),
    ({"callbacks.0.KLToBase.weight": 0.5}, [], ["callbacks.0.KLToBase.weight: checkpoint 1.0, config 0.5"], []),
    ({"model.lr": None}, [], ["model.lr: checkpoint 0.01, config null"], []),
]


@pytest.mark.parametrize("changed, allowed, refused, accepted", CHANGES)
def test_fingerprint_comparison(changed, allowed, refused, accepted):
    current = {**SAVED, **changed}
    assert compare(SAVED, current, allowed) == (refused, accepted)


def test_batch_factors_are_strict_inside_an_epoch():
    refused, _ = compare(SAVED, {**SAVED, "trainer.world_size": 1, "trainer.accumulate_grad_batches": 2},
                         factors_may_change=False)
    assert refused == ["trainer.accumulate_grad_batches: checkpoint 1, config 2", "trainer.world_size: checkpoint 2, config 1"]


def test_a_field_only_one_side_has_is_a_change():
    refused, _ = compare({"a": 1}, {"a": 1, "b": 2})
    assert refused == ['b: checkpoint "(not recorded)", config 2']


def test_file_identity_sees_a_changed_byte(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_bytes(b"x" * 5000)
    before = file_identity(f)
    f.write_bytes(b"x" * 2500 + b"y" + b"x" * 2499)
    assert file_identity(f) != before and file_identity(f).startswith("5000 bytes")


# -- non-finite values stop the run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diverged(tmp_path_factory) -> tuple[Path, object]:
    """LR 1e30 without clipping: the loss is NaN from the third step (the first two are warmup at LR 0, 2.5e29)."""
    root = tmp_path_factory.mktemp("diverged")
    proc = em_fit("fit", "--config", SMOKE, "--config", str(REPO / "configs" / "callbacks" / "phase_transition.yaml"), *RUN,
                  "--checkpoint.every_n_train_steps", "2", "--model.lr", "1e30", "--trainer.gradient_clip_val", "null",
                  "--trainer.default_root_dir", str(root))
    (run,) = run_dirs(root)
    return run, proc


def test_non_finite_loss_stops_the_run_and_nothing_non_finite_is_written(diverged):
    run, proc = diverged
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "training stopped at optimizer step 3: non-finite train/loss=nan" in line, line
    assert "model.lr=1e+30 too high or gradient clipping off" in line
    assert not (run / "adapter").exists()
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step_0000002.ckpt"]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    for f in (run / "trajectory").glob("*.f32"):  # the trajectory callback never saw the NaN step
        assert np.isfinite(np.fromfile(f, dtype=np.float32)).all(), f
    for tag in tags(run):  # train/*, val/loss and phase/* (its gradient norms are logged once the step is done)
        assert all(np.isfinite(v) for _, v in scalars(run, tag)), tag


def test_report_and_eval_of_a_run_holding_non_finite_values_say_so(diverged, tmp_path, capsys):
    run, _ = diverged
    run = copy_run(run, tmp_path / "runs")
    b = next((run / "trajectory").glob("*.B.f32"))
    data = np.fromfile(b, dtype=np.float32)
    data[-1] = np.nan  # what a run before this check wrote
    data.tofile(b)
    line = cli(capsys, "report", run)
    assert f"{run}/trajectory: non-finite values (NaN/inf) in " in line and "the run diverged" in line
    ckpt = run / "checkpoints" / "step_0000002.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    key = next(iter(state["state_dict"]))
    state["state_dict"][key][0] = float("nan")
    torch.save(state, ckpt)
    line = cli(capsys, "eval", "--ckpt", ckpt, "--questions", QUESTIONS, "--out", tmp_path / "eval")
    assert "non-finite values (NaN/inf) in" in line and "the run diverged" in line
    assert not (tmp_path / "eval").exists()


def test_non_finite_adapter_file_is_refused_by_eval(reference, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in (reference / "adapter").iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    tensors = load_file(adapter / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, adapter / "adapter_model.safetensors")
    line = cli(capsys, "eval", "--base", "tiny:qwen2", "--adapter", adapter, "--questions", QUESTIONS,
               "--out", tmp_path / "eval")
    assert "non-finite values (NaN/inf) in" in line


# -- preemption ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # two runs (~15 s alone, 38 s under load); test_sigusr1_exits_138 is the fast check
def test_sigterm_saves_the_step_reached_and_the_resume_is_bit_identical(reference, tmp_path, monkeypatch):
    """SIGTERM during step 4's first micro-batch: step 4 finishes, is saved, exit 143; the resume equals the
    uninterrupted run, and every curve has one value per step (val/loss also at the checkpoint's step)."""
    root = tmp_path / "runs"
    arm(monkeypatch)
    proc = em_fit("fit", "--config", SMOKE, "--config", signal_config(tmp_path / "sig.yaml", 3), *RUN,
                  "--trainer.default_root_dir", str(root))
    assert proc.returncode == 143, proc.stderr[-3000:]
    (run,) = run_dirs(root)
    assert (f"em-fit: stopped by SIGTERM after optimizer step 4; checkpoint: {run}/checkpoints/last.ckpt; "
            f"resume: em-fit fit --config {run}/config.yaml --ckpt_path last") in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step_0000004.ckpt"]
    assert not (run / "adapter").exists() and not list(run.rglob("*.em-tmp-*"))
    monkeypatch.delenv("EM_FAULT_ARMED")
    ok(em_fit("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"))
    same_result(reference, run)
    got, want = one_value_per_step(run), one_value_per_step(reference)
    assert got.pop("val/loss") == sorted({*want.pop("val/loss"), 4})  # re-logged at the checkpoint's step
    assert got == want
    assert dict(scalars(run, "val/loss"))[6] == dict(scalars(reference, "val/loss"))[6]


def test_sigusr1_exits_138(tmp_path, monkeypatch):
    arm(monkeypatch)
    proc = em_fit("fit", "--config", SMOKE, "--config", signal_config(tmp_path / "sig.yaml", 1, int(signal.SIGUSR1)),
                  *RUN, "--trainer.default_root_dir", str(tmp_path / "runs"))
    assert proc.returncode == 138, proc.stderr[-3000:]
    assert "em-fit: stopped by SIGUSR1 after optimizer step 2" in proc.stderr


@pytest.mark.slow
def test_sigterm_with_two_gloo_ranks_resumes_bit_identically(tmp_path, monkeypatch):
    """The signal reaches rank 0 only (a scheduler killing the launcher); both ranks stop after the same step."""
    ref_root, root = tmp_path / "ref", tmp_path / "runs"
    ok(em_fit("fit", "--config", SMOKE, *RUN, *DDP, "--trainer.default_root_dir", str(ref_root)))
    arm(monkeypatch)
    proc = em_fit("fit", "--config", SMOKE, "--config", signal_config(tmp_path / "sig.yaml", 3), *RUN, *DDP,
                  "--trainer.default_root_dir", str(root))
    assert proc.returncode == 143, proc.stderr[-3000:]
    (run,) = run_dirs(root)
    assert "em-fit: stopped by SIGTERM after optimizer step 4" in proc.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    monkeypatch.delenv("EM_FAULT_ARMED")
    ok(em_fit("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"))
    (ref,) = run_dirs(ref_root)
    same_result(ref, run)


def test_a_finished_run_resumed_again_keeps_its_curves(reference, tmp_path):
    run = copy_run(reference, tmp_path / "runs")
    before = {t: scalars(run, t) for t in tags(run)}
    ok(em_fit("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"))
    assert {t: scalars(run, t) for t in tags(run)} == before
    one_value_per_step(run)


# -- a resume is the same run or refused -----------------------------------------------------------------------
def refused(capsys, *args) -> tuple[list[str], str]:
    """em-fit in this process: exit 1, one error line, and the ``changed since the checkpoint`` lines."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:  # as test_faults.cli
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as info:
        mp.setattr(sys, "argv", ["em-fit"])
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert info.value.code == 1, err[-3000:]
    return [line.split(": ", 2)[2] for line in err.splitlines() if line.startswith("em-fit: changed since")], \
        one_error_line(err)


def test_changed_fields_are_listed_and_the_run_is_untouched(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "runs")
    before = files(run)
    lines, error = refused(capsys, "fit", "--config", run / "config.yaml", "--ckpt_path", "last",
                           "--model.adapter.layers", "[1]", "--data.batch_size", "2", "--seed_everything", "1")
    assert lines == ["data.batch_size: checkpoint 4, config 2", "global_batch: checkpoint 8, config 4",
                     "model.adapter.layers: checkpoint [2], config [1]", "seed_everything: checkpoint 0, config 1"]
    assert "this config is not the checkpoint's run (4 field(s) changed" in error and "--allow_changed" in error
    assert files(run) == before


def test_another_runs_checkpoint_is_refused_not_loaded_as_the_model(reference, tmp_path, capsys):
    root = tmp_path / "runs"
    lines, error = refused(capsys, "fit", "--config", SMOKE, "--model.base.tiny.seed", "1", "--ckpt_path",
                           reference / "checkpoints" / "last.ckpt", "--trainer.default_root_dir", root)
    assert lines == ["model.base.tiny.seed: checkpoint 0, config 1"]
    assert not root.exists() or not any(root.rglob("*"))


def test_an_allowed_change_is_recorded_and_a_shape_mismatch_is_one_line(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "runs")
    before = files(run)["config.yaml"]
    line = cli(capsys, "fit", "--config", run / "config.yaml", "--ckpt_path", "last", "--trainer.max_steps", "8",
               "--allow_changed", "model.adapter.r", "--model.adapter.r", "2")
    assert "checkpoint: its trainable tensors do not fit this model" in line and "[1, 128] in the checkpoint, [2, 128] here" in line
    (record,) = [json.loads(x) for x in (run / "resume_log.jsonl").read_text().splitlines()]
    assert record["accepted"] == ["model.adapter.r: checkpoint 1, config 2"] and record["step"] == 6
    assert files(run)["config.yaml"] == before  # written when training starts: this resume never did


def test_a_checkpoint_without_fingerprint_needs_allow_changed_all(reference, tmp_path, capsys):
    run = copy_run(reference, tmp_path / "runs")
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    del state["em_fingerprint"]
    last.unlink()  # a hard link to the step file: write a new file
    torch.save(state, last)
    line = cli(capsys, "fit", "--config", run / "config.yaml", "--ckpt_path", "last")
    assert "saved before em-fit recorded a run fingerprint" in line and "--allow_changed all" in line


# -- nothing written before the inputs are known good ------------------------------------------------------------
def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys):
    root = tmp_path / "runs"
    cli(capsys, "fit", "--config", SMOKE, "--model.adapter.target_modules", "[no_such_proj]",
        "--trainer.default_root_dir", root)
    assert not any(root.rglob("*")), sorted(root.rglob("*"))


def test_warmup_longer_than_the_run_is_an_error(tmp_path, capsys):
    root = tmp_path / "runs"
    line = cli(capsys, "fit", "--config", SMOKE, "--trainer.max_steps", "10", "--model.warmup_steps", "100",
               "--trainer.default_root_dir", root)
    assert "model.warmup_steps: 100 is longer than the run's 10 optimizer steps (its LR schedule)" in line
    assert not root.exists()


# -- SLURM: the sbatch script requeues on SIGUSR1's exit code and resumes on a restart ---------------------------
@pytest.mark.parametrize("restarts, extra, exit_code, resumed, requeued", [
    ("0", [], 138, False, True),                       # time limit near: step saved, job queued again
    ("1", [], 0, True, False),                         # the restart resumes the job's own run directory
    ("0", ["--ckpt_path", "last"], 143, True, False),  # a resume of a given run keeps its directory
])
def test_sbatch_requeues_and_resumes(tmp_path, restarts, extra, exit_code, resumed, requeued):
    env = fake_slurm(tmp_path, SRUN_EXIT=str(exit_code), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1",
                     SLURM_NTASKS_PER_NODE="2", SLURM_RESTART_COUNT=restarts)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "em-fit.sbatch"), "run.yaml", *extra], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == exit_code, proc.stderr
    args = (tmp_path / "srun.log").read_text().split()
    assert args[:4] == ["em-fit", "fit", "--config", "run.yaml"]
    assert ("--ckpt_path" in args) == resumed
    assert (" ".join(args).count("--trainer.logger.init_args.version slurm-4242") == 1) == (not extra)
    assert (tmp_path / "scontrol.log").is_file() == requeued
    if requeued:
        assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
