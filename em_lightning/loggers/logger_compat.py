"""The only places em-lightning touches Lightning/TensorBoard logger internals (no public API does these;
lightning < 2.7 in pyproject; tests/loggers/test_logger_compat.py checks each against the installed versions).

- A run's ``version_N`` is reserved exclusively before the logger picks one lazily: pin it.
- A resumed run's curves continue in the same folder: TensorBoard's ``purge_step`` must reach the
  SummaryWriter, which TensorBoardLogger builds lazily from the kwargs it was given. CSVLogger's writer
  deletes ``metrics.csv`` when it opens (``open_csv`` writes the rows before the purge step back).
- Lightning adds an ``epoch`` scalar to every metrics dict logged without a step: TensorBoard's first
  card, and noise (the x axis is the optimizer step): ``hide_epoch_scalar`` drops it for a logger.
- Many scalars of one step go into ONE TensorBoard event (``add_scalar`` costs ~0.1 ms per value on a
  CPU, most of the trajectory callback's per-step cost), with the logger's name prefix.
"""

from __future__ import annotations

import csv
import io
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary

from em_lightning.run.atomic_io import atomic_write

_CSV_PURGE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # CSVLogger -> the step its rows restart at


def version_unset(logger) -> bool:
    return getattr(logger, "_version", 0) is None


def pin_version(logger, version: int) -> None:
    logger._version = version


def set_purge_step(logger, step: int) -> bool:
    """The resumed run replaces what the interrupted one logged at or after ``step`` (call it on every rank,
    before the logger's first write). TensorBoard: its writer drops those events; CSV: ``open_csv`` leaves
    those rows out. False for other loggers (W&B, MLflow: the re-logged steps are logged twice there)."""
    if isinstance(logger, TensorBoardLogger):
        logger._kwargs["purge_step"] = step
        return True
    if isinstance(logger, CSVLogger):
        _CSV_PURGE[logger] = step
        return True
    return False


def purge_step(logger) -> int | None:
    """The purge step a logger was given (``set_purge_step``): its values at or after it are being replaced."""
    if isinstance(logger, CSVLogger):
        return _CSV_PURGE.get(logger)
    return logger._kwargs.get("purge_step") if isinstance(logger, TensorBoardLogger) else None


def open_csv(logger) -> bool:
    """Open a CSVLogger's writer (rank 0, once the run's version is pinned) without losing the run's earlier
    metrics: Lightning's writer deletes ``metrics.csv`` when it opens a folder that has one (and warns, for a
    fresh run too, since the run directory already holds its lock). The rows of steps before the purge step
    (all rows without one: ``em-fit validate``) are written back under the same header. False for other
    loggers."""
    if not isinstance(logger, CSVLogger) or logger._experiment is not None:
        return False
    path = Path(logger.log_dir) / "metrics.csv"
    header, rows = [], []
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), list(reader)
    until = purge_step(logger)
    kept = io.StringIO()
    out = csv.DictWriter(kept, fieldnames=header)
    out.writeheader()
    out.writerows(row for row in rows if (step := _row_step(row)) is not None and (until is None or step < until))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = logger.experiment  # deletes metrics.csv
    if header:
        atomic_write(path, kept.getvalue())
        writer.metrics_keys = header  # keys logged later are merged into it (Lightning rewrites the file then)
    return True


def _row_step(row: dict) -> int | None:
    """A metrics.csv row's step; None for a row torn by a killed run (its last write, half done: fewer fields
    than the header, which csv.DictReader fills with None, or a step that is not a number)."""
    if None in row.values() or None in row:
        return None
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


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
