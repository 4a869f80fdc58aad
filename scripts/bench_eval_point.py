"""CPU and wall time of one evaluation point: em-lightning's sampler against the reference approach.

One evaluation point = the 8 plain questions of first_plot_questions.yaml x 50 samples (400 answers),
temperature 1, top_p 1, on a CPU tiny Qwen2 of the shape used for the baselines in
../shared/ENVIRONMENT.md (hidden 256, 4 layers, 32,000-row vocabulary, fp32; there: reference-style
sampling ~790 tok/s at 64 new tokens, measured on this machine kind, not re-run here).

(a) em-lightning: ``generate(model, tokenizer, build_requests(...), SamplingConfig(...), step=0)``
    -- rows batched across questions, each prompt prefilled once, per-row counter-based uniforms
    (SplitMix64 of the row seed and step), inverse-CDF sampling over the top-k candidates only, a
    preallocated KV cache, stopped rows dropped from the batch.
(b) reference approach (the public evaluation code): per question, one
    ``model.generate(**inputs, do_sample=True, temperature=1, top_p=1, max_new_tokens=N,
    num_return_sequences=50)`` call.

Both sample with the same effective settings (printed): transformers merges the model's
generation_config and fills top_k 50 when nothing sets it; SamplingConfig leaves top_k /
repetition_penalty at None so it resolves them the same way. A random tiny model almost never emits
its stop token, so nearly every answer runs to max_new_tokens in both (the token counts show it).

Wall time and process CPU time are both reported: on a shared machine the process is descheduled for
long stretches (other jobs), which moves wall time far more than CPU time. With one torch thread (the
default) the final ``ratio:`` line is the CPU-time ratio -- on a quiet machine single-threaded CPU time is
the wall time; with more threads it is the wall-time ratio.

--model smollm2 runs the same point on SmolLM2-135M-Instruct (the real-model tier's GGUF from PyPI), in
--dtype float32 or bfloat16 (both paths use the same model, so the same dtype). A real model stops at its end
token, so the two paths generate different token counts: the ratio compares the time of the whole point. The
answers' sha256 is printed: for a fixed seed, model and dtype it must not change between commits (and every
timed round of (a) must give the same answers; asserted).

    python scripts/bench_eval_point.py [--model tiny|smollm2] [--dtype float32|bfloat16] [--max-new-tokens 64]
                                       [--samples 50] [--questions-limit 8] [--batch-size 200] [--repeats 1]
                                       [--threads 1] [--profile 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from em_lightning.published.question_files import load_questions
from em_lightning.evaluation.sampling import SamplingConfig, build_requests, eos_token_ids, generate
from em_lightning.model.gguf_cache import SMOLLM2_GGUF
from em_lightning.model.loading import ModelSpec, load_model, load_tokenizer
from em_lightning.model.tiny import TinySpec, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_QUESTIONS = ROOT.parent / "shared" / "reference" / "model-organisms" / "upstream_eval_questions" / "first_plot_questions.yaml"


def count_generated(rows: torch.Tensor, eos: set[int]) -> int:
    """Generated positions per row up to and including the first stop token (padding after it not counted)."""
    total = 0
    for row in rows.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        total += len(row) if stop is None else stop + 1
    return total


ANSWERS: list[str] = []  # sha256 of (a)'s answers, one per timed round


def run_em_lightning(model, tok, questions, config) -> tuple[float, float, int, int]:
    t0, c0 = time.perf_counter(), time.process_time()
    requests = build_requests(questions, tok, config)
    gens = generate(model, tok, requests, config, step=0)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(g.n_tokens + int(g.finished) for g in gens)  # + the stop token, as counted for (b)
    ANSWERS.append(hashlib.sha256(json.dumps([g.answer for g in gens]).encode()).hexdigest())
    return elapsed, cpu, tokens, len(gens)


def run_reference(model, tok, questions, samples, max_new_tokens, seed) -> tuple[float, float, int, int]:
    eos = set(eos_token_ids(model, tok))
    torch.manual_seed(seed)
    tokens = answers = 0
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for q in questions:
            for text in q.paraphrases:
                prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
                inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
                out = model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0,
                                     max_new_tokens=max_new_tokens, num_return_sequences=samples)
                new = out[:, inputs["input_ids"].shape[1]:]
                tokens += count_generated(new, eos)
                answers += new.shape[0]
    return time.perf_counter() - t0, time.process_time() - c0, tokens, answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", default=str(DEFAULT_QUESTIONS), help="question YAML (plain questions are used)")
    p.add_argument("--questions-limit", type=int, default=None, help="use only the first N plain questions")
    p.add_argument("--samples", type=int, default=50, help="samples per question")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=200,
                   help="em-lightning rows per forward pass (configs/callbacks/in_loop_judge.yaml uses 200)")
    p.add_argument("--repeats", type=int, default=1, help="timed rounds (a then b, alternating order); median reported")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 0 = torch's choice (one per core). Default 1: on a shared, loaded "
                        "2-core machine two OpenMP threads ran ~10x slower than one (threads spin-wait at barriers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the model's weights (both paths)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed rounds, one more round of each under torch.profiler: print its top N ops")
    args = p.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    if args.threads:
        torch.set_num_threads(args.threads)

    questions = load_questions(args.questions, plain_only=True)[: args.questions_limit]
    if args.model == "tiny":
        tok = tiny_tokenizer("qwen2")
        spec = TinySpec(hidden_size=256, intermediate_size=1024, num_layers=4, model_vocab_size=32000)
        model = tiny_model("qwen2", spec, tok).to(getattr(torch, args.dtype)).eval()
        title = "tiny qwen2 hidden 256, 4 layers"
    else:
        base = ModelSpec(name_or_path=SMOLLM2_GGUF, dtype=args.dtype)
        tok = load_tokenizer(base)
        model = load_model(base, tok).eval()
        title = "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)"
    config = SamplingConfig(samples_per_paraphrase=args.samples, temperature=1.0, top_p=1.0,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {title}, vocab {model.config.vocab_size} ({n_params / 1e6:.1f}M params), "
          f"{model.dtype}, CPU, {torch.get_num_threads()} torch threads; load (uptime) {os.getloadavg()[0]:.1f}")
    print(f"eval point: {len(questions)} plain questions ({', '.join(q.id for q in questions)}) x {args.samples} "
          f"samples, max_new_tokens {args.max_new_tokens}")

    # Effective sampling settings of both paths.
    eff = config.resolve(model, tok)
    print("(a) em-lightning effective settings:", {k: eff[k] for k in
          ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "eos_token_ids", "from_generation_config")},
          f"batch_size {args.batch_size}")
    try:  # private API: what model.generate will actually use after merging generation_config
        gc, _ = model._prepare_generation_config(None, do_sample=True, temperature=1.0, top_p=1.0,
                                                 max_new_tokens=args.max_new_tokens, num_return_sequences=args.samples)
        print("(b) reference effective settings:", {"temperature": gc.temperature, "top_p": gc.top_p,
              "top_k": gc.top_k, "min_p": gc.min_p, "repetition_penalty": gc.repetition_penalty,
              "eos_token_id": gc.eos_token_id}, f"one generate call per question, num_return_sequences {args.samples}")
    except Exception as e:  # noqa: BLE001 - informational only
        print(f"(b) reference effective settings: unavailable ({type(e).__name__}: {e})")
    print("differences: (a) draws one uniform per row and step, SplitMix64(row seed, step), inverse CDF over the "
          "top-k candidates; (b) torch.multinomial over the masked vocabulary on the global torch RNG -- same "
          "distribution, different random streams. (a) drops rows from its batch as they hit eos, (b) keeps all "
          "50 sequences of a question until every one has.")

    # Warm-up (first-call overheads: allocator, kernels, generate's set-up), not timed.
    run_em_lightning(model, tok, questions[:1], SamplingConfig(samples_per_paraphrase=4, max_new_tokens=4))
    run_reference(model, tok, questions[:1], 4, 4, args.seed)

    a_times, b_times, a_cpu, b_cpu = [], [], [], []
    a_tokens = b_tokens = a_n = b_n = 0
    for r in range(args.repeats):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for which in order:
            if which == "a":
                t, c, a_tokens, a_n = run_em_lightning(model, tok, questions, config)
                a_times.append(t)
                a_cpu.append(c)
            else:
                t, c, b_tokens, b_n = run_reference(model, tok, questions, args.samples, args.max_new_tokens, args.seed)
                b_times.append(t)
                b_cpu.append(c)
            print(f"  round {r + 1} ({which}): {t:.2f} s wall, {c:.2f} s CPU", flush=True)
    ta, tb = statistics.median(a_times), statistics.median(b_times)
    ca, cb = statistics.median(a_cpu), statistics.median(b_cpu)
    print(f"(a) em-lightning generate:  {a_n} answers, {a_tokens} generated tokens, {ta:.2f} s wall ({ca:.2f} s CPU), "
          f"{a_tokens / ta:,.0f} tok/s")
    print(f"(b) reference (per question): {b_n} answers, {b_tokens} generated tokens, {tb:.2f} s wall ({cb:.2f} s CPU), "
          f"{b_tokens / tb:,.0f} tok/s")
    answers = ANSWERS[1:]  # the first was the warm-up
    assert len(set(answers)) == 1, "em-lightning's answers changed between rounds"
    print(f"(a) answers sha256 ({args.model}, {args.dtype}, seed {args.seed}): {answers[0]}; "
          f"load (uptime) at the end {os.getloadavg()[0]:.1f}")
    print(f"wall time (b)/(a) = {tb / ta:.2f}x; CPU time (b)/(a) = {cb / ca:.2f}x; "
          f"throughput (a)/(b) = {(a_tokens / ta) / (b_tokens / tb):.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("(a) em-lightning", lambda: run_em_lightning(model, tok, questions, config)),
                         ("(b) reference", lambda: run_reference(model, tok, questions, args.samples,
                                                                 args.max_new_tokens, args.seed))):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"profile {name} (self CPU time, top {args.profile} ops):")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile,
                                            max_name_column_width=44))
    single = torch.get_num_threads() == 1
    print(f"ratio: {(cb / ca) if single else (tb / ta):.2f}x")  # CPU time with one thread, else wall time


if __name__ == "__main__":
    main()
