"""TensorBoard's custom-scalars layout: one "Phase transition" page with every curve that matters side by
side (written through ``RunLogger.summary(layout_summary(...))``), and the text shown while no transition is
detected.

Chart entries are regexes that TensorBoard's custom-scalars plugin applies with ``re.match`` (anchored at
the start only), so each ends in ``$``; ``.*`` stands for the module name in ``phase/<module>/...``. The
eval/* charts stay empty until an evaluation callback logs those tags.
"""

from __future__ import annotations

from collections.abc import Sequence

from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2

CATEGORY = "Phase transition"
EVAL_TAGS = ("em_rate", "coherent_rate", "aligned_mean")  # under eval/ (eval_demo/ for the demo judge)
EVAL_ROOTS = ("eval", "eval_demo")


def _phase(metric: str) -> str:
    return rf"^phase/.*/{metric}$"


def phase_transition_layout(k_values: Sequence[int] = (5, 10, 15)) -> dict:
    """``{category: {chart title: [kind, content]}}`` for ``SummaryWriter.add_custom_scalars``: one page, read
    top to bottom as training (loss, learning rate, whole-model gradient norm), then the adapter's geometry,
    then the judged evaluation. Each line of a chart is one tag, which TensorBoard names in the chart's
    tooltip; the titles say which tags each chart holds. The EM rate is a margin chart (its 95% interval)."""
    charts = {
        "loss: train/loss (each step), val/loss (held-out rows)": ["Multiline", [r"^train/loss$", r"^val/loss$"]],
        "learning rate: train/lr": ["Multiline", [r"^train/lr$"]],
        "gradient norm, all trainable weights: train/grad_norm (before clipping)": ["Multiline", [r"^train/grad_norm$"]],
        "adapter gradient norms: phase/<module>/A_grad_norm, B_grad_norm": ["Multiline", [_phase("[AB]_grad_norm")]],
        "adapter norms: phase/<module>/A_norm, B_norm": ["Multiline", [_phase("[AB]_norm")]],
        "rotation per step (degrees): phase/<module>/A_rotation_deg, B_rotation_deg": ["Multiline", [_phase("[AB]_rotation_deg")]],
        "cumulative rotation of B (degrees)": ["Multiline", [_phase("B_rotation_cum_deg")]],
        **{f"local cosine similarity of B, k={k}": ["Multiline", [_phase(f"B_local_cos_k{k}")]] for k in k_values},
        "detected transitions (step; none so far: see TEXT phase/transitions)": ["Multiline", [_phase("transition_step")]],
        "EM rate with its 95% interval (eval/em_rate; eval_demo/: demo judge, means nothing)": [
            "Margin", [(f"{root}/em_rate", f"{root}/em_rate_ci95_low", f"{root}/em_rate_ci95_high") for root in EVAL_ROOTS]],
        **{f"{tag} (evaluation: eval/, eval_demo/)": ["Multiline", [rf"^eval(_demo)?/{tag}$"]] for tag in EVAL_TAGS[1:]},
    }
    return {CATEGORY: charts}


def layout_proto(layout: dict):
    """The layout as TensorBoard's Layout proto (torch's ``add_custom_scalars`` takes one margin series)."""
    categories = []
    for title, charts in layout.items():
        built = []
        for name, (kind, content) in charts.items():
            if kind == "Margin":
                series = [layout_pb2.MarginChartContent.Series(value=v, lower=lo, upper=hi) for v, lo, hi in content]
                built.append(layout_pb2.Chart(title=name, margin=layout_pb2.MarginChartContent(series=series)))
            else:
                built.append(layout_pb2.Chart(title=name, multiline=layout_pb2.MultilineChartContent(tag=content)))
        categories.append(layout_pb2.Category(title=title, chart=built))
    return layout_pb2.Layout(category=categories)


def layout_summary(layout: dict) -> Summary:
    """The summary TensorBoard's custom-scalars plugin reads (what torch's add_custom_scalars writes, with
    margin charts of several series)."""
    tensor = TensorProto(dtype="DT_STRING", string_val=[layout_proto(layout).SerializeToString()],
                         tensor_shape=TensorShapeProto())
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
    return Summary(value=[Summary.Value(tag="custom_scalars__config__", tensor=tensor, metadata=meta)])


def no_transition_text(step: int, final: bool) -> str:
    """The phase/transitions text while (or when) the detector has found nothing, so the page never
    shows an empty chart without a word."""
    return (f"No transition detected in steps 0..{step}." if final
            else f"No transition detected so far (step {step}); detected turns are listed here as they happen.")
