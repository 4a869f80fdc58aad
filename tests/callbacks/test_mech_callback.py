"""MechanisticProbes through the CLI on the smoke model with the demo judge, on 2 gloo processes (DDP):
directions gathered over ranks equal a one-process recomputation from the step checkpoint and the judged
answers; the logprob probe; steering at points; em-fit steer (alpha 0 reproduces the in-loop answers);
em-fit report draws the mechanistic figures; a resumed run logs what a run never stopped logs."""

import math
from argparse import Namespace

import pytest
import torch
import yaml
from clirun import REPO, em_fit, ok, run_dirs, scalars
from tb_scalars import all_scalars, assert_one_value_per_step, steps_by_tag

from em_lightning.callbacks import MechanisticProbes
from em_lightning.cli import main
from em_lightning.evaluation.records import read_jsonl
from em_lightning.lit.posthoc_model import load_model_for_eval
from em_lightning.model.loading import ModelSpec, load_model, load_tokenizer
from em_lightning.probes import (
    Direction,
    AnswerClasses,
    collect,
    direction_path,
    from_sums,
    load_direction,
    load_triples,
    logprob_margins,
    rank1_modules,
    separation,
)
from em_lightning.model.tiny import TinySpec

PRESET = REPO / "configs" / "callbacks" / "mechanistic.yaml"
# DemoJudge scores stay below ~60: the demo lowers the aligned class to > 45 so both classes exist.
DEMO = {"aligned_above": 45.0, "min_per_class": 2, "steer_alphas": [0.0, 1.0], "every_n_steps": 2}
MODULE = "model.layers.2.mlp.down_proj"


def _preset_args() -> dict:
    return yaml.safe_load(PRESET.read_text())["trainer"]["callbacks+"][0]["init_args"]


def test_shipped_presets_build():
    cb = MechanisticProbes(**_preset_args())
    assert cb.classes == AnswerClasses(30.0, 70.0, 50.0) and len(cb.triples) >= 6
    judge_free = yaml.safe_load((REPO / "configs" / "callbacks" / "mechanistic_judge_free.yaml").read_text())
    assert MechanisticProbes(**judge_free["trainer"]["callbacks+"][0]["init_args"]).direction_source == "triples"
    with pytest.raises(ValueError, match="triples needs a triples file"):
        MechanisticProbes(direction_source="triples")
    with pytest.raises(ValueError, match="every_n_steps"):
        MechanisticProbes(every_n_steps=0)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mech")
    preset = yaml.safe_load(PRESET.read_text())
    preset["trainer"]["callbacks+"][0]["init_args"].update(DEMO)
    (root / "mech.yaml").write_text(yaml.safe_dump(preset))
    ok(em_fit("fit", "--config", "configs/smoke.yaml", "--config", "configs/callbacks/phase_transition.yaml",
              "--config", "configs/callbacks/demo_eval.yaml", "--config", str(root / "mech.yaml"),
              "--trainer.max_steps", "6", "--checkpoint.every_n_train_steps", "3", "--trainer.enable_progress_bar",
              "false", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(root / "runs"), timeout=600))
    (run_dir,) = run_dirs(root / "runs")
    return run_dir


def _labelled(run_dir, step, classes):
    records = read_jsonl(run_dir / "generations" / f"step_{step:07d}.jsonl")
    return [(r, y) for r in records if (y := classes.label(r["scores"])) is not None]


