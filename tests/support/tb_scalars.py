"""Every TensorBoard scalar of a run, as TensorBoard shows it (a resumed run's purged events dropped), and the
check that a run's curves hold exactly one value per (tag, step): a resume must neither lose a step (the
checkpoint's included) nor log one twice. Shared by the resume tests (phase/*, val/loss, eval/*)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def all_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} in file order, from every event file in ``run_dir`` (not below it)."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every value
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def steps_by_tag(run_dir: str | Path, prefix: str = "") -> dict[str, list[int]]:
    """{tag: sorted steps} for the tags starting with ``prefix``."""
    return {tag: sorted(s for s, _ in values) for tag, values in all_scalars(run_dir).items() if tag.startswith(prefix)}


def assert_one_value_per_step(run_dir: str | Path, prefix: str = "",
                              expected: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Fail when a tag (starting with ``prefix``) holds a step twice; with ``expected`` (e.g. the same run
    never interrupted: ``steps_by_tag(reference)``), also when the tags or their steps differ. Returns the
    steps by tag."""
    got = steps_by_tag(run_dir, prefix)
    twice = {tag: sorted(s for s, n in Counter(steps).items() if n > 1) for tag, steps in got.items()}
    twice = {tag: steps for tag, steps in twice.items() if steps}
    assert not twice, f"logged more than once at these steps: {twice}"
    if expected is not None:
        expected = {tag: sorted(steps) for tag, steps in expected.items() if tag.startswith(prefix)}
        missing = {t: sorted(set(s) - set(got.get(t, []))) for t, s in expected.items()}
        extra = {t: sorted(set(s) - set(expected.get(t, []))) for t, s in got.items()}
        missing = {t: s for t, s in missing.items() if s}
        extra = {t: s for t, s in extra.items() if s}
        assert not missing and not extra, f"steps missing: {missing}; steps not expected: {extra}"
    return got
