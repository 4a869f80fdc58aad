"""When a run computes val/loss, in optimizer steps, and what it costs (an estimate): pure functions for
``callbacks.StepValidation`` and the line it prints at the start."""

from __future__ import annotations


def interval_in_steps(val_check_interval: int | float | None, steps_per_epoch: int | None) -> int | None:
    """Optimizer steps between checks: an int is steps; a float is a fraction of an epoch's steps (as
    Lightning reads it, 1.0: every epoch); None: no periodic check (only before and after training)."""
    if val_check_interval is None or isinstance(val_check_interval, bool):
        return None
    if isinstance(val_check_interval, int):
        if val_check_interval < 1:
            raise ValueError(f"trainer.val_check_interval: expected optimizer steps >= 1 or a fraction of an "
                             f"epoch, got {val_check_interval}")
        return val_check_interval
    if steps_per_epoch is None:
        return None
    return max(1, round(float(val_check_interval) * steps_per_epoch))


def validation_steps(start: int, end: int, every: int | None, before_after: bool) -> list[int]:
    """The steps whose val/loss a run from ``start`` to ``end`` logs."""
    steps = set(range(every * (start // every + 1), end + 1, every)) if every else set()  # after start
    if before_after:
        steps |= {end} | ({0} if start == 0 else set())
    return sorted(steps)


def pass_cost_in_steps(val_tokens: int, train_tokens_per_step: float) -> float:
    """A validation pass in optimizer steps of compute: a forward over its tokens, a training step a forward
    and a backward (~3 forwards) over its tokens. An estimate, padding and attention length ignored."""
    return val_tokens / max(3.0 * train_tokens_per_step, 1e-9)


def describe_schedule(start: int, end: int, every: int | None, before_after: bool, val_rows: int,
                      val_tokens: int, train_tokens_per_step: float, capped_from: int | None = None) -> str:
    steps = validation_steps(start, end, every, before_after)
    shown = ", ".join(map(str, steps)) if len(steps) <= 8 else (
        f"{', '.join(map(str, steps[:5]))}, ..., {', '.join(map(str, steps[-2:]))}")
    why = f"every {every} optimizer steps (trainer.val_check_interval)" if every else "no periodic check"
    if before_after:
        why += "; before the first and after the last step (model.validate_before_training)"
    each = pass_cost_in_steps(val_tokens, train_tokens_per_step)
    share = each * len(steps) / max(end - start, 1)
    rows = f"{val_rows} held-out rows" + (f" (capped from {capped_from}: data.val_max_rows)" if capped_from else "")
    return (f"validation: val/loss over {rows}, {val_tokens} tokens, at steps {shown or 'none'} ({len(steps)} "
            f"passes: {why}); estimated cost ~{each:.1f} optimizer steps each, ~{100 * share:.0f}% of the "
            "training compute (forward only; lower data.val_max_rows or raise trainer.val_check_interval to cut it)")
