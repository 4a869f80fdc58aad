import pytest
import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from em_lightning.training.schedule import lr_factor, resolve_schedule_steps


@pytest.mark.parametrize(
    "kind, reference",
    [
        ("linear", lambda o: get_linear_schedule_with_warmup(o, 5, 40)),
        ("cosine", lambda o: get_cosine_schedule_with_warmup(o, 5, 40)),
        ("constant", lambda o: get_constant_schedule_with_warmup(o, 5)),
    ],
)
def test_matches_transformers_schedules(kind, reference):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = reference(opt)
    for step in range(41):  # within the schedule (transformers' cosine rises again past its end)
        assert lr_factor(step, kind, 5, 40) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()


def test_decay_stays_at_zero_past_the_end():
    assert lr_factor(45, "cosine", 5, 40) == 0.0 and lr_factor(45, "linear", 5, 40) == 0.0


def test_extension_policy():
    assert resolve_schedule_steps(None, 800, "linear") == 800  # unset: stretched to the planned run
    assert resolve_schedule_steps(1000, 800, "linear") == 1000
    assert resolve_schedule_steps(400, 800, "constant") == 400
    with pytest.raises(ValueError, match="LR 0"):
        resolve_schedule_steps(400, 800, "linear")
    # the stretched schedule never gives LR 0 before its end
    assert all(lr_factor(s, "linear", 5, 800) > 0 for s in range(1, 800))


def test_planned_steps_counts_like_lightning():
    from em_lightning.training.schedule import planned_steps

    assert planned_steps(-1, 3, 12, 2) == 18
    assert planned_steps(-1, 2, 11, 2) == 12  # the epoch's last, shorter group still steps
    assert planned_steps(10, 3, 12, 2) == 10 and planned_steps(40, 3, 12, 2) == 18
    assert planned_steps(7, -1, 12, 2) == 7 and planned_steps(7, None, 12, 2) == 7
    with pytest.raises(ValueError, match="no end"):
        planned_steps(-1, -1, 12, 2)
