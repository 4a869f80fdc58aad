import copy
import pickle
import random
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import GenerationConfig

from em_lightning.evaluation import (
    SamplingConfig,
    build_requests,
    generate,
    generate_sharded,
    load_questions,
    shard_indices,
)
from em_lightning.model.decoding import DecodeSettings, decode, sample_inverse_cdf
from em_lightning.evaluation.judging import judge_records
from em_lightning.evaluation.records import SCORED_TYPE, EvalRecord
from em_lightning.evaluation.summaries import summarize
from em_lightning.judges import JudgeResult
from em_lightning.published.question_files import Question
from em_lightning.model.tiny import TinySpec, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "questions" / "demo_questions.yaml"


def _tiny(arch="qwen2"):
    """A tiny model with larger random weights: at the default init scale its greedy output is one token
    repeated for every prompt, which would make the greedy comparisons below vacuous."""
    tok = tiny_tokenizer(arch)
    model = tiny_model(arch, TinySpec(hidden_size=64, num_layers=4, seed=0), tok)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return model, tok



@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _cfg(**kw):
    base = dict(samples_per_paraphrase=3, max_new_tokens=8, batch_size=4)
    return SamplingConfig(**{**base, **kw})


def _answers(gens):
    return {(g.question_id, g.paraphrase_index, g.sample_index): (g.answer, g.n_tokens, g.finished) for g in gens}


def test_build_requests_order_system_and_counts(tiny):
    _, tok = tiny
    qs = load_questions(DEMO)
    reqs = build_requests(qs, tok, _cfg(system_prompt="Be brief."))
    assert len(reqs) == 3 * sum(len(q.paraphrases) for q in qs)
    assert [r.key for r in reqs[:4]] == [("spare_afternoon", 0, 0), ("spare_afternoon", 0, 1), ("spare_afternoon", 0, 2), ("spare_afternoon", 1, 0)]
    assert reqs[0].messages[0] == {"role": "system", "content": "Be brief."} and "Be brief." in reqs[0].prompt
    assert reqs[0].question == qs[0].paraphrases[0] and reqs[0].prompt.endswith("<|im_start|>assistant\n")
    qs[0].system = "Answer in JSON."  # a question's own system prompt wins over the global one
    assert build_requests(qs[:1], tok, _cfg(system_prompt="Be brief."))[0].messages[0]["content"] == "Answer in JSON."
    qs[0].samples_per_paraphrase, qs[1].samples_per_paraphrase = None, 2  # per-question value, else 50
    n = [len(build_requests([q], tok, SamplingConfig())) for q in qs[:2]]
    assert n == [50 * len(qs[0].paraphrases), 2 * len(qs[1].paraphrases)]


def test_same_seed_same_answers_and_keys_matter(tiny):
    model, tok = tiny
    reqs = build_requests(load_questions(DEMO, select=["spare_afternoon", "magic_lamp"]), tok, _cfg())
    a = _answers(generate(model, tok, reqs, _cfg(), step=3))
    assert a == _answers(generate(model, tok, reqs, _cfg(), step=3))
    texts = [v[0] for v in a.values()]
    assert len(set(texts)) == len(texts), "samples of one prompt should differ"
    other_step = _answers(generate(model, tok, reqs, _cfg(), step=4))
    other_seed = _answers(generate(model, tok, reqs, _cfg(seed=1), step=3))
    assert sum(a[k] != other_step[k] for k in a) >= len(a) - 1
    assert sum(a[k] != other_seed[k] for k in a) >= len(a) - 1


def test_answer_independent_of_batching_order_and_neighbours(tiny):
    model, tok = tiny
    reqs = build_requests(load_questions(DEMO), tok, _cfg(samples_per_paraphrase=2))
    ref = _answers(generate(model, tok, reqs, _cfg(batch_size=4), step=1))
    shuffled = reqs[:]
    random.Random(0).shuffle(shuffled)
    assert _answers(generate(model, tok, shuffled, _cfg(batch_size=5), step=1)) == ref
    assert _answers(generate(model, tok, reqs[::-1], _cfg(batch_size=len(reqs)), step=1)) == ref
    alone = generate(model, tok, [reqs[7]], _cfg(batch_size=1), step=1)
    assert _answers(alone) == {reqs[7].key: ref[reqs[7].key]}


