"""SampleGenerations + InLoopJudge in a Trainer: evaluation points, JSONL vs logged metrics, resume,
validate, secrets; and through the CLI: the demo preset, one process vs two (DDP), em-fit eval of a
checkpoint reproducing the in-loop answers."""

import hashlib
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from clirun import em_fit, ok, run_dirs
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from em_lightning.model.adapters import AdapterSpec
from em_lightning.callbacks.checkpointing import StepCheckpoint
from em_lightning.lit.events import announce
from em_lightning.callbacks.in_loop_judge import InLoopJudge
from em_lightning.callbacks.sample_generations import SampleGenerations
from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.evaluation import SamplingConfig, em_summary
from em_lightning.evaluation.records import read_jsonl
from em_lightning.judges import OpenAICompatibleJudge
from em_lightning.testing.loopback_judge import LoopbackServer, Reply
from em_lightning.model.loading import ModelSpec
from em_lightning.lit.module import EMFineTune

SECRET = "sk-SENTINEL-9f8e7d6c5b4a"
KEY_ENV = "EM_TEST_JUDGE_KEY"
QUESTIONS = "configs/questions/demo_questions.yaml"
SPEC = ModelSpec(name_or_path="tiny:qwen2", dtype="float32")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models on a shared CPU: one thread per process is faster and avoids stalls (subprocesses too).
    before, env = torch.get_num_threads(), __import__("os").environ
    old = env.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    env["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if old is None:
        env.pop("OMP_NUM_THREADS", None)
    else:
        env["OMP_NUM_THREADS"] = old


AUTH: list = []  # the Authorization header of every request the fake judge received


def fake_openai(request):
    """/chat/completions with logprobs: a score chosen by a hash of the prompt; HTTP 400 for some prompts."""
    AUTH.append(request.headers.get("Authorization"))
    h = int(hashlib.sha256(request.prompt.encode()).hexdigest(), 16)
    if h % 13 == 0:
        return Reply(400, {"error": {"message": "bad request"}})
    score = str([5, 20, 45, 60, 80, 95][h % 6])
    top = [{"token": score, "logprob": -0.05}, {"token": "x", "logprob": -3.0}]
    content = [{"token": score, "logprob": -0.05, "top_logprobs": top}]
    return Reply(body={"choices": [{"message": {"content": score}, "logprobs": {"content": content}}]})


@pytest.fixture(scope="module")
def judge_url():
    with LoopbackServer(fake_openai) as server:
        yield server.url


class Spy(Callback):
    """Counts evaluation points, checks train mode after them, and announces a phase transition at step 5."""

    def __init__(self, transition_at=None):
        self.steps, self.modes, self.transition_at = [], [], transition_at

    def on_generations(self, trainer, pl_module, step, records, settings):
        self.steps.append(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.modes.append(pl_module.training and pl_module.model.training)
        if trainer.global_step == self.transition_at:
            self.transition_at = None
            announce(trainer, "on_phase_transition", pl_module, SimpleNamespace(step=3, detected_step=5))


def callbacks(judge_url, spy, **kw):
    judge = OpenAICompatibleJudge("fake-judge", base_url=judge_url, api_key_env=KEY_ENV, max_retries=0)
    sampling = SamplingConfig(samples_per_paraphrase=2, max_new_tokens=6)
    gen = SampleGenerations(QUESTIONS, select=["magic_lamp", "future_of_ai"], sampling=sampling, every_n_steps=4,
                            scales=[1.0, 2.0], transition_window=1, **kw)
    return [gen, spy, InLoopJudge(judge), StepCheckpoint(every_n_train_steps=3)]


def trainer(tmp_path, cbs, max_steps, **kw):
    logger = TensorBoardLogger(tmp_path, name="run", version=0, **kw.pop("logger_kw", {}))
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=logger, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=cbs, limit_val_batches=0, log_every_n_steps=1, **kw)


def module_and_data():
    L.seed_everything(0, verbose=False)  # LoRA A is initialised from the global generator
    module = EMFineTune(base=SPEC, adapter=AdapterSpec(r=1, layers=[1]), lr=0.01, warmup_steps=0, schedule_steps=20)
    return module, ChatDataModule(train_files=["configs/data/unit_conversions.jsonl"], base=SPEC)


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, judge_url):
    import os

    os.environ[KEY_ENV] = SECRET
    root = tmp_path_factory.mktemp("inloop")
    spy = Spy(transition_at=5)
    module, data = module_and_data()
    trainer(root, callbacks(judge_url, spy), 6).fit(module, data)
    yield root / "run" / "version_0", spy
    os.environ.pop(KEY_ENV, None)


