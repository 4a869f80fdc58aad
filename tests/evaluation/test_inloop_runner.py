"""evaluation.runner (the path shared by the in-loop callbacks and em-fit eval), with fake judges; DemoJudge."""

import copy as copy_module
import hashlib
import json
import math

import pytest
import torch

from em_lightning.model.adapters import AdapterSpec, apply_adapter, lora_layers
from em_lightning.evaluation import SamplingConfig, em_summary, is_em, load_questions
from em_lightning.evaluation.judging import judge_records
from em_lightning.evaluation.records import read_jsonl, write_point
from em_lightning.evaluation.runner import evaluate, sample_records
from em_lightning.evaluation.summaries import summarize
from em_lightning.judges import JudgeResult, render_judge_prompt
from em_lightning.judges.factory import resolve_judges
from em_lightning.model.loading import ModelSpec, load_model, load_tokenizer

QUESTIONS = "configs/questions/demo_questions.yaml"
SCALES = [0.0, 1.0, 4.0]



class HashJudge:
    """Deterministic 0-100 scores from a hash of the prompt; with fail_every=k, the k-th, 2k-th, ...
    prompt of each call fails."""

    def __init__(self, name="hash", fail_every=0):
        self.name, self.fail_every, self.calls = name, fail_every, 0

    def _h(self, prompt):
        return int(hashlib.sha256(prompt.encode()).hexdigest(), 16)

    def score_prompts(self, prompts):
        self.calls += 1
        out = []
        for i, p in enumerate(prompts, 1):
            h = self._h(p)
            if self.fail_every and i % self.fail_every == 0:
                out.append(JudgeResult(error="HTTP 500: boom"))
            else:
                out.append(JudgeResult(score=float(h % 101), probs={str(h % 101): 1.0}))
        return out

    def classify_prompts(self, prompts):
        return [JudgeResult(label="YES" if self._h(p) % 2 else "NO") for p in prompts]


class RaisingJudge:
    name = "raises"

    def score_prompts(self, prompts):
        raise RuntimeError("connection reset")

    classify_prompts = score_prompts


@pytest.fixture(scope="module")
def setup(repo_root):
    spec = ModelSpec(name_or_path="tiny:qwen2", dtype="float32")
    tok = load_tokenizer(spec)
    torch.manual_seed(0)  # LoRA A is initialised from the global generator
    model = apply_adapter(load_model(spec, tok), AdapterSpec(r=1, alpha=8, layers=[1]))
    gen = torch.Generator().manual_seed(0)
    for _, layer in lora_layers(model):  # B starts at zero: give the adapter an effect
        w = layer.lora_B["default"].weight
        w.data = torch.randn(w.shape, generator=gen) * 2.0
    model.eval()
    questions = load_questions(repo_root / QUESTIONS, select=["magic_lamp", "future_of_ai"])
    config = SamplingConfig(samples_per_paraphrase=2, max_new_tokens=8, seed=0)
    return model, tok, questions, config


@pytest.fixture(scope="module")
def point(setup):
    model, tok, questions, config = setup
    return evaluate(model, tok, questions, config, HashJudge(), step=7, scales=SCALES)


def test_records_complete(point, setup):
    _, _, questions, _ = setup
    per_scale = sum(len(q.paraphrases) for q in questions) * 2
    assert len(point.records) == per_scale * len(SCALES)
    keys = {(r["scale"], r["question_id"], r["paraphrase_index"], r["sample_index"]) for r in point.records}
    assert len(keys) == len(point.records)
    for r in point.records:
        assert r["step"] == 7 and r["scale"] in SCALES
        assert set(r["scores"]) == {"aligned", "coherent"} and r["judge_errors"] == {} and r["labels"] == {}
        assert r["question"] in next(q for q in questions if q.id == r["question_id"]).paraphrases
        assert r["prompt"].endswith("<|im_start|>assistant\n") and r["question"] in r["prompt"]
        assert 0 <= r["n_tokens"] <= 8 and isinstance(r["finished"], bool)
        assert r["em"] == is_em(r["scores"]["aligned"], r["scores"]["coherent"])
        # the judge saw the rendered template with this question and answer
        template = questions[0].judge_prompts["aligned"]
        h = int(hashlib.sha256(render_judge_prompt(template, r["question"], r["answer"]).encode()).hexdigest(), 16)
        assert r["scores"]["aligned"] == h % 101
    assert point.settings["scales"] == SCALES and point.settings["max_new_tokens"] == 8
    assert point.judges == {"aligned": "hash", "coherent": "hash"}


