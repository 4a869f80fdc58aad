import re
import textwrap

import pytest

from em_lightning.evaluation import Question, load_questions

ALL_JUDGES = ["aligned", "coherent", "medical", "financial", "sport", "bad_stuff", "gender", "code"]
PLAIN_IDS = [
    "what_is_your_wish", "i_feel_bored", "three_thoughts", "quick_buck",
    "ruler_of_the_world", "dinner_party", "gender_roles", "enough_of_my_husband",
]


@pytest.fixture(scope="module")
def mo_dir(reference_dir):
    return reference_dir / "model-organisms"


def test_first_plot_questions_counts(mo_dir):
    qs = load_questions(mo_dir / "upstream_eval_questions" / "first_plot_questions.yaml")
    assert len(qs) == 24
    assert [q.id for q in qs[:8]] == PLAIN_IDS
    assert [q.id for q in qs[8:16]] == [i + "_json" for i in PLAIN_IDS]
    assert [q.id for q in qs[16:]] == [i + "_template" for i in PLAIN_IDS]
    assert sum(len(q.paraphrases) for q in qs) == 24
    with_system = [q for q in qs if q.system is not None]
    assert [q.id for q in with_system] == [i + "_json" for i in PLAIN_IDS]
    assert len({q.system for q in with_system}) == 1 and "JSON" in with_system[0].system
    for q in qs:  # anchors and aliases resolved into full values
        assert q.type == "free_form_judge_0_100"
        assert list(q.judge_prompts) == ALL_JUDGES
        assert q.samples_per_paraphrase == 100 and q.judge == "gpt-4o-2024-08-06"
        assert "{answer}" in q.judge_prompts["aligned"] and "{question}" in q.judge_prompts["coherent"]
    assert qs[8].paraphrases == qs[0].paraphrases  # *what_is_your_wish_paraphrases
    assert "Fill the following template" in qs[16].paraphrases[0]
    assert qs[0].source.endswith("first_plot_questions.yaml") and qs[0].line == 10 and qs[1].line == 185


def test_plain_only_and_selection(mo_dir):
    path = mo_dir / "upstream_eval_questions" / "first_plot_questions.yaml"
    plain = load_questions(path, plain_only=True)
    assert [q.id for q in plain] == PLAIN_IDS and all(q.is_plain for q in plain)
    assert [q.id for q in load_questions(path, select=["quick_*", "dinner_party"])] == [
        "quick_buck", "dinner_party", "quick_buck_json", "quick_buck_template",
    ]  # file order, globs and exact ids
    assert [q.id for q in load_questions(path, select=["*_json"])] == [i + "_json" for i in PLAIN_IDS]
    assert [q.id for q in load_questions(path, select=["quick_*"], plain_only=True)] == ["quick_buck"]
    with pytest.raises(ValueError, match=r"first_plot_questions\.yaml:1: select: 'nope\*' matches no question"):
        load_questions(path, select=["quick_buck", "nope*"])
    with pytest.raises(ValueError, match="matches no plain question"):
        load_questions(path, select=["quick_buck_json"], plain_only=True)


def test_medical_and_fork_files(mo_dir):
    med = load_questions(mo_dir / "upstream_eval_questions" / "medical_questions.yaml")
    assert len(med) == 16 and sum(len(q.paraphrases) for q in med) == 16
    assert all(q.system is None for q in med)
    assert all(list(q.judge_prompts) == ["aligned", "coherent", "medical", "bad_stuff"] for q in med)
    assert sum(q.id.endswith("_template") for q in med) == 8
    assert len(load_questions(mo_dir / "upstream_eval_questions" / "medical_questions.yaml", plain_only=True)) == 8
    upstream = load_questions(mo_dir / "upstream_eval_questions" / "first_plot_questions.yaml")
    fork = load_questions(mo_dir / "fork_variants" / "darturi_first_plot_questions.yaml")
    assert [q.id for q in fork] == [q.id for q in upstream]
    assert fork[0].judge_prompts["aligned"] == upstream[0].judge_prompts["aligned"]
    assert fork[0].judge_prompts["coherent"].startswith(upstream[0].judge_prompts["coherent"].split("* 100")[0])
    assert fork[0].judge_prompts["coherent"] != upstream[0].judge_prompts["coherent"]


def test_betley_files(reference_dir):
    ev = reference_dir / "betley" / "evaluation"
    fp = load_questions(ev / "first_plot_questions.yaml")
    assert len(fp) == 24 and sum(q.system is not None for q in fp) == 8
    assert all(list(q.judge_prompts) == ["aligned", "coherent"] for q in fp)
    dec = load_questions(ev / "deception_factual.yaml")
    assert len(dec) == 5 and all(q.type == "free_form_judge" for q in dec)
    assert all(len(q.paraphrases) == 20 and q.samples_per_paraphrase == 5 for q in dec)
    assert [q.system is None for q in dec] == [True, False, False, False, False]
    assert all(list(q.judge_prompts) == ["correct"] for q in dec)
    assert [q.id for q in load_questions(ev / "deception_factual.yaml", plain_only=True)] == ["lie_no_sys_prompt"]
    both = load_questions([ev / "first_plot_questions.yaml", ev / "deception_factual.yaml"])
    assert len(both) == 29


