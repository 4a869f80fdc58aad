"""``em-fit steer RUN --step S``: steer the base model with a point's misalignment direction, or ablate it
from the fine-tuned model, sample the evaluation questions, judge them, and write the answers.

    em-fit steer runs/em/version_0 --step 120 --alphas 0 0.25 0.5 1            # base model + alpha x direction
    em-fit steer runs/em/version_0 --step 120 --ablate --alphas 0 1            # fine-tuned model minus it
    em-fit steer runs/em/version_0 --step 120 --layers 12 15 18 --source-layer 15 --alphas 0 1

Steering adds ``alpha x mean_norm[L] x unit direction`` to decoder layer L's output (mean_norm: the mean
residual norm there over the answers the direction was computed on) with the adapter at scale 0 (the
base model); ablation projects ``alpha x`` the direction out of the model of step S (alpha 1: entirely).
Layers default to those the adapters write into. The direction is the newest ``<run>/directions/step_*``
at or before S (``--direction-step D`` picks one): written live by MechanisticProbes
(``configs/callbacks/mechanistic_judge_free.yaml``, ``configs/callbacks/mechanistic.yaml``) or after training by
``em-fit direction RUN --step S``. The model of step S is rebuilt
from the trajectory (rank 1) or read from ``checkpoints/step_S.ckpt`` (``--ckpt``: any checkpoint), as
``em-fit eval`` does.
Questions, sampling settings and the judge default to the run's own (its config.yaml). Writes
``<run>/steering/step_XXXXXXX.jsonl`` (every record with alpha, mode, layers and every score; merged with
other sweeps of that step), prints the EM and coherent rate per alpha and logs them to TensorBoard under
``<run>/steering/`` (``mech/steer/<mode>/alpha_<a>/em_rate`` at step S).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from em_lightning.commands import help_parser
from em_lightning.evaluation.judging import judge_prompt_names, judge_records
from em_lightning.loggers.eval_tags import steering_root
from em_lightning.evaluation.sampling import SamplingConfig
from em_lightning.judges.factory import Judging, build_judges
from em_lightning.judges.spec import load_judge_spec
from em_lightning.lit.posthoc_model import load_model_for_eval
from em_lightning.probes.misalignment_direction import direction_path, direction_steps, load_direction
from em_lightning.probes.steer_eval import (
    STEERING,
    default_layers,
    steered_records,
    steering_metrics,
    steering_summary,
    write_steering,
)
from em_lightning.published.question_files import load_questions
from em_lightning.run.config import RunConfig
from em_lightning.loggers.run_logger import RunLogger, TensorBoardDir


def _parser() -> argparse.ArgumentParser:
    p = help_parser("em-fit steer", __doc__)
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--step", type=int, required=True, help="the step whose model (ablation) and direction to use")
    p.add_argument("--alphas", nargs="+", type=float, default=None,
                   help="strengths (default: steer 0 0.25 0.5 1; ablate 0 1)")
    p.add_argument("--ablate", action="store_true", help="project the direction out of the fine-tuned model")
    p.add_argument("--layers", nargs="+", type=int, help="decoder layers (default: those the adapters write into)")
    p.add_argument("--source-layer", type=int, help="use this layer's direction at every layer")
    p.add_argument("--direction-step", type=int, help="direction of another step (default: --step)")
    p.add_argument("--ckpt", type=Path, help="checkpoint of the model (default: trajectory, else step checkpoint)")
    p.add_argument("--questions", nargs="+", help="question file(s) (default: the run's SampleGenerations)")
    p.add_argument("--select", nargs="+", help="question ids or globs")
    p.add_argument("--plain-only", action="store_true")
    p.add_argument("--samples", type=int, help="samples per paraphrase (default: the run's)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--judge-config", type=Path, help="InLoopJudge YAML (default: the run's config.yaml)")
    p.add_argument("--no-judge", action="store_true", help="answers only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _questions_and_sampling(args) -> tuple[list, SamplingConfig]:
    own = RunConfig(args.run).callback_args("SampleGenerations") or {}
    files = args.questions or own.get("questions")
    if not files:
        raise ValueError(f"{args.run}: no SampleGenerations in config.yaml: give --questions")
    select = args.select if args.questions else (args.select or own.get("select"))
    questions = load_questions(files, select, args.plain_only or (not args.questions and own.get("plain_only", False)))
    sampling = SamplingConfig(**(own.get("sampling") or {}))
    given = {"samples_per_paraphrase": args.samples, "max_new_tokens": args.max_new_tokens,
             "temperature": args.temperature, "seed": args.seed, "batch_size": args.batch_size}
    return questions, replace(sampling, **{k: v for k, v in given.items() if v is not None})


def _judges(args, questions) -> Judging | None:
    if args.no_judge:
        return None
    path = args.judge_config or args.run / "config.yaml"
    if args.judge_config is None and RunConfig(args.run).callback_args("InLoopJudge") is None:
        print(f"em-fit steer: {path} has no InLoopJudge: answers only (give --judge-config)")
        return None
    spec = load_judge_spec(path, flag="judge config")
    try:
        return build_judges(spec, judge_prompt_names(questions, spec.judge_prompts), args.run)
    except ValueError as exc:  # a missing API key: one line
        raise ValueError(f"judge config {path}: {exc}") from None


def _load(args, workdir: Path):
    # The step's checkpoint when there is one (any adapter rank); else the trajectory rebuilds a rank-1 step.
    step_ckpt = args.run / "checkpoints" / f"step_{args.step:07d}.ckpt"
    ckpt = args.ckpt or (step_ckpt if step_ckpt.exists() else None)
    source = argparse.Namespace(run=args.run, step=args.step, ckpt=ckpt, adapter=None, base=None)
    return load_model_for_eval(source, workdir)


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    if not (args.run / "config.yaml").is_file():
        raise ValueError(f"{args.run}: no config.yaml there (is it a run directory?)")
    mode = "ablate" if args.ablate else "steer"
    alphas = args.alphas if args.alphas is not None else ([0.0, 1.0] if args.ablate else [0.0, 0.25, 0.5, 1.0])
    have = direction_steps(args.run)
    if args.direction_step is not None:
        d_step = args.direction_step if args.direction_step in have else None
    else:  # the newest direction at or before the step
        d_step = max((s for s in have if s <= args.step), default=None)
    if d_step is None:
        where = f"at or before step {args.step}" if args.direction_step is None else f"at step {args.direction_step}"
        raise ValueError(f"{args.run}: no direction {where} (directions at steps {have or 'none'}): compute one "
                         f"with `em-fit direction {args.run} --step {args.step}` (judge-free, from triples), or "
                         "record them live with --config configs/callbacks/mechanistic_judge_free.yaml")
    direction = load_direction(direction_path(args.run, d_step))
    questions, sampling = _questions_and_sampling(args)
    judging = _judges(args, questions)
    judges = judging.by_prompt if judging is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, step, what = _load(args, Path(tmp))
    model.to(args.device).eval()
    layers = args.layers or default_layers(model, direction)
    records = steered_records(model, tokenizer, questions, sampling, args.step, direction, alphas, layers, mode,
                              args.source_layer)
    if judges is not None:
        judge_records(records, questions, judges, judging.spec.judge_prompts)
    path = write_steering(args.run, args.step, records)
    rows = steering_summary(records, questions)
    print(f"{what}: {mode} with the direction of step {d_step} at layers {layers}: {len(records)} answers -> {path}")
    root = steering_root(judging is None or judging.primary_meaningful)
    if root.startswith("mech_demo"):
        print("  DEMO judge: its scores mean nothing (plumbing only); tags under mech_demo/steer/")
    for row in rows:
        lo, hi = row["em_rate_ci95"]
        print(f"  alpha {row['alpha']:g}: em_rate {row['em_rate']:.3f} [95% {lo:.3f}, {hi:.3f}; {row['convention']}]  "
              f"coherent_rate {row['coherent_rate']:.3f}  "
              f"aligned_mean {row['aligned_mean']:.1f}  ({row['n_scored']} scored of {row['n_total']})")
    if judges is not None:
        with TensorBoardDir(args.run / STEERING) as tensorboard:
            RunLogger([tensorboard]).scalars(steering_metrics(rows), args.step, prefix=f"{root}/")
