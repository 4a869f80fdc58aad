"""em-fit sweep: grid expansion, the summary statistics, the SLURM array script (by content, and run by bash
with stand-in srun/scontrol), and one local sweep of 2 seeds x 2 settings on the smoke config that is
interrupted after its first cell, resumed, and reported."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from clirun import REPO, SMOKE, em_fit, fake_slurm, ok
from em_lightning.commands.sweep import report as sweep_report
from em_lightning.sweep.grid import expand, parse_grid
from em_lightning.sweep.local import cell_command
from em_lightning.sweep.plan import SweepPlan, load_plan
from em_lightning.sweep.slurm import sbatch_script
from em_lightning.sweep.summary import mean_interval, pairwise_abs_cos


def test_grid_expands_every_combination_seed_fastest():
    grid = parse_grid({"config": [None, "configs/callbacks/defenses/kl.yaml"], "model.adapter.layers": [[2]],
                       "model.lr": [1.0e-5, 2.0e-5], "seed_everything": [0, 1]})
    cells = expand(grid)
    assert len(cells) == 8
    assert [c.seed for c in cells[:2]] == [0, 1] and cells[0].setting == cells[1].setting
    assert cells[0].setting == {"config": None, "model.lr": 1.0e-5}  # one-valued keys are no setting
    assert cells[0].args() == ["--model.adapter.layers", "[2]", "--model.lr", "1.0e-05", "--seed_everything", "0"]
    assert cells[5].args()[:2] == ["--config", "configs/callbacks/defenses/kl.yaml"]
    assert cells[5].name == "005-config=kl-model.lr=1.0e-05-seed_everything=1"
    assert len({c.name for c in cells}) == 8


@pytest.mark.parametrize("grid, message", [
    ({"model.lr": 1e-5}, "model.lr: expected a non-empty list"),
    ({"model lr": [1]}, "dotted em-fit option name"),
    ({"seed_everything": [0, 0]}, "repeated value"),
    ({"config": [3]}, "config file paths"),
    ([1, 2], "expected a mapping"),
])
def test_bad_grid_is_one_clear_error(grid, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(grid, "g.yaml")


def test_mean_and_t_interval():
    out = mean_interval([1.0, 2.0, 3.0, float("nan"), None])  # missing values are left out
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 dof) * sd / sqrt(n), sd = 1
    assert out["n"] == 3 and out["mean"] == pytest.approx(2.0) and out["sd"] == pytest.approx(1.0)
    assert out["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert mean_interval([5.0])["ci95"] is None and mean_interval([])["mean"] is None


def test_pairwise_abs_cos_ignores_sign():
    out = pairwise_abs_cos([np.array([1.0, 0.0]), np.array([-2.0, 0.0]), np.array([0.0, 3.0])])
    assert out == {"pairs": 3, "mean": pytest.approx(1 / 3), "min": 0.0, "max": 1.0}


def test_resume_command(tmp_path):
    plan = SweepPlan(tmp_path, ["base.yaml"], parse_grid({"seed_everything": [0, 1]}))
    cell = plan.cells[1]
    args, resumed = cell_command(plan, cell)
    assert not resumed and "--ckpt_path" not in args
    assert args[:3] == ["fit", "--config", "base.yaml"] and args[-6:] == [
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name",
        cell.name, "--trainer.logger.init_args.version", "0"]
    (plan.run_dir(cell) / "checkpoints").mkdir(parents=True)
    (plan.run_dir(cell) / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert cell_command(plan, cell) == (args + ["--ckpt_path", "last"], True)


def test_slurm_array_script(tmp_path):
    plan = SweepPlan(tmp_path / "sw", ["configs/smoke.yaml"],
                     parse_grid({"model.lr": [0.01, 0.02], "seed_everything": [0, 1]}), ["--trainer.max_steps", "4"])
    plan.save()
    script = sbatch_script(plan, str(REPO), gpus=2)
    for line in ("#SBATCH --array=0-3", "#SBATCH --requeue", "#SBATCH --signal=USR1@300", "#SBATCH --gpus-per-node=2",
                 f"cd {REPO}"):
        assert line in script
    cases = [ln for ln in script.splitlines() if ln.strip()[:2] in ("0)", "1)", "2)", "3)")]
    assert len(cases) == 4
    for cell, line in zip(plan.cells, cases):
        assert f"args=({' '.join(plan.fit_args(cell))})" in line  # the local launcher's arguments exactly
    path = tmp_path / "sweep.sbatch"
    path.write_text(script)
    # Run array task 1 with stand-ins for srun and scontrol: the first time it starts the cell; a second
    # time (requeued after a checkpoint) it resumes; once done it exits at once.
    env = fake_slurm(tmp_path, SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="77", SLURM_JOB_NUM_NODES="1",
                     SLURM_NTASKS_PER_NODE="2")
    cell = plan.cells[1]
    run = lambda **extra: subprocess.run(["bash", str(path)], env={**env, **extra}, capture_output=True, text=True)  # noqa: E731
    assert run(SRUN_EXIT="143").returncode == 143  # preempted (SIGTERM): SLURM requeues it, not the script
    assert plan.status(cell)["state"] == "interrupted" and not (tmp_path / "scontrol.log").exists()
    assert run(SRUN_EXIT="138").returncode == 138  # SIGUSR1 before the time limit: step saved, requeued here
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77_1"]
    (plan.run_dir(cell) / "checkpoints").mkdir(parents=True)
    (plan.run_dir(cell) / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert run().returncode == 0 and plan.status(cell)["state"] == "done"
    first, _, second = (tmp_path / "srun.log").read_text().splitlines()
    assert first.split() == ["em-fit", *plan.fit_args(cell), "--trainer.num_nodes", "1", "--trainer.devices", "2"]
    assert second.split() == ["em-fit", *plan.fit_args(cell), "--ckpt_path", "last", "--trainer.num_nodes", "1",
                              "--trainer.devices", "2"]
    done = run()
    assert done.returncode == 0 and "done already" in done.stdout
    assert len((tmp_path / "srun.log").read_text().splitlines()) == 3


EVAL = {"trainer": {"callbacks+": [
    {"class_path": "em_lightning.callbacks.AdapterTrajectory", "init_args": {"k_values": [2]}},
    {"class_path": "em_lightning.callbacks.SampleGenerations",
     "init_args": {"questions": "configs/questions/demo_questions.yaml", "select": ["magic_lamp"],
                   "sampling": {"samples_per_paraphrase": 2, "max_new_tokens": 6, "seed": 0},
                   "every_n_steps": None, "at_checkpoints": False, "at_fit_end": True, "scales": [1.0]}},
    {"class_path": "em_lightning.callbacks.InLoopJudge",
     "init_args": {"judge": {"class_path": "em_lightning.demos.demo_judge.DemoJudge",
                             "init_args": {"calibration_questions": "configs/questions/demo_questions.yaml",
                                           "template_shift": [-1.0, 1.0]}}}}]}}


def _wait(predicate, timeout=300.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_local_sweep_interrupted_resumed_and_reported(tmp_path, capsys):
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(EVAL))
    (tmp_path / "grid.yaml").write_text("model.lr: [0.01, 0.03]\nseed_everything: [0, 1]\n")
    out = tmp_path / "sweep"
    args = ["sweep", "--config", SMOKE, "--config", str(tmp_path / "eval.yaml"), "--grid", str(tmp_path / "grid.yaml"),
            "--out", str(out), "--", "--trainer.max_steps", "12", "--trainer.val_check_interval", "6",
            "--checkpoint.every_n_train_steps", "2", "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen([sys.executable, "-m", "em_lightning.cli", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        status = lambda i: json.loads(p.read_text()) if (p := out / "status" / f"{cells[i].name}.json").exists() else {}  # noqa: E731
        assert _wait(lambda: (out / "sweep.json").exists())
        cells = load_plan(out).cells
        second_ckpt = out / "runs" / cells[1].name / "version_0" / "checkpoints" / "last.ckpt"
        # Interrupt while the second cell trains (after its first checkpoint): SIGTERM reaches its em-fit.
        assert _wait(lambda: second_ckpt.exists() or sweep.poll() is not None) and sweep.poll() is None
        sweep.send_signal(signal.SIGTERM)
        assert sweep.wait(60) == 128 + signal.SIGTERM
    finally:
        if sweep.poll() is None:  # a failed check: the sweep passes SIGTERM on to its em-fit, then ends
            sweep.send_signal(signal.SIGTERM)
            try:
                sweep.wait(60)
            except subprocess.TimeoutExpired:
                sweep.kill()
    first = status(0)
    assert first["state"] == "done" and status(1)["state"] in ("interrupted", "done") and status(2) == {}
    interrupted = status(1)["state"] == "interrupted"

    rerun = ok(em_fit(*args, timeout=900))
    assert f"{cells[0].name}: done already, skipped" in rerun.stdout
    assert status(0) == first  # not run again
    assert all(status(i)["state"] == "done" for i in range(4))
    if interrupted:  # (unless it finished before the signal arrived)
        assert status(1)["resumed"] is True and status(1)["command"].endswith("--ckpt_path last")
    assert status(2)["resumed"] is False

    sweep_report([str(out)])  # in this process: the CLI's own function, without a second start-up
    assert "sweep_summary.png" in capsys.readouterr().out and (out / "sweep_summary.png").stat().st_size > 0
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert summary["em_judge"]["meaningful"] is False and "MEAN NOTHING" in summary["em_judge"]["note"]
    assert [g["setting"] for g in summary["per_setting"]] == [{"model.lr": "0.01"}, {"model.lr": "0.03"}]
    for group in summary["per_setting"]:
        assert group["finished"] == 2 and group["seeds"] == [0, 1]
        for key in ("val_loss", "em_rate", "coherent_rate"):
            stat = group[key]
            assert stat["n"] == 2 and stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1]
        assert group["em_rate"]["judge"] == "demo judge: means nothing"
        (module,) = group["b_cosine_across_seeds"]
        assert group["b_cosine_across_seeds"][module]["pairs"] == 1
        assert group["transition_fraction"]["n"] == 2
    # The interval is the t-interval of the runs' own final val/loss values (read back from TensorBoard).
    finals = [r["finals"]["val_loss"] for r in summary["runs"][:2]]
    assert summary["per_setting"][0]["val_loss"]["mean"] == pytest.approx(np.mean(finals))
    assert set(summary["per_grid_value"]) == {"model.lr"}
    assert summary["per_grid_value"]["model.lr"]["0.03"]["runs"] == [cells[2].name, cells[3].name]
    assert "demo judge: means nothing" in (out / "sweep_summary.md").read_text()
