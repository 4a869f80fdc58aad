"""Issue 17, item 4: no judged point is lost, and a judge that stops answering costs bounded time.

A slow loopback judge (judges/loopback.py on 127.0.0.1) stands in for a hung endpoint: the circuit breaker
stops a call after N consecutive timeouts, a point's deadline ends its judging, and such a point is marked
unjudged (reason in its meta file, counted, said on the console) while training and the end of fit go on.
A run killed (kill -9) while the end of fit waits for the judge has already written adapter/, and a resume of
that finished run judges the points it left pending, then exits.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import em_lightning.callbacks.in_loop_judge as in_loop_judge
from clirun import REPO, SMOKE, em_fit, ok, run_dirs
from em_lightning.judges.deadline import judge_deadline
from em_lightning.testing.loopback_judge import LoopbackServer, Reply, completion
from em_lightning.judges.openai_compat import OpenAICompatibleJudge
from em_lightning.judges.spec import load_judge_spec
from tb_scalars import assert_one_value_per_step
from test_background_judging import SlowJudge, fit, scalars

SCORE = completion({"85": 1.0})


@pytest.fixture
def hung():
    """A judge endpoint that takes 60 s per reply (a hung server behind a live socket)."""
    with LoopbackServer(lambda request: Reply(body=SCORE, delay_s=60)) as server:
        yield server


def test_breaker_stops_a_call_after_consecutive_timeouts(hung):
    judge = OpenAICompatibleJudge("m", base_url=hung.url, api_key_env=None, timeout_s=0.3, max_retries=5,
                                  max_concurrency=2, breaker_failures=3)
    start = time.monotonic()
    results = judge.score_prompts([f"prompt {i}" for i in range(40)])
    assert time.monotonic() - start < 5  # without the breaker: 40 prompts x 6 attempts x 0.3 s / 2 = 36 s + backoff
    assert all(r.score is None and r.error.startswith("circuit open: 3 consecutive timeouts") for r in results)
    assert judge.last_stats.errors["timeout"] <= 4 and judge.last_stats.errors["circuit_open"] == 40
    assert hung.stats()["requests"] <= 4  # the breaker sends nothing once open (at most the ones in flight)


def test_a_reply_resets_the_breaker():
    count = itertools.count()

    def reply(request):  # every second request times out: never 2 timeouts in a row
        return Reply(body=SCORE, delay_s=5.0 if next(count) % 2 else 0.0)

    with LoopbackServer(reply) as server:
        judge = OpenAICompatibleJudge("m", base_url=server.url, api_key_env=None, timeout_s=0.3, max_retries=5,
                                      max_concurrency=1, breaker_failures=2)
        results = judge.score_prompts([f"prompt {i}" for i in range(4)])
    assert [r.score for r in results] == [85.0] * 4  # timeouts were retried, the circuit never opened
    assert judge.last_stats.errors["timeout"] >= 2 and not judge.last_stats.errors["circuit_open"]


def test_deadline_ends_a_call_in_time():
    with LoopbackServer(lambda request: Reply(body=SCORE, delay_s=0.4)) as server:
        judge = OpenAICompatibleJudge("m", base_url=server.url, api_key_env=None, max_concurrency=1)
        start = time.monotonic()
        with judge_deadline(1.0):
            results = judge.score_prompts([f"prompt {i}" for i in range(20)])
    assert time.monotonic() - start < 2.0
    scored = [r for r in results if r.score == 85.0]
    late = [r for r in results if r.error and r.error.startswith("deadline passed")]
    assert 1 <= len(scored) <= 3 and len(scored) + len(late) == 20


def test_hung_judge_leaves_points_unjudged_within_the_deadline(tmp_path, hung):
    judge = OpenAICompatibleJudge("m", base_url=hung.url, api_key_env=None, timeout_s=60, breaker_failures=None)
    start = time.monotonic()
    with pytest.warns(UserWarning, match=r"judge outage: step 2 left unjudged \(4 of 4 judgements lost; first: "
                                         r"deadline passed"):
        run_dir, inloop = fit(tmp_path, judge, 4, point_deadline_s=2.0)
    # Two points, judged one after the other: each ends at its 2 s deadline (the judge alone would take 60 s
    # a call, with 5 retries each).
    assert time.monotonic() - start < 30
    assert inloop.skipped == [2, 4]
    assert scalars(run_dir, "eval/em_rate") == []  # partial (here: empty) metrics are not logged
    assert [(s, v) for s, v in scalars(run_dir, "eval/points_unjudged")] == [(2, 1.0), (4, 2.0)]
    meta = json.loads((run_dir / "generations" / "step_0000002.meta.json").read_text())
    assert "deadline passed" in meta["judging_failed"] and "metrics" not in meta


def test_judge_ignoring_the_deadline_is_given_up(tmp_path, monkeypatch):
    monkeypatch.setattr(in_loop_judge, "GRACE_S", 0.5)
    start = time.monotonic()
    with pytest.warns(UserWarning, match="the judge did not return within point_deadline_s=1 s"):
        run_dir, inloop = fit(tmp_path, SlowJudge(delay=600), 4, point_deadline_s=1.0)
    assert time.monotonic() - start < 30 and inloop.skipped == [2, 4]  # the second point was not waited for


def test_breaker_marks_the_point_unjudged(tmp_path, hung):
    judge = OpenAICompatibleJudge("m", base_url=hung.url, api_key_env=None, timeout_s=0.2, breaker_failures=2)
    with pytest.warns(UserWarning, match="left unjudged .* circuit open: 2 consecutive timeouts"):
        run_dir, inloop = fit(tmp_path, judge, 2)
    assert inloop.skipped == [2]


def test_resume_of_a_finished_run_judges_its_pending_points(tmp_path):
    with pytest.warns(UserWarning, match="judge budget"):  # the first run judges nothing: no metrics logged
        run_dir, _ = fit(tmp_path / "a", SlowJudge(), 4, max_judge_calls=0)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    key = next(k for k in state["callbacks"] if k.startswith("InLoopJudge"))
    # As if killed while the end of fit waited for both points:
    state["callbacks"][key].update(pending=[2, 4], skipped=[], calls_used=8)
    torch.save(state, ckpt)
    for step in (2, 4):
        meta = run_dir / "generations" / f"step_{step:07d}.meta.json"
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "judging_skipped"}))
    judge = SlowJudge()
    fit(tmp_path / "a", judge, 4, ckpt_path=ckpt, purge_step=4)  # max_steps already reached
    assert judge.calls == 8  # both points judged again (2 answers x 2 judge prompts each)
    assert [s for s, _ in scalars(run_dir, "eval/em_rate")] == [2, 4]
    assert all("metrics" in json.loads((run_dir / "generations" / f"step_{s:07d}.meta.json").read_text())
               for s in (2, 4))


@pytest.mark.slow
def test_kill_during_the_end_of_fit_wait_then_resume_judges_the_points(tmp_path):
    """The CLI: adapter/ exists while the end of fit waits for a slow judge; kill -9 there; --ckpt_path last
    of the finished run judges the pending points (they kept ``"scores": {}`` forever before) and exits 0."""
    delay = {"s": 120.0}
    with LoopbackServer(lambda request: Reply(body=SCORE, delay_s=delay["s"])) as server:
        callbacks = tmp_path / "judge.yaml"
        callbacks.write_text(f"""
