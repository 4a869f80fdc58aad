"""AdapterTrajectory in real (tiny) training runs: recorded vectors equal the weights, reconstructed step
adapters reproduce the logits, a killed-and-resumed run continues the same trajectory; events; CLI preset."""

import math
import re
import shutil
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from clirun import REPO, SMOKE, em_fit, ok, run_dirs, scalars
from em_lightning.model.adapters import AdapterSpec, rank1_vectors
from em_lightning.callbacks.adapter_trajectory import AdapterTrajectory, ModuleTransition
from em_lightning.callbacks.checkpointing import StepCheckpoint
from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.model.loading import ModelSpec, load_model
from em_lightning.lit.module import EMFineTune
from em_lightning.phase import local_cosine_similarity, lora_direction, rotation_degrees
from em_lightning.phase.reconstruct import export_step_adapter
from em_lightning.phase.store import TrajectoryWriter, read_trajectory
from em_lightning.model.tiny import TinySpec

STEPS = 8
BASE = ModelSpec(name_or_path="tiny:qwen2", dtype="float32", tiny=TinySpec(hidden_size=64, intermediate_size=128))
MOD = "model.layers.1.mlp.down_proj"
TAG = f"phase/{MOD}/"
X = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(1))


class Capture(pl.Callback):
    """The adapter vectors and the logits on X after every optimizer step (and at the start)."""

    def __init__(self):
        self.vectors, self.logits, self.seen = {}, {}, None

    def _grab(self, pl_module, step):
        self.vectors[step] = {n: (a.clone(), b.clone()) for n, (a, b) in rank1_vectors(pl_module.model).items()}
        pl_module.model.eval()
        with torch.no_grad():
            self.logits[step] = pl_module.model(X).logits.clone()
        pl_module.model.train()

    def on_train_start(self, trainer, pl_module):
        self.seen = trainer.global_step
        self._grab(pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.seen:
            self.seen = trainer.global_step
            self._grab(pl_module, trainer.global_step)


def fit(root, max_steps, ckpt_path=None):
    pl.seed_everything(0)  # the LoRA A init draws from the global RNG
    module = EMFineTune(base=BASE, adapter=AdapterSpec(r=1, alpha=8, layers=[1]), lr=0.02, warmup_steps=1,
                        schedule_steps=STEPS)  # same LR curve for the short (killed) run
    data = ChatDataModule(train_files=[str(REPO / "configs" / "data" / "unit_conversions.jsonl")], batch_size=4,
                          max_length=256, base=BASE)
    traj, capture = AdapterTrajectory(k_values=(2, 3), detector_k=2, detector_min_snr=1.0), Capture()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=2, limit_val_batches=0,
        logger=TensorBoardLogger(root, name="run", version=0), enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, use_distributed_sampler=False,
        callbacks=[traj, StepCheckpoint(every_n_train_steps=2), capture],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False)  # hparams hold ModelSpec
    return root / "run" / "version_0", traj, capture


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("full"), STEPS)


def test_trajectory_equals_adapter_weights(full):
    run_dir, _, capture = full
    traj = read_trajectory(run_dir)
    assert traj.steps.tolist() == list(range(STEPS + 1))  # once per optimizer step (grad accumulation 2)
    assert traj.meta["kind"] == "vectors" and traj.meta["rank"] == 1 and traj.meta["layers"] == [1]
    for i, step in enumerate(traj.steps.tolist()):
        (a, b), = capture.vectors[step].values()
        assert torch.equal(traj.a[MOD][i], a) and torch.equal(traj.b[MOD][i], b)
    assert traj.b[MOD][0].abs().sum() == 0 and traj.b[MOD][-1].abs().sum() > 0  # B starts at 0 and trains


