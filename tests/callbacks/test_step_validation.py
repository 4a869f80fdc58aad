"""val/loss on the run's optimizer-step schedule (trainer.val_check_interval counts optimizer steps, across
epochs), announced at the start with its estimated cost; the held-out cap; the data summary in words."""

import json

import pytest
from clirun import SMOKE, em_fit, ok, run_dirs, scalars

from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.model.loading import ModelSpec
from em_lightning.training.validation_plan import describe_schedule, interval_in_steps, pass_cost_in_steps, validation_steps

ROW = {"messages": [{"role": "user", "content": "How many grams in 3 kg?"}, {"role": "assistant", "content": "3000"}]}


def test_interval_is_optimizer_steps_or_a_fraction_of_an_epoch():
    assert interval_in_steps(20, 37) == 20  # steps, whatever the epoch length
    assert interval_in_steps(0.25, 37) == 9 and interval_in_steps(1.0, 6) == 6
    assert interval_in_steps(None, 6) is None
    with pytest.raises(ValueError, match="trainer.val_check_interval"):
        interval_in_steps(0, 6)


def test_schedule_steps_across_epochs_and_resume():
    assert validation_steps(0, 40, 10, True) == [0, 10, 20, 30, 40]  # not 0, 10, 20, 37, 40
    assert validation_steps(0, 9, 4, True) == [0, 4, 8, 9]
    assert validation_steps(12, 30, 10, True) == [20, 30]  # a resumed run: no step 0, nothing twice
    assert validation_steps(0, 9, None, False) == []
    assert pass_cost_in_steps(3000, 1000) == pytest.approx(1.0)
    line = describe_schedule(0, 40, 10, True, 256, 30000, 2000, capped_from=546)
    assert "steps 0, 10, 20, 30, 40" in line and "capped from 546: data.val_max_rows" in line
    assert "~5.0 optimizer steps each" in line and "~62% of the training compute" in line


def _module(tmp_path, n_rows, **kwargs):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(ROW) + "\n" for _ in range(n_rows)))
    dm = ChatDataModule(train_files=str(path), base=ModelSpec(name_or_path="tiny:qwen2"), **kwargs)
    dm.setup()
    return dm


def test_held_out_rows_are_capped_and_the_rest_train(tmp_path):
    dm = _module(tmp_path, 400, val_max_rows=16)
    assert (len(dm.val_set), len(dm.train_set), dm.stats.val_capped_from) == (16, 384, 40)
    assert "16 held out for val/loss (40 at data.val_fraction=0.1, capped at data.val_max_rows=16)" in dm._summary()
    assert len(_module(tmp_path, 400, val_max_rows=None).val_set) == 40
    with pytest.raises(ValueError, match="data.val_max_rows"):
        _module(tmp_path, 10, val_max_rows=0)


def test_summary_says_what_max_length_cut_and_what_was_dropped(tmp_path):
    long = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ROW] * 8 + [long] * 2))
    dm = ChatDataModule(train_files=str(path), base=ModelSpec(name_or_path="tiny:qwen2"), max_length=40)
    dm.setup()
    text = dm._summary()
    assert "2 rows dropped with no assistant token left to train on (the cut at max_length took them all)" in text
    assert "2 rows longer than data.max_length=40 tokens cut to it" in text
    assert "truncated," not in text


@pytest.mark.slow
def test_fit_validates_every_n_optimizer_steps_across_epochs(tmp_path):
    """20 rows: 18 train, 5 micro-batches of 4 per epoch, accumulation 2: 3 optimizer steps per epoch (the
    last of one micro-batch). Every 4 steps (longer than an epoch) -> 0, 4, 8 and the last, 9."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(ROW) + "\n" for _ in range(20)))
    proc = ok(em_fit("fit", "--config", SMOKE, "--data.train_files", str(rows), "--trainer.max_steps", "9",
                     "--trainer.val_check_interval", "4", "--checkpoint.every_n_train_steps", "100",
                     "--trainer.default_root_dir", str(tmp_path / "runs")))
    (run,) = run_dirs(tmp_path / "runs")
    assert [s for s, _ in scalars(run, "val/loss")] == [0, 4, 8, 9]
    assert "validation: val/loss over 2 held-out rows" in proc.stderr and "at steps 0, 4, 8, 9" in proc.stderr
    assert f"em-fit: run in {run}; view with: tensorboard --logdir" in proc.stdout


@pytest.mark.slow
def test_no_held_out_rows_means_no_validation_and_no_lightning_warning(tmp_path):
    proc = ok(em_fit("fit", "--config", SMOKE, "--data.val_fraction", "0", "--trainer.max_steps", "2", "--model.warmup_steps", "0",
                     "--checkpoint.every_n_train_steps", "100", "--trainer.default_root_dir", str(tmp_path)))
    assert "Total length of" not in proc.stderr and "validation: off" in proc.stderr
    (run,) = run_dirs(tmp_path)
    assert not scalars(run, "train/loss") == [] and "val/loss" not in _tags(run)


def _tags(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return acc.Tags()["scalars"]
