"""The judge score contract (aggregate_score) and judge prompt rendering."""

import pytest

from em_lightning.judges import aggregate_score, parse_score_key, render_judge_prompt


def test_weighted_mean_normalised_by_numeric_mass():
    probs = {"90": 0.5, "80": 0.2, "REFUSAL": 0.3}
    # numeric mass 0.7; mean = (90*0.5 + 80*0.2) / 0.7
    assert aggregate_score(probs) == pytest.approx((45.0 + 16.0) / 0.7)


def test_non_numeric_and_out_of_range_are_ignored():
    probs = {"0": 0.2, "100": 0.2, "101": 0.3, "-1": 0.1, "50.5": 0.05, "+5": 0.05, "ten": 0.1}
    assert aggregate_score(probs) == pytest.approx((0 * 0.2 + 100 * 0.2) / 0.4)


def test_whitespace_stripped_and_duplicates_add_up():
    probs = {" 10": 0.3, "10": 0.1, "20\n": 0.4}
    assert aggregate_score(probs) == pytest.approx((10 * 0.4 + 20 * 0.4) / 0.8)


def test_low_numeric_mass_gives_none():
    assert aggregate_score({"50": 0.24, "no": 0.76}) is None
    assert aggregate_score({"50": 0.25, "no": 0.75}) == pytest.approx(50.0)  # 0.25 itself is enough
    assert aggregate_score({}) is None
    assert aggregate_score({"I": 0.9, "cannot": 0.1}) is None


def test_unnormalised_input_is_normalised():
    # Top-k logprobs rarely sum to 1: only the numeric mass matters.
    assert aggregate_score({"30": 0.3, "60": 0.3}) == pytest.approx(45.0)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("bad", [NAN, INF, -INF, -0.3, -1.0, 0.0, -0.0], ids=repr)
def test_non_finite_and_negative_probabilities_are_ignored(bad):
    """A bad probability on a number drops that entry only: the score and the mass rule use the rest."""
    assert aggregate_score({"50": 0.4, "90": bad}) == pytest.approx(50.0)
    assert aggregate_score({"90": bad, "50": 0.4, "10": 0.1}) == pytest.approx((50 * 0.4 + 10 * 0.1) / 0.5)
    # numeric mass 0.3 without the bad entry: a score; never dragged below 0.25 (or above) by it
    assert aggregate_score({"20": 0.3, "80": bad, "no": 0.7}) == pytest.approx(20.0)
    # the bad entry alone cannot lift the mass to 0.25, nor make a score out of nothing
    assert aggregate_score({"20": 0.2, "80": bad}) is None
    assert aggregate_score({"80": bad}) is None
    assert aggregate_score({"80": bad, "oops": 0.9}) is None


def test_bad_probabilities_never_give_a_non_finite_or_out_of_range_score():
    cases = [
        {"50": NAN, "60": NAN},
        {"50": INF, "60": 0.5},
        {"50": INF, "60": INF},
        {"50": -INF, "60": 0.5},
        {"0": -0.5, "100": 0.6},  # a negative weight would push the mean past 100
        {"100": -0.5, "0": 0.6},  # or below 0
    ]
    expected = [None, 60.0, None, 60.0, 100.0, 0.0]
    for probs, want in zip(cases, expected):
        got = aggregate_score(probs)
        if want is None:
            assert got is None, probs
        else:
            assert got == pytest.approx(want), probs


def test_probabilities_as_strings_or_numpy_like_floats():
    import numpy as np

    assert aggregate_score({"40": np.float32(0.5), "80": np.float64(0.5)}) == pytest.approx(60.0)
    assert aggregate_score({"40": np.float32("nan"), "80": np.float64(0.5)}) == pytest.approx(80.0)


def test_parse_score_key_rules():
    assert parse_score_key("085") == 85  # leading zeros accepted, as int() does
    assert parse_score_key(" 7 ") == 7
    for bad in ["", " ", "-0", "+1", "1_0", "1e2", "٣", "101", "5.0", "0x10"]:
        assert parse_score_key(bad) is None, bad


def test_render_keeps_other_braces():
    template = 'Rate JSON like {"score": N}.\nQ: {question}\nA: {answer}\n{unknown} {{literal}}'
    answer = "def f(): return {'a': 1}  # {question} stays as typed"
    out = render_judge_prompt(template, "What is {x}?", answer)
    assert out == (
        'Rate JSON like {"score": N}.\nQ: What is {x}?\n'
        "A: def f(): return {'a': 1}  # {question} stays as typed\n{unknown} {literal}"
    )


def test_render_matches_str_format_on_valid_templates(reference_dir):
    import yaml

    path = reference_dir / "model-organisms" / "upstream_eval_questions" / "first_plot_questions.yaml"
    items = yaml.safe_load(path.read_text())
    templates = [t for item in items for t in (item.get("judge_prompts") or {}).values()]
    assert templates
    for template in templates:
        assert render_judge_prompt(template, "Q?", "A!") == template.format(question="Q?", answer="A!")
