"""``em-fit judge calibrate``: check a judge against published judged answers (the GPT-4o scores of the EM
papers) before trusting its EM rates.

    em-fit data fetch betley-judged-qwen-coder-32b betley-first-plot-questions    # once
    em-fit judge calibrate --judge JUDGE.yaml --against betley-judged-qwen-coder-32b --out calib/
    em-fit judge calibrate --judge JUDGE.yaml --against mine.csv --questions Q.yaml --out calib/

JUDGE.yaml holds a ``judge:`` block exactly as the in-loop preset writes it (``class_path`` + ``init_args``;
a callbacks preset holding an InLoopJudge works too; its ``cache``, ``cache_path`` and ``max_judge_calls``
apply). Every answer is re-judged with the published judge prompt of its ``question_id``; writes
``DIR/calibration.json`` (see ``evaluation.calibration``), ``DIR/judged.jsonl`` (per row) and
``DIR/calibration_<metric>.png``, and prints a one-screen summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from em_lightning.run.atomic_io import atomic_write
from em_lightning.published.registry import BY_NAME, DEFAULT_DIR
from em_lightning.evaluation.calibration import calibrate, calibration_prompts
from em_lightning.evaluation.metrics import DEFAULT_CONVENTION, convention_named, resolve_conventions
from em_lightning.evaluation.records import json_safe
from em_lightning.published.judged_answers import METRICS, read_judged_csv
from em_lightning.judges.factory import build_judges
from em_lightning.judges.spec import load_judge_spec
from em_lightning.published.question_files import load_questions
from em_lightning.report.calibration import draw_calibration


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="em-fit judge", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("calibrate", help="re-judge published judged answers and compare with their scores")
    c.add_argument("--judge", type=Path, required=True, help="YAML with a judge: block (class_path + init_args)")
    c.add_argument("--against", required=True, help="a judged-answers entry of `em-fit data list`, or a CSV file "
                   "with columns question_id, question, answer, aligned, coherent")
    c.add_argument("--questions", nargs="+", help="question file(s) whose judge prompts produced the scores "
                   "(default for a registry entry: its paired question file)")
    c.add_argument("--out", type=Path, required=True, help="output folder")
    c.add_argument("--convention", default=DEFAULT_CONVENTION, help="EM convention of the headline rate "
                   f"(default {DEFAULT_CONVENTION}; every named one is in calibration.json)")
    c.add_argument("--data-dir", type=Path, default=Path(DEFAULT_DIR), help="where `em-fit data fetch` put the files")
    return p


def _sources(args) -> tuple[Path, list[Path]]:
    """(the judged-answers CSV, its question files)."""
    entry = BY_NAME.get(args.against)
    if entry is None:
        csv = Path(args.against)
        if not csv.is_file():
            raise ValueError(f"--against {args.against}: neither a judged-answers entry of `em-fit data list` "
                             "nor a file")
        if not args.questions:
            raise ValueError(f"--against {csv}: a local CSV needs --questions FILE (the question file whose judge "
                             "prompts produced its scores)")
        return csv, [Path(q) for q in args.questions]
    if entry.kind != "judged-answers":
        raise ValueError(f"--against {entry.name}: a {entry.kind} entry, not judged answers")
    csv = args.data_dir / entry.dest
    if not csv.is_file():
        raise ValueError(f"--against {entry.name}: {csv} not found; fetch it: em-fit data fetch {entry.name}"
                         + ("" if args.data_dir == Path(DEFAULT_DIR) else f" --dir {args.data_dir}"))
    if args.questions:
        return csv, [Path(q) for q in args.questions]
    paired = BY_NAME[entry.questions]
    questions = args.data_dir / paired.dest
    if not questions.is_file():
        raise ValueError(f"--against {entry.name}: its question file {questions} not found; fetch it: "
                         f"em-fit data fetch {paired.name} (or name one with --questions)")
    return csv, [questions]


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.3f}"


def summary_lines(result: dict, csv: Path) -> list[str]:
    """The console summary (one screen)."""
    em = result["em_rate"]
    demo = [] if result["meaningful"] else ["DEMO JUDGE: its scores mean nothing (plumbing only)"]
    lines = demo + [
        f"judge {result['judge']} against {csv}: {result['n_rows']} rows, {result['n']} compared for EM",
        f"  convention {result['convention']}",
        f"  {'metric':10s} {'n':>5s} {'spearman':>9s} {'pearson':>9s} {'mae':>8s} {'bias':>8s} "
        f"{'failures':>9s} {'no score':>9s} {'ref None':>9s}",
    ]
    for m in METRICS:
        lines.append(f"  {m:10s} {result['n_pairs'][m]:5d} {_fmt(result['spearman'][m]):>9s} "
                     f"{_fmt(result['pearson'][m]):>9s} {_fmt(result['mae'][m]):>8s} {_fmt(result['bias'][m]):>8s} "
                     f"{result['failures'][m]:9d} {result['judge_no_score'][m]:9d} {result['reference_missing'][m]:9d}")
    ci_r, ci_j = em["ci95_reference"], em["ci95_judge"]
    lines += [
        f"  EM rate: published {_fmt(em['reference'])} [{_fmt(ci_r[0])}, {_fmt(ci_r[1])}] (n={em['n_reference']})"
        f"  judge {_fmt(em['judge'])} [{_fmt(ci_j[0])}, {_fmt(ci_j[1])}] (n={em['n_judge']})  (95% intervals)",
        f"  Cohen's kappa of EM labels: {_fmt(result['kappa_em'])} (n={result['n']})",
    ]
    for name, c in result["by_convention"].items():
        lines.append(f"    {name:18s} published {_fmt(c['reference'])}  judge {_fmt(c['judge'])}")
    return lines + demo


def calibrate_main(args) -> None:
    csv, question_files = _sources(args)
    rows = read_judged_csv(csv)
    questions = load_questions([str(q) for q in question_files])
    try:  # an unknown question id fails now, before anything is written
        calibration_prompts(rows, questions)
    except ValueError as exc:
        raise ValueError(f"{csv}: {exc}") from None
    spec = load_judge_spec(args.judge, flag="--judge")
    conventions = resolve_conventions()
    convention = convention_named(args.convention)
    calls = 2 * len(rows)
    if spec.max_judge_calls is not None and calls > spec.max_judge_calls:
        raise ValueError(f"--judge {args.judge}: calibration needs {calls} judge calls, max_judge_calls is "
                         f"{spec.max_judge_calls}; nothing judged")
    args.out.mkdir(parents=True, exist_ok=True)
    try:  # the published judge prompts, all scored by the config's judge (its per-prompt judges and panel aside)
        judge = build_judges(replace(spec, judges={}, panel={}), list(METRICS), args.out).by_prompt[METRICS[0]]
    except ValueError as exc:  # a missing API key: one line
        raise ValueError(f"--judge {args.judge}: {exc}") from None
    result = calibrate(rows, questions, judge, convention, conventions)
    per_row = result.pop("rows")
    result.update(against=str(csv), questions=[str(q) for q in question_files], judge_calls=calls)
    atomic_write(args.out / "judged.jsonl", "".join(json.dumps(json_safe(r)) + "\n" for r in per_row))
    atomic_write(args.out / "calibration.json", json.dumps(json_safe(result), indent=1))
    figures = draw_calibration({**result, "rows": per_row}, convention, args.out)
    print("\n".join(summary_lines(result, csv)))
    print(f"  -> {args.out / 'calibration.json'}, {args.out / 'judged.jsonl'}, " + ", ".join(p.name for p in figures))


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    if args.action == "calibrate":
        calibrate_main(args)
    else:  # argparse's choices make this unreachable
        sys.exit(2)