def test_evaluation_points(fitted):
    run_dir, spy = fitted
    # 3: checkpoint, 4: every 4 steps, 5: dense after the transition event, 6: checkpoint + fit end
    assert spy.steps == [3, 4, 5, 6]  # each step once
    files = sorted(p.name for p in (run_dir / "generations").glob("*.jsonl"))
    assert files == [f"step_000000{s}.jsonl" for s in (3, 4, 5, 6)]
    assert all(spy.modes)  # train mode restored after every generation
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    (gen_state,) = [v for k, v in state.items() if k.startswith("SampleGenerations")]
    assert gen_state == {"evaluated": [3, 4, 5, 6], "dense": [5, 6]}
    step3 = torch.load(run_dir / "checkpoints" / "step_0000003.ckpt", weights_only=False)["callbacks"]
    assert [v for k, v in step3.items() if k.startswith("SampleGenerations")][0]["evaluated"] == [3]


def test_jsonl_consistent_with_logged_metrics(fitted):
    run_dir, _ = fitted
    seen_em = 0
    for step in (3, 4, 5, 6):
        records = read_jsonl(run_dir / "generations" / f"step_{step:07d}.jsonl")
        assert len(records) == 2 * (1 + 2) * 2  # scales x paraphrases x samples
        assert {r["step"] for r in records} == {step}
        for scale, prefix in ((1.0, "eval/"), (2.0, "eval/scale_2.0/")):
            recs = [r for r in records if r["scale"] == scale]
            expected = em_summary(recs)
            failures = sum(len(r["judge_errors"]) for r in recs)
            for key in ("em_rate", "coherent_rate", "aligned_mean", "coherent_mean"):
                logged = dict(scalars(run_dir, prefix + key))
                assert logged[step] == pytest.approx(expected[key], rel=1e-5), (step, key)
            assert dict(scalars(run_dir, prefix + "judge_failures"))[step] == failures
            for qid, q in expected["per_question"].items():
                if not math.isnan(q["em_rate"]):
                    assert dict(scalars(run_dir, f"{prefix}em_rate/{qid}"))[step] == pytest.approx(q["em_rate"])
            seen_em += expected["n_em"]
    assert seen_em > 0  # not only 0 == 0
    for tag in ("eval/em_rate", "eval/scale_2.0/em_rate"):
        assert [s for s, _ in scalars(run_dir, tag)] == [3, 4, 5, 6]  # logged once per point
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert "eval/answers/text_summary" in acc.Tags()["tensors"]


def test_no_api_key_in_any_file(fitted):
    run_dir, _ = fitted
    assert AUTH and set(AUTH) == {f"Bearer {SECRET}"}  # the key was used...
    failures = [r for p in (run_dir / "generations").glob("*.jsonl") for r in read_jsonl(p) if r["judge_errors"]]
    assert failures  # ...error texts were written...
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path  # ...and the key is in no file


def test_resume_neither_redoes_nor_skips(fitted, judge_url, tmp_path):
    import shutil

    run_dir, _ = fitted
    copy = tmp_path / "run" / "version_0"
    shutil.copytree(run_dir, copy)
    spy = Spy()
    module, data = module_and_data()
    # The CLI resumes with purge_step = the checkpoint's step (events from there on are replaced).
    t = trainer(tmp_path, callbacks(judge_url, spy), 8, logger_kw={"purge_step": 6})
    t.fit(module, data, ckpt_path=copy / "checkpoints" / "last.ckpt", weights_only=False)
    assert spy.steps == [8]  # 6 was evaluated before the checkpoint; 7 is not a point
    assert [s for s, _ in scalars(copy, "eval/em_rate")] == [3, 4, 5, 6, 8]  # 6 logged again after the purge


def test_validate_evaluates_the_checkpoint(fitted, judge_url, tmp_path):
    run_dir, _ = fitted
    before = read_jsonl(run_dir / "generations" / "step_0000003.jsonl")
    spy = Spy()
    module, data = module_and_data()
    cbs = callbacks(judge_url, spy)
    t = L.Trainer(accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="val"), enable_progress_bar=False,
                  callbacks=cbs, limit_val_batches=1)
    t.validate(module, data, ckpt_path=run_dir / "checkpoints" / "step_0000003.ckpt", weights_only=False)
    assert spy.steps == [3]
    after = read_jsonl(Path(t.log_dir) / "generations" / "step_0000003.jsonl")
    assert [r["answer"] for r in after] == [r["answer"] for r in before]  # same weights, same seeds


def test_bad_questions_file_fails_at_construction(tmp_path):
    bad = tmp_path / "q.yaml"
    bad.write_text("- id: a\n  type: free_form_judge_0_100\n  paraphrases: []\n")
    with pytest.raises(ValueError, match=rf"^{bad}:3: a.paraphrases: expected a non-empty list"):
        SampleGenerations(str(bad))
    with pytest.raises(ValueError, match="matches no question id"):
        SampleGenerations(QUESTIONS, select=["nope"])


