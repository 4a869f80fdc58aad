"""The judges a set of judge prompts uses, ready to call: resolved by name, API keys checked, cached.
One place for what the in-loop callback and ``em-fit eval`` both need."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from em_lightning.judges.base import Judge
from em_lightning.judges.cache import CachedJudge, JudgeCache


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