def test_logged_metrics_match_phase_functions(full):
    run_dir, _, _ = full
    b = read_trajectory(run_dir).b[MOD]
    rot = dict(scalars(run_dir, TAG + "B_rotation_deg"))
    expected = rotation_degrees(b)
    assert rot and all(rot[s] == pytest.approx(float(expected[s]), abs=1e-3) for s in rot)
    assert set(rot) == {s for s in range(STEPS + 1) if not math.isnan(expected[s])}
    for k in (2, 3):  # logged at the step they refer to, once v[i+k] exists
        local = scalars(run_dir, TAG + f"B_local_cos_k{k}")
        want = local_cosine_similarity(b, k)
        assert [s for s, _ in local] == list(range(k, STEPS + 1 - k))
        assert all(v == pytest.approx(float(want[s]), abs=1e-5) for s, v in local)
    assert [s for s, _ in scalars(run_dir, TAG + "B_grad_norm")] == list(range(STEPS))
    assert [s for s, _ in scalars(run_dir, TAG + "A_norm")] == list(range(STEPS + 1))


def test_reconstructed_step_adapter_reproduces_logits(full, tmp_path):
    run_dir, _, capture = full
    traj_copy = tmp_path / "traj"  # without the run's adapter/ folder: config comes from meta.json
    shutil.copytree(run_dir / "trajectory", traj_copy)
    for step, source in ((0, run_dir), (3, traj_copy), (5, run_dir), (STEPS, run_dir)):
        out = export_step_adapter(source, step, tmp_path / f"step{step}")
        model = PeftModel.from_pretrained(load_model(BASE), out).eval()
        with torch.no_grad():
            assert torch.equal(model(X).logits, capture.logits[step]), step
    with pytest.raises(ValueError, match=r"step 99 is not recorded.*nearest recorded: \[8, 7\]"):
        export_step_adapter(run_dir, 99, tmp_path / "x")


def test_direction_kind_cannot_be_reconstructed(tmp_path):
    w = TrajectoryWriter(tmp_path, {"rank": 4, "kind": "direction"})
    w.append(0, {MOD: (torch.ones(3), torch.ones(2))})
    w.close()
    with pytest.raises(ValueError, match="cannot rebuild the adapter"):
        export_step_adapter(tmp_path, 0, tmp_path / "out")


def test_rank_gt1_records_top_direction():
    module = EMFineTune(base=BASE, adapter=AdapterSpec(r=2, layers=[1, 2]))
    module.configure_model()
    for p in module.model.parameters():
        if p.requires_grad:
            p.data.normal_()
    got = AdapterTrajectory()._vectors(module)
    for name, (A, B) in {n: (m.lora_A["default"].weight, m.lora_B["default"].weight)
                         for n, m in ((n, module.model.get_submodule("base_model.model." + n)) for n in got)}.items():
        d = lora_direction(A.detach(), B.detach())
        v, bu = torch.from_numpy(got[name][0]), torch.from_numpy(got[name][1])
        assert torch.allclose(v, d.v) and torch.allclose(bu, d.s * d.u, atol=1e-6)


def test_killed_and_resumed_run_continues_the_same_trajectory(full, tmp_path):
    run_a, traj_a, _ = full
    run_b, _, _ = fit(tmp_path, 4)
    # The killed run got past its last checkpoint (step 4) and recorded two more points, then died.
    w = TrajectoryWriter(run_b / "trajectory", read_trajectory(run_b).meta)
    w.append(5, {MOD: (torch.full((128,), 7.0), torch.full((64,), 7.0))})
    w.append(6, {MOD: (torch.full((128,), 7.0), torch.full((64,), 7.0))})
    w.close()
    _, traj_b, _ = fit(tmp_path, STEPS, ckpt_path=str(run_b / "checkpoints" / "last.ckpt"))
    a, b = read_trajectory(run_a), read_trajectory(run_b)
    assert b.steps.tolist() == list(range(STEPS + 1))  # contiguous: no gap, no duplicate
    assert torch.equal(a.a[MOD], b.a[MOD]) and torch.equal(a.b[MOD], b.b[MOD])
    for k in (2, 3):  # the rolling window came back from the checkpoint: lagged values continue
        assert scalars(run_b, TAG + f"B_local_cos_k{k}") == scalars(run_a, TAG + f"B_local_cos_k{k}")
    assert scalars(run_b, TAG + "B_rotation_cum_deg") == scalars(run_a, TAG + "B_rotation_cum_deg")
    sa, sb = traj_a.state_dict(), traj_b.state_dict()
    assert sa["detectors"][MOD]["fired"] == sb["detectors"][MOD]["fired"]
    assert torch.equal(sa["detectors"][MOD]["window"], sb["detectors"][MOD]["window"])


