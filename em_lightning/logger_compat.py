"""The only places em-lightning touches Lightning/TensorBoard logger internals (no public API does these;
lightning < 2.7 in pyproject; tests/test_logger_compat.py checks each against the installed versions).

- A run's ``version_N`` is reserved exclusively before the logger picks one lazily: pin it.
- A resumed run's curves continue in the same folder: TensorBoard's ``purge_step`` must reach the
  SummaryWriter, which TensorBoardLogger builds lazily from the kwargs it was given.
- Lightning adds an ``epoch`` scalar to every metrics dict logged without a step: TensorBoard's first
  card, and noise (the x axis is the optimizer step): ``hide_epoch_scalar`` drops it for a logger.
- Many scalars of one step go into ONE TensorBoard event (``add_scalar`` costs ~0.1 ms per value on a
  CPU, most of the trajectory callback's per-step cost), with the logger's name prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

from tensorboard.compat.proto.summary_pb2 import Summary


def version_unset(logger) -> bool:
    return getattr(logger, "_version", 0) is None


def pin_version(logger, version: int) -> None:
    logger._version = version


def set_purge_step(logger, step: int) -> bool:
    """False when the logger is not one that takes a purge step (nothing to do)."""
    if not hasattr(logger, "_kwargs"):
        return False
    logger._kwargs["purge_step"] = step
    return True


def purge_step(logger) -> int | None:
    """The purge step a logger was given (``set_purge_step``): its events at or after it are being replaced."""
    return getattr(logger, "_kwargs", {}).get("purge_step")


def write_scalars(logger, metrics: Mapping[str, float], step: int) -> None:
    """All values in one event on a TensorBoard logger; other loggers get ``log_metrics``."""
    writer = getattr(getattr(logger, "experiment", None), "file_writer", None)
    if writer is None:
        logger.log_metrics(dict(metrics), step=step)
        return
    prefix = getattr(logger, "_prefix", "")
    join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
    values = [Summary.Value(tag=f"{prefix}{join}{k}" if prefix else k, simple_value=v) for k, v in metrics.items()]
    writer.add_summary(Summary(value=values), step)  # what add_scalar writes, batched


def write_summary(logger, summary: Summary, step: int | None = None) -> bool:
    """A ready-made summary (e.g. the custom-scalars layout) on a TensorBoard logger; False for others."""
    writer = getattr(getattr(logger, "experiment", None), "file_writer", None)
    if writer is None:
        return False
    writer.add_summary(summary, step)
    return True


def hide_epoch_scalar(logger) -> None:
    """Drop the ``epoch`` key Lightning adds to step metrics before the logger writes them."""
    log_metrics = logger.log_metrics

    def without_epoch(metrics, step=None):
        return log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    logger.log_metrics = without_epoch