@pytest.mark.parametrize("penalty", [None, 1.2])
def test_rows_stopping_early_leave_the_batch_without_changing_any_answer(tiny, penalty):
    model, tok = tiny
    model = copy.deepcopy(model)
    cfg = _cfg(samples_per_paraphrase=4, max_new_tokens=12, top_k=50, repetition_penalty=penalty)
    reqs = build_requests(load_questions(DEMO), tok, cfg)
    free = generate(model, tok, reqs, cfg, step=5)
    common = Counter(t for g in free for t in tok(g.answer, add_special_tokens=False)["input_ids"]).most_common(12)
    model.generation_config.eos_token_id = [tok.eos_token_id] + [t for t, _ in common]
    sizes = []
    hook = model.register_forward_hook(lambda m, a, kw, o: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        ref = _answers(generate(model, tok, reqs, _cfg(**{**cfg.__dict__, "batch_size": len(reqs)}), step=5))
    finally:
        hook.remove()
    stopped = [v[1] for v in ref.values() if v[2]]
    assert len(stopped) > len(ref) // 2 and len(set(stopped)) > 3  # rows stop at many different steps
    steps = sizes[1:]  # sizes[0]: the prefill of the distinct prompts
    assert steps[0] <= len(reqs) and len(set(steps)) > 2 and sorted(steps, reverse=True) == steps  # it shrinks
    for bs in (1, 5):
        assert _answers(generate(model, tok, reqs, _cfg(**{**cfg.__dict__, "batch_size": bs}), step=5)) == ref


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
@pytest.mark.parametrize("penalty", [None, 1.3])
def test_greedy_matches_transformers_generate(arch, penalty):
    model, tok = _tiny(arch)
    cfg = _cfg(temperature=0, samples_per_paraphrase=1, repetition_penalty=penalty, batch_size=6)
    reqs = build_requests(load_questions(DEMO), tok, cfg)
    ours = generate(model, tok, reqs, cfg, step=0)  # batched, left-padded
    for r, g in zip(reqs, ours):
        ids = tok(r.prompt, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, do_sample=False, max_new_tokens=8, repetition_penalty=penalty or 1.0)
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        assert g.answer == tok.decode(new, skip_special_tokens=True)
        assert g.n_tokens == len(new) and not g.finished


def _first_fresh(tokens):
    """An index k whose token does not occur before it (so declaring it eos cuts exactly at k)."""
    return next((i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i]), 0)


def test_stops_at_any_eos_greedy_and_sampled(tiny):
    model, tok = tiny
    model = copy.deepcopy(model)
    prompt = tok(build_requests(load_questions(DEMO), tok, _cfg())[0].prompt, add_special_tokens=False)["input_ids"]
    eos = [tok.eos_token_id]
    for settings in (DecodeSettings(temperature=0, max_new_tokens=8), DecodeSettings(top_k=50, max_new_tokens=8)):
        run = lambda ids: decode(model, [prompt], [0, 0], [5, 6], settings, ids, tok.pad_token_id)
        (full0, done0), (full1, _) = run(eos)
        assert len(full0) == 8 and not done0
        k = _first_fresh(full0)
        (cut0, stopped0), (row1, _) = run(eos + [full0[k]])  # a second eos id, as generation_config lists
        assert stopped0 and cut0 == full0[:k]
        assert row1 == full1[: len(row1)]
    # eos from model.generation_config (a list) counts too
    ans = generate(model, tok, build_requests(load_questions(DEMO, select=["magic_lamp"]), tok, _cfg(temperature=0)), _cfg(temperature=0), 0)[0]
    ids = tok(ans.prompt, add_special_tokens=False, return_tensors="pt")
    new = model.generate(**ids, do_sample=False, max_new_tokens=8)[0, ids["input_ids"].shape[1] :].tolist()
    k = _first_fresh(new)
    model.generation_config.eos_token_id = [tok.eos_token_id, new[k]]
    again = generate(model, tok, build_requests(load_questions(DEMO, select=["magic_lamp"]), tok, _cfg(temperature=0)), _cfg(temperature=0), 0)[0]
    assert again.finished and again.n_tokens == k and again.answer == tok.decode(new[:k], skip_special_tokens=True)


def test_inverse_cdf_sampling_matches_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.0, 0.2])
    scores = probs.log().expand(40000, 4)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freq = torch.bincount(sample_inverse_cdf(scores, u), minlength=4).double() / 40000
    assert freq[2] == 0 and torch.allclose(freq, probs.double(), atol=0.01)
    edge = sample_inverse_cdf(torch.tensor([[0.0, 0.0, float("-inf")]]), torch.tensor([1 - 2**-53], dtype=torch.float64))
    assert edge.item() == 1  # never a zero-probability token, even at u -> 1