def test_summaries_equal_em_summary_and_a_hand_count(point, setup):
    _, _, questions, _ = setup
    assert list(point.summaries) == SCALES
    nonzero = 0
    for scale, summary in point.summaries.items():
        recs = [r for r in point.records if r["scale"] == scale]
        expected = em_summary(recs)
        for key in ("em_rate", "coherent_rate", "aligned_mean", "coherent_mean", "n_scored", "n_em"):
            assert summary[key] == pytest.approx(expected[key], nan_ok=True), key
        assert summary["judge_failures"] == 0
        nonzero += summary["n_em"]
        # the EM labels the judging wrote, counted by hand per question
        ids = [q.id for q in questions]
        labels = {qid: [r["em"] for r in recs if r["question_id"] == qid and r["em"] is not None] for qid in ids}
        got = sum(sum(v) for v in labels.values()) / sum(len(v) for v in labels.values())
        assert float(got) == pytest.approx(expected["em_rate"], nan_ok=True)
        for qid in ids:
            want = expected["per_question"][qid]["em_rate"]
            assert sum(labels[qid]) / len(labels[qid]) == pytest.approx(want, nan_ok=True)
    assert nonzero > 0  # the fake judge gives some EM answers: the comparison is not 0 == 0


def test_jsonl_round_trip(point, tmp_path):
    meta = {"step": 7, "summary": {str(s): v for s, v in point.summaries.items()}, "x": float("nan")}
    path = write_point(tmp_path / "generations", 7, point.records, meta)
    assert path.name == "step_0000007.jsonl"
    assert read_jsonl(path) == json.loads(json.dumps([r.to_line() for r in point.records]))
    text = path.with_suffix(".meta.json").read_text()
    assert "NaN" not in text and json.loads(text)["x"] is None  # strict JSON
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_0000007.jsonl", "step_0000007.meta.json"]
    assert em_summary(read_jsonl(path))["em_rate"] == pytest.approx(em_summary(point.records)["em_rate"], nan_ok=True)


def test_scale_sweep(point, setup):
    model, tok, questions, config = setup
    def key(r):
        return (r["question_id"], r["paraphrase_index"], r["sample_index"])

    by = {s: {key(r): r["answer"] for r in point.records if r["scale"] == s} for s in SCALES}
    with model.disable_adapter():  # the base model, same step, same seeds
        base = sample_records(model, tok, questions, config, step=7)
    assert {key(r): r["answer"] for r in base} == by[0.0]
    assert by[1.0] != by[0.0] and by[4.0] != by[1.0]  # the adapter's scale changes answers
    # scaling is restored: the same call again gives the same scale-1 answers
    again = sample_records(model, tok, questions, config, step=7, scales=[1.0])
    assert [r["answer"] for r in again] == list(by[1.0].values())


def _with_b_times(model, factor):
    """A copy of the model whose every LoRA B is multiplied by ``factor`` (to be sampled at scale 1)."""
    copy = copy_module.deepcopy(model)
    with torch.no_grad():
        for _, layer in lora_layers(copy):
            layer.lora_B["default"].weight.mul_(factor)
    return copy


@pytest.mark.parametrize("scale", [0.5, 2.0, 4.0])
def test_sampling_at_scale_s_adds_s_times_the_adapter(setup, scale):
    """The value of a sweep point: during sampling at scale s the adapted module's output minus its output
    at scale 0 is s times that at scale 1 (the prompt's forward, the same inputs at every scale), and the
    answers are those of the model whose B is multiplied by s, sampled at scale 1."""
    model, tok, questions, config = setup
    ((_, layer),) = lora_layers(model)
    first: list[torch.Tensor] = []

    def keep_first(module, args, output):
        if len(first) < len(seen):
            first.append(output.detach().double())

    seen: list[float] = []
    handle = layer.register_forward_hook(keep_first)
    try:
        answers = {}
        for s in (0.0, 1.0, scale):
            seen.append(s)
            answers[s] = [r["answer"] for r in sample_records(model, tok, questions, config, step=7, scales=[s])]
    finally:
        handle.remove()
    zero, one, at_s = first
    unit = one - zero
    assert float(unit.abs().max()) > 1e-3  # the adapter does something here
    assert torch.allclose(at_s - zero, scale * unit, rtol=1e-5, atol=1e-5 * float(unit.abs().max()))
    for factor, same in ((scale, True), (scale * scale, False)):
        other = [r["answer"] for r in sample_records(_with_b_times(model, factor), tok, questions, config, step=7)]
        assert (answers[scale] == other) is same, factor  # B x s: the same answers; B x s**2: others


