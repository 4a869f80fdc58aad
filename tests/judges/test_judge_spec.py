"""JudgeSpec + build_judges: the one judge set-up of InLoopJudge, em-fit eval, steer and judge calibrate; the
judge-config loader; and run_config, the one reader of a run's recorded config.yaml."""

import inspect
from dataclasses import fields

import pytest
import yaml

from em_lightning.callbacks.in_loop_judge import InLoopJudge
from em_lightning.judges.base import JudgeResult
from em_lightning.judges.cache import CachedJudge
from em_lightning.judges.factory import build_judges
from em_lightning.judges.openai_compat import OpenAICompatibleJudge
from em_lightning.judges.spec import IN_LOOP_ONLY, JudgeSpec, load_judge_spec
from em_lightning.run.config import RunConfig, find_callback


class FixedJudge:
    def __init__(self, name, score=50.0, meaningful=True):
        self.name, self.score, self.meaningful, self.calls = name, score, meaningful, 0

    def score_prompts(self, prompts):
        self.calls += len(prompts)
        return [JudgeResult(score=self.score) for _ in prompts]

    def classify_prompts(self, prompts):
        return [JudgeResult(label="x") for _ in prompts]


def test_build_judges_resolves_caches_each_judge_once_and_builds_the_panel(tmp_path):
    main, medical, other = FixedJudge("main"), FixedJudge("medical", 10.0), FixedJudge("other")
    spec = JudgeSpec(main, judges={"medical": medical}, panel={"other": other})
    judging = build_judges(spec, ["aligned", "coherent", "medical"], tmp_path)
    assert judging.names == ["aligned", "coherent", "medical"] and judging.primary == "main"
    assert all(isinstance(j, CachedJudge) for j in judging.by_prompt.values())
    assert judging.by_prompt["aligned"] is judging.by_prompt["coherent"]  # one wrapper per distinct judge
    assert judging.by_prompt["aligned"] is not judging.by_prompt["medical"]
    assert judging.by_prompt["medical"].score_prompts(["p", "p"])[0].score == 10.0 and medical.calls == 1  # cached
    assert set(judging.panel) == {"other"} and set(judging.panel["other"]) == {"aligned", "coherent", "medical"}
    assert judging.meaningful and (tmp_path / "judge_cache.sqlite").is_file()


def test_build_judges_without_cache_or_with_its_own_path(tmp_path):
    judge = FixedJudge("j")
    assert build_judges(JudgeSpec(judge, cache=False), ["aligned"], tmp_path).by_prompt == {"aligned": judge}
    assert not (tmp_path / "judge_cache.sqlite").exists()
    build_judges(JudgeSpec(judge, cache_path=str(tmp_path / "elsewhere" / "c.sqlite")), ["aligned"], tmp_path)
    assert (tmp_path / "elsewhere" / "c.sqlite").is_file() and not (tmp_path / "judge_cache.sqlite").exists()


def test_a_demo_judge_anywhere_makes_the_numbers_not_meaningful(tmp_path):
    real, demo = FixedJudge("real"), FixedJudge("demo", meaningful=False)
    assert not build_judges(JudgeSpec(demo, cache=False), ["aligned"], tmp_path).meaningful
    with_demo_panel = build_judges(JudgeSpec(real, panel={"d": demo}, cache=False), ["aligned"], tmp_path)
    assert not with_demo_panel.meaningful and with_demo_panel.primary_meaningful  # steering: only the primary
    per_prompt = build_judges(JudgeSpec(real, judges={"aligned": demo}, cache=False), ["aligned"], tmp_path)
    assert not per_prompt.meaningful and not per_prompt.primary_meaningful


