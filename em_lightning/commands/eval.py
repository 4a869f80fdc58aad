"""``em-fit eval``: evaluate a saved adapter, a checkpoint, or a step rebuilt from a run's trajectory,
optionally at several adapter scales, through the same runner as the in-loop callbacks.

    em-fit eval --run runs/em/version_0 --questions Q.yaml                       # the run's final adapter
    em-fit eval --run runs/em/version_0 --step 120 --questions Q.yaml --scales 0.5 1 2 4
    em-fit eval --ckpt runs/em/version_0/checkpoints/step_0000100.ckpt --questions Q.yaml
    em-fit eval --base Qwen/Qwen2.5-14B-Instruct --adapter DIR --questions Q.yaml \
        --judge-config configs/callbacks/in_loop_judge.yaml

Writes ``<out>/step_XXXXXXX.jsonl`` (the record format of ``evaluation.records``), its ``.meta.json``
sidecar and ``<out>/summary.json`` (metrics per scale: the EM rate under ``--convention`` with its 95%
interval and the answers behind it, every named convention beside it). Without ``--judge-config`` the
answers are written unjudged and no metric is computed. Sampling settings not given as flags come from
the run's recorded SampleGenerations settings (its config.yaml; ``--run`` or the checkpoint's run), else
the published protocol's (temperature 1, top_p 1, 600 new tokens); the ones used are printed. A checkpoint evaluated with the in-loop sampling
settings reproduces the in-loop answers of its step (sampling seeds depend on the step, not on the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from em_lightning.commands import help_parser
from em_lightning.evaluation.metrics import DEFAULT_CONVENTION, convention_named, resolve_conventions
from em_lightning.evaluation.judging import judge_prompt_names, judge_share, judge_tasks
from em_lightning.evaluation.panel import apply_panel
from em_lightning.evaluation.records import json_safe, write_point
from em_lightning.evaluation.runner import evaluate, point_meta
from em_lightning.loggers.eval_tags import metrics_root, panel_metrics
from em_lightning.evaluation.sampling import SamplingConfig
from em_lightning.training.finite import check_finite
from em_lightning.judges.factory import Judging, build_judges
from em_lightning.judges.spec import load_judge_spec
from em_lightning.lit.posthoc_model import load_model_for_eval
from em_lightning.published.question_files import load_questions
from em_lightning.run.config import RunConfig
from em_lightning.run.outputs import refuse_run_record


def _parser() -> argparse.ArgumentParser:
    p = help_parser("em-fit eval", __doc__)
    p.add_argument("--base", help="base model: tiny:qwen2 | hub id | folder (default: from --run / --ckpt)")
    p.add_argument("--run", type=Path, help="run directory (its config.yaml gives the base model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", type=Path, help="PEFT adapter folder (or a fully fine-tuned model folder)")
    src.add_argument("--ckpt", type=Path, help="em-fit checkpoint (.ckpt)")
    p.add_argument("--step", type=int, help="with --run alone: rebuild this step from the trajectory; "
                   "otherwise the step recorded (it also seeds sampling). Default: the checkpoint's step or 0")
    p.add_argument("--questions", nargs="+", required=True, help="question file(s) (public EM YAML format)")
    p.add_argument("--select", nargs="+", help="question ids or globs")
    p.add_argument("--plain-only", action="store_true", help="only plain questions (no _json/_template variants)")
    p.add_argument("--scales", nargs="+", type=float, default=[1.0], help="adapter scales (e.g. 0.5 1 2 4)")
    p.add_argument("--samples", type=int, help="samples per paraphrase (default: the question's, else 50)")
    recorded = " (default: the run's recorded setting, else %s)"
    p.add_argument("--max-new-tokens", type=int, help="new tokens per answer" + recorded % 600)
    p.add_argument("--temperature", type=float, help="sampling temperature" + recorded % 1.0)
    p.add_argument("--top-p", type=float, help="nucleus sampling" + recorded % 1.0)
    p.add_argument("--seed", type=int, help="sampling seed" + recorded % 0)
    p.add_argument("--batch-size", type=int, help="rows per forward (never changes an answer)" + recorded % 32)
    p.add_argument("--convention", default=DEFAULT_CONVENTION, help="EM convention of the headline rate "
                   f"(default {DEFAULT_CONVENTION}; also inoculation, coherent60; all are in summary.json)")
    p.add_argument("--judge-config", type=Path, help="YAML: InLoopJudge init args ({judge: {class_path, "
                   "init_args}, ...}) or a callbacks preset holding an InLoopJudge; none: answers only")
    p.add_argument("--out", type=Path, help="output folder (default: <run>/posthoc, else eval_out)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow --out inside a run's own generations/, adapter/, trajectory/ or checkpoints/")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def recorded_sampling(run: Path | None) -> dict:
    """The first SampleGenerations callback's ``sampling`` settings in a run's config.yaml ({} if none)."""
    if run is None or not (run / "config.yaml").is_file():
        return {}
    own = RunConfig(run).callback_args("SampleGenerations")
    if own is None:
        return {}
    sampling = own.get("sampling") or {}
    sampling = sampling.get("init_args", sampling) if isinstance(sampling, dict) else {}
    fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    return {k: v for k, v in sampling.items() if k in fields}


def sampling_from(args) -> tuple[SamplingConfig, str]:
    """Flags first, then the run's recorded settings, then SamplingConfig's defaults; and where they came from."""
    run = args.run or (args.ckpt.parent.parent if args.ckpt else None)
    settings = recorded_sampling(run)
    source = f"the run's recorded settings ({run / 'config.yaml'})" if settings else "the published defaults"
    flags = {"samples_per_paraphrase": args.samples, "temperature": args.temperature, "top_p": args.top_p,
             "max_new_tokens": args.max_new_tokens, "seed": args.seed, "batch_size": args.batch_size}
    given = {k: v for k, v in flags.items() if v is not None}
    if given:
        source += ", overridden by " + ", ".join(f"--{k.replace('_', '-')}" for k in given)
    return SamplingConfig(**{**settings, **given}), source


def _fmt_rate(s: dict) -> str:
    lo, hi = s["em_rate_ci95"]
    ci = "" if lo != lo else f" [{lo:.3f}, {hi:.3f}]"
    return f"em_rate {s['em_rate']:.3f}{ci} (n={s['n_scored']}, {s['convention']})"


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    questions = load_questions(args.questions, args.select, args.plain_only)
    sampling, sampling_source = sampling_from(args)
    convention = convention_named(args.convention)
    out = args.out or (args.run / "posthoc" if args.run else Path("eval_out"))
    refuse_run_record(out, "--out", args.overwrite)
    judging: Judging | None = None
    if args.judge_config:
        spec = load_judge_spec(args.judge_config)
        try:
            convention_named(spec.convention, spec.conventions)  # the config's own, checked as fit checks it
            judging = build_judges(spec, judge_prompt_names(questions, spec.judge_prompts), out)
        except ValueError as exc:  # a missing API key, an unknown judge prompt: one line
            raise ValueError(f"--judge-config {args.judge_config}: {exc}") from None
    judges, names = (judging.by_prompt, judging.names) if judging else (None, None)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, step, what = load_model_for_eval(args, Path(tmp))
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n} or dict(model.named_parameters())
    check_finite(trained, what)  # a diverged run's adapter answers garbage: one line, not a result
    model.to(args.device).eval()
    point = evaluate(model, tokenizer, questions, sampling, judges, step, args.scales, names,
                     convention=convention, conventions=resolve_conventions())
    meaningful = judging is None or judging.meaningful
    meta = {**point_meta(point), "judged": judges is not None, "sampling_source": sampling_source,
            **({"convention": convention.describe(), "meaningful": meaningful} if judges is not None else {})}
    if judging is not None and judging.panel:  # the same answers judged by every panel member (one process)
        meta["panel_metrics"] = judge_panel(point.records, questions, judging, convention)
    path = write_point(out, step, point.records, meta)
    summary = {"source": what, "step": step, "generations": str(path), **meta}
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1))
    print(f"{what}: {len(point.records)} answers -> {path}")
    print(f"  sampling from {sampling_source}: temperature {sampling.temperature}, top_p {sampling.top_p}, "
          f"max_new_tokens {sampling.max_new_tokens}, seed {sampling.seed}")
    if judges is None:
        print("  answers NOT judged (no --judge-config): no EM metrics; judge them with --judge-config YAML")
        return
    demo = "" if meaningful else "  [DEMO JUDGE: these scores mean nothing]"
    for scale, s in point.summaries.items():
        print(f"  scale {scale:g}: {_fmt_rate(s)}  coherent_rate {s['coherent_rate']:.3f}  "
              f"aligned_mean {s['aligned_mean']:.1f}  judge_failures {s['judge_failures']}{demo}")
    for tag, value in meta.get("panel_metrics", {}).items():
        if "/agreement/" in tag or tag.endswith("/em_rate") or tag.endswith("em_disagreements"):
            print(f"  {tag}: {value:.3f}{demo}")


def judge_panel(records: list[dict], questions, judging: Judging, convention) -> dict[str, float]:
    """Judge the records with every panel member, mark each record's panel scores and disagreements, and
    return the panel's metrics (per-judge EM rates, agreement; the in-loop tags)."""
    tasks = [t for t in judge_tasks(records, questions, judging.names, list(judging.panel)) if t.judge]
    judgements = judge_share(records, questions, judging.by_prompt, tasks, panel=judging.panel)
    apply_panel(records, tasks, judgements, judging.primary, convention)
    return panel_metrics(records, questions, metrics_root(judging.meaningful), convention)

