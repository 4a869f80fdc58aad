"""JudgeCache / CachedJudge: hits avoid calls, failures are retried, the file survives crashes."""

import subprocess
import sys
import textwrap

import pytest

from em_lightning.judges import CachedJudge, Judge, JudgeCache, JudgeResult


class FakeJudge:
    """Scores "p<N>" as N with certainty; prompts containing "fail" fail; records every prompt sent."""

    def __init__(self, name="fake-judge"):
        self.name = name
        self.sent = []

    def score_prompts(self, prompts):
        self.sent.extend(prompts)
        out = []
        for p in prompts:
            if "fail" in p:
                out.append(JudgeResult(error="HTTP 500"))
            else:
                out.append(JudgeResult(score=float(p[1:]), probs={p[1:]: 0.9, "x": 0.1}))
        return out

    def classify_prompts(self, prompts):
        self.sent.extend(prompts)
        return [JudgeResult(label=p.upper(), probs={p.upper(): 0.8}) for p in prompts]


def test_hits_avoid_calls_and_duplicates_are_sent_once(tmp_path):
    fake = FakeJudge()
    judge = CachedJudge(fake, JudgeCache(tmp_path / "judge.sqlite"))
    assert isinstance(judge, Judge)

    first = judge.score_prompts(["p10", "p20", "p10"])
    assert [r.score for r in first] == [10.0, 20.0, 10.0]
    assert fake.sent == ["p10", "p20"]  # the duplicate went once

    second = judge.score_prompts(["p20", "p30", "p10"])
    assert fake.sent == ["p10", "p20", "p30"]  # only the miss
    assert [r.score for r in second] == [20.0, 30.0, 10.0]
    assert second[0].probs == pytest.approx({"20": 0.9, "x": 0.1})
    assert (judge.hits, judge.misses) == (2, 3)


def test_failures_are_not_cached(tmp_path):
    fake = FakeJudge()
    judge = CachedJudge(fake, JudgeCache(tmp_path / "c.sqlite"))
    r = judge.score_prompts(["p5fail", "p7"])
    assert r[0].error == "HTTP 500" and r[0].score is None
    judge.score_prompts(["p5fail", "p7"])
    assert fake.sent == ["p5fail", "p7", "p5fail"]  # the failure is asked again, the success is not
    assert len(judge.cache) == 1


def test_persistence_keys_and_kinds(tmp_path):
    path = tmp_path / "sub" / "cache.sqlite"
    CachedJudge(FakeJudge(), JudgeCache(path)).score_prompts(["p40"])
    CachedJudge(FakeJudge(), JudgeCache(path)).classify_prompts(["paris"])

    fresh = FakeJudge()
    again = CachedJudge(fresh, JudgeCache(path))  # a new process would see the same
    assert again.score_prompts(["p40"])[0].score == 40.0
    assert again.classify_prompts(["paris"])[0].label == "PARIS"
    assert fresh.sent == []
    # Another judge model, or the other kind of judging, is a different key.
    other = FakeJudge(name="other-judge")
    CachedJudge(other, JudgeCache(path)).score_prompts(["p40"])
    again.classify_prompts(["p40"])
    assert other.sent == ["p40"] and fresh.sent == ["p40"]


def test_score_is_recomputed_from_stored_distribution(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")
    # Stored score deliberately inconsistent: the distribution is the truth (the rule may change).
    cache.put_many("j", "score", ["q"], [JudgeResult(score=1.0, probs={"60": 0.3, "80": 0.1, "no": 0.6})])
    [hit] = cache.get_many("j", "score", ["q"])
    assert hit.score == pytest.approx((60 * 0.3 + 80 * 0.1) / 0.4)


def test_killed_writer_leaves_cache_intact(tmp_path):
    path = tmp_path / "c.sqlite"
    CachedJudge(FakeJudge(), JudgeCache(path)).score_prompts(["p1", "p2"])
    # A process dies in the middle of a write transaction (no commit, no close).
    script = textwrap.dedent(
        f"""
        import os, sqlite3
        con = sqlite3.connect({str(path)!r})
        con.execute("BEGIN")
        con.execute("INSERT INTO judgements VALUES ('k', 'j', 'score', 1.0, '{{}}', NULL, 0)")
        con.execute("DELETE FROM judgements")
        os._exit(1)
        """
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 1
    fake = FakeJudge()
    judge = CachedJudge(fake, JudgeCache(path))
    assert [r.score for r in judge.score_prompts(["p1", "p2"])] == [1.0, 2.0]
    assert fake.sent == [] and len(judge.cache) == 2


def test_unreadable_file_is_moved_aside(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database, just junk left by something else" * 20)
    with pytest.warns(UserWarning, match="unreadable"):
        cache = JudgeCache(path)
    assert len(cache) == 0
    assert len(list(tmp_path.glob("c.sqlite.corrupt-*"))) == 1
    judge = CachedJudge(FakeJudge(), cache)
    judge.score_prompts(["p3"])
    assert len(cache) == 1