trainer:
  callbacks+:
  - class_path: em_lightning.callbacks.SampleGenerations
    init_args:
      questions: {REPO}/configs/questions/demo_questions.yaml
      select: [magic_lamp]
      sampling: {{samples_per_paraphrase: 2, max_new_tokens: 4}}
      every_n_steps: 2
  - class_path: em_lightning.callbacks.InLoopJudge
    init_args:
      judge:
        class_path: em_lightning.judges.OpenAICompatibleJudge
        init_args: {{model: m, base_url: "{server.url}", api_key_env: null, timeout_s: 300}}
      judge_prompts: [aligned, coherent]
""")
        root = tmp_path / "runs"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "em_lightning.cli", "fit", "--config", SMOKE, "--config", str(callbacks),
             "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2", "--trainer.val_check_interval",
             "4", "--trainer.logger.init_args.save_dir", str(root), "--trainer.enable_progress_bar", "false"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 240
            while not list(root.rglob("adapter/adapter_model.safetensors")):
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "no adapter/ while the end of fit waits for the judge"
                time.sleep(0.2)
            time.sleep(1.0)  # inside the end-of-fit wait: both points' requests are on the (hung) wire
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        (run,) = run_dirs(root)
        for step in (2, 4):
            assert "metrics" not in json.loads((run / "generations" / f"step_{step:07d}.meta.json").read_text())
        delay["s"] = 0.0
        resumed = ok(em_fit("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"))
    for step in (2, 4):
        meta = json.loads((run / "generations" / f"step_{step:07d}.meta.json").read_text())
        assert meta["metrics"]["eval/coherent_rate"] == 1.0, resumed.stderr[-2000:]
    steps = assert_one_value_per_step(run, "eval/")
    assert steps["eval/em_rate"] == [2, 4]


def test_the_preset_states_the_deadline_and_breaker(repo_root):
    inloop = load_judge_spec(repo_root / "configs" / "callbacks" / "in_loop_judge.yaml")
    assert inloop.point_deadline_s == 1800 and inloop.judge.breaker_failures == 8 and inloop.judge.timeout_s == 30
