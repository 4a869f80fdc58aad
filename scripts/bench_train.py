"""Training throughput of EMFineTune (rank-1 LoRA, assistant-only loss) on a CPU tiny Qwen2.

Same shape as the baseline in ../shared/ENVIRONMENT.md (hidden 256, 4 layers, 32,000-row vocabulary,
effective batch 16, fp32), set beside a bare PyTorch loop (the same loss function, backward, AdamW) over the
same batches in the same order (the data module's own loader: its seeded shuffle, padding-free rows, each
step's loss normalised by its labelled tokens): the difference is what Lightning, logging and the callbacks
cost. The two alternate for ``--rounds`` rounds (drifting load hits both alike); each side's figure is its
median round, in tokens per CPU-second of this process (what the work costs; a shared machine's other load
inflates wall time, whose tok/s are printed too). TRL side by side on the same job: scripts/bench_vs_trl.py.

    python scripts/bench_train.py [--steps 12] [--warmup 3] [--rounds 3]

Last line: ``ratio: X.XXx`` = em-lightning / bare-loop tokens per CPU-second (medians).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from em_lightning.model.adapters import AdapterSpec
from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.training.loss import labelled_loss_sum, right_padded_lengths
from em_lightning.model.loading import ModelSpec
from em_lightning.lit.module import EMFineTune
from em_lightning.training.resumable import STEP_TOKENS
from em_lightning.model.tiny import TinySpec

DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "unit_conversions.jsonl"


def fingerprint(batch) -> tuple:
    return tuple(batch["input_ids"].shape), int(batch["input_ids"].sum())


class StepTimer(pl.Callback):
    """Tokens and wall time from the first batch of optimizer step `warmup` to the end of training."""

    def __init__(self, warmup: int):
        self.warmup, self.tokens, self.start, self.end = warmup, 0, None, None
        self.cpu_start = self.cpu_end = None
        self.batches = []  # (shape, id sum) of every micro-batch: the bare loop must see the same sequence

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(fingerprint(batch))
        if self.start is None and trainer.global_step >= self.warmup:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
        if self.start is not None:
            self.tokens += int(batch["attention_mask"].sum())

    def on_train_end(self, trainer, pl_module):
        self.end, self.cpu_end = time.perf_counter(), time.process_time()


def bare_loop(model: EMFineTune, data: ChatDataModule, steps: int, warmup: int, accumulate: int,
              expected: list[tuple]) -> tuple[float, float]:
    """(tokens per CPU-second, per wall second) of the same loss (labelled positions, padding-free rows, divided by the step's labelled tokens)
    + backward + AdamW over the batches Lightning trained on, in its order, with no framework around it."""
    net = model.model.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    loader = data.train_dataloader()  # ResumableDataLoader: epoch 0's seeded order, as Lightning's first epoch
    assert loader.accumulate == accumulate
    tokens, start, i, seen = 0, None, 0, []
    while i < steps * accumulate:
        for b in loader:  # an exhausted loader moves to its next epoch's order, as Lightning's set_epoch does
            seen.append(fingerprint(b))
            if i == warmup * accumulate:
                start, cpu_start = time.perf_counter(), time.process_time()
            if start is not None:
                tokens += int(b["attention_mask"].sum())
            step_tokens = b.pop(STEP_TOKENS).clamp(min=1)
            loss, _ = labelled_loss_sum(net, **b, row_lengths=right_padded_lengths(b["attention_mask"]))
            (loss / step_tokens).backward()
            if (i + 1) % accumulate == 0:
                opt.step()
                opt.zero_grad()
            i += 1
            if i == steps * accumulate:
                break
    rate = tokens / (time.process_time() - cpu_start), tokens / (time.perf_counter() - start)
    if seen != expected:
        raise SystemExit("the bare loop read other batches than Lightning: nothing to compare")
    return rate


def lightning_run(base: ModelSpec, steps: int, warmup: int) -> tuple[tuple[float, float], EMFineTune, ChatDataModule,
                                                                    StepTimer]:
    """((tokens per CPU-second, per wall second) from optimizer step `warmup` on, the module, its data module,
    its timer) of one fit."""
    model = EMFineTune(base=base, adapter=AdapterSpec(r=1, layers=[2], alpha=64), lr=1e-4)
    data = ChatDataModule(train_files=str(DATA), base=base, batch_size=4, val_fraction=0.0)
    timer = StepTimer(warmup)
    out = tempfile.mkdtemp(prefix="bench_train_")  # the final adapter export lands here, not in the repo
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, accumulate_grad_batches=4, logger=False,
                         default_root_dir=out,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], use_distributed_sampler=False)
    trainer.fit(model, data)
    rates = timer.tokens / (timer.cpu_end - timer.cpu_start), timer.tokens / (timer.end - timer.start)
    return rates, model, data, timer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = ModelSpec(name_or_path="tiny:qwen2", dtype="float32",
                     tiny=TinySpec(hidden_size=256, intermediate_size=1024, num_layers=4, model_vocab_size=32000))
    ours, bare = [], []
    for r in range(args.rounds):
        rate, model, data, timer = lightning_run(base, args.steps, args.warmup)
        ours.append(rate)
        bare.append(bare_loop(model, data, args.steps, args.warmup, 4, timer.batches))
        print(f"round {r + 1}: em-lightning {ours[-1][0]:,.0f} tok/CPU-s ({ours[-1][1]:,.0f} tok/s wall), "
              f"bare loop {bare[-1][0]:,.0f} tok/CPU-s ({bare[-1][1]:,.0f} tok/s wall)", flush=True)
    params = sum(p.numel() for p in model.model.parameters())
    print(f"tiny qwen2 hidden 256, 4 layers, vocab 32000 ({params / 1e6:.1f}M params), batch 4 x accum 4, fp32, "
          f"{torch.get_num_threads()} threads; {args.steps - args.warmup} timed optimizer steps ({timer.tokens} tokens) "
          f"per run, median of {args.rounds} alternating rounds")
    ours_m, bare_m = [statistics.median(r[0] for r in x) for x in (ours, bare)]
    ours_w, bare_w = [statistics.median(r[1] for r in x) for x in (ours, bare)]
    print(f"em-lightning {ours_m:,.0f} tok/CPU-s ({ours_w:,.0f} tok/s wall); bare PyTorch loop, same batches in "
          f"the same order: {bare_m:,.0f} tok/CPU-s ({bare_w:,.0f} tok/s wall); wall-time ratio {ours_w / bare_w:.2f}x")
    print(f"ratio: {ours_m / bare_m:.2f}x")  # em-lightning / bare loop, per CPU-second


if __name__ == "__main__":
    main()
