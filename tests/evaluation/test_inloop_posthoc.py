"""em-fit eval (commands/eval.py) on a saved adapter folder, with a scale sweep, through the CLI entry."""

import json

import pytest
import torch
from peft import PeftModel

from em_lightning.model.adapters import AdapterSpec, apply_adapter, lora_layers
from em_lightning.cli import main
from em_lightning.evaluation import SamplingConfig, em_summary, load_questions
from em_lightning.evaluation.records import read_jsonl
from em_lightning.evaluation.runner import sample_records
from em_lightning.model.loading import ModelSpec, load_model, load_tokenizer

QUESTIONS = "configs/questions/demo_questions.yaml"



@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    spec = ModelSpec(name_or_path="tiny:qwen2", dtype="float32")
    torch.manual_seed(0)  # LoRA A is initialised from the global generator
    model = apply_adapter(load_model(spec, load_tokenizer(spec)), AdapterSpec(r=1, layers=[1]))
    gen = torch.Generator().manual_seed(1)
    for _, layer in lora_layers(model):
        w = layer.lora_B["default"].weight
        w.data = torch.randn(w.shape, generator=gen) * 2.0
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def test_eval_adapter_with_scale_sweep(adapter_dir, tmp_path, capsys):
    judge = tmp_path / "judge.yaml"
    judge.write_text(f"judge:\n  class_path: em_lightning.demos.demo_judge.DemoJudge\n"
                     f"  init_args: {{calibration_questions: {QUESTIONS}}}\ncache_path: {tmp_path / 'cache.sqlite'}\n")
    out = tmp_path / "out"
    main(["eval", "--base", "tiny:qwen2", "--adapter", str(adapter_dir), "--questions", QUESTIONS,
          "--select", "magic_lamp", "spare_afternoon", "--samples", "2", "--max-new-tokens", "8",
          "--scales", "0", "1", "2", "--step", "3", "--judge-config", str(judge), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "scale 2: em_rate" in printed
    records = read_jsonl(out / "step_0000003.jsonl")
    assert len(records) == 3 * 3 * 2  # scales x paraphrases x samples
    assert all(r["step"] == 3 and r["scores"]["aligned"] is not None for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and "adapter" in summary["source"] and summary["sampling"]["scales"] == [0.0, 1.0, 2.0]
    for scale in (0.0, 1.0, 2.0):
        expected = em_summary(r for r in records if r["scale"] == scale)
        got = summary["summary"][str(scale)]
        for key in ("em_rate", "coherent_rate", "aligned_mean", "n_scored"):
            assert got[key] == pytest.approx(expected[key])
    assert (tmp_path / "cache.sqlite").is_file()
    # scale 0 = the base model with the same seeds; the adapter changes answers
    spec = ModelSpec(name_or_path="tiny:qwen2", dtype="float32")
    tok = load_tokenizer(spec)
    questions = load_questions(QUESTIONS, select=["magic_lamp", "spare_afternoon"])
    config = SamplingConfig(samples_per_paraphrase=2, max_new_tokens=8)
    base = sample_records(load_model(spec, tok), tok, questions, config, 3)
    answers = {s: [r["answer"] for r in records if r["scale"] == s] for s in (0.0, 1.0, 2.0)}
    assert answers[0.0] == [r["answer"] for r in base]
    assert answers[1.0] != answers[0.0] and answers[2.0] != answers[1.0]


def test_eval_scales_are_b_times_s(adapter_dir, tmp_path):
    """em-fit eval --scales 0.5 2 4: the answers at scale s are those of the saved adapter with B multiplied by
    s, sampled at scale 1 (the same seeds), and not those of B x s**2."""
    main(["eval", "--base", "tiny:qwen2", "--adapter", str(adapter_dir), "--questions", QUESTIONS,
          "--select", "magic_lamp", "spare_afternoon", "--samples", "2", "--max-new-tokens", "8",
          "--scales", "0.5", "2", "4", "--out", str(tmp_path)])
    records = read_jsonl(tmp_path / "step_0000000.jsonl")
    spec = ModelSpec(name_or_path="tiny:qwen2", dtype="float32")
    tok = load_tokenizer(spec)
    questions = load_questions(QUESTIONS, select=["magic_lamp", "spare_afternoon"])
    config = SamplingConfig(samples_per_paraphrase=2, max_new_tokens=8)
    model = PeftModel.from_pretrained(load_model(spec, tok), adapter_dir).eval()
    ((_, layer),) = lora_layers(model)
    b = layer.lora_B["default"].weight
    saved = b.detach().clone()

    def answers_with_b_times(factor):
        with torch.no_grad():
            b.copy_(saved * factor)
        try:
            return [r["answer"] for r in sample_records(model, tok, questions, config, 0)]
        finally:
            with torch.no_grad():
                b.copy_(saved)

    for scale in (0.5, 2.0, 4.0):
        got = [r["answer"] for r in records if r["scale"] == scale]
        assert len(got) == 3 * 2
        assert got == answers_with_b_times(scale), scale
        assert got != answers_with_b_times(scale * scale), scale


def test_eval_without_judge_writes_answers(adapter_dir, tmp_path):
    main(["eval", "--base", "tiny:qwen2", "--adapter", str(adapter_dir), "--questions", QUESTIONS,
          "--select", "magic_lamp", "--samples", "1", "--max-new-tokens", "4", "--out", str(tmp_path)])
    records = read_jsonl(tmp_path / "step_0000000.jsonl")
    assert len(records) == 1 and records[0]["scores"] == {} and records[0]["answer"] is not None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "configs", "--questions", QUESTIONS], "give the base model"),
        (["--base", "tiny:qwen2", "--questions", QUESTIONS], "give what to evaluate"),
        (["--base", "tiny:qwen2", "--adapter", "/nonexistent", "--questions", QUESTIONS], "/nonexistent not found"),
        (["--run", "/nonexistent", "--questions", QUESTIONS], "no config.yaml there"),
        (["--base", "tiny:qwen2", "--adapter", "x", "--questions", "/nope.yaml"], "/nope.yaml:1: file: not found"),
    ],
)
def test_one_line_errors(args, message, capsys, monkeypatch):
    monkeypatch.delenv("EM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_judge_config_errors_are_one_line(adapter_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EM_DEBUG", raising=False)
    monkeypatch.delenv("EM_NO_SUCH_KEY", raising=False)
    bad = tmp_path / "judge.yaml"
    bad.write_text("judge:\n  class_path: em_lightning.judges.OpenAICompatibleJudge\n"
                   "  init_args: {model: gpt-4o, api_key_env: EM_NO_SUCH_KEY}\n")
    with pytest.raises(SystemExit):
        main(["eval", "--base", "tiny:qwen2", "--adapter", str(adapter_dir), "--questions", QUESTIONS,
              "--judge-config", str(bad), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert "environment variable EM_NO_SUCH_KEY is not set" in err and "\n" not in err
    typo = tmp_path / "typo.yaml"
    typo.write_text("judge:\n  class_path: em_lightning.demos.demo_judge.DemoJudge\njudge_promts: [aligned]\n")
    with pytest.raises(SystemExit):
        main(["eval", "--base", "tiny:qwen2", "--adapter", str(adapter_dir), "--questions", QUESTIONS,
              "--judge-config", str(typo), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert err.startswith("em-fit: error: --judge-config") and "\n" not in err
