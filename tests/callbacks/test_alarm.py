"""Alarm: stops a run on a detected transition (a real smoke run, Lightning's should_stop, the checkpoint kept
at the alarm step), densifies checkpoints after a transition and keeps the window across a resume, fires on
the EM rate of a judged point and on cos(B, direction); each trigger once."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from clirun import SMOKE, em_fit, ok, run_dirs, scalars
from em_lightning.model.adapters import AdapterSpec, apply_adapter, lora_layers
from em_lightning.callbacks.adapter_trajectory import ModuleTransition
from em_lightning.callbacks.alarm import Alarm
from em_lightning.phase.store import read_trajectory
from em_lightning.probes.misalignment_direction import Direction, save_direction
from em_lightning.model.tiny import TinySpec, tiny_model

MOD = "model.layers.1.mlp.down_proj"


def fake_trainer(callbacks, step=0):
    saved = []

    def save_checkpoint(path, weights_only=False):
        saved.append((path.name, trainer.global_step))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)

    trainer = SimpleNamespace(global_step=step, should_stop=False, is_global_zero=True, loggers=[],
                              callbacks=callbacks, save_checkpoint=save_checkpoint,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all=True: d))
    return trainer, saved


def event(step, detected):
    return ModuleTransition(step=step, detected_step=detected, local_cosine=0.3, k=2, index=step, module=MOD)


class Listener:
    def __init__(self):
        self.alarms, self.changes = [], []

    def on_alarm(self, trainer, pl_module, alarm):
        self.alarms.append(alarm)

    def on_cadence_change(self, trainer, pl_module, change):
        self.changes.append(change)


def test_transition_densifies_then_resume_keeps_the_window(tmp_path):
    alarm, listener = Alarm(dense_window=6, dense_every=2), Listener()
    alarm.run_dir = tmp_path
    trainer, saved = fake_trainer([alarm, listener], step=9)
    alarm.on_train_start(trainer, None)
    alarm.on_phase_transition(trainer, None, event(6, 9))
    assert not trainer.should_stop and saved == [("step_0000009.ckpt", 9)]
    assert alarm.window == {"start": 9, "end": 15, "every": 2}
    (change,) = listener.changes
    assert change["checkpoints"] == 3 and change["est_disk_bytes"] == 300.0  # 3 more of the 100-byte file
    for step in (10, 11):
        trainer.global_step = step
        alarm.on_train_batch_end(trainer, None, None, None, 0)
    state = alarm.state_dict()  # the checkpoint at step 11

    resumed = Alarm(dense_window=6, dense_every=2)
    resumed.run_dir = tmp_path
    resumed.load_state_dict(json.loads(json.dumps(state)))  # what a checkpoint holds survives serialisation
    trainer2, saved2 = fake_trainer([resumed], step=11)
    resumed.on_train_start(trainer2, None)
    for step in range(12, 20):
        trainer2.global_step = step
        resumed.on_train_batch_end(trainer2, None, None, None, 0)
    resumed.on_phase_transition(trainer2, None, event(16, 19))  # a second turn: the trigger fired already
    assert saved[1:] == [("step_0000011.ckpt", 11)] and saved2 == [("step_0000013.ckpt", 13), ("step_0000015.ckpt", 15)]
    lines = [json.loads(line) for line in (tmp_path / "alarms.jsonl").read_text().splitlines()]
    assert [e["trigger"] for e in lines] == ["transition", "cadence"] and lines[0]["action"] == "dense checkpoints"


def test_em_rate_trigger_stops_once(tmp_path):
    alarm, listener = Alarm(em_rate_above=0.4, on_transition=False, after_step=0), Listener()
    alarm.run_dir = tmp_path
    trainer, saved = fake_trainer([alarm, listener], step=5)
    em, fine = {"aligned": 10.0, "coherent": 90.0}, {"aligned": 90.0, "coherent": 90.0}
    records = [{"scale": 1.0, "scores": em}, {"scale": 1.0, "scores": fine}, {"scale": 4.0, "scores": em}]
    alarm.on_point_judged(trainer, None, 5, records)  # 1 of 2 at scale 1: 0.5 > 0.4 (scale 4 not counted)
    alarm.on_phase_transition(trainer, None, event(2, 5))  # on_transition: false
    assert trainer.should_stop and saved == [("step_0000005.ckpt", 5)]
    assert [(a["trigger"], a["value"], a["action"]) for a in listener.alarms] == [("em_rate", 0.5, "stop")]
    trainer.global_step = 8
    alarm.on_point_judged(trainer, None, 8, records)
    assert len(listener.alarms) == 1

    low = Alarm(em_rate_above=0.5, on_transition=False)
    trainer, saved = fake_trainer([low], step=5)
    low.on_point_judged(trainer, None, 5, records)  # 0.5 is not above 0.5
    assert not trainer.should_stop and not saved


def test_cos_direction_trigger(tmp_path):
    model = apply_adapter(tiny_model("qwen2", TinySpec(hidden_size=64, intermediate_size=128)),
                          AdapterSpec(r=1, alpha=8, layers=[1], target_modules=["down_proj"]))
    ((name, layer),) = list(lora_layers(model))
    b = torch.randn(64)
    with torch.no_grad():
        layer.lora_B["default"].weight[:, 0] = b
    direction = tmp_path / "d.safetensors"
    away = torch.randn(64)
    away -= (away @ b) / (b @ b) * b  # orthogonal to B: cos 0
    save_direction(direction, Direction(0, {1: away}, {1: 1.0}, 1, 1))
    alarm = Alarm(cos_direction_above=0.5, on_transition=False, direction=str(direction), check_every_n_steps=2)
    alarm.run_dir = tmp_path
    trainer, saved = fake_trainer([alarm], step=0)
    alarm.on_train_start(trainer, None)
    module = SimpleNamespace(model=model)
    trainer.global_step = 2
    alarm.on_train_batch_end(trainer, module, None, None, 0)
    assert not trainer.should_stop
    save_direction(direction, Direction(0, {1: b + 0.1 * away}, {1: 1.0}, 1, 1))
    trainer.global_step = 3  # not a check step
    alarm.on_train_batch_end(trainer, module, None, None, 0)
    assert not trainer.should_stop
    trainer.global_step = 4
    alarm.on_train_batch_end(trainer, module, None, None, 0)
    assert trainer.should_stop and saved == [("step_0000004.ckpt", 4)] and alarm.fired[0]["value"] > 0.9


def test_bad_settings_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="dense_every"):
        Alarm(dense_every=0)
    with pytest.raises(FileNotFoundError, match="no such file"):
        Alarm(direction=str(tmp_path / "missing.safetensors"))


def test_preset_builds(repo_root):
    (entry,) = yaml.safe_load((repo_root / "configs" / "callbacks" / "alarm.yaml").read_text())["trainer"]["callbacks+"]
    assert entry["class_path"] == "em_lightning.callbacks.Alarm"
    alarm = Alarm(**entry["init_args"])
    assert alarm.dense_window > 0 and alarm.stop


@pytest.mark.slow
def test_alarm_stops_a_real_run_at_its_transition(tmp_path):
    # A touchy detector (k=2, any rise) so that the smoke run turns within a few steps.
    (tmp_path / "touchy.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks+": [
        {"class_path": "em_lightning.callbacks.AdapterTrajectory",
         "init_args": {"k_values": [2], "detector_k": 2, "detector_min_snr": 0.5, "detector_min_rise": 0.01,
                       "detector_min_z": 0.0, "detector_baseline": 2}},
        {"class_path": "em_lightning.callbacks.Alarm", "init_args": {"on_transition": True, "stop": True}}]}}))
    ok(em_fit("fit", "--config", SMOKE, "--config", str(tmp_path / "touchy.yaml"), "--trainer.max_steps", "30",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false", timeout=900))
    (run_dir,) = run_dirs(tmp_path)
    (alarm,) = [json.loads(line) for line in (run_dir / "alarms.jsonl").read_text().splitlines()]
    step = alarm["step"]
    assert alarm["trigger"] == "transition" and alarm["action"] == "stop" and 0 < step < 30
    assert (run_dir / "checkpoints" / f"step_{step:07d}.ckpt").is_file()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == step and last["callbacks"]["Alarm"]["fired"][0]["step"] == step
    # Training stopped there: the last optimizer step is the one that made step `step` (its loss is logged
    # at step - 1, the weights that computed it), the last recorded adapter that of step `step`.
    assert scalars(run_dir, "train/loss")[-1][0] == step - 1
    assert int(read_trajectory(run_dir / "trajectory").steps[-1]) == step
