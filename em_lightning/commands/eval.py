"""``em-fit eval``: evaluate a saved adapter, a checkpoint, or a step rebuilt from a run's trajectory,
optionally at several adapter scales, through the same runner as the in-loop callbacks.

    em-fit eval --run runs/em/version_0 --questions Q.yaml                       # the run's final adapter
    em-fit eval --run runs/em/version_0 --step 120 --questions Q.yaml --scales 0.5 1 2 4
    em-fit eval --ckpt runs/em/version_0/checkpoints/step_0000100.ckpt --questions Q.yaml
    em-fit eval --base Qwen/Qwen2.5-14B-Instruct --adapter DIR --questions Q.yaml \
        --judge-config callbacks/in_loop_judge.yaml

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
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser
from peft import PeftModel

from em_lightning.commands import help_parser
from em_lightning.callbacks.in_loop_judge import InLoopJudge
from em_lightning.checkpoints import checkpoint_global_step, consolidate
from em_lightning.evaluation.metrics import DEFAULT_CONVENTION, convention_named, resolve_conventions
from em_lightning.evaluation.judging import judge_prompt_names, judge_share, judge_tasks
from em_lightning.evaluation.panel import apply_panel
from em_lightning.evaluation.records import json_safe, write_point
from em_lightning.evaluation.runner import evaluate, point_meta
from em_lightning.eval_tags import metrics_root, panel_metrics
from em_lightning.evaluation.sampling import SamplingConfig
from em_lightning.finite import check_finite
from em_lightning.judges.cache import JudgeCache
from em_lightning.judges.factory import prepare_judges
from em_lightning.models import ModelSpec, load_model, load_tokenizer
from em_lightning.module import EMFineTune
from em_lightning.phase.reconstruct import export_step_adapter
from em_lightning.questions import load_questions
from em_lightning.run_outputs import refuse_run_record
from em_lightning.tiny import TinySpec


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


def _spec_from_run(run: Path):
    config = run / "config.yaml"
    if not config.is_file():
        raise ValueError(f"--run {run}: no config.yaml there (is it a run directory?)")
    base = dict((yaml.safe_load(config.read_text()).get("model") or {}).get("base") or {})
    base["tiny"] = TinySpec(**(base.get("tiny") or {}))
    return ModelSpec(**base)


def _base_spec(args):
    spec = _spec_from_run(args.run) if args.run else None
    if args.base:
        spec = ModelSpec(name_or_path=args.base, tiny=spec.tiny if spec else ModelSpec().tiny)
    if spec is None:
        raise ValueError("give the base model: --base NAME_OR_PATH or --run RUN_DIR")
    return spec


def load_model_for_eval(args, workdir: Path) -> tuple[Any, Any, int, str]:
    """(model, tokenizer, step, description) for the source the arguments name."""
    if args.run is not None and not (args.run / "config.yaml").is_file():
        raise ValueError(f"--run {args.run}: no config.yaml there (is it a run directory?)")
    if args.ckpt:  # hyperparameters in the checkpoint name the base model and the adapter
        if not args.ckpt.exists():
            raise ValueError(f"--ckpt {args.ckpt}: no such file")
        step = args.step if args.step is not None else checkpoint_global_step(args.ckpt)
        ckpt = consolidate(args.ckpt, workdir / "consolidated.ckpt")  # FSDP2 shards -> one file
        with warnings.catch_warnings():  # "keys missing from the checkpoint": the frozen base, by design
            warnings.simplefilter("ignore")
            # builds the model (configure_model) before loading the trainable weights
            module = EMFineTune.load_from_checkpoint(ckpt, map_location="cpu")
        return module.model, module.tokenizer, step, f"checkpoint {args.ckpt}"
    adapter, step, what = args.adapter, args.step, None
    if adapter is None:
        if args.run is None:
            raise ValueError("give what to evaluate: --adapter DIR, --ckpt PATH or --run RUN_DIR [--step S]")
        if args.step is None:
            adapter, step, what = args.run / "adapter", _last_step(args.run), f"final adapter of {args.run}"
        else:
            adapter = export_step_adapter(args.run, args.step, workdir / f"adapter_step_{args.step}")
            what = f"step {args.step} of {args.run} (rebuilt from the trajectory)"
    if not adapter.is_dir():
        raise ValueError(f"adapter folder {adapter} not found")
    if not (adapter / "adapter_config.json").is_file() and (adapter / "config.json").is_file():
        spec = ModelSpec(name_or_path=str(adapter))  # a fully fine-tuned model, saved whole
        tokenizer = load_tokenizer(spec)
        return load_model(spec, tokenizer), tokenizer, step or 0, what or f"model {adapter}"
    spec = _base_spec(args)
    tokenizer = load_tokenizer(spec)
    model = PeftModel.from_pretrained(load_model(spec, tokenizer), adapter)
    return model, tokenizer, step or 0, what or f"adapter {adapter} on {spec.name_or_path}"


def recorded_sampling(run: Path | None) -> dict:
    """The first SampleGenerations callback's ``sampling`` settings in a run's config.yaml ({} if none)."""
    config = run / "config.yaml" if run is not None else None
    if config is None or not config.is_file():
        return {}
    callbacks = ((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("SampleGenerations"):
            sampling = (cb.get("init_args") or {}).get("sampling") or {}
            sampling = sampling.get("init_args", sampling) if isinstance(sampling, dict) else {}
            fields = {f.name for f in dataclasses.fields(SamplingConfig)}
            return {k: v for k, v in sampling.items() if k in fields}
    return {}


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


def _last_step(run: Path) -> int:
    last = run / "checkpoints" / "last.ckpt"
    return checkpoint_global_step(last) if last.is_file() else 0


def load_judge_config(path: Path) -> InLoopJudge:
    """The InLoopJudge that init args or a callbacks preset describe: its judges, judge prompts, cache."""
    if not path.is_file():
        raise ValueError(f"--judge-config {path}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    callbacks = (data.get("trainer") or {}) if isinstance(data, dict) else {}
    for item in callbacks.get("callbacks+", []) + callbacks.get("callbacks", []):
        if isinstance(item, dict) and str(item.get("class_path", "")).endswith("InLoopJudge"):
            data = item.get("init_args") or {}
            break
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(InLoopJudge, "judge_config")
    try:
        cfg = parser.parse_object({"judge_config": data})
        judge = parser.instantiate_classes(cfg).judge_config
    except Exception as exc:  # jsonargparse explains over several lines; keep the first
        raise ValueError(f"--judge-config {path}: {str(exc).strip().splitlines()[0]}") from None
    return judge


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    questions = load_questions(args.questions, args.select, args.plain_only)
    sampling, sampling_source = sampling_from(args)
    convention = convention_named(args.convention)
    out = args.out or (args.run / "posthoc" if args.run else Path("eval_out"))
    refuse_run_record(out, "--out", args.overwrite)
    judges, names, panel = (None, None, {})
    if args.judge_config:
        config = load_judge_config(args.judge_config)
        names = judge_prompt_names(questions, config.judge_prompts)
        cache = JudgeCache(Path(config.cache_path or out / "judge_cache.sqlite")) if config.cache else None
        try:
            judges = prepare_judges({"*": config.judge, **config.judges}, names, cache)
            panel = {m: prepare_judges(j, names, cache) for m, j in config.panel.items()}
        except ValueError as exc:  # a missing API key: one line
            raise ValueError(f"--judge-config {args.judge_config}: {exc}") from None
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, step, what = load_model_for_eval(args, Path(tmp))
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n} or dict(model.named_parameters())
    check_finite(trained, what)  # a diverged run's adapter answers garbage: one line, not a result
    model.to(args.device).eval()
    point = evaluate(model, tokenizer, questions, sampling, judges, step, args.scales, names,
                     convention=convention, conventions=resolve_conventions())
    meaningful = judges is None or metrics_root(judges, {m: j[names[0]] for m, j in panel.items() if names}) == "eval"
    meta = {**point_meta(point), "judged": judges is not None, "sampling_source": sampling_source,
            **({"convention": convention.describe(), "meaningful": meaningful} if judges is not None else {})}
    if panel:  # the same answers judged by every panel member (one process: no collectives here)
        meta["panel_metrics"] = judge_panel(point.records, questions, judges, panel, names, config, convention)
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


def judge_panel(records: list[dict], questions, judges, panel: dict, names: list[str], config,
                convention) -> dict[str, float]:
    """Judge the records with every panel member, mark each record's panel scores and disagreements, and
    return the panel's metrics (per-judge EM rates, agreement; the in-loop tags)."""
    tasks = [t for t in judge_tasks(records, questions, names, list(panel)) if t.judge]
    judgements = judge_share(records, questions, judges, tasks, panel=panel)
    primary = getattr(config.judge, "name", type(config.judge).__name__)
    apply_panel(records, tasks, judgements, primary, convention)
    return panel_metrics(records, questions, metrics_root(judges), convention)

