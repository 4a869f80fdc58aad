"""RunLogger: TensorBoard and every other Lightning logger get the same scalars; rank 0 only; buffering keeps
one event per step in step order; texts reach loggers without a TEXT tab as JSONL rows; nothing else in the
package writes to a logger."""

import csv
import json
import re
from pathlib import Path

import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from em_lightning.loggers.run_logger import RunLogger, TensorBoardDir, drop_texts_from
from tb_scalars import all_scalars as read_scalars


def _csv_rows(logger):
    logger.save()
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_tensorboard_and_csv_get_the_same_scalars(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    cs = CSVLogger(tmp_path, name="csv", version=0)
    log = RunLogger([tb, cs])
    log.scalars({"loss": 1.5, "lr": 0.25}, step=3, prefix="train/")
    log.scalars({"m/B_norm": 2.0}, step=4, prefix="phase/", buffered=True)
    log.scalars({"m/A_norm": 1.0}, step=2, prefix="phase/", buffered=True)
    log.save()
    tb.experiment.flush()
    scalars = read_scalars(tb.log_dir)
    assert scalars == {"train/loss": [(3, 1.5)], "train/lr": [(3, 0.25)], "phase/m/B_norm": [(4, 2.0)],
                       "phase/m/A_norm": [(2, 1.0)]}
    rows = _csv_rows(cs)
    got = {(k, int(r["step"])): float(v) for r in rows for k, v in r.items() if k != "step"}
    assert got == {(tag, step): v for tag, pts in scalars.items() for step, v in pts}
    assert [int(r["step"]) for r in rows] == [3, 2, 4]  # held steps written in step order


def test_other_ranks_write_nothing(tmp_path):
    cs = CSVLogger(tmp_path, name="csv", version=0)
    log = RunLogger([cs], active=False)
    log.scalars({"x": 1.0}, step=0)
    log.text("t", "hello", step=0)
    log.save()
    assert not (tmp_path / "csv").exists()


def test_text_without_a_text_tab_goes_to_jsonl(tmp_path):
    cs = CSVLogger(tmp_path, name="csv", version=0)
    RunLogger([cs]).table("eval/answers", ["q", "a"], [["why|", "because"]], step=5, note="DEMO")
    rows = [json.loads(line) for line in open(f"{cs.log_dir}/texts.jsonl")]
    assert rows == [{"tag": "eval/answers", "step": 5, "text": "DEMO\n\n| q | a |\n|---|---|\n| why\\| | because |"}]


def test_tensorboard_dir_for_commands(tmp_path):
    with TensorBoardDir(tmp_path / "steer") as tb:
        RunLogger([tb]).scalars({"em_rate": 0.5}, step=7, prefix="mech/steer/")
    assert read_scalars(tmp_path / "steer") == {"mech/steer/em_rate": [(7, 0.5)]}


def test_tensor_values_are_written_as_floats(tmp_path):
    cs = CSVLogger(tmp_path, name="csv", version=0)
    RunLogger([cs]).scalars({"loss": torch.tensor(1.5), "lr": 0.01, "grad_norm": torch.tensor(0.25, dtype=torch.bfloat16),
                             "tokens": torch.tensor(7)}, step=2, prefix="train/")
    assert _csv_rows(cs) == [{"step": "2", "train/loss": "1.5", "train/lr": "0.01", "train/grad_norm": "0.25",
                              "train/tokens": "7.0"}]


def test_a_resume_drops_the_texts_it_writes_again(tmp_path):
    cs = CSVLogger(tmp_path, name="csv", version=0)
    log = RunLogger([cs])
    for step in (2, 4, 6):
        log.text("alarm", f"at {step}", step=step)
    drop_texts_from(cs, 4)  # the checkpoint's step: the resumed run writes 4 and 6 again
    assert [json.loads(line)["step"] for line in open(f"{cs.log_dir}/texts.jsonl")] == [2]


def test_a_resume_after_kill_9_drops_a_torn_text_row(tmp_path):
    cs = CSVLogger(tmp_path, name="csv", version=0)
    RunLogger([cs]).text("alarm", "at 2", step=2)
    with open(f"{cs.log_dir}/texts.jsonl", "a") as f:
        f.write('{"tag": "alarm", "st')  # the killed run's last append, half written
    drop_texts_from(cs, 4)
    assert [json.loads(line)["step"] for line in open(f"{cs.log_dir}/texts.jsonl")] == [2]


WRITES = re.compile(r"\b(log_metrics|add_text|add_scalar|add_scalars|add_figure|SummaryWriter)\(")


def test_only_the_run_logger_writes_to_loggers():
    """Metrics, texts and figures reach a logger through loggers/run_logger.py (internals: loggers/logger_compat.py)."""
    package = Path(__file__).resolve().parents[2] / "em_lightning"
    allowed = {package / "loggers" / "run_logger.py", package / "loggers" / "logger_compat.py"}
    found = [f"{path.relative_to(package.parent)}:{n}: {line.strip()}"
             for path in sorted(package.rglob("*.py")) if path not in allowed
             for n, line in enumerate(path.read_text().splitlines(), 1) if WRITES.search(line)]
    assert not found, "write through em_lightning.loggers.run_logger.RunLogger instead:\n" + "\n".join(found)
