"""The ``eval/`` namespace: tag names of a judged point's metrics, owned here (the libraries return plain
names like ``em_rate``), for InLoopJudge and ``em-fit eval`` alike.

``eval/<name>`` for adapter scale 1, ``eval/scale_<s>/<name>`` for the others; the root is ``eval_demo``
when a judge's scores mean nothing (the demo judge), so that demo numbers never share a chart with real
ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from em_lightning.evaluation.metrics import MODEL_ORGANISMS, Convention
from em_lightning.evaluation.panel import panel_values
from em_lightning.evaluation.summaries import scale_metrics, summarize
from em_lightning.published.question_files import Question


def metrics_root(meaningful: bool) -> str:
    """``eval``, or ``eval_demo`` when a judge says its scores mean nothing (``judges.factory.Judging.meaningful``)."""
    return "eval" if meaningful else "eval_demo"


def steering_root(meaningful: bool) -> str:
    """``mech/steer`` (steered and ablated EM rates: MechanisticProbes, ``em-fit steer``), or ``mech_demo/steer``
    when the judges' scores mean nothing (``judges.factory.Judging.primary_meaningful``)."""
    return "mech/steer" if meaningful else "mech_demo/steer"


def scale_prefix(scale: float, root: str = "eval") -> str:
    """Tag prefix: ``eval/`` for scale 1, ``eval/scale_2.0/`` for the others."""
    return f"{root}/" if float(scale) == 1.0 else f"{root}/scale_{float(scale)!r}/"


def scale_tags(by_scale: Mapping[float, Mapping[str, float]], root: str = "eval") -> dict[str, float]:
    """{scale: {name: value}} -> {tag: value}."""
    return {scale_prefix(scale, root) + name: value for scale, values in by_scale.items()
            for name, value in values.items()}


def point_metrics(records: Sequence[Mapping], questions: Sequence[Question], root: str = "eval",
                  convention: Convention = MODEL_ORGANISMS, conventions: Mapping[str, Convention] | None = None,
                  summaries: Mapping[float, dict] | None = None) -> dict[str, float]:
    """The tags of a point's metrics (``summaries.scale_metrics`` under ``<root>/`` or
    ``<root>/scale_<s>/``), from its ``summaries`` when given (else the records are summarised here)."""
    if summaries is None:
        summaries = summarize(records, questions, convention, conventions)
    return scale_tags(scale_metrics(summaries, records, questions, convention), root)


def panel_metrics(records: Sequence[Mapping], questions: Sequence[Question], root: str = "eval",
                  convention: Convention = MODEL_ORGANISMS) -> dict[str, float]:
    """The tags of a judge panel's metrics (``panel.panel_values``), e.g. ``eval/judge/<name>/em_rate``."""
    return scale_tags(panel_values(records, questions, convention), root)