def test_missing_keys_and_bad_specs_are_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("EM_SPEC_NO_KEY", raising=False)
    api = OpenAICompatibleJudge("gpt-x", api_key_env="EM_SPEC_NO_KEY")
    with pytest.raises(ValueError, match="EM_SPEC_NO_KEY is not set") as info:
        build_judges(JudgeSpec(api, cache=False), ["aligned"], tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="^panel: .*EM_SPEC_NO_KEY"):
        build_judges(JudgeSpec(FixedJudge("j"), panel={"api": api}, cache=False), ["aligned"], tmp_path)
    with pytest.raises(ValueError, match="no judge for judge prompt 'medical'"):
        build_judges(JudgeSpec(FixedJudge("j"), judges={"*": None}, cache=False), ["medical"], tmp_path)
    with pytest.raises(ValueError, match="max_judge_calls must be >= 0"):
        JudgeSpec(FixedJudge("j"), max_judge_calls=-1)
    with pytest.raises(ValueError, match="point_deadline_s must be > 0"):
        JudgeSpec(FixedJudge("j"), point_deadline_s=0)
    with pytest.raises(ValueError, match="panel member 'j' has the primary judge's name"):
        JudgeSpec(FixedJudge("j"), panel={"j": FixedJudge("k")})
    with pytest.raises(ValueError, match="^InLoopJudge: max_judge_calls must be >= 0"):
        InLoopJudge(FixedJudge("j"), max_judge_calls=-1)


def test_in_loop_judge_args_are_the_spec_plus_its_own():
    """A judge-config file holds InLoopJudge's init args: each is a JudgeSpec field or one IN_LOOP_ONLY drops."""
    in_loop = set(inspect.signature(InLoopJudge.__init__).parameters) - {"self"}
    spec = {f.name for f in fields(JudgeSpec)}
    assert in_loop == spec | set(IN_LOOP_ONLY) and not spec & set(IN_LOOP_ONLY)


API = {"class_path": "em_lightning.judges.OpenAICompatibleJudge", "init_args": {"model": "gpt-x", "timeout_s": 7.0}}


def test_load_judge_spec_from_init_args_a_preset_and_a_run_config(tmp_path):
    args = {"judge": API, "judge_prompts": ["aligned"], "max_judge_calls": 9, "answers_per_question": 2}
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(args))
    spec = load_judge_spec(tmp_path / "args.yaml")
    assert spec.judge_prompts == ["aligned"] and spec.max_judge_calls == 9
    assert spec.judge.timeout_s == 7.0  # the judge itself is built
    preset = {"trainer": {"callbacks+": [{"class_path": "em_lightning.callbacks.SampleGenerations", "init_args": {}},
                                         {"class_path": "em_lightning.callbacks.InLoopJudge", "init_args": args}]}}
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))
    assert load_judge_spec(tmp_path / "preset.yaml").max_judge_calls == 9
    run = tmp_path / "run"
    run.mkdir()
    recorded = {"trainer": {"callbacks": preset["trainer"]["callbacks+"]}, "model": {"base": {"name_or_path": "tiny:qwen2"}}}
    (run / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert load_judge_spec(run / "config.yaml").judge_prompts == ["aligned"]


def test_load_judge_spec_errors_name_the_flag_and_the_file(tmp_path):
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"judge": API, "judge_promts": ["aligned"]}))
    with pytest.raises(ValueError) as info:
        load_judge_spec(tmp_path / "typo.yaml", flag="--judge")
    assert str(info.value).startswith(f"--judge {tmp_path / 'typo.yaml'}: ") and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="--judge-config .*nope.yaml: no such file"):
        load_judge_spec(tmp_path / "nope.yaml")


def test_run_config_reads_callbacks_and_the_base_model(tmp_path):
    with pytest.raises(ValueError, match="no config.yaml there"):
        RunConfig(tmp_path)
    config = {"model": {"base": {"name_or_path": "tiny:qwen2", "dtype": "float32"}},
              "trainer": {"callbacks": [{"class_path": "em_lightning.callbacks.SampleGenerations",
                                         "init_args": {"questions": "q.yaml"}}, "not a mapping"]}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = RunConfig(tmp_path)
    assert run.model_base() == {"name_or_path": "tiny:qwen2", "dtype": "float32"}
    assert run.callback_args("SampleGenerations") == {"questions": "q.yaml"}
    assert run.callback_args("InLoopJudge") is None
    assert find_callback({"trainer": {"callbacks+": [{"class_path": "x.Alarm"}]}}, "Alarm") == {}
    assert find_callback({"trainer": None}, "Alarm") is None and find_callback([], "Alarm") is None
    (tmp_path / "config.yaml").write_text("")
    assert RunConfig(tmp_path).model_base() == {} and RunConfig(tmp_path).callback_args("Alarm") is None