@pytest.mark.slow
def test_ddp_direction_equals_one_process_recomputation(ddp_run, tmp_path):
    classes = AnswerClasses(aligned_above=DEMO["aligned_above"])
    for step in (3, 6):
        labelled = _labelled(ddp_run, step, classes)
        labels = [y for _, y in labelled]
        saved = load_direction(direction_path(ddp_run, step))
        assert (saved.n_em, saved.n_aligned) == (labels.count(1), labels.count(0))
        assert dict(scalars(ddp_run, "mech/n_em"))[step] == labels.count(1)
        assert saved.meta["weights"] == "of the point's step"
        # One process, the model of that step (its checkpoint), the judged answers of that step.
        ckpt = ddp_run / "checkpoints" / f"step_{step:07d}.ckpt"
        args = Namespace(ckpt=ckpt, run=None, step=None, adapter=None, base=None)
        model, tokenizer, _, _ = load_model_for_eval(args, tmp_path)
        lora = rank1_modules(model)
        sums, scalars_ = collect(model.eval(), tokenizer, [r["prompt"] for r, _ in labelled],
                                 [r["answer"] for r, _ in labelled], labels, saved.layers, lora)
        again = from_sums(step, sums, saved.layers)
        assert saved.layers == [0, 1, 2, 3]
        for layer in saved.layers:
            torch.testing.assert_close(saved.vectors[layer], again.vectors[layer], rtol=1e-4, atol=1e-6)
            assert saved.mean_norm[layer] == pytest.approx(again.mean_norm[layer], rel=1e-5)
        auroc = separation(scalars_[0], labels)["auroc"]
        logged = dict(scalars(ddp_run, f"mech/{MODULE}/lora_scalar_auroc"))[step]
        assert logged == pytest.approx(auroc, abs=1e-5)
        b = model.base_model.model.model.layers[2].mlp.down_proj.lora_B["default"].weight[:, 0].detach()
        cos = float(torch.nn.functional.cosine_similarity(b, again.vectors[2], dim=0))
        assert dict(scalars(ddp_run, f"mech/{MODULE}/cos_B_direction"))[step] == pytest.approx(cos, abs=1e-5)


def test_logprob_margin_at_step_zero_equals_the_base_model(ddp_run):
    spec = ModelSpec(name_or_path="tiny:qwen2", dtype="float32",
                     tiny=TinySpec(hidden_size=64, intermediate_size=128, num_layers=4, seed=0))
    tokenizer = load_tokenizer(spec)
    want = logprob_margins(load_model(spec, tokenizer), tokenizer, load_triples(_preset_args()["triples"]))
    margin = dict(scalars(ddp_run, "mech/logprob_margin"))
    assert sorted(margin) == [0, 2, 4, 6]  # every 2 steps, from the start of fit
    assert margin[0] == pytest.approx(want["margin"], abs=1e-5)  # step 0: B = 0, the base model
    for qid, value in want["per_id"].items():
        assert dict(scalars(ddp_run, f"mech/logprob_margin/{qid}"))[0] == pytest.approx(value, abs=1e-5)


def test_steering_at_points_and_em_fit_steer(ddp_run, capsys):
    key = lambda r: (r["question_id"], r["paraphrase_index"], r["sample_index"])  # noqa: E731
    gen = read_jsonl(ddp_run / "generations" / "step_0000003.jsonl")
    base = {key(r): (r["answer"], r["scores"]) for r in gen if r["scale"] == 0.0}
    tuned = {key(r): (r["answer"], r["scores"]) for r in gen if r["scale"] == 1.0}
    in_loop = read_jsonl(ddp_run / "steering" / "step_0000003.jsonl")  # written by the callback (2 ranks)
    assert {r["alpha"] for r in in_loop} == {0.0, 1.0} and {r["mode"] for r in in_loop} == {"steer"}
    steer0 = {key(r): (r["answer"], r["scores"]) for r in in_loop if r["alpha"] == 0.0}
    assert {k: v[0] for k, v in steer0.items()} == {k: v[0] for k, v in base.items()}  # alpha 0 = scale 0
    for k, (_, scores) in steer0.items():  # judged in other batches: equal to rounding
        assert scores == pytest.approx(base[k][1], rel=1e-4)
    em = dict(scalars(ddp_run, "mech_demo/steer/steer/alpha_1.0/em_rate"))  # the demo judge: labelled apart
    assert set(em) == {3, 6}
    low = dict(scalars(ddp_run, "mech_demo/steer/steer/alpha_1.0/em_rate_ci95_low"))
    high = dict(scalars(ddp_run, "mech_demo/steer/steer/alpha_1.0/em_rate_ci95_high"))
    assert all(low[s] <= em[s] <= high[s] for s in em)  # every steered EM rate with its interval
    with pytest.raises(KeyError):  # never under the real judges' tag
        scalars(ddp_run, "mech/steer/steer/alpha_1.0/em_rate")

    main(["steer", str(ddp_run), "--step", "3", "--ablate", "--alphas", "0", "1"])
    out = capsys.readouterr().out
    assert "ablate with the direction of step 3 at layers [2]" in out and "alpha 1: em_rate" in out
    assert "DEMO judge: its scores mean nothing" in out and "[95% " in out and "model-organisms]" in out
    records = read_jsonl(ddp_run / "steering" / "step_0000003.jsonl")  # merged with the callback's sweep
    assert {(r["mode"], r["alpha"]) for r in records} == {(m, a) for m in ("steer", "ablate") for a in (0.0, 1.0)}
    ablate0 = {key(r): r["answer"] for r in records if r["mode"] == "ablate" and r["alpha"] == 0.0}
    assert ablate0 == {k: v[0] for k, v in tuned.items()}  # the model of step 3, rebuilt from the trajectory
    assert all(r["scores"].get("aligned") is not None for r in records)  # judged with the run's DemoJudge
    with pytest.raises(SystemExit):
        main(["steer", str(ddp_run), "--step", "2"])
    assert "no direction at or before step 2 (directions at steps [3, 6]" in capsys.readouterr().err


