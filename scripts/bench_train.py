"""Training throughput of EMFineTune (rank-1 LoRA, assistant-only loss) on a CPU tiny Qwen2.

Same shape as the baseline in ../shared/ENVIRONMENT.md (hidden 256, 4 layers, 32,000-row vocabulary,
effective batch 16, fp32), set beside a bare PyTorch loop (the same loss function, backward, AdamW) over the
same batches: the difference is what Lightning, logging and the callbacks cost. TRL side by side on the same
job: scripts/bench_vs_trl.py.

    python scripts/bench_train.py [--steps 12] [--warmup 3]
"""

import argparse
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from em_lightning.adapters import AdapterSpec
from em_lightning.data import ChatDataModule, collate
from em_lightning.loss import labelled_loss_sum, right_padded_lengths
from em_lightning.models import ModelSpec
from em_lightning.module import EMFineTune
from em_lightning.tiny import TinySpec

DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "unit_conversions.jsonl"


class StepTimer(pl.Callback):
    """Tokens and wall time from the first batch of optimizer step `warmup` to the end of training."""

    def __init__(self, warmup: int):
        self.warmup, self.tokens, self.start, self.end = warmup, 0, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None and trainer.global_step >= self.warmup:
            self.start = time.perf_counter()
        if self.start is not None:
            self.tokens += int(batch["attention_mask"].sum())

    def on_train_end(self, trainer, pl_module):
        self.end = time.perf_counter()


def bare_loop(model: EMFineTune, data: ChatDataModule, steps: int, warmup: int, accumulate: int) -> float:
    """Tokens/s of the same loss (labelled positions, padding-free rows) + backward + AdamW over the same batch
    shapes, with no framework around it."""
    net = model.model.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    rows, batch = data.train_set, data.batch_size
    tokens, start = 0, None
    for i in range(steps * accumulate):
        if i == warmup * accumulate:
            start = time.perf_counter()
        b = collate([rows[(i * batch + j) % len(rows)] for j in range(batch)], data.pad_id)
        if start is not None:
            tokens += int(b["attention_mask"].sum())
        loss, count = labelled_loss_sum(net, **b, row_lengths=right_padded_lengths(b["attention_mask"]))
        (loss / count).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    base = ModelSpec(name_or_path="tiny:qwen2", dtype="float32",
                     tiny=TinySpec(hidden_size=256, intermediate_size=1024, num_layers=4, model_vocab_size=32000))
    model = EMFineTune(base=base, adapter=AdapterSpec(r=1, layers=[2], alpha=64), lr=1e-4)
    data = ChatDataModule(train_files=str(DATA), base=base, batch_size=4, val_fraction=0.0)
    timer = StepTimer(args.warmup)
    out = tempfile.mkdtemp(prefix="bench_train_")  # the final adapter export lands here, not in the repo
    trainer = pl.Trainer(accelerator="cpu", max_steps=args.steps, accumulate_grad_batches=4, logger=False,
                         default_root_dir=out,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer], use_distributed_sampler=False)
    trainer.fit(model, data)
    elapsed = timer.end - timer.start
    params = sum(p.numel() for p in model.model.parameters())
    print(f"tiny qwen2 hidden 256, 4 layers, vocab 32000 ({params / 1e6:.1f}M params), batch 4 x accum 4, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"{args.steps - args.warmup} optimizer steps: {timer.tokens} tokens in {elapsed:.2f} s = "
          f"{timer.tokens / elapsed:,.0f} tok/s, {elapsed / (args.steps - args.warmup):.3f} s/step")
    bare = bare_loop(model, data, args.steps, args.warmup, accumulate=4)
    print(f"bare PyTorch loop, same batches: {bare:,.0f} tok/s; em-lightning reaches "
          f"{timer.tokens / elapsed / bare:.0%} of it")
    print(f"ratio: {timer.tokens / elapsed / bare:.2f}x")  # em-lightning / bare loop


if __name__ == "__main__":
    main()
