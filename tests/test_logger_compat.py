"""The logger internals em-lightning relies on (logger_compat.py) still behave on the installed versions."""

from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from em_lightning.logger_compat import pin_version, set_purge_step, version_unset, write_scalars


def test_pinned_version_and_purge_step_reach_the_writer(tmp_path):
    first = TensorBoardLogger(tmp_path, name="run")
    assert version_unset(first)
    pin_version(first, 7)
    assert not version_unset(first) and first.log_dir.endswith("version_7")
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.experiment.flush()
    resumed = TensorBoardLogger(tmp_path, name="run", version=7)
    assert set_purge_step(resumed, 3)  # the resumed run replaces steps 3.. of the killed one
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
