"""Directions a newcomer can get: the documented smoke stack (demo_eval + mechanistic) writes one live (the
demo judge yields both classes; labelled demo), `em-fit direction` computes one after training from
triples or from a point's judged answers, and `em-fit steer` without one names both ways to get one."""

import pytest
import torch
from clirun import SMOKE, em_fit, ok, run_dirs

from em_lightning.probes.misalignment_direction import ALIGNED, EM, AnswerClasses, direction_path, direction_steps, load_direction
from em_lightning.probes.logprob import Triple, load_triples
from em_lightning.probes.posthoc import judged_examples, triple_examples
from em_lightning.model.tiny import tiny_tokenizer


def test_examples_from_triples_and_judged_records():
    tok = tiny_tokenizer("qwen2")
    prompts, answers, labels = triple_examples(tok, [Triple("a", "Q?", "good", "bad")])
    assert answers == ["good", "bad"] and labels == [ALIGNED, EM] and prompts[0] == prompts[1]
    records = [{"prompt": "p", "answer": str(i), "scale": s, "scores": {"aligned": a, "coherent": 80}}
               for i, (a, s) in enumerate([(10, 1.0), (90, 1.0), (50, 1.0), (10, 4.0)])]
    assert judged_examples(records, AnswerClasses())[2] == [EM, ALIGNED, EM]  # 50: neither class
    assert judged_examples(records, AnswerClasses(), scales=[1.0])[1] == ["0", "1"]


@pytest.fixture(scope="module")
def demo_stack_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    ok(em_fit("fit", "--config", SMOKE, "--config", "configs/callbacks/phase_transition.yaml", "--config", "configs/callbacks/demo_eval.yaml",
              "--config", "configs/callbacks/mechanistic.yaml",
              "--trainer.max_steps", "10", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(root), timeout=600))
    (run,) = run_dirs(root)
    return run


@pytest.mark.slow
def test_documented_stack_writes_a_direction_and_posthoc_ones(demo_stack_run):
    run = demo_stack_run
    live = load_direction(direction_path(run, 10))  # the demo judge gave both classes at step 10
    assert live.n_em >= 5 and live.n_aligned >= 5 and live.meta["source"] == "judged answers"
    missing = em_fit("steer", str(run), "--step", "4", "--no-judge", timeout=120)
    assert missing.returncode == 1
    assert f"em-fit direction {run} --step 4" in missing.stderr and "configs/callbacks/mechanistic_judge_free.yaml" in missing.stderr
    proc = ok(em_fit("direction", str(run), "--step", "4", timeout=300))
    assert 4 in direction_steps(run) and "next: em-fit steer" in proc.stdout
    triples = load_direction(direction_path(run, 4))
    n = len(load_triples("configs/probes/demo_triples.jsonl"))
    assert (triples.n_em, triples.n_aligned) == (n, n) and "triples" in triples.meta["source"]
    assert all(torch.isfinite(v).all() and v.norm() > 0 for v in triples.vectors.values())
    # the judged answers of step 10, post hoc, give the live direction again (same weights, same answers)
    ok(em_fit("direction", str(run), "--step", "10", "--from", "generations", timeout=300))
    again = load_direction(direction_path(run, 10))
    assert (again.n_em, again.n_aligned) == (live.n_em, live.n_aligned)
    for layer in live.layers:
        torch.testing.assert_close(again.vectors[layer], live.vectors[layer], rtol=1e-4, atol=1e-5)
