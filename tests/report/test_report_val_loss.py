"""report.md and the metrics figure show val/loss (the run's one held-out number) beside train/loss, with
its unit and scale."""

from torch.utils.tensorboard import SummaryWriter

from em_lightning.report.analysis import analyse_run
from em_lightning.report.figures import draw_metrics
from em_lightning.report.summary import write_summary


def test_val_loss_table_and_figure(tmp_path):
    with SummaryWriter(str(tmp_path)) as w:
        for step in range(21):
            w.add_scalar("train/loss", 4.0 - step * 0.02, step)
        for step, value in ((0, 4.103), (10, 3.9), (20, 3.545)):
            w.add_scalar("val/loss", value, step)
    report = analyse_run(tmp_path, [5])
    write_summary(report, [], tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "## Loss" in text and "nats per assistant token" in text and "scale 1" in text
    assert "| 20 | 3.545 | 3.69 |" in text  # train/loss: mean of steps 11..20
    assert "val/loss 4.103 (step 0) -> 3.545 (step 20)." in text
    fig = draw_metrics(report)
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert "val/loss (held-out rows)" in labels and "train/loss" in labels
