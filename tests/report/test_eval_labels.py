"""The report labels a run's judged numbers as the demo judge's whenever the run used it: by the tag root, a
point's meta, or the demo judge's class in the run's config.yaml (its path now and before the package moved)."""

import json

import pytest

from em_lightning.report.eval_labels import eval_labels


@pytest.mark.parametrize("class_path, demo", [
    ("em_lightning.demos.demo_judge.DemoJudge", True),
    ("em_lightning.judges.demo.DemoJudge", True),  # a run recorded before the move
    ("em_lightning.judges.OpenAICompatJudge", False),
])
def test_demo_judge_in_the_config(tmp_path, class_path, demo):
    (tmp_path / "config.yaml").write_text(f"judge:\n  class_path: {class_path}\n")
    labels = eval_labels(tmp_path, {"eval/em_rate": [(1, 0.5)]})
    assert labels.root == "eval" and labels.demo is demo


def test_tag_root_and_point_meta(tmp_path):
    assert eval_labels(tmp_path, {"eval_demo/em_rate": [(1, 0.5)]}).demo
    (tmp_path / "generations").mkdir()
    (tmp_path / "generations" / "step_0000004.meta.json").write_text(json.dumps({"meaningful": False, "convention": "x"}))
    labels = eval_labels(tmp_path, {"eval/em_rate": [(4, 0.5)]})
    assert labels.demo and labels.convention == "x"