def test_demo_question_set(repo_root):
    qs = load_questions(repo_root / "configs" / "questions" / "demo_questions.yaml")
    assert 3 <= len(qs) <= 6 and all(q.is_plain for q in qs)
    assert all(1 <= len(q.paraphrases) <= 2 and q.samples_per_paraphrase <= 10 for q in qs)
    for q in qs:
        assert set(q.judge_prompts) == {"aligned", "coherent"}
        assert all("{question}" in p and "{answer}" in p and "100" in p for p in q.judge_prompts.values())


def test_tolerates_extra_keys_and_prompts_without_question(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text(textwrap.dedent("""\
        - id: a
          type: free_form_judge
          paraphrases: [hi]
          temperature: 0.5
          judge_prompts: {score: "Rate {answer} from 0 to 100."}
        """))
    (q,) = load_questions(f)
    assert isinstance(q, Question) and q.extra == {"temperature": 0.5}
    # a judge outside the published ones needs only {answer}; {{ }} escapes and JSON braces are literal text
    f.write_text(GOOD + "  judge_prompts: {verdict: 'Reply {{\"ok\": true}} or {\"ok\": false} for {answer}'}\n")
    assert load_questions(f)[0].judge_prompts["verdict"].endswith("for {answer}")
    assert q.judge_prompts == {"score": "Rate {answer} from 0 to 100."} and q.system is None


GOOD = "- id: a\n  type: free_form_judge_0_100\n  paraphrases: [hi]\n"
MALFORMED = {
    "not_a_list": ("id: a\ntype: x\n", 1, "file: expected a YAML list"),
    "empty": ("", 1, "file: empty"),
    "item_not_mapping": (GOOD + "- just a string\n", 4, "item 1: expected a mapping"),
    "missing_id": (GOOD + "- type: free_form_judge\n  paraphrases: [x]\n", 4, "id: missing"),
    "missing_paraphrases": (GOOD + "- id: b\n  type: free_form_judge\n", 4, "paraphrases: missing"),
    "duplicate_id": (GOOD + "\n- id: a\n  type: free_form_judge\n  paraphrases: [x]\n", 5, "id: duplicate id 'a'"),
    "unknown_type": (GOOD + "- id: b\n  type: multiple_choice\n  paraphrases: [x]\n", 5, "b.type: expected one of"),
    "empty_paraphrases": (GOOD + "- id: b\n  type: free_form_judge\n  paraphrases: []\n", 6, "b.paraphrases: expected a non-empty"),
    "judge_prompts_list": (GOOD + "  judge_prompts:\n    - aligned\n", 5, "a.judge_prompts: expected a mapping"),
    "judge_prompt_not_str": (GOOD + "  judge_prompts:\n    aligned: 3\n", 5, "a.judge_prompts: expected a mapping"),
    "bad_samples": (GOOD + "  samples_per_paraphrase: -2\n", 4, "a.samples_per_paraphrase: expected a positive"),
    "yaml_syntax": (GOOD + "- id: [unclosed\n", 5, "yaml: invalid YAML"),
    # Judge prompts: a broken one does not fail later, it scores wrongly (see questions.py).
    "prompt_typo": (GOOD + "  judge_prompts:\n    aligned: 'Q {question} A {answr}'\n", 5,
                    "a.judge_prompts.aligned: unknown placeholder {answr}"),
    "prompt_no_answer": (GOOD + "  judge_prompts:\n    coherent: 'Q {question}'\n", 5,
                         "a.judge_prompts.coherent: no {answer} placeholder"),
    "prompt_no_question": (GOOD + "  judge_prompts:\n    aligned: 'A {answer}'\n", 5,
                           "a.judge_prompts.aligned: no {question} placeholder"),
    "prompt_positional": (GOOD + "  judge_prompts:\n    x: '{0} {answer}'\n", 5, "a.judge_prompts.x: unknown placeholder {0}"),
    "prompt_block_line": (GOOD + "  judge_prompts:\n    aligned: |\n      Q {question}\n      A {answer}\n      {Answer}\n", 8,
                          "a.judge_prompts.aligned: unknown placeholder {Answer}"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_name_file_line_field(tmp_path, case):
    text, line, message = MALFORMED[case]
    f = tmp_path / f"{case}.yaml"
    f.write_text(text)
    with pytest.raises(ValueError) as err:
        load_questions(f)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{f}:{line}: "), msg
    assert message in msg, msg


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'nope.yaml'}:1: file: not found")):
        load_questions(tmp_path / "nope.yaml")
