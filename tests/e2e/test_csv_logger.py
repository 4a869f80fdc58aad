"""With the demo stack (make demo's callbacks), a CSVLogger run records every scalar (train/, val/, phase/,
eval_demo/, mech/) and text a TensorBoard run records, at the same steps; resumed from an earlier checkpoint it holds
each (tag, step) once, as TensorBoard's purge step gives (metrics.csv and texts.jsonl rows from the
checkpoint's step on are replaced); em-fit report reads a CSV run's curves from metrics.csv."""

import csv
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clirun import SMOKE, em_fit, ok, run_dirs
from tb_scalars import steps_by_tag

from em_lightning.report.analysis import read_scalars

CSV = "lightning.pytorch.loggers.CSVLogger"
STACK = ["--config", "configs/callbacks/phase_transition.yaml", "--config", "configs/callbacks/demo_eval.yaml",
         "--config", "configs/callbacks/mechanistic.yaml"]
SHORT = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--checkpoint.every_n_train_steps", "2",
         "--model.warmup_steps", "1", "--trainer.enable_progress_bar", "false"]


def _fit(root, *args):
    ok(em_fit("fit", "--config", SMOKE, *STACK, *SHORT, "--trainer.default_root_dir", str(root), *args, timeout=600))
    (run,) = run_dirs(root)
    return run


def _csv_steps(run):
    """{tag: sorted steps} of metrics.csv, a step as often as it was written."""
    steps = {}
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for tag, value in row.items():
                if tag != "step" and value != "":
                    steps.setdefault(tag, []).append(int(row["step"]))
    return {tag: sorted(s) for tag, s in steps.items()}


def _tb_texts(run):
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    suffix = "/text_summary"
    return sorted((tag[: -len(suffix)], e.step) for tag in acc.Tags()["tensors"] if tag.endswith(suffix)
                  for e in acc.Tensors(tag))


def _csv_texts(run):
    return sorted((row["tag"], row["step"]) for row in map(json.loads, open(run / "texts.jsonl")))


@pytest.mark.slow
def test_csv_run_records_what_tensorboard_records(tmp_path):
    tensorboard = _fit(tmp_path / "tb")
    expected = steps_by_tag(tensorboard)
    assert {tag.split("/")[0] for tag in expected} == {"train", "val", "phase", "eval_demo", "mech"}
    run = _fit(tmp_path / "csv", "--trainer.logger", CSV)
    assert _csv_steps(run) == expected
    texts = _tb_texts(tensorboard)
    assert {tag for tag, _ in texts} >= {"phase/transitions", "eval_demo/answers"}
    assert _csv_texts(run) == texts
    # Resumed from step 2 (as after a crash there): steps 2.. are replaced, none is written twice.
    ok(em_fit("fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "step_0000002.ckpt"),
              timeout=600))
    assert _csv_steps(run) == expected
    # Texts from step 2 on are written again, once each, the run's closing "no transition" line included
    assert _csv_texts(run) == texts
    # em-fit report reads the CSV run's curves: the TensorBoard run's tags and steps, the same losses
    from_csv, from_tb = read_scalars(run), read_scalars(tensorboard)
    assert {t: steps for t, (steps, _) in from_csv.items()} == {t: steps for t, (steps, _) in from_tb.items()}
    assert from_csv["train/loss"][1] == pytest.approx(from_tb["train/loss"][1], rel=1e-5)
    ok(em_fit("report", str(run), timeout=600))
    assert (run / "report" / "metrics.png").is_file()
