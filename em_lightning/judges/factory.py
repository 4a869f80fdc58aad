"""The judges a set of judge prompts uses, ready to call: resolved by name, API keys checked, cached.
``build_judges`` is the one set-up of a ``JudgeSpec`` for the in-loop judge, ``em-fit eval``, ``em-fit steer``
and ``em-fit judge calibrate``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from em_lightning.judges.base import Judge, is_meaningful
from em_lightning.judges.cache import CachedJudge, JudgeCache
from em_lightning.judges.spec import JudgeSpec


def resolve_judges(judges: Judge | Mapping[str, Judge], names: Sequence[str]) -> dict[str, Judge]:
    """{judge prompt name: Judge}; a single Judge serves every name, a mapping may use ``"*"`` as default."""
    if not isinstance(judges, Mapping):
        return {n: judges for n in names}
    out = {}
    for n in names:
        judge = judges.get(n, judges.get("*"))
        if judge is None:
            raise ValueError(f"no judge for judge prompt {n!r} (have {sorted(judges)}; add it or a '*' default)")
        out[n] = judge
    return out


def prepare_judges(judges: Judge | Mapping[str, Judge], names: Sequence[str],
                   cache: JudgeCache | None = None) -> dict[str, Judge]:
    """Resolve, check every judge's API key now (a missing key fails before any work, as ValueError), and
    wrap each distinct judge once in the cache."""
    resolved = resolve_judges(judges, names)
    for judge in {id(j): j for j in resolved.values()}.values():
        check = getattr(judge, "check_api_key", None)
        if callable(check):
            try:
                check()
            except RuntimeError as exc:  # MissingAPIKeyError
                raise ValueError(str(exc)) from None
    if cache is None:
        return resolved
    wrapped: dict[int, CachedJudge] = {}
    return {n: wrapped.setdefault(id(j), CachedJudge(j, cache)) for n, j in resolved.items()}


@dataclass(frozen=True)
class Judging:
    """A JudgeSpec made ready: who scores each judge prompt (cached, API keys checked), the panel likewise."""

    spec: JudgeSpec
    names: list[str]  # the judge prompts scored
    by_prompt: dict[str, Judge]  # judge prompt name -> the primary judge for it
    panel: dict[str, dict[str, Judge]]  # panel member -> judge prompt name -> judge
    meaningful: bool  # False when a judge (the demo judge) says its scores mean nothing

    @property
    def primary(self) -> str:
        return self.spec.primary_name

    @property
    def primary_meaningful(self) -> bool:
        """Whether the judges scoring each prompt (the panel aside) give meaningful scores: what steering uses."""
        return all(is_meaningful(j) for j in self.by_prompt.values())


def build_judges(spec: JudgeSpec, names: Sequence[str], cache_dir: str | Path) -> Judging:
    """The judges of ``spec`` for the judge prompts ``names``, each distinct judge wrapped once in the
    spec's cache (``spec.cache_file(cache_dir)``; create it on one process first where several open it). A
    missing API key fails now, as one ValueError line (``panel: ...`` for a panel member's)."""
    path = spec.cache_file(cache_dir)
    cache = JudgeCache(path) if path is not None else None
    by_prompt = prepare_judges({"*": spec.judge, **spec.judges}, names, cache)
    try:
        panel = {m: prepare_judges(j, names, cache) for m, j in spec.panel.items()}
    except ValueError as exc:
        raise ValueError(f"panel: {exc}") from None
    heads = [next(iter(p.values())) for p in panel.values() if p]  # a member's first judge speaks for it
    meaningful = all(is_meaningful(j) for j in [*by_prompt.values(), *heads])
    return Judging(spec, list(names), by_prompt, panel, meaningful)