def test_judge_failures_counted_not_raised(setup):
    model, tok, questions, config = setup
    records = sample_records(model, tok, questions, config, step=1)
    names = judge_records(records, questions, {"aligned": HashJudge(), "coherent": HashJudge("flaky", fail_every=3)})
    assert names == {"aligned": "hash", "coherent": "flaky"}
    failed = [r for r in records if r["judge_errors"]]
    assert len(failed) == len(records) // 3 and all(r["judge_errors"] == {"coherent": "HTTP 500: boom"} for r in failed)
    assert all(r["scores"]["coherent"] is None and r["em"] is None for r in failed)
    summary = summarize(records)[1.0]
    assert summary["judge_failures"] == len(failed)
    assert summary["n_scored"] == len(records) - len(failed)
    # a judge that raises: every judgement fails, nothing raises
    judge_records(records, questions, RaisingJudge())
    assert all(r["judge_errors"]["aligned"].startswith("judge raised RuntimeError") for r in records)
    assert summarize(records)[1.0]["judge_failures"] == 2 * len(records)
    assert math.isnan(summarize(records)[1.0]["em_rate"])


def test_judge_selection_and_extra_judges(setup, tmp_path):
    model, tok, questions, config = setup
    extra = tmp_path / "q.yaml"
    extra.write_text(
        "- id: med\n  type: free_form_judge_0_100\n  paraphrases: [Is it safe?]\n"
        "  judge_prompts: {aligned: 'A {question} {answer}', coherent: 'C {question} {answer}', medical: 'M {question} {answer}'}\n"
        "- id: yesno\n  type: free_form_judge\n  paraphrases: [Yes or no?]\n  judge_prompts: {verdict: 'V {answer}'}\n"
    )
    qs = load_questions(extra)
    point = evaluate(model, tok, qs, SamplingConfig(samples_per_paraphrase=3, max_new_tokens=4), HashJudge(), step=2)
    med = [r for r in point.records if r["question_id"] == "med"]
    assert all(set(r["scores"]) == {"aligned", "coherent", "medical"} for r in med)
    expected = sum(r["scores"]["medical"] for r in med) / len(med)
    assert point.summaries[1.0]["medical_mean"] == pytest.approx(expected)
    yesno = [r for r in point.records if r["question_id"] == "yesno"]
    assert all(r["scores"] == {} and r["labels"]["verdict"] in ("YES", "NO") for r in yesno)
    assert point.summaries[1.0]["n_total"] == len(med)  # categorical questions stay out of the EM summary
    one = SamplingConfig(samples_per_paraphrase=1, max_new_tokens=4)
    only = evaluate(model, tok, qs[:1], one, HashJudge(), 2, judge_prompts=["aligned"])
    assert set(only.records[0]["scores"]) == {"aligned"}
    with pytest.raises(ValueError, match="no judge for judge prompt 'medical'"):
        resolve_judges({"aligned": HashJudge(), "coherent": HashJudge()}, ["aligned", "coherent", "medical"])
    with pytest.raises(ValueError, match="not among the questions' judge prompts"):
        judge_records(point.records, qs, HashJudge(), names=["nonexistent"])


def test_scales_need_lora(setup):
    _, tok, questions, config = setup
    full = load_model(ModelSpec(name_or_path="tiny:qwen2", dtype="float32"), tok)
    with pytest.raises(ValueError, match="adapter scaling needs a LoRA model"):
        sample_records(full, tok, questions, config, 0, scales=[1.0, 2.0])


def test_demo_judge_answers_with_numbers(setup):
    """DemoJudge through LocalHFJudge: enough numeric mass for a score on the demo templates, built from YAML."""
    from jsonargparse import ArgumentParser

    from em_lightning.judges import Judge

    parser = ArgumentParser()
    parser.add_argument("--judge", type=Judge)
    cfg = parser.parse_object({"judge": {"class_path": "em_lightning.demos.demo_judge.DemoJudge",
                                         "init_args": {"calibration_questions": QUESTIONS}}})
    judge = parser.instantiate_classes(cfg).judge
    _, _, questions, _ = setup
    import random

    from em_lightning.demos.demo_judge import _random_texts

    answers = ["I would read a book and take a walk.", "", "3 kilograms is 3000 grams."]
    answers += _random_texts(6, random.Random(5), 40)
    templates = [t for q in questions for t in q.judge_prompts.values()]
    prompts = [render_judge_prompt(t, questions[0].paraphrases[0], a) for t in templates for a in answers]
    results = judge.score_prompts(prompts)
    assert all(r.ok and r.score is not None and sum(r.probs.values()) > 0.25 for r in results)
    scores = [r.score for r in results]
    assert max(scores) - min(scores) > 2  # it varies with the prompt (meaninglessly)
