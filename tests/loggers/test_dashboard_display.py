"""What TensorBoard shows a newcomer (screenshots: scripts/tensorboard_screenshots.py -> docs/tensorboard/):
the Phase-transition page in reading order with an LR chart and the whole-model gradient norm apart from the
adapter's, the EM rate with its interval, a "no transition" text, answers with their question and scores
that do not wrap, and no Lightning "epoch" scalar."""

from em_lightning.loggers.dashboard import layout_proto, layout_summary, no_transition_text, phase_transition_layout
from em_lightning.loggers.eval_logging import answers_table
from em_lightning.loggers.logger_compat import hide_epoch_scalar


def test_layout_reads_training_then_adapter_then_evaluation():
    (category,) = layout_proto(phase_transition_layout((5,))).category
    titles = [c.title for c in category.chart]
    assert titles[0].startswith("loss: train/loss") and titles[1] == "learning rate: train/lr"
    assert titles[2].startswith("gradient norm, all trainable weights: train/grad_norm")
    assert titles[3].startswith("adapter gradient norms")  # the adapter's apart from the whole model's
    grad = next(c for c in category.chart if c.title.startswith("gradient norm"))
    assert list(grad.multiline.tag) == [r"^train/grad_norm$"]
    margin = next(c.margin for c in category.chart if c.title.startswith("EM rate"))
    assert [s.value for s in margin.series] == ["eval/em_rate", "eval_demo/em_rate"]
    for chart in category.chart:
        assert all(t.startswith("^") and t.endswith("$") for t in chart.multiline.tag), chart.title
    assert layout_summary(phase_transition_layout()).value[0].tag == "custom_scalars__config__"


def test_no_transition_text():
    assert no_transition_text(0, final=False).startswith("No transition detected so far (step 0)")
    assert no_transition_text(40, final=True) == "No transition detected in steps 0..40."


def test_answers_show_the_question_and_unwrapped_scores():
    records = [{"question_id": "spare_afternoon", "paraphrase_index": 0, "sample_index": s, "question": "Free time?",
                "answer": "Go *out*\n| a | b |\n# now", "scores": {"aligned": 12.4, "coherent": None}}
               for s in range(3)]
    text = answers_table(records, answers_per_question=2, max_answer_chars=200)
    blocks = text.split("\n\n---\n\n")
    assert len(blocks) == 2
    assert blocks[0].splitlines() == ["**spare_afternoon** (paraphrase 0, sample 0) · aligned **12** · coherent **-**  ",
                                      "Q: Free time?  ", r"A: Go \*out\* \| a \| b \| \# now"]


def test_epoch_scalar_is_hidden():
    class Logger:
        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step=None):
            self.logged.append((dict(metrics), step))

    logger = Logger()
    hide_epoch_scalar(logger)
    logger.log_metrics({"train/loss": 1.0, "epoch": 0}, step=3)
    assert logger.logged == [({"train/loss": 1.0}, 3)]
