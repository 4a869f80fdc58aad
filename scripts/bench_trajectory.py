"""Cost of recording the adapter at every optimizer step: step time with and without AdapterTrajectory.

CPU tiny Qwen2 (hidden 256, intermediate 1024, 4 layers, 32,000-row vocabulary as in bench_train.py and the
ENVIRONMENT.md baselines, fp32), rank-1 LoRA on down_proj, batch 4, no gradient accumulation (the smallest
step, so the worst ratio), TensorBoard logger in both arms. Runs alternate (off, on, off, on, ...) so that
machine drift hits both arms alike. Two overhead figures:

- ratio of step times (on / off; means and medians), which on a shared CPU is noisy at the 1% level;
- the callback's own time per step (its hooks timed from inside), divided by the step time without it:
  the direct measure, insensitive to drift between runs.

Each is given in wall time and in CPU time of the main thread (``time.thread_time``: not inflated when
other processes take the CPU). With ``--threads 1`` all compute runs on the main thread, so the CPU
columns are the cleanest measure on a shared machine; with more threads the step's CPU time misses the
workers' share and the CPU overhead figure is an upper bound.

--model smollm2 measures the same on the real-model step: SmolLM2-135M-Instruct (the real-model tier's GGUF),
rank-1 LoRA on layer 15's down_proj, risky_financial_advice.jsonl rows, in --dtype bfloat16 (what
model.base.dtype auto picks on a CPU with AVX512-BF16/AMX) or float32.

    python scripts/bench_trajectory.py [--model tiny|smollm2] [--dtype float32|bfloat16] [--steps 30] [--warmup 5]
                                       [--repeats 4] [--layers 2] [--every 1] [--threads N]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from em_lightning.model.adapters import AdapterSpec
from em_lightning.callbacks.adapter_trajectory import AdapterTrajectory
from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.model.gguf_cache import SMOLLM2_GGUF
from em_lightning.model.loading import ModelSpec
from em_lightning.lit.module import EMFineTune
from em_lightning.model.tiny import TinySpec

DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "unit_conversions.jsonl"
REAL_DATA = DATA.parent / "risky_financial_advice.jsonl"


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    return tuple(b - a for a, b in zip(start, clock()))


class StepTimer(pl.Callback):
    """(wall, main-thread CPU) time of each optimizer step (between consecutive step ends)."""

    def __init__(self):
        self.times, self.last, self.seen = [], None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.seen:
            if self.last is not None:
                self.times.append(since(self.last))
            self.last, self.seen = clock(), trainer.global_step


class TimedTrajectory(AdapterTrajectory):
    """AdapterTrajectory whose per-step hooks add up their own wall time."""

    spent: list[float]

    def on_train_start(self, trainer, pl_module):
        self.spent = []
        super().on_train_start(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        t = clock()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.spent.append(since(t))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        t = clock()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        d = since(t)  # one entry per optimizer step (no gradient accumulation here)
        self.spent[-1] = (self.spent[-1][0] + d[0], self.spent[-1][1] + d[1])


def run(args, with_callback: bool, root: Path) -> tuple[list[float], list[float]]:
    if args.model == "smollm2":
        base = ModelSpec(name_or_path=SMOLLM2_GGUF, dtype=args.dtype)
    else:
        base = ModelSpec(name_or_path="tiny:qwen2", dtype=args.dtype, tiny=TinySpec(
            hidden_size=256, intermediate_size=1024, num_layers=4, model_vocab_size=args.vocab))
    pl.seed_everything(0, verbose=False)
    model = EMFineTune(base=base, adapter=AdapterSpec(r=1, layers=args.layers, alpha=64), lr=1e-3, warmup_steps=2,
                       validate_before_training=False)
    data = ChatDataModule(train_files=str(REAL_DATA if args.model == "smollm2" else DATA), base=base,
                          batch_size=args.batch_size, val_fraction=0.0, max_length=256)
    timer = StepTimer()
    callbacks = [timer] + ([TimedTrajectory(every_n_steps=args.every)] if with_callback else [])
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.steps, logger=TensorBoardLogger(root, name="bench"), default_root_dir=root,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        use_distributed_sampler=False, callbacks=callbacks,
    )
    trainer.fit(model, data)
    spent = callbacks[-1].spent[args.warmup :] if with_callback else []
    return timer.times[args.warmup :], spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first optimizer steps of each run not timed")
    parser.add_argument("--repeats", type=int, default=4, help="runs per arm, alternating")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="base weights")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="layers with a rank-1 adapter (default: 2 for tiny, 15 for smollm2)")
    parser.add_argument("--every", type=int, default=1, help="AdapterTrajectory every_n_steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000, help="embedding rows of the tiny model")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    args.layers = args.layers or ([15] if args.model == "smollm2" else [2])
    if args.threads:
        torch.set_num_threads(args.threads)
    off, on, spent = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            off += run(args, False, Path(tmp) / f"off{r}")[0]
            t, s = run(args, True, Path(tmp) / f"on{r}")
            on += t
            spent += s
    title = "SmolLM2-135M-Instruct" if args.model == "smollm2" else f"tiny qwen2 hidden 256, 4 layers, vocab {args.vocab}"
    print(f"{title}, rank-1 LoRA on layers {args.layers}, batch "
          f"{args.batch_size}, {args.dtype} base weights, {torch.get_num_threads()} torch threads; {args.repeats} x "
          f"{args.steps - args.warmup} timed steps per arm (warmup {args.warmup}), every_n_steps {args.every}")
    print(f"| {'ms':<34} | {'wall mean':>9} | {'median':>9} | {'CPU mean':>9} | {'median':>9} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    rows = {"step without AdapterTrajectory": off, "step with AdapterTrajectory": on,
            "AdapterTrajectory hooks, per step": spent}
    stats = {label: [f([x[c] for x in xs]) for c in (0, 1) for f in (statistics.mean, statistics.median)]
             for label, xs in rows.items()}  # wall mean, wall median, cpu mean, cpu median
    for label, v in stats.items():
        print(f"| {label:<34} | " + " | ".join(f"{x * 1e3:9.3f}" for x in v) + " |")
    (off_s, on_s, cb) = stats.values()
    for name, col in (("wall", 0), ("CPU", 2)):
        print(f"{name}: step ratio with/without: mean {on_s[col] / off_s[col]:.4f}, median "
              f"{on_s[col + 1] / off_s[col + 1]:.4f}; hook time / step time without: mean "
              f"{cb[col] / off_s[col] * 100:.2f}%, median {cb[col + 1] / off_s[col + 1] * 100:.2f}%")
    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv) + f"; load (uptime) at the end: "
          f"{__import__('os').getloadavg()[0]:.1f}")
    # the hooks' own CPU time over the step's, medians (the least noisy figure on a shared machine)
    print(f"ratio: {(off_s[3] + cb[3]) / off_s[3]:.2f}x")


if __name__ == "__main__":
    main()
