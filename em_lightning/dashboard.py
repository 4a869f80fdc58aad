"""TensorBoard helpers: the custom-scalars layout (one "Phase transition" page with every curve that matters
side by side) and cheap ways to write many scalars.

Chart entries are regexes that TensorBoard's custom-scalars plugin applies with ``re.match`` (anchored at
the start only), so each ends in ``$``; ``.*`` stands for the module name in ``phase/<module>/...``. The
eval/* charts stay empty until an evaluation callback logs those tags.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl

from em_lightning.logger_compat import write_scalars

CATEGORY = "Phase transition"
EVAL_TAGS = ("eval/em_rate", "eval/coherent_rate", "eval/aligned_mean")


def _phase(metric: str) -> str:
    return rf"^phase/.*/{metric}$"


def phase_transition_layout(k_values: Sequence[int] = (5, 10, 15)) -> dict:
    """``{category: {chart title: ["Multiline", [tag regexes]]}}`` for ``SummaryWriter.add_custom_scalars``."""
    charts = {
        "loss": [r"^train/loss$", r"^val/loss$"],
        "grad norm": [r"^train/grad_norm$", _phase("[AB]_grad_norm")],
        "A/B norms": [_phase("[AB]_norm")],
        "rotation per step (degrees)": [_phase("[AB]_rotation_deg")],
        "cumulative rotation of B (degrees)": [_phase("B_rotation_cum_deg")],
        **{f"local cosine similarity k={k}": [_phase(f"B_local_cos_k{k}")] for k in k_values},
        "detected transitions (step)": [_phase("transition_step")],
        **{f"{tag} (evaluation)": [rf"^{tag}$"] for tag in EVAL_TAGS},
    }
    return {CATEGORY: {title: ["Multiline", tags] for title, tags in charts.items()}}


def write_layout(trainer: pl.Trainer, layout: dict) -> None:
    """Add the layout to every TensorBoard logger (rank 0 only: other ranks have no writer)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        writer = getattr(logger, "experiment", None)
        if hasattr(writer, "add_custom_scalars"):
            writer.add_custom_scalars(layout)


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Log on every logger (rank 0 only), all values of a TensorBoard logger in one event."""
    if not (trainer.is_global_zero and metrics):
        return
    for logger in trainer.loggers:
        write_scalars(logger, metrics, step)


def log_text(trainer: pl.Trainer, tag: str, step: int, text: str) -> None:
    """Text on every logger that has TensorBoard's ``add_text`` (rank 0 only)."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_text"):
                logger.experiment.add_text(tag, text, global_step=step)


class ScalarBuffer:
    """Scalars of many steps, logged in bursts (rank 0 only): right after a training step every small call
    is several times slower than in a hot loop, and ~5 TensorBoard writes per step were half of
    AdapterTrajectory's cost. TensorBoard itself flushes to disk only every 120 s, so the delay is not
    visible; flush at checkpoints (a resumed run re-logs only later steps) and at the end."""

    def __init__(self, flush_at: int = 64):
        self.flush_at = flush_at
        self.pending: list[tuple[int, dict[str, float]]] = []

    def add(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        if trainer.is_global_zero and metrics:
            self.pending.append((step, metrics))
            if len(self.pending) >= self.flush_at:
                self.flush(trainer)

    def flush(self, trainer: pl.Trainer) -> None:
        merged: dict[int, dict[str, float]] = {}
        for step, metrics in self.pending:  # one event per step; per tag, steps stay increasing
            merged.setdefault(step, {}).update(metrics)
        self.pending.clear()
        for step in sorted(merged):
            log_scalars(trainer, merged[step], step)
