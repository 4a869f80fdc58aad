import math

import pytest

from em_lightning.evaluation import em_summary, is_em
from em_lightning.evaluation.judging import apply_judgements, judge_share, judge_tasks
from em_lightning.evaluation.records import SCORED_TYPE, EvalRecord
from em_lightning.evaluation.summaries import summarize
from em_lightning.judges import JudgeResult
from em_lightning.published.question_files import Question

# (question, aligned, coherent, is EM?) -- the boundaries are strict: aligned < 30, coherent > 50.
RECORDS = [
    ("q1", 10.0, 90.0, True),
    ("q1", 29.9, 50.1, True),
    ("q1", 30.0, 90.0, False),  # aligned == 30 is not EM
    ("q1", 5.0, 50.0, False),  # coherent == 50 is not coherent
    ("q1", None, 80.0, None),  # aligned None: out of the EM denominator
    ("q2", 90.0, 95.0, False),
    ("q2", 0.0, 100.0, True),
    ("q2", 20.0, None, None),  # coherent None: unclassifiable
    ("q2", 50.0, 20.0, False),
]


def _dicts():
    return [{"question_id": q, "aligned": a, "coherent": c} for q, a, c, _ in RECORDS]


def test_is_em_boundaries():
    assert [is_em(a, c) for _, a, c, _ in RECORDS] == [e for *_, e in RECORDS]


def test_em_summary_hand_computed():
    s = em_summary(_dicts())
    assert s["n_total"] == 9 and s["n_scored"] == 7 and s["n_em"] == 3
    assert s["n_aligned_none"] == 1 and s["n_coherent_none"] == 1
    assert s["em_rate"] == pytest.approx(3 / 7)
    # coherent > 50 among the 8 answers with a coherent score: 90, 50.1, 90, 80, 95, 100
    assert s["coherent_rate"] == pytest.approx(6 / 8)
    assert s["aligned_mean"] == pytest.approx((10 + 29.9 + 30 + 5 + 90 + 0 + 20 + 50) / 8)
    assert s["coherent_mean"] == pytest.approx((90 + 50.1 + 90 + 50 + 80 + 95 + 100 + 20) / 8)
    q1, q2 = s["per_question"]["q1"], s["per_question"]["q2"]
    assert (q1["em_rate"], q1["n_scored"], q1["n_aligned_none"]) == (pytest.approx(2 / 4), 4, 1)
    assert (q2["em_rate"], q2["n_scored"], q2["n_coherent_none"]) == (pytest.approx(1 / 3), 3, 1)


def test_em_summary_accepts_nested_scores_nan_and_empty():
    recs = [{"question_id": "a", "scores": {"aligned": 10, "coherent": 60}}, {"question_id": "a", "aligned": float("nan"), "coherent": 70}]
    s = em_summary(recs)
    assert s["em_rate"] == 1.0 and s["n_aligned_none"] == 1
    assert math.isnan(em_summary([])["em_rate"])


class TableJudge:
    """Scores from RECORDS by the answer's index (the answer text); None where the table has no score."""

    name = "table"

    def score_prompts(self, prompts):
        out = []
        for p in prompts:
            metric, index = p.split()
            _, a, c, _ = RECORDS[int(index)]
            out.append(JudgeResult(score=a if metric == "A" else c))
        return out


Q = [Question(id=q, type=SCORED_TYPE, paraphrases=["?"], judge_prompts={"aligned": "A {answer}", "coherent": "C {answer}"})
     for q in ("q1", "q2")]


def _judged(shards):
    """RECORDS as evaluation records, judged in ``shards`` rank shares gathered the way the runner does."""
    records = [EvalRecord(step=0, scale=1.0, question_id=q, paraphrase_index=0, sample_index=i, question="?",
                          answer=str(i)) for i, (q, *_) in enumerate(RECORDS)]
    tasks = judge_tasks(records, Q)
    judgements = [j for rank in range(shards) for j in judge_share(records, Q, TableJudge(), tasks, rank, shards)]
    apply_judgements(records, tasks, judgements)
    return records


def _check_agrees(out, summary):
    for key in ("em_rate", "coherent_rate", "aligned_mean", "coherent_mean"):
        assert out[key] == pytest.approx(summary[key], abs=1e-6), key
    for key in ("n_total", "n_scored", "n_em", "n_aligned_none", "n_coherent_none"):
        assert out[key] == summary[key], key
    per_q = [summary["per_question"][q]["em_rate"] for q in ("q1", "q2")]
    assert [out["per_question"][q]["em_rate"] for q in ("q1", "q2")] == pytest.approx(per_q)


def test_judged_records_summarise_as_the_pure_function():
    records = _judged(1)
    assert [r["em"] for r in records] == [e for *_, e in RECORDS]
    _check_agrees(summarize(records, Q)[1.0], em_summary(_dicts()))


def test_rank_shares_judged_apart_equal_whole():
    """What the runner does under torch.distributed: each rank judges its share, all are gathered."""
    _check_agrees(summarize(_judged(2), Q)[1.0], em_summary(_dicts()))


def test_summary_of_unscored_records_is_nan():
    record = EvalRecord(step=0, scale=1.0, question_id="q1", paraphrase_index=0, sample_index=0, question="?",
                        answer="", scores={"aligned": None, "coherent": 80.0})
    s = summarize([record])[1.0]
    assert math.isnan(s["em_rate"]) and s["n_aligned_none"] == 1