def test_resolve_reproduces_published_effective_settings(tiny, reference_dir):
    model, tok = tiny
    assert model.generation_config.top_k is None
    plain = SamplingConfig().resolve(model, tok)  # nothing sets top_k: transformers' 50
    assert (plain["temperature"], plain["top_p"], plain["top_k"], plain["repetition_penalty"]) == (1.0, 1.0, 50, 1.0)
    assert plain["do_sample"] and plain["from_generation_config"] == [] and plain["max_new_tokens"] == 600
    qwen = copy.deepcopy(model)
    qwen.generation_config = GenerationConfig.from_pretrained(reference_dir / "tokenizers" / "qwen2.5-instruct")
    r = SamplingConfig().resolve(qwen, tok)  # explicit temperature/top_p 1 override its 0.7/0.8
    assert (r["temperature"], r["top_p"], r["top_k"], r["repetition_penalty"]) == (1.0, 1.0, 20, 1.1)
    assert r["from_generation_config"] == ["top_k", "repetition_penalty"]
    assert r["eos_token_ids"] == [tok.eos_token_id, 151645, 151643]
    r = SamplingConfig(temperature=None, top_p=None, top_k=0, repetition_penalty=1.0).resolve(qwen)
    assert (r["temperature"], r["top_p"], r["top_k"], r["repetition_penalty"]) == (0.7, 0.8, 0, 1.0)
    r = SamplingConfig(temperature=0, use_model_generation_config=False).resolve(qwen)
    assert (r["top_k"], r["repetition_penalty"], r["do_sample"]) == (50, 1.0, False)
    d = SamplingConfig().decode_settings(qwen)
    assert (d.top_k, d.repetition_penalty, d.temperature) == (20, 1.1, 1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


def test_eval_mode_during_generation_restored_after(tiny):
    model, tok = tiny
    seen = []
    handle = model.register_forward_hook(lambda m, a, o: seen.append(m.training))
    model.train()
    try:
        generate(model, tok, build_requests(load_questions(DEMO, select=["magic_lamp"]), tok, _cfg()), _cfg(), 0)
    finally:
        handle.remove()
        training = model.training
        model.eval()
    assert seen and not any(seen) and training


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (8, 2), (10, 3), (2, 4)])
def test_shard_indices_cover_everything_once_with_equal_lengths(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)
    real = [i for s in shards for i in s if i is not None]
    assert sorted(real) == list(range(n))
    assert all([i for i in s if i is not None] == list(range(r, n, world)) for r, s in enumerate(shards))
    assert all(i is None for s in shards for i in s[len(range(0, n, world)) :])  # padding only at the end


# ---- two real gloo processes -------------------------------------------------------------------

def _setup():
    """Same on every process: 7 requests, prompt A on even positions and B on odd ones, so rank 0 (even
    positions) holds only A. Under greedy with A's first token as an extra eos, A stops at once and B runs
    on: ranks finish at different steps."""
    torch.set_num_threads(1)
    model, tok = _tiny()
    cfg = _cfg(samples_per_paraphrase=4)
    a = build_requests(load_questions(DEMO, select=["magic_lamp"]), tok, cfg)
    b = build_requests(load_questions(DEMO, select=["argument_with_friend"]), tok, cfg)
    reqs = [a[0], b[0], a[1], b[1], a[2], b[2], a[3]]
    first_a = model(**tok(a[0].prompt, add_special_tokens=False, return_tensors="pt")).logits[0, -1].argmax().item()
    return model, tok, reqs, cfg, first_a


SCORES = [(10.0, 90.0), (50.0, 60.0), (20.0, 40.0), (None, 90.0), (0.0, 70.0)]  # (aligned, coherent) per answer
SCORED_Q = Question(id="q", type=SCORED_TYPE, paraphrases=["?"], judge_prompts={"aligned": "A {answer}",
                                                                                "coherent": "C {answer}"})


class ScoreTableJudge:
    name = "table"

    def score_prompts(self, prompts):
        return [JudgeResult(score=SCORES[int(p.split()[1])][p.startswith("C")]) for p in prompts]


def _worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, tok, reqs, cfg, first_a = _setup()
        sampled = generate_sharded(model, tok, reqs, cfg, step=2)
        model.generation_config.eos_token_id = [tok.eos_token_id, first_a]
        calls = []
        model.register_forward_hook(lambda *_: calls.append(1))
        greedy = {}
        for synced in (False, True):
            calls.clear()
            greedy[synced] = (generate_sharded(model, tok, reqs, _cfg(temperature=0), step=2, synced=synced), len(calls))
        # each rank judges half of the answers; judge_records gathers every judgement on every rank
        records = [EvalRecord(step=2, scale=1.0, question_id="q", paraphrase_index=0, sample_index=i, question="?",
                              answer=str(i)) for i in range(len(SCORES))]
        judge_records(records, [SCORED_Q], ScoreTableJudge())
        em = summarize(records, [SCORED_Q])[1.0]
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps((sampled, greedy, em)))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_sharded_two_gloo_processes(tmp_path):
    # fork: the children skip re-importing torch/transformers (seconds each); they run one thread.
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    model, tok, reqs, cfg, first_a = _setup()
    single = generate(model, tok, reqs, cfg, step=2)
    model.generation_config.eos_token_id = [tok.eos_token_id, first_a]
    single_greedy = generate(model, tok, reqs, _cfg(temperature=0), step=2)
    assert [g.finished for g in single_greedy] == [True, False] * 3 + [True]  # the set-up works
    for rank in range(2):
        sampled, greedy, em = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        assert [g.__dict__ for g in sampled] == [g.__dict__ for g in single]  # full, ordered, equal
        for synced in (False, True):
            assert [g.__dict__ for g in greedy[synced][0]] == [g.__dict__ for g in single_greedy]
        # rank 0 holds only A rows (stop at once: 1 prefill); rank 1 holds B rows (prefill + 7 steps)
        assert greedy[False][1] == (1 if rank == 0 else 8)
        assert greedy[True][1] == 8  # synced: every rank keeps stepping until all are done
        assert em["n_total"] == 5 and em["n_aligned_none"] == 1 and em["em_rate"] == pytest.approx(2 / 4)
