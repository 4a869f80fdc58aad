import math

import pytest
import torch

from em_lightning.evaluation import EMRate, em_summary, is_em

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


def _tensors(records):
    nan = float("nan")
    aligned = torch.tensor([nan if a is None else a for _, a, _, _ in records])
    coherent = torch.tensor([nan if c is None else c for _, _, c, _ in records])
    group = torch.tensor([0 if q == "q1" else 1 for q, *_ in records])
    return aligned, coherent, group


def _check_agrees(out, summary):
    for key in ("em_rate", "coherent_rate", "aligned_mean", "coherent_mean"):
        assert out[key].item() == pytest.approx(summary[key], abs=1e-6), key
    for key in ("n_total", "n_scored", "n_em", "n_aligned_none", "n_coherent_none"):
        assert out[key].item() == summary[key], key
    per_q = [summary["per_question"][q]["em_rate"] for q in ("q1", "q2")]
    assert out["per_group_em_rate"].tolist() == pytest.approx(per_q)


def test_torchmetrics_agrees_with_pure_function():
    metric = EMRate(num_groups=2)
    aligned, coherent, group = _tensors(RECORDS)
    metric.update(aligned[:4], coherent[:4], group[:4])  # several updates accumulate
    metric.update(aligned[4:], coherent[4:], group[4:])
    _check_agrees(metric.compute(), em_summary(_dicts()))


def test_torchmetrics_merged_shards_equal_whole():
    """What DDP does with sum states: per-rank states added up."""
    aligned, coherent, group = _tensors(RECORDS)
    ranks = [EMRate(num_groups=2) for _ in range(2)]
    for r, m in enumerate(ranks):
        m.update(aligned[r::2], coherent[r::2], group[r::2])
    ranks[0].merge_state(ranks[1])
    _check_agrees(ranks[0].compute(), em_summary(_dicts()))


def test_torchmetrics_empty_is_nan_and_shape_checked():
    m = EMRate()
    m.update(torch.tensor([float("nan")]), torch.tensor([80.0]))
    assert math.isnan(m.compute()["em_rate"].item()) and m.compute()["n_aligned_none"].item() == 1
    with pytest.raises(ValueError, match="differ in shape"):
        m.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0]))
