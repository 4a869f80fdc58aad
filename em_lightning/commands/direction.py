"""``em-fit direction RUN --step S``: a misalignment direction computed after training, for ``em-fit steer``.

    em-fit direction runs/em/version_0 --step 180                        # judge-free, from the demo triples
    em-fit direction runs/em/version_0 --step 180 --triples my_triples.jsonl
    em-fit direction runs/em/version_0 --step 90 --from generations      # the judged answers of point 90

The model of step S is rebuilt as ``em-fit eval`` does (the step checkpoint, else the rank-1 trajectory).
``--from triples`` (default; no judge involved): each triple's misaligned answer minus its aligned answer,
as ``configs/callbacks/mechanistic_judge_free.yaml`` computes live. ``--from generations``: the answers of
``generations/step_S.jsonl`` classed by their judge scores (EM: aligned < 30 and coherent > 50; aligned:
aligned > 70 and coherent > 50), as ``configs/callbacks/mechanistic.yaml`` does live -- with the demo judge those
classes mean nothing. Writes ``<run>/directions/step_S.safetensors`` (what ``em-fit steer`` reads).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from em_lightning.commands import help_parser
from em_lightning.evaluation.records import point_path
from em_lightning.lit.posthoc_model import load_model_for_eval
from em_lightning.probes.misalignment_direction import AnswerClasses, direction_path, save_direction
from em_lightning.probes.logprob import load_triples
from em_lightning.probes.posthoc import direction_from_examples, judged_examples, triple_examples
from em_lightning.run.config import RunConfig

DEFAULT_TRIPLES = "configs/probes/demo_triples.jsonl"


def _parser() -> argparse.ArgumentParser:
    p = help_parser("em-fit direction", __doc__)
    p.add_argument("run", type=Path, help="run directory")
    p.add_argument("--step", type=int, required=True, help="the step whose model computes the direction")
    p.add_argument("--from", dest="source", choices=("triples", "generations"), default="triples",
                   help="answers: judge-free triples (default) or the step's judged generations")
    p.add_argument("--triples", type=Path, default=None, help=f"triples file (default: the run's, else {DEFAULT_TRIPLES})")
    p.add_argument("--scales", nargs="+", type=float, help="--from generations: answers of these adapter scales only")
    p.add_argument("--min-per-class", type=int, default=5, help="--from generations: fewest answers per class")
    p.add_argument("--layers", nargs="+", type=int, help="decoder layers (default: all)")
    p.add_argument("--ckpt", type=Path, help="checkpoint of the model (default: step checkpoint, else trajectory)")
    p.add_argument("--batch-size", type=int, default=8)
    return p


def _run_triples(run: Path) -> Path:
    triples = (RunConfig(run).callback_args("MechanisticProbes") or {}).get("triples")
    return Path(triples) if triples else Path(DEFAULT_TRIPLES)


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    if not (args.run / "config.yaml").is_file():
        raise ValueError(f"{args.run}: no config.yaml there (is it a run directory?)")
    classes = AnswerClasses()
    if args.source == "generations":
        path = point_path(args.run / "generations", args.step)
        if not path.is_file():
            raise ValueError(f"{path}: no generations at step {args.step} (use --from triples, judge-free)")
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        meta = {"source": f"judged answers of {path.name} (post hoc)", "classes": classes.describe(),
                "scales": args.scales, "weights": "of the step"}
        min_per_class = args.min_per_class
    else:
        triples_file = args.triples or _run_triples(args.run)
        triples = load_triples(triples_file)
        meta = {"source": f"triples {triples_file} ({len(triples)}, post hoc)", "weights": "of the step"}
        min_per_class = 1
    with tempfile.TemporaryDirectory() as tmp:
        step_ckpt = args.run / "checkpoints" / f"step_{args.step:07d}.ckpt"
        ckpt = args.ckpt or (step_ckpt if step_ckpt.exists() else None)
        source = argparse.Namespace(run=args.run, step=args.step, ckpt=ckpt, adapter=None, base=None)
        model, tokenizer, _, what = load_model_for_eval(source, Path(tmp))
    model.eval()
    examples = (judged_examples(records, classes, args.scales) if args.source == "generations"
                else triple_examples(tokenizer, triples))
    try:
        direction = direction_from_examples(model, tokenizer, args.step, examples, args.layers, meta,
                                            args.batch_size, min_per_class=min_per_class)
    except ValueError as e:
        raise ValueError(f"{args.run} step {args.step}: no direction from {meta['source']}: {e} "
                         f"({classes.describe()}); try --from triples") from None
    out = save_direction(direction_path(args.run, args.step), direction)
    print(f"{what}: direction from {direction.n_em} misaligned and {direction.n_aligned} aligned answers "
          f"({meta['source']}), layers {direction.layers[0]}..{direction.layers[-1]} -> {out}")
    print(f"next: em-fit steer {args.run} --step {args.step}")
