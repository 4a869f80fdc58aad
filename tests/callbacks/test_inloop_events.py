"""Callbacks hear from each other only through events: SampleGenerations announces its questions
(``on_evaluation_source``), InLoopJudge its judges (``on_judges_ready``), whichever order the callbacks are
listed in; a missing partner is one clear error before training."""

import json

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from em_lightning.model.adapters import AdapterSpec
from em_lightning.callbacks import InLoopJudge, MechanisticProbes, SampleGenerations
from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.evaluation import SamplingConfig
from em_lightning.judges.base import JudgeResult
from em_lightning.model.loading import ModelSpec
from em_lightning.lit.module import EMFineTune

SPEC = ModelSpec(name_or_path="tiny:qwen2", dtype="float32")


class ConstantJudge:
    name = "constant"

    def score_prompts(self, prompts):
        return [JudgeResult(score=20.0) for _ in prompts]

    def classify_prompts(self, prompts):
        return [JudgeResult(label="x") for _ in prompts]


class Listener(Callback):
    def __init__(self):
        self.heard = []

    def on_evaluation_source(self, trainer, pl_module, source):
        self.heard.append(("source", [q.id for q in source.questions]))

    def on_judges_ready(self, trainer, pl_module, judging):
        self.heard.append(("judges", judging.names, judging.primary))


def fit(tmp_path, callbacks, max_steps=2):
    L.seed_everything(0, verbose=False)
    module = EMFineTune(base=SPEC, adapter=AdapterSpec(r=1, layers=[1]), lr=0.01, warmup_steps=0, schedule_steps=20)
    data = ChatDataModule(train_files=["configs/data/unit_conversions.jsonl"], base=SPEC)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False, callbacks=callbacks)
    trainer.fit(module, data)
    return tmp_path / "run" / "version_0"


def sample_generations():
    return SampleGenerations("configs/questions/demo_questions.yaml", select=["magic_lamp"], every_n_steps=2,
                             sampling=SamplingConfig(samples_per_paraphrase=1, max_new_tokens=3), at_checkpoints=False)


@pytest.mark.parametrize("judge_first", [True, False])
def test_the_judge_gets_the_questions_in_either_order(tmp_path, judge_first):
    listener = Listener()
    gen, judge = sample_generations(), InLoopJudge(ConstantJudge(), judge_prompts=["aligned", "coherent"], cache=False)
    run = fit(tmp_path, [judge, listener, gen] if judge_first else [gen, listener, judge])
    # each event once (their order depends on the list: the judge announces from inside the source's event)
    assert sorted(listener.heard) == [("judges", ["aligned", "coherent"], "constant"), ("source", ["magic_lamp"])]
    meta = json.loads((run / "generations" / "step_0000002.meta.json").read_text())
    assert meta["judges"] and "eval/em_rate" in meta["metrics"]  # the point was judged and logged


def test_a_missing_partner_is_one_error_before_training(tmp_path):
    judge = InLoopJudge(ConstantJudge(), cache=False)
    with pytest.raises(ValueError, match="InLoopJudge needs a SampleGenerations callback"):
        fit(tmp_path / "a", [judge])
    with pytest.raises(ValueError, match="MechanisticProbes needs an InLoopJudge"):
        fit(tmp_path / "b", [sample_generations(), MechanisticProbes(every_n_steps=None)])
    assert not (tmp_path / "b" / "run" / "version_0" / "generations").exists()  # no point was sampled