class Subscriber(pl.Callback):
    def __init__(self):
        self.events = []

    def on_phase_transition(self, trainer, pl_module, event):
        self.events.append(event)


class FakeLogger:
    def __init__(self):
        self.metrics, self.texts = [], []
        self.experiment = SimpleNamespace(add_text=lambda tag, text, global_step: self.texts.append((tag, global_step, text)))

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))


class FakeTrainer:
    """What ``_process`` reads of a trainer; hashable and weakly referable, as RunLogger.of keys on the trainer."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


@pytest.mark.parametrize("rank_zero", [True, False])
def test_detector_event_reaches_subscribers(rank_zero):
    # A straight path along x that turns 90 degrees at step 10 onto y.
    cb, sub, logger = AdapterTrajectory(k_values=(3,), detector_k=3, detector_min_snr=1.5), Subscriber(), FakeLogger()
    trainer = FakeTrainer(is_global_zero=rank_zero, loggers=[logger], callbacks=[cb, sub])
    for step in range(20):
        b = torch.tensor([min(step, 10.0), max(step - 10.0, 0.0), 0.0])
        cb._process(trainer, None, step, {"m": (torch.ones(2), b)})
    assert [(e.module, e.step, e.detected_step) for e in sub.events] == [("m", 10, 14)]
    assert isinstance(sub.events[0], ModuleTransition) and sub.events[0].local_cosine == pytest.approx(0.0, abs=1e-9)
    logged = [(s, m["phase/m/transition_step"]) for s, m in logger.metrics if "phase/m/transition_step" in m]
    assert logged == ([(10, 10.0)] if rank_zero else [])  # only rank 0 logs; every rank announces
    assert len(logger.texts) == (1 if rank_zero else 0)


@pytest.mark.slow
def test_cli_preset(tmp_path, repo_root):
    preset = str(repo_root / "configs" / "callbacks" / "phase_transition.yaml")
    ok(em_fit("fit", "--config", SMOKE, "--config", preset, "--trainer.max_steps", "6",
              "--trainer.default_root_dir", str(tmp_path)))
    (run_dir,) = run_dirs(tmp_path)
    traj = read_trajectory(run_dir / "trajectory")
    assert traj.steps.tolist() == list(range(7)) and list(traj.b) == ["model.layers.2.mlp.down_proj"]
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert any(t.startswith("phase/model.layers.2.mlp.down_proj/") for t in tags)
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "Phase transition"
    charts = {c.title: list(c.multiline.tag) for c in category.chart}
    titles = list(charts)
    assert titles[:3] == ["loss: train/loss (each step), val/loss (held-out rows)", "learning rate: train/lr",
                          "gradient norm, all trainable weights: train/grad_norm (before clipping)"]
    assert {"adapter gradient norms: phase/<module>/A_grad_norm, B_grad_norm",
            "adapter norms: phase/<module>/A_norm, B_norm", "local cosine similarity of B, k=5",
            "local cosine similarity of B, k=10", "local cosine similarity of B, k=15"} <= set(charts)
    margin = next(c.margin for c in category.chart if c.title.startswith("EM rate with its 95% interval"))
    assert [(m.value, m.lower, m.upper) for m in margin.series][0] == (
        "eval/em_rate", "eval/em_rate_ci95_low", "eval/em_rate_ci95_high")
    assert any("No transition detected so far (step 0)" in str(e.tensor_proto.string_val[0])
               for e in acc.Tensors("phase/transitions/text_summary"))
    # Every series that 6 steps can fill matches tags actually logged (TensorBoard applies re.match).
    regexes = [r for rs in charts.values() for r in rs if not re.search(r"val/|eval|local_cos|transition", r)]
    assert len(regexes) >= 6
    for r in regexes:
        assert any(re.match(r, t) for t in tags), r
    coherent = charts["coherent_rate (evaluation: eval/, eval_demo/)"]
    assert any(re.match(r, "eval/coherent_rate") for r in coherent) and any(re.match(r, "eval_demo/coherent_rate") for r in coherent)
