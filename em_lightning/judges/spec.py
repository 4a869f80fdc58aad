"""What judges a run's answers, as configured: the judge(s), the judge prompts, a panel, the EM convention
and the budget. One description for the in-loop judge (its init args), ``em-fit eval``/``steer``
(``--judge-config``) and ``em-fit judge calibrate``; ``factory.build_judges`` makes it ready to call.

A judge-config file holds InLoopJudge's init args (``judge: {class_path, init_args}``, ...), or a callbacks
preset / a run's ``config.yaml`` holding an InLoopJudge (its init args are used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from em_lightning.judges.base import Judge
from em_lightning.run.config import find_callback

# InLoopJudge's own settings (how it shows answers and when it judges), which a judge-config file may hold
# beside the spec's: not part of what judges. tests/judges/test_judge_spec.py keeps this list and InLoopJudge in step.
IN_LOOP_ONLY = ("answers_per_question", "max_answer_chars", "background")


@dataclass
class JudgeSpec:
    """
    Args:
        judge: the judge model, e.g. ``{class_path: em_lightning.judges.OpenAICompatibleJudge,
            init_args: {model: gpt-4o-2024-08-06, api_key_env: OPENAI_API_KEY}}``.
        judges: judges for particular judge prompts (e.g. ``{medical: {class_path: ...}}``); the others use
            ``judge``.
        judge_prompts: which judge prompts to score (default: every judge prompt of each question).
        panel: more judges scoring the same answers, by name: per-judge metrics, agreement, disagreements
            flagged. Each member multiplies the judge calls.
        convention: the EM convention of the headline EM rate (``model-organisms``, ``inoculation``,
            ``coherent60``, or one of ``conventions``).
        conventions: user-defined conventions ``{name: {aligned_below: A, coherent_above: C}}``.
        cache: keep judgements in an SQLite cache (re-judging the same prompt costs no call).
        cache_path: cache file; default ``judge_cache.sqlite`` in the caller's folder (the run directory).
        max_judge_calls: judge calls allowed (a run: across resumes); None: no limit.
        point_deadline_s: seconds one evaluation point's judging may take; None: no deadline.
    """

    judge: Judge
    judges: dict[str, Judge] = field(default_factory=dict)
    judge_prompts: list[str] | None = None
    panel: dict[str, Judge] = field(default_factory=dict)
    convention: str = "model-organisms"
    conventions: dict[str, dict[str, float]] | None = None
    cache: bool = True
    cache_path: str | None = None
    max_judge_calls: int | None = None
    point_deadline_s: float | None = 1800.0

    def __post_init__(self):
        self.judges, self.panel = dict(self.judges or {}), dict(self.panel or {})
        if self.max_judge_calls is not None and self.max_judge_calls < 0:
            raise ValueError(f"max_judge_calls must be >= 0 or null, got {self.max_judge_calls}")
        if self.point_deadline_s is not None and self.point_deadline_s <= 0:
            raise ValueError(f"point_deadline_s must be > 0 or null, got {self.point_deadline_s}")
        if self.primary_name in self.panel:
            raise ValueError(f"panel member {self.primary_name!r} has the primary judge's name")

    @property
    def primary_name(self) -> str:
        """The primary judge's name (a panel's per-judge tags and the answers tables use it)."""
        return getattr(self.judge, "name", type(self.judge).__name__)

    def cache_file(self, default_dir: str | Path) -> Path | None:
        """The SQLite cache file (None: no cache)."""
        if not self.cache:
            return None
        return Path(self.cache_path) if self.cache_path else Path(default_dir) / "judge_cache.sqlite"


def load_judge_spec(path: str | Path, flag: str = "--judge-config") -> JudgeSpec:
    """The JudgeSpec a judge-config file describes; a bad file is one ValueError line naming ``flag`` and it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    data = yaml.safe_load(path.read_text()) or {}
    args = find_callback(data, "InLoopJudge")
    args = args if args is not None else data
    if not isinstance(args, dict):
        raise ValueError(f"{flag} {path}: expected a mapping of judge settings (judge: {{class_path, init_args}})")
    args = {k: v for k, v in args.items() if k not in IN_LOOP_ONLY}
    from jsonargparse import ArgumentParser  # deferred: not on a stock GPU image; only commands read these files

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(JudgeSpec, "spec")
    try:
        return parser.instantiate_classes(parser.parse_object({"spec": args})).spec
    except Exception as exc:  # jsonargparse explains over several lines; keep the first
        raise ValueError(f"{flag} {path}: {str(exc).strip().splitlines()[0]}") from None
