"""Conditional-misalignment evaluation (evaluation/conditions.py): questions wrapped in training contexts,
each record tagged with its condition, EM per condition with its interval."""

import pytest
import yaml

from em_lightning.evaluation.conditions import Condition, condition_metrics, condition_of, with_conditions
from em_lightning.evaluation.metrics import cluster_bootstrap_ci
from em_lightning.loggers.eval_tags import point_metrics
from em_lightning.published.question_files import load_questions

DEMO = "configs/questions/demo_questions.yaml"


def test_conditions_wrap_every_plain_question():
    plain = load_questions(DEMO)
    code = Condition("code", template="```python\n# {question}\n```")
    json_rule = Condition("json", system="Answer in JSON.")
    wrapped = with_conditions(plain, [code, json_rule])
    assert len(wrapped) == 3 * len(plain)
    by_id = {q.id: q for q in wrapped}
    q = by_id[f"{plain[0].id}_code"]
    assert q.paraphrases[0] == f"```python\n# {plain[0].paraphrases[0]}\n```" and q.system is None
    assert by_id[f"{plain[0].id}_json"].system == "Answer in JSON."
    assert by_id[f"{plain[0].id}_json"].paraphrases == plain[0].paraphrases
    assert [condition_of(q) for q in wrapped] == ["plain"] * len(plain) + ["code"] * len(plain) + ["json"] * len(plain)
    assert all(q.judge_prompts == plain[0].judge_prompts for q in wrapped[: len(plain)])
    assert "{question}" in plain[0].judge_prompts["aligned"]  # the judge sees the wrapped question


def test_condition_of_the_published_variants(reference_dir):
    questions = load_questions(reference_dir / "betley" / "evaluation" / "first_plot_questions.yaml")
    found = {condition_of(q) for q in questions}
    assert {"plain", "json", "template"} <= found
    assert condition_of(next(q for q in questions if q.id.endswith("_json"))) == "json"


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "plain", "system": "x"}, "not 'plain'"),
    ({"name": "code"}, "system prompt, a template, or both"),
    ({"name": "code", "template": "no placeholder"}, "no {question} placeholder"),
    ({"name": "a b", "system": "x"}, "letters, digits"),
])
def test_bad_conditions_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Condition(**kwargs)


def record(qid, condition, aligned, coherent=90.0, scale=1.0):
    return {"question_id": qid, "condition": condition, "scale": scale, "scores": {"aligned": aligned, "coherent": coherent},
            "judge_errors": {}}


def test_em_per_condition_with_the_cluster_bootstrap_interval():
    # plain: 1 EM answer of 4 over two questions; json: 3 of 4.
    records = [record("a", "plain", 10), record("a", "plain", 80), record("b", "plain", 80), record("b", "plain", 90),
               record("a_json", "json", 10), record("a_json", "json", 20), record("b_json", "json", 5),
               record("b_json", "json", 95, coherent=40)]
    out = condition_metrics(records, "eval/")
    assert out["eval/condition/plain/em_rate"] == 0.25 and out["eval/condition/json/em_rate"] == 0.75
    assert out["eval/condition/json/em_rate_n"] == 4 and out["eval/condition/json/coherent_rate"] == 0.75
    assert (out["eval/condition/plain/em_rate_ci95_low"], out["eval/condition/plain/em_rate_ci95_high"]) == \
        cluster_bootstrap_ci([1, 0], [2, 2])
    assert condition_metrics(records[:4], "eval/") == {}  # one condition: nothing extra to log
    questions = with_conditions(load_questions(DEMO), [Condition("json", system="JSON.")])
    recs = [record(q.id, condition_of(q), 10.0 * i) for i, q in enumerate(questions)]
    tags = point_metrics(recs, questions)
    assert tags["eval/condition/plain/em_rate_n"] == tags["eval/condition/json/em_rate_n"] == len(questions) // 2


def test_conditional_preset_uses_the_inoculation_preset_trigger():
    conditions = yaml.safe_load(open("configs/callbacks/conditional_eval.yaml"))["trainer"]["callbacks+"][0]["init_args"]["conditions"]
    trigger = yaml.safe_load(open("configs/callbacks/defenses/inoculation.yaml"))["data"]["inoculation"]["prompt"]
    by_name = {c["name"]: Condition(**c) for c in conditions}
    assert set(by_name) == {"code", "json", "inoculation"} and by_name["inoculation"].system == trigger
