"""InLoopJudge judges in the background: training goes on while a point is judged, every point is logged
once at its own step (also after a resume with a point still pending), the end of fit waits for the last
one, the run-level judge budget stops judging (not training), and the evaluation plan is known up front."""

import json
import threading
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from em_lightning.model.adapters import AdapterSpec
from em_lightning.callbacks.checkpointing import StepCheckpoint
from em_lightning.callbacks.in_loop_judge import InLoopJudge
from em_lightning.callbacks.sample_generations import SampleGenerations
from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.evaluation import SamplingConfig
from em_lightning.evaluation.records import read_jsonl
from em_lightning.judges.base import JudgeResult
from em_lightning.model.loading import ModelSpec
from em_lightning.lit.module import EMFineTune

QUESTIONS = "configs/questions/demo_questions.yaml"
SPEC = ModelSpec(name_or_path="tiny:qwen2", dtype="float32")


class SlowJudge:
    """Scores every prompt 20 (aligned) / 80 (coherent) after a delay; records when each call ran."""

    name = "slow"

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls, self.threads = delay, 0, set()

    def score_prompts(self, prompts):
        time.sleep(self.delay)
        self.calls += len(prompts)
        self.threads.add(threading.current_thread().name)
        return [JudgeResult(score=20.0 if "aligned" in p.lower() or "harm" in p.lower() else 80.0) for p in prompts]

    def classify_prompts(self, prompts):
        return [JudgeResult(label="x") for _ in prompts]


def fit(root, judge, max_steps, ckpt_path=None, purge_step=None, **judge_kw):
    L.seed_everything(0, verbose=False)
    module = EMFineTune(base=SPEC, adapter=AdapterSpec(r=1, layers=[1]), lr=0.01, warmup_steps=0, schedule_steps=20)
    data = ChatDataModule(train_files=["configs/data/unit_conversions.jsonl"], base=SPEC)
    gen = SampleGenerations(QUESTIONS, select=["magic_lamp"], sampling=SamplingConfig(samples_per_paraphrase=2,
                            max_new_tokens=4), every_n_steps=2, at_checkpoints=False)
    inloop = InLoopJudge(judge, judge_prompts=["aligned", "coherent"], cache=False, **judge_kw)
    logger = TensorBoardLogger(root, name="run", version=0, **({} if purge_step is None else {"purge_step": purge_step}))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1,
                        callbacks=[gen, inloop, StepCheckpoint(every_n_train_steps=3)])
    trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=False)
    return root / "run" / "version_0", inloop


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    judge = SlowJudge(delay=0.4)
    run_dir, inloop = fit(tmp_path_factory.mktemp("slow"), judge, 6)
    return run_dir, judge, inloop


def test_judging_runs_beside_training_and_every_point_is_logged_once(slow_run):
    run_dir, judge, _ = slow_run
    assert judge.threads and all(t.startswith("InLoopJudge") for t in judge.threads)  # not the training thread
    assert [s for s, _ in scalars(run_dir, "eval/em_rate")] == [2, 4, 6]  # once each, at its own step
    for step in (2, 4, 6):
        records = read_jsonl(run_dir / "generations" / f"step_{step:07d}.jsonl")
        assert records and all(r["scores"].get("coherent") == 80.0 for r in records)  # the judged file
        meta = json.loads((run_dir / "generations" / f"step_{step:07d}.meta.json").read_text())
        assert meta["metrics"]["eval/coherent_rate"] == 1.0


def test_training_did_not_wait_for_the_judge(tmp_path):
    """With a judge slower than the rest of the run, training reaches its last step while the first point
    is still being judged; the end of fit waits for it."""
    finished_at = {}

    class Late(SlowJudge):
        def score_prompts(self, prompts):
            out = super().score_prompts(prompts)
            finished_at.setdefault("t", time.perf_counter())
            return out

    start = time.perf_counter()
    run_dir, _ = fit(tmp_path, Late(delay=3.0), 4)
    steps_done_at = [e.wall_time for e in EventAccumulator(str(run_dir)).Reload().Scalars("train/loss")]
    assert len(steps_done_at) == 4
    assert [s for s, _ in scalars(run_dir, "eval/em_rate")] == [2, 4]
    assert finished_at["t"] - start > 3.0  # the first judgement returned after 3 s ...
    first_point_logged = EventAccumulator(str(run_dir)).Reload().Scalars("eval/em_rate")[0].wall_time
    assert steps_done_at[-1] < first_point_logged  # ... and training had logged its last step before that


def test_a_point_pending_at_the_checkpoint_is_judged_after_resume(slow_run, tmp_path):
    import shutil

    run_dir, _, _ = slow_run
    copy = tmp_path / "run" / "version_0"
    shutil.copytree(run_dir, copy)
    ckpt = copy / "checkpoints" / "step_0000006.ckpt"
    state = torch.load(ckpt, weights_only=False)
    key = next(k for k in state["callbacks"] if k.startswith("InLoopJudge"))
    # As if killed after the checkpoint at step 6 while point 6 was still being judged:
    state["callbacks"][key]["pending"] = [6]
    torch.save(state, ckpt)
    meta = copy / "generations" / "step_0000006.meta.json"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "metrics"}))
    judge = SlowJudge()
    fit(tmp_path, judge, 8, ckpt_path=ckpt, purge_step=6)
    assert [s for s, _ in scalars(copy, "eval/em_rate")] == [2, 4, 6, 8]  # 6 judged again, logged once
    assert "metrics" in json.loads(meta.read_text())


def test_budget_stops_judging_not_training(tmp_path):
    judge = SlowJudge()
    # magic_lamp: 1 paraphrase x 2 samples x 2 judge prompts = 4 calls per point: the budget fits 1 point
    run_dir, inloop = fit(tmp_path, judge, 6, max_judge_calls=7)
    assert judge.calls == 4 and inloop.calls_used == 4 and inloop.skipped == [4, 6]
    assert [s for s, _ in scalars(run_dir, "eval/em_rate")] == [2]
    assert [(s, v) for s, v in scalars(run_dir, "eval/points_unjudged")] == [(4, 1.0), (6, 2.0)]
    assert [s for s, _ in scalars(run_dir, "train/loss")] == list(range(6))  # training went on
    meta = json.loads((run_dir / "generations" / "step_0000004.meta.json").read_text())
    assert "max_judge_calls=7" in meta["judging_skipped"]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    assert next(v for k, v in state.items() if k.startswith("InLoopJudge"))["calls_used"] == 4


def test_the_plan_is_written_up_front(slow_run):
    run_dir, _, _ = slow_run
    plan = json.loads((run_dir / "evaluation_plan.json").read_text())
    assert plan["points"] == [2, 4, 6]
    assert plan["answers"] == 3 * 1 * 2  # points x paraphrases x samples
    assert plan["judge_calls"] == 3 * 1 * 2 * 2  # x judge prompts (aligned, coherent)
    records = [r for s in (2, 4, 6) for r in read_jsonl(run_dir / "generations" / f"step_{s:07d}.jsonl")]
    assert len(records) == plan["answers"] and sum(len(r["scores"]) for r in records) == plan["judge_calls"]