def test_report_draws_the_mechanistic_figures(ddp_run, tmp_path):
    main(["report", str(ddp_run), "--out", str(tmp_path)])
    for name in ("quadrants", "em_vs_scale", "em_vs_alpha", "cos_direction", "logprob_margin", "em_per_question"):
        path = tmp_path / f"mech_{name}.png"
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG", name
    assert "mech_cos_direction.png" in (tmp_path / "report.md").read_text()
    assert not math.isnan(load_direction(direction_path(ddp_run, 6)).mean_norm[2])


@pytest.mark.slow
def test_resume_logs_what_a_run_never_stopped_logs(tmp_path):
    """Resumed from its step-2 checkpoint (a judged point there, the periodic probe on schedule), a 4-step
    run holds each mech/ (tag, step) once, the same tags, steps and values as the run never stopped."""
    preset = yaml.safe_load(PRESET.read_text())
    preset["trainer"]["callbacks+"][0]["init_args"]["every_n_steps"] = 2
    (tmp_path / "mech.yaml").write_text(yaml.safe_dump(preset))
    args = ["--config", "configs/smoke.yaml", "--config", "configs/callbacks/demo_eval.yaml", "--config",
            str(tmp_path / "mech.yaml"), "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2",
            "--trainer.val_check_interval", "4", "--trainer.enable_progress_bar", "false"]
    runs = {}
    for name in ("whole", "resumed"):
        ok(em_fit("fit", *args, "--trainer.default_root_dir", str(tmp_path / name), timeout=600))
        (runs[name],) = run_dirs(tmp_path / name)
    run = runs["resumed"]
    ok(em_fit("fit", "--config", str(run / "config.yaml"), "--ckpt_path",
              str(run / "checkpoints" / "step_0000002.ckpt"), timeout=600))
    expected = steps_by_tag(runs["whole"], "mech/")
    assert {"mech/n_em", f"mech/{MODULE}/lora_scalar_auroc", f"mech/{MODULE}/cos_B_direction"} <= set(expected)
    assert 2 in expected["mech/n_em"] and 2 in expected["mech/logprob_margin"]
    assert_one_value_per_step(run, "mech/", expected=expected)
    whole, resumed = all_scalars(runs["whole"]), all_scalars(run)
    for tag in expected:
        assert dict(resumed[tag]) == pytest.approx(dict(whole[tag]), rel=1e-5, abs=1e-6), tag


def test_judge_free_point_steers_with_the_direction_of_its_step():
    """direction_source: triples: a point judged in the background after later periodic directions were
    computed steers with the newest direction at or before its own step (what a run resumed there uses),
    not with whatever is newest when its judging finished."""
    cb = MechanisticProbes(direction_source="triples", triples=_preset_args()["triples"], steer_alphas=[1.0])
    cb.triples = []  # no logprob pass; the direction pass and steering replaced by stand-ins that record
    cb._direction = lambda trainer, pl_module, step, *a: setattr(cb, "direction", Direction(step, {}, {}, 1, 1)) or {}
    used = []
    cb._steer = lambda trainer, model, tokenizer, step, direction: used.append(direction.step) or {}
    trainer = Namespace(loggers=[], is_global_zero=True)
    module = Namespace(model=torch.nn.Linear(2, 2), tokenizer=None)
    for step in (2, 4):  # periodic directions at 2 and 4 (every_n_steps 2)
        cb._periodic(trainer, module, step)
    cb.on_point_judged(trainer, module, 3, [])  # the point sampled at step 3, judged after step 4
    assert used == [2]
