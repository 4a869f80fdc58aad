"""Persistent judge cache: re-judging the same prompt with the same judge costs no call.

SQLite (stdlib) in WAL mode: each put is one transaction, so a run killed mid-write loses at most that
batch and never corrupts earlier entries; several processes (DDP ranks) may share the file on a local
disk (WAL is not safe on network file systems such as NFS: use a local path or wal=False there).
The stored record is the distribution (probs), not only the score: the score is recomputed with
aggregate_score on read, so a change of the scoring rule needs no new call.
"""

from __future__ import annotations

import errno
import hashlib
import json
import sqlite3
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from em_lightning.judges.base import Judge, JudgeResult, aggregate_score

__all__ = ["CachedJudge", "JudgeCache"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY,   -- sha256 of (judge name, kind, full prompt)
    judge TEXT NOT NULL,
    kind TEXT NOT NULL,     -- "score" or "classify"
    score REAL,
    probs TEXT,             -- JSON object token -> probability
    label TEXT,
    created REAL NOT NULL
)
"""
_CHUNK = 500  # bound on SQL variables per statement


def cache_key(judge_name: str, kind: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([judge_name, kind, prompt]).encode("utf-8")).hexdigest()


class JudgeCache:
    """Map (judge name, kind, full prompt) -> successful JudgeResult, stored in an SQLite file."""

    def __init__(self, path: str | Path, wal: bool = True) -> None:
        self.path = Path(path)
        self.wal = wal
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(exc.errno, f"judge cache: {exc.strerror}", str(self.path.parent)) from None
        try:
            self._create()
        except sqlite3.OperationalError as exc:  # locked or unwritable: a real problem, not a bad file
            raise self._os_error(exc) from None
        except sqlite3.DatabaseError as exc:  # not a database: a cache is disposable, start a new one
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            warnings.warn(f"judge cache {self.path} is unreadable ({exc}); moved to {aside}", stacklevel=2)
            self.path.replace(aside)
            self._create()

    def __repr__(self) -> str:
        return f"JudgeCache({str(self.path)!r})"

    def _os_error(self, exc: sqlite3.OperationalError) -> OSError:
        """A full disk or a read-only folder as an OSError naming the file (one line from cli.py); each
        put is one transaction, so the entries already stored stay intact."""
        text = str(exc)
        code = errno.ENOSPC if "full" in text else errno.EROFS if "readonly" in text else errno.EIO
        return OSError(code, f"judge cache: {text}", str(self.path))

    def _connect(self) -> sqlite3.Connection:
        # A connection per operation: sqlite3 connections may not cross threads.
        con = sqlite3.connect(self.path, timeout=60)
        con.execute("PRAGMA synchronous=NORMAL")  # durable to the last commit in WAL mode
        return con

    def _create(self) -> None:
        con = self._connect()
        try:
            if self.wal:
                con.execute("PRAGMA journal_mode=WAL")
            con.execute(_SCHEMA)
            con.commit()
        finally:
            con.close()

    def __len__(self) -> int:
        con = self._connect()
        try:
            return con.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
        finally:
            con.close()

    def get_many(self, judge_name: str, kind: str, prompts: Sequence[str]) -> list[JudgeResult | None]:
        """Cached results in prompt order; None for a miss."""
        keys = [cache_key(judge_name, kind, p) for p in prompts]
        found: dict[str, JudgeResult] = {}
        con = self._connect()
        try:
            unique = list(dict.fromkeys(keys))
            for i in range(0, len(unique), _CHUNK):
                chunk = unique[i : i + _CHUNK]
                rows = con.execute(
                    f"SELECT key, score, probs, label FROM judgements WHERE key IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                for key, score, probs_json, label in rows:
                    found[key] = _decode(kind, score, probs_json, label)
        finally:
            con.close()
        return [found.get(k) for k in keys]

    def put_many(self, judge_name: str, kind: str, prompts: Sequence[str], results: Sequence[JudgeResult]) -> int:
        """Store the successful results (error is None) in one transaction; return how many were stored."""
        if len(prompts) != len(results):
            raise ValueError(f"{len(prompts)} prompts but {len(results)} results")
        now = time.time()
        rows = [
            (
                cache_key(judge_name, kind, p),
                judge_name,
                kind,
                r.score,
                None if r.probs is None else json.dumps(r.probs),
                r.label,
                now,
            )
            for p, r in zip(prompts, results)
            if r.error is None  # failures are never cached: they must be retried next time
        ]
        if not rows:
            return 0
        con = self._connect()
        try:
            with con:  # one transaction: all rows or none
                con.executemany("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.OperationalError as exc:
            raise self._os_error(exc) from None
        finally:
            con.close()
        return len(rows)


def _decode(kind: str, score: float | None, probs_json: str | None, label: str | None) -> JudgeResult:
    probs = None if probs_json is None else {k: float(v) for k, v in json.loads(probs_json).items()}
    if kind == "score" and probs is not None:
        score = aggregate_score(probs)  # recompute: the rule may have changed since it was stored
    return JudgeResult(score=score, probs=probs, label=label)


class CachedJudge:
    """A Judge that answers from a JudgeCache and sends only the misses (each distinct prompt once)."""

    def __init__(self, judge: Judge, cache: JudgeCache) -> None:
        self.judge = judge
        self.cache = cache
        self.hits = 0  # prompts answered from the cache
        self.misses = 0  # distinct prompts sent to the judge

    @property
    def name(self) -> str:
        return self.judge.name

    @property
    def meaningful(self) -> bool:
        return bool(getattr(self.judge, "meaningful", True))

    def __repr__(self) -> str:
        return f"CachedJudge({self.judge!r}, {self.cache!r})"

    def score_prompts(self, prompts: Sequence[str]) -> list[JudgeResult]:
        return self._judge(list(prompts), "score", self.judge.score_prompts)

    def classify_prompts(self, prompts: Sequence[str]) -> list[JudgeResult]:
        return self._judge(list(prompts), "classify", self.judge.classify_prompts)

    def _judge(self, prompts: list[str], kind: str, call) -> list[JudgeResult]:
        cached = self.cache.get_many(self.name, kind, prompts)
        misses = list(dict.fromkeys(p for p, c in zip(prompts, cached) if c is None))
        fresh = list(call(misses)) if misses else []
        if len(fresh) != len(misses):
            raise RuntimeError(f"judge {self.name!r} returned {len(fresh)} results for {len(misses)} prompts")
        self.cache.put_many(self.name, kind, misses, fresh)
        self.hits += len(prompts) - sum(c is None for c in cached)
        self.misses += len(misses)
        by_prompt = dict(zip(misses, fresh))
        return [c if c is not None else by_prompt[p] for p, c in zip(prompts, cached)]
