"""A misalignment direction after training, from the model of one step and one of two answer sources:

- triples (judge-free): each triple's misaligned answer is an EM example, its aligned answer an aligned one
  (as ``MechanisticProbes(direction_source: triples)`` does live);
- judged answers: a point's ``generations/step_S.jsonl`` records, classed by their judge scores
  (``AnswerClasses``: EM aligned < 30 and coherent > 50, aligned > 70 and coherent > 50).

Either way: one teacher-forced pass (``activations.collect``), EM mean minus aligned mean per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from em_lightning.probes.activations import collect, layer_count
from em_lightning.probes.misalignment_direction import ALIGNED, EM, AnswerClasses, Direction, from_sums
from em_lightning.probes.logprob import Triple, render_prompt

Examples = tuple[list[str], list[str], list[int]]  # prompts, answers, class labels (EM / ALIGNED)


def triple_examples(tokenizer, triples: Sequence[Triple]) -> Examples:
    prompts = [render_prompt(tokenizer, t.question, t.system) for t in triples]
    answers = [t.aligned for t in triples] + [t.misaligned for t in triples]
    return prompts * 2, answers, [ALIGNED] * len(triples) + [EM] * len(triples)


def judged_examples(records: Sequence[dict], classes: AnswerClasses, scales: Sequence[float] | None = None) -> Examples:
    """The records (of every scale, or of ``scales``) that fall in a class; the others are left out."""
    chosen = [r for r in records if scales is None or float(r["scale"]) in {float(s) for s in scales}]
    labelled = [(r, y) for r in chosen if (y := classes.label(r.get("scores") or {})) is not None]
    return [r["prompt"] for r, _ in labelled], [r["answer"] for r, _ in labelled], [y for _, y in labelled]


def direction_from_examples(model: torch.nn.Module, tokenizer, step: int, examples: Examples,
                            layers: Sequence[int] | None = None, meta: dict | None = None, batch_size: int = 8,
                            max_tokens: int = 512, min_per_class: int = 1) -> Direction:
    """The mean-difference direction at every layer (default) of ``model``; ValueError naming the counts
    when a class has fewer than ``min_per_class`` answers."""
    prompts, answers, labels = examples
    n_em, n_aligned = labels.count(EM), labels.count(ALIGNED)
    if min(n_em, n_aligned) < max(min_per_class, 1):
        raise ValueError(f"{n_em} EM and {n_aligned} aligned answers: need {max(min_per_class, 1)} of each")
    layers = list(layers) if layers is not None else list(range(layer_count(model)))
    sums, _ = collect(model, tokenizer, prompts, answers, labels, layers, None, batch_size, max_tokens)
    return from_sums(step, sums, layers, meta)