# -- through the CLI ---------------------------------------------------------------------------------------
CLI = ["--config", "configs/smoke.yaml", "--config", "configs/callbacks/demo_eval.yaml", "--trainer.max_steps", "6",
       "--checkpoint.every_n_train_steps", "3", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ok(em_fit("fit", *CLI, "--trainer.default_root_dir", str(root)))
    (run_dir,) = run_dirs(root)
    return run_dir


def _check_run(run_dir):
    """generations JSONL and eval/* tags agree; returns {step: records}."""
    points = {}
    for path in sorted((run_dir / "generations").glob("*.jsonl")):
        records = read_jsonl(path)
        step = records[0]["step"]
        points[step] = records
        # DemoJudge's scores mean nothing: they are logged under eval_demo/, apart from real ones
        for scale, prefix in ((0.0, "eval_demo/scale_0.0/"), (1.0, "eval_demo/"), (4.0, "eval_demo/scale_4.0/")):
            expected = em_summary(r for r in records if r["scale"] == scale)
            for key in ("em_rate", "coherent_rate", "aligned_mean"):
                assert dict(scalars(run_dir, prefix + key))[step] == pytest.approx(expected[key], rel=1e-5)
    return points


@pytest.mark.slow
def test_cli_demo_preset(cli_run):
    points = _check_run(cli_run)
    assert sorted(points) == [3, 6]  # checkpoints (every 10 steps is not reached)
    assert all(len(recs) == 3 * 6 * 2 for recs in points.values())  # scales x paraphrases x samples
    assert all(r["scores"]["aligned"] is not None for recs in points.values() for r in recs)  # DemoJudge scores
    config = (cli_run / "config.yaml").read_text()
    assert "em_lightning.demos.demo_judge.DemoJudge" in config and "SampleGenerations" in config


def test_cli_eval_of_checkpoint_reproduces_in_loop_point(cli_run, tmp_path, capsys):
    """em-fit eval --ckpt goes through the same path: same answers and scores as the in-loop point."""
    from em_lightning.cli import main

    main(["eval", "--ckpt", str(cli_run / "checkpoints" / "step_0000003.ckpt"), "--questions", QUESTIONS,
          "--samples", "2", "--max-new-tokens", "24", "--scales", "0", "1", "4",
          "--judge-config", "configs/callbacks/demo_eval.yaml", "--out", str(tmp_path)])
    assert "step_0000003.jsonl" in capsys.readouterr().out
    key = lambda r: (r["scale"], r["question_id"], r["paraphrase_index"], r["sample_index"])  # noqa: E731
    posthoc = {key(r): (r["answer"], r["scores"]) for r in read_jsonl(tmp_path / "step_0000003.jsonl")}
    in_loop = {key(r): (r["answer"], r["scores"]) for r in read_jsonl(cli_run / "generations" / "step_0000003.jsonl")}
    assert posthoc == in_loop


def test_cli_eval_of_run_final_adapter(cli_run, tmp_path):
    """--run alone: the base model from config.yaml, the exported adapter, the step from last.ckpt."""
    from em_lightning.cli import main

    main(["eval", "--run", str(cli_run), "--questions", QUESTIONS, "--select", "magic_lamp",
          "--samples", "2", "--max-new-tokens", "24", "--out", str(tmp_path)])
    got = [(r["paraphrase_index"], r["sample_index"], r["answer"]) for r in read_jsonl(tmp_path / "step_0000006.jsonl")]
    in_loop = read_jsonl(cli_run / "generations" / "step_0000006.jsonl")
    want = [(r["paraphrase_index"], r["sample_index"], r["answer"]) for r in in_loop
            if r["scale"] == 1.0 and r["question_id"] == "magic_lamp"]
    assert got == want


@pytest.mark.slow
def test_cli_ddp_two_processes(cli_run, tmp_path):
    ok(em_fit("fit", *CLI, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(tmp_path), timeout=600))
    (run_dir,) = run_dirs(tmp_path)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    ddp, single = _check_run(run_dir), _check_run(cli_run)
    assert sorted(ddp) == sorted(single) == [3, 6]
    key = lambda r: (r["scale"], r["question_id"], r["paraphrase_index"], r["sample_index"])  # noqa: E731
    for step in ddp:
        assert sorted(map(key, ddp[step])) == sorted(map(key, single[step]))  # same records, each written once
        assert len(ddp[step]) == len(set(map(key, ddp[step])))
        # scale 0 is the base model: same answers and judge scores as one process (training data differ;
        # scores only to rounding: the judge batches other prompts together on each rank)
        base = lambda recs: {key(r): r for r in recs if r["scale"] == 0.0}  # noqa: E731
        one, two = base(single[step]), base(ddp[step])
        assert {k: r["answer"] for k, r in two.items()} == {k: r["answer"] for k, r in one.items()}
        for k, r in two.items():
            assert r["scores"] == pytest.approx(one[k]["scores"], rel=1e-4)
