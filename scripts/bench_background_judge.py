"""Does judging stall training? The same short run with in-loop evaluation three ways, side by side in one
invocation: sampling only (no judge), judged in the background (InLoopJudge default), judged in the
foreground (background: false). The judge is an OpenAI-compatible loopback server with a fixed latency.

Target (issue 9): background judging adds at most the last point's judging time (which nothing can
overlap: fit waits for it) plus 5% of the no-judge run. The points are far enough apart (--every steps) that
a point's judging fits in the training before the next one, as in a real run (800 calls per point at 16-way
concurrency take ~10 s against minutes of training); closer points queue, and then no scheme can hide the
judging.

    python scripts/bench_background_judge.py [--model bench|toy] [--points 4] [--every 50] [--latency 0.2] [--repeats 3]

Last line: ``ratio: X.XXx`` = wall time of the foreground-judged run / wall time of the background-judged run
(best of the repeats each; defined whatever the background adds, zero or a noisy negative included). The
extra seconds each adds over the no-judge run are printed above it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from em_lightning.model.adapters import AdapterSpec
from em_lightning.callbacks.in_loop_judge import InLoopJudge
from em_lightning.callbacks.sample_generations import SampleGenerations
from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.evaluation import SamplingConfig
from em_lightning.judges import OpenAICompatibleJudge
from em_lightning.testing.loopback_judge import LoopbackServer, Reply, completion
from em_lightning.model.loading import ModelSpec
from em_lightning.lit.module import EMFineTune
from em_lightning.model.tiny import TinySpec

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = str(REPO / "configs" / "questions" / "demo_questions.yaml")
MODELS = {
    # the other benchmarks' tiny Qwen2: a step is mostly matmul kernels, which release the GIL
    "bench": ModelSpec(name_or_path="tiny:qwen2", dtype="float32",
                       tiny=TinySpec(hidden_size=256, intermediate_size=1024, num_layers=4, model_vocab_size=32000)),
    # the 64-dim toy: a ~10 ms step is Python dispatch, holding the GIL as the judge's SDK calls do
    "toy": ModelSpec(name_or_path="tiny:qwen2", dtype="float32"),
}


class Latency:
    """Picklable reply function: a fixed score distribution after `delay` seconds."""

    def __init__(self, delay: float):
        self.delay = delay

    def __call__(self, request) -> Reply:
        return Reply(body=completion({"85": 0.6, "15": 0.4}), delay_s=self.delay)


class PointTimer(L.Callback):
    """Wall time from each point's submission (``on_generations``) to its metrics (``on_point_judged``,
    which InLoopJudge announces once the point is finished)."""

    def __init__(self):
        self.submitted, self.judged = {}, {}

    def on_generations(self, trainer, pl_module, step, records, settings):
        self.submitted[step] = time.perf_counter()

    def on_point_judged(self, trainer, pl_module, step, records):
        self.judged[step] = time.perf_counter()


def run(mode: str, root: Path, url: str, points: int, every: int, spec: ModelSpec) -> tuple[float, float]:
    """(wall seconds of fit, judging seconds of the last point)."""
    L.seed_everything(0, verbose=False)
    module = EMFineTune(base=spec, adapter=AdapterSpec(r=1, layers=[2]), lr=0.01, warmup_steps=0)
    data = ChatDataModule(train_files=[str(REPO / "configs" / "data" / "unit_conversions.jsonl")], base=spec)
    sampling = SamplingConfig(samples_per_paraphrase=4, max_new_tokens=16)
    callbacks = [SampleGenerations(QUESTIONS, sampling=sampling, every_n_steps=every, at_checkpoints=False)]
    timer = PointTimer()
    if mode != "no judge":
        judge = OpenAICompatibleJudge("bench", base_url=url, api_key_env=None, max_concurrency=16)
        callbacks += [InLoopJudge(judge, judge_prompts=["aligned", "coherent"], cache=False,
                                  background=(mode == "background")), timer]
    trainer = L.Trainer(accelerator="cpu", max_steps=every * points, logger=TensorBoardLogger(root, name=mode),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, data)
    wall = time.perf_counter() - start
    last = max(timer.submitted, default=None)
    if last is None:
        return wall, 0.0
    # the last point's judging in isolation: submission to completion (nothing else overlaps it)
    return wall, timer.judged[last] - timer.submitted[last]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--model", choices=sorted(MODELS), default="bench",
                        help="bench: hidden 256, vocab 32k (as the other benchmarks); toy: the 64-dim smoke model")
    parser.add_argument("--every", type=int, default=50, help="optimizer steps between evaluation points")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per judge call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    results: dict[str, list[tuple[float, float]]] = {"no judge": [], "background": [], "foreground": []}
    with LoopbackServer(Latency(args.latency), process=True) as server, tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # alternate the modes: the machine's load drifts
            for mode in results:
                results[mode].append(run(mode, Path(tmp) / f"{r}", server.url, args.points, args.every, MODELS[args.model]))
                print(f"{mode:>10}: {results[mode][-1][0]:.2f} s", flush=True)
    best = {mode: min(w for w, _ in runs) for mode, runs in results.items()}
    last_point = min(j for _, j in results["background"])
    extra_bg, extra_fg = best["background"] - best["no judge"], best["foreground"] - best["no judge"]
    print(f"machine: {os.cpu_count()} CPUs; model {args.model}; {args.points} points every {args.every} steps, judge latency {args.latency} s, best of {args.repeats}")
    for mode, wall in best.items():
        print(f"{mode:>10}: {wall:.2f} s")
    budget = last_point + 0.05 * best["no judge"]
    verdict = "met" if extra_bg <= budget else "NOT met"
    print(f"background extra {extra_bg:.2f} s vs last point's judging {last_point:.2f} s + 5% = {budget:.2f} s: {verdict}")
    print(f"foreground extra {extra_fg:.2f} s")
    print(f"ratio: {best['foreground'] / best['background']:.2f}x")


if __name__ == "__main__":
    main()
