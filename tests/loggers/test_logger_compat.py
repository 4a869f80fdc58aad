"""The logger internals em-lightning relies on (logger_compat.py) still behave on the installed versions."""

import csv

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from em_lightning.loggers.logger_compat import (
    open_csv,
    pin_version,
    purge_step,
    set_purge_step,
    version_unset,
    write_scalars,
)


def test_pinned_version_and_purge_step_reach_the_writer(tmp_path):
    first = TensorBoardLogger(tmp_path, name="run")
    assert version_unset(first)
    pin_version(first, 7)
    assert not version_unset(first) and first.log_dir.endswith("version_7")
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.experiment.flush()
    resumed = TensorBoardLogger(tmp_path, name="run", version=7)
    assert set_purge_step(resumed, 3) and purge_step(resumed) == 3  # the resumed run replaces steps 3.. of the killed one
    for step in (3, 4):
        resumed.log_metrics({"train/loss": 10.0 + step}, step=step)
    resumed.experiment.flush()
    acc = EventAccumulator(resumed.log_dir)
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_batched_scalars_equal_log_metrics(tmp_path):
    for prefix in ("", "pre"):
        a = TensorBoardLogger(tmp_path, name=f"a{prefix}", version=0, prefix=prefix)
        b = TensorBoardLogger(tmp_path, name=f"b{prefix}", version=0, prefix=prefix)
        metrics = {"phase/m/B_norm": 1.5, "phase/m/A_norm": 0.25}
        write_scalars(a, metrics, 4)
        b.log_metrics(metrics, step=4)
        tags = []
        for logger in (a, b):
            logger.experiment.flush()
            acc = EventAccumulator(logger.log_dir)
            acc.Reload()
            tags.append({t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]})
        assert tags[0] == tags[1] and len(tags[0]) == 2


def _csv_steps(logger):
    logger.save()
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return [(int(r["step"]), {k: float(v) for k, v in r.items() if k != "step" and v}) for r in csv.DictReader(f)]


def test_csv_resume_keeps_the_rows_before_the_purge_step(tmp_path, recwarn):
    first = CSVLogger(tmp_path, name="run", version=0)
    for step in range(5):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.log_metrics({"val/loss": 9.0}, step=4)
    first.save()
    resumed = CSVLogger(tmp_path, name="run", version=0)
    assert set_purge_step(resumed, 3) and purge_step(resumed) == 3
    assert open_csv(resumed)  # Lightning's writer alone deletes metrics.csv here
    resumed.log_metrics({"train/loss": 13.0}, step=3)
    resumed.log_metrics({"train/kl": 0.5}, step=4)  # a new column: Lightning rewrites the file with it
    assert _csv_steps(resumed) == [(0, {"train/loss": 0.0}), (1, {"train/loss": 1.0}), (2, {"train/loss": 2.0}),
                                   (3, {"train/loss": 13.0}), (4, {"train/kl": 0.5})]
    assert not [w for w in recwarn if "Experiment logs directory" in str(w.message)]


def test_csv_resume_after_kill_9_drops_the_torn_last_row(tmp_path):
    """A run killed while Lightning wrote metrics.csv leaves half a row: the resume drops it, keeps the rest."""
    first = CSVLogger(tmp_path, name="run", version=0)
    for step in range(3):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    path = tmp_path / "run" / "version_0" / "metrics.csv"
    path.write_text(path.read_text() + "1")  # the killed write: "1,0.5" cut after its step
    resumed = CSVLogger(tmp_path, name="run", version=0)
    assert set_purge_step(resumed, 2) and open_csv(resumed)
    resumed.log_metrics({"train/loss": 12.0}, step=2)
    assert _csv_steps(resumed) == [(0, {"train/loss": 0.0}), (1, {"train/loss": 1.0}), (2, {"train/loss": 12.0})]


def test_csv_without_purge_step_keeps_every_row(tmp_path):
    first = CSVLogger(tmp_path, name="run", version=0)
    first.log_metrics({"train/loss": 1.0}, step=7)
    first.save()
    again = CSVLogger(tmp_path, name="run", version=0)  # em-fit validate on a run: its curves stay
    assert purge_step(again) is None and open_csv(again)
    again.log_metrics({"val/loss": 2.0}, step=0)
    assert _csv_steps(again) == [(7, {"train/loss": 1.0}), (0, {"val/loss": 2.0})]
    assert not open_csv(TensorBoardLogger(tmp_path, name="tb"))  # other loggers: nothing to do
