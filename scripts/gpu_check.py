"""One-command GPU check (`make gpu-check`): what em-lightning does on a real GPU, in under 8 minutes.

Run once on a machine with one GPU, from the repository root (no network, no model hub needed):

    python scripts/gpu_check.py --out gpu_check_out         # -> gpu_check_out/gpu_check.json + gpu_check.md
    python scripts/gpu_check.py --smoke --out /tmp/smoke    # the same code at tiny shapes on CPU (< 2 min; tests)

Every model is built from a config in configs/gpu_check/ (written from the published config.json sizes of
Qwen2.5-0.5B, Qwen2.5-7B, Llama-3.1-8B and Qwen2.5-14B) with RANDOM weights in bf16: speed and memory
depend on the shapes, not the values. It reports, as JSON and a markdown table:

1. training, for the 0.5B, 7B and 8B shapes x {rank-1 LoRA on the middle layer's down_proj, rank-32 LoRA on
   all linear layers}: tokens/s, MFU, peak memory, for em-lightning's step (loss.py: padding-free rows, head and
   cross-entropy at labelled positions only) and for a plain transformers + PEFT loop as the reference (what
   TRL's SFTTrainer runs at its core: ``model(**batch, labels=...)``, backward, AdamW; TRL itself cannot
   import on a stock GPU image: it needs ``datasets``/pyarrow, too large to carry). The 14B shape: peak
   memory of the rank-1 step only.
   MFU = FLOPs / time / peak, FLOPs = tokens x (2 N_forward + 2 N_backward + 6 N_trainable)
   + labelled tokens x 4 N_head, where N_forward = the decoder's linear weights (the base is frozen),
   N_backward = the frozen linear weights of the layers the gradient flows through (from the first adapted
   layer up: input gradients only, no weight gradients), N_trainable = adapter weights (forward, input and
   weight gradients), N_head = the output head (logits and their input gradient at labelled positions).
   Attention scores are not counted. Peak: the GPU's nominal dense bf16 figure where known (H100/H200: 989
   TFLOP/s) and torch.matmul's measured bf16 rate on 8192^3 (both reported).
2. one evaluation point on the 0.5B shape: 400 answers (8 prompts x 50) x 600 new tokens, em-lightning's
   sampler (evaluation/sampling.generate) against ``model.generate(num_return_sequences=50)`` per prompt.
3. attention layouts on the 0.5B shape, forward + backward of the same rows: padded batch (sdpa, mask),
   padding-free rows (em-lightning's default), packed rows with position ids (sdpa: transformers builds the
   block-diagonal mask from them; flash_attention_2 when flash-attn is installed: varlen kernel). The packed
   loss is checked against the padding-free one. The fastest is named as the GPU's default.
4. a 30-step ``em-fit fit`` on the 0.5B shape with the live callbacks on (AdapterTrajectory + phase detector,
   SampleGenerations, InLoopJudge with the offline demo judge, StepCheckpoint), under Lightning's
   SimpleProfiler: each callback's share of the fit's wall time (time inside its hooks; judging runs in a
   worker thread and is not counted).

Stock GPU image: torch, lightning, transformers, peft, torchmetrics, tensorboard, accelerate are there; em-fit
fit also needs jsonargparse (LightningCLI). em_lightning imports without datasets, bitsandbytes, openai and
jsonargparse where they are not used (tests/e2e/test_gpu_check.py checks it). The wheels to carry (~0.4 MiB):

    pip download --no-deps -d wheels jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
    # on the GPU machine:
    pip install --no-deps --no-index wheels/*.whl && pip install --no-deps --no-build-isolation -e .

Budget on an H100 (estimate, not measured: no GPU was available when this was written): ~1 min of model
building, ~3 min of training steps, ~1.5 min of sampling, ~1 min for em-fit fit.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from em_lightning.model.adapters import AdapterSpec, apply_adapter
from em_lightning.evaluation.sampling import SamplingConfig, build_requests, generate
from em_lightning.training.loss import IGNORE_INDEX, linear_cross_entropy_sum, labelled_loss_sum
from em_lightning.published.question_files import load_questions
from em_lightning.model.tiny import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "gpu_check"
TRAIN_SHAPES = ["qwen2.5-0.5b", "qwen2.5-7b", "llama-3.1-8b"]
MEMORY_ONLY = ["qwen2.5-14b"]
NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}  # dense, vendor sheets
SMOKE_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)


class Plan:
    """Sizes of each part: the real check or its tiny CPU smoke version (same code)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.rows, self.seq = (4, 64) if smoke else (8, 1024)  # rows per optimizer step, longest row
        self.steps, self.warmup = (2, 1) if smoke else (4, 2)
        self.samples, self.new_tokens, self.sample_batch = (4, 8, 32) if smoke else (50, 600, 400)
        self.fit_steps = 4 if smoke else 30


def model_config(name: str, smoke: bool):
    d = json.loads((CONFIGS / f"{name}.json").read_text())
    d.pop("_source", None)
    if smoke:
        d.update(SMOKE_SIZES, bos_token_id=0, eos_token_id=1)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def build(config, device, attn="sdpa"):
    """Random bf16 weights on ``device``, frozen, in train mode."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def adapters(config) -> dict[str, AdapterSpec]:
    return {"rank1-downproj": AdapterSpec(r=1, alpha=16, target_modules=["down_proj"],
                                          layers=[config.num_hidden_layers // 2]),
            "rank32-all-linear": AdapterSpec(r=32, alpha=64, target_modules="all-linear")}


def random_rows(plan: Plan, vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows of lengths between half and all of plan.seq; the first 30% of each is prompt (unlabelled)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(plan.rows):
        n = int(torch.randint(plan.seq // 2, plan.seq + 1, (), generator=g))
        ids = torch.randint(2, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: int(0.3 * n)] = IGNORE_INDEX
        rows.append((ids, labels))
    return rows


def padded(rows, pad_id: int = 0):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(x)], mask[i, : len(x)] = x, y, 1
    return ids, mask, labels


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (CPU smoke)


def flop_counts(model) -> dict[str, int]:
    """N_forward, N_backward, N_trainable, N_head (see the docstring) from the adapted model's modules."""
    layer_of = lambda name: int(re.search(r"\.layers\.(\d+)\.", name).group(1))  # noqa: E731
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    first = min(layer_of(n) for n in trainable)
    forward = backward = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name and "lora_" not in name:
            forward += m.weight.numel()
            backward += m.weight.numel() if layer_of(name) >= first else 0
    head = model.get_output_embeddings().weight.numel()
    return {"forward": forward, "backward": backward, "trainable": sum(p.numel() for p in trainable.values()),
            "head": head}


def step_flops(counts: dict[str, int], tokens: int, labelled: int) -> float:
    return (tokens * (2 * counts["forward"] + 2 * counts["backward"] + 6 * counts["trainable"])
            + labelled * 4 * counts["head"])


def matmul_peak_tflops(device, smoke: bool) -> float:
    n = 512 if smoke else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    sync(device)
    reps = 3 if smoke else 20
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


# -- 1. training ---------------------------------------------------------------------------------------
def em_step(model, opt, rows, device):
    count = sum(int((y[1:] != IGNORE_INDEX).sum()) for _, y in rows)
    for ids, labels in rows:
        s, _ = labelled_loss_sum(model, ids[None].to(device), None, labels[None].to(device), row_lengths=[len(ids)])
        (s / count).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def reference_step(model, opt, rows, device, micro: int = 2):
    """transformers' own loss on right-padded micro-batches (full logits), as TRL's plain path."""
    count = sum(int((y[1:] != IGNORE_INDEX).sum()) for _, y in rows)
    for k in range(0, len(rows), micro):
        ids, mask, labels = (t.to(device) for t in padded(rows[k : k + micro]))
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        (out.loss * n / count).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(step, plan: Plan, device) -> float:
    for _ in range(plan.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(plan.steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / plan.steps


def train_case(name, adapter_name, spec, plan, device, peaks, memory_only=False) -> dict:
    config = model_config(name, plan.smoke)
    reset_peak(device)
    model = apply_adapter(build(config, device), spec)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rows = random_rows(plan, config.vocab_size)
    tokens = sum(len(x) for x, _ in rows)
    labelled = sum(int((y[1:] != IGNORE_INDEX).sum()) for _, y in rows)
    counts = flop_counts(model)
    out = {"shape": name, "adapter": adapter_name, "tokens_per_step": tokens, "flop_counts": counts}
    seconds = time_steps(lambda: em_step(model, opt, rows, device), plan, device)
    out["em_peak_mem_gib"] = round(peak_gib(device), 2)
    if memory_only:
        del model, opt
        return out
    flops = step_flops(counts, tokens, labelled)
    out.update(em_tok_s=tokens / seconds, em_tflops=flops / seconds / 1e12)
    reset_peak(device)
    seconds = time_steps(lambda: reference_step(model, opt, rows, device), plan, device)
    out.update(ref_tok_s=tokens / seconds, ref_tflops=flops / seconds / 1e12, ref_peak_mem_gib=round(peak_gib(device), 2))
    for who in ("em", "ref"):
        for peak_name, peak in peaks.items():
            out[f"{who}_mfu_{peak_name}"] = out[f"{who}_tflops"] / peak
    out["speedup"] = out["em_tok_s"] / out["ref_tok_s"]
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# -- 2. evaluation point -------------------------------------------------------------------------------
def eval_point(plan, device) -> dict:
    config = model_config("qwen2.5-0.5b", plan.smoke)
    model = build(config, device).eval()
    tok = tiny_tokenizer("qwen2")  # random weights: any tokenizer with a chat template does (prompts, stops)
    questions = load_questions(REPO / "configs/questions/demo_questions.yaml") + load_questions(
        REPO / "configs/questions/finance_probe.yaml")  # 8 prompts
    sampling = SamplingConfig(samples_per_paraphrase=plan.samples, max_new_tokens=plan.new_tokens, seed=0,
                              batch_size=plan.sample_batch)
    requests = build_requests(questions, tok, sampling)
    sync(device)
    start = time.perf_counter()
    gens = generate(model, tok, requests, sampling, step=0)
    sync(device)
    em_s = time.perf_counter() - start
    em_tokens = sum(g.n_tokens + int(g.finished) for g in gens)
    prompts = list(dict.fromkeys(r.prompt for r in requests))
    torch.manual_seed(0)
    start, ref_tokens = time.perf_counter(), 0
    with torch.no_grad():
        for prompt in prompts:
            inputs = tok(prompt, return_tensors="pt", add_special_tokens=False).to(device)
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=50,
                                 max_new_tokens=plan.new_tokens, num_return_sequences=plan.samples,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            ref_tokens += out[:, inputs["input_ids"].shape[1]:].numel()
    sync(device)
    ref_s = time.perf_counter() - start
    del model
    return {"answers": len(gens), "prompts": len(prompts), "max_new_tokens": plan.new_tokens,
            "em_seconds": em_s, "em_tokens": em_tokens, "ref_seconds": ref_s, "ref_tokens": ref_tokens,
            "speedup": ref_s / em_s}


# -- 3. attention layouts ------------------------------------------------------------------------------
def packed_loss_sum(model, rows, device):
    """One packed row, position ids restarting at each row (transformers derives the per-row attention from
    them); the loss at labelled positions only (a row's first token is prompt, so no label crosses rows)."""
    ids = torch.cat([x for x, _ in rows])[None].to(device)
    labels = torch.cat([y for _, y in rows])[None].to(device)
    pos = torch.cat([torch.arange(len(x)) for x, _ in rows])[None].to(device)
    decoder, head = model.get_base_model().model, model.get_output_embeddings()
    hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return linear_cross_entropy_sum(hidden[:, :-1][keep], head.weight, targets[keep])


def packing_is_isolated(model, rows, device) -> bool:
    """Packed rows see only themselves: the last row's hidden states packed equal those of the row alone (a
    random model's loss is near log(vocab) whatever it attends to, so the loss alone would not show a leak)."""
    decoder = model.get_base_model().model
    ids = torch.cat([x for x, _ in rows])[None].to(device)
    pos = torch.cat([torch.arange(len(x)) for x, _ in rows])[None].to(device)
    with torch.no_grad():
        packed = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0, -len(rows[-1][0]):]
        alone = decoder(input_ids=rows[-1][0][None].to(device), use_cache=False).last_hidden_state[0]
    return bool((packed.float() - alone.float()).norm() <= 0.02 * alone.float().norm())


def attention_layouts(plan, device) -> dict:
    config = model_config("qwen2.5-0.5b", plan.smoke)
    rows = random_rows(plan, config.vocab_size, seed=1)
    tokens = sum(len(x) for x, _ in rows)
    spec = adapters(config)["rank1-downproj"]
    try:
        import flash_attn  # noqa: F401

        has_flash = device.type == "cuda"
    except ImportError:
        has_flash = False

    def padded_loss(model):
        ids, mask, labels = (t.to(device) for t in padded(rows))
        return labelled_loss_sum(model, ids, mask, labels)[0]

    def free_loss(model):
        return sum(labelled_loss_sum(model, x[None].to(device), None, y[None].to(device), row_lengths=[len(x)])[0]
                   for x, y in rows)

    layouts = {"padded (sdpa, mask)": ("sdpa", padded_loss), "padding-free rows (sdpa)": ("sdpa", free_loss),
               "packed + position ids (sdpa)": ("sdpa", lambda m: packed_loss_sum(m, rows, device))}
    if has_flash:
        layouts["packed + position ids (flash_attention_2)"] = ("flash_attention_2",
                                                                lambda m: packed_loss_sum(m, rows, device))
    out, losses = {}, {}
    for label, (attn, loss_fn) in layouts.items():
        model = apply_adapter(build(config, device, attn), spec)
        torch.manual_seed(0)
        for p in model.parameters():  # B != 0 so that the adapter's gradient path runs in full
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.01)

        def step():
            loss = loss_fn(model)
            loss.backward()
            losses[label] = float(loss.detach())

        seconds = time_steps(step, plan, device)
        out[label] = {"tok_s": tokens / seconds, "loss_sum": losses[label]}
        if label.startswith("packed"):
            out[label]["rows_isolated"] = packing_is_isolated(model, rows, device)
        del model
    ref = out["padding-free rows (sdpa)"]["loss_sum"]
    for label, r in out.items():  # every layout computes the same loss (bf16 tolerance)
        r["loss_matches_padding_free"] = abs(r["loss_sum"] - ref) <= 0.02 * abs(ref)
    correct = [k for k, r in out.items() if r["loss_matches_padding_free"] and r.get("rows_isolated", True)]
    best = max(correct, key=lambda k: out[k]["tok_s"])
    return {"tokens": tokens, "layouts": out, "fastest": best}


# -- 4. em-fit fit with the live callbacks --------------------------------------------------------------
FIT_CONFIG = """
seed_everything: 0
trainer:
  accelerator: auto
  devices: 1
  max_steps: {steps}
  val_check_interval: {val_every}
  enable_progress_bar: false
  logger: {{class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {{save_dir: {root}/runs, name: fit}}}}
  profiler:
    class_path: lightning.pytorch.profilers.SimpleProfiler
    init_args: {{dirpath: {root}, filename: profile}}
checkpoint:
  every_n_train_steps: {ckpt_every}
model:
  base: {{name_or_path: {root}/model, tokenizer: {root}/tokenizer, dtype: bfloat16}}
  adapter: {{kind: lora, r: 1, alpha: 16, use_rslora: true, target_modules: [down_proj], layers: [{layer}]}}
  lr: 1.0e-4
  warmup_steps: 2
data:
  train_files: [{data}]
  val_fraction: 0.05
  batch_size: 4
  max_length: 256
"""


def fit_with_callbacks(plan, root: Path) -> dict:
    config = model_config("qwen2.5-0.5b", plan.smoke)
    build(config, "cpu").save_pretrained(root / "model")
    tiny_tokenizer("qwen2").save_pretrained(root / "tokenizer")
    (root / "fit.yaml").write_text(FIT_CONFIG.format(
        steps=plan.fit_steps, val_every=plan.fit_steps // 2, ckpt_every=max(1, plan.fit_steps // 3), root=root,
        layer=config.num_hidden_layers // 2, data=REPO / "configs/data/risky_financial_advice.jsonl"))
    eval_every = {"trainer": {"callbacks+": []}}
    demo = __import__("yaml").safe_load((REPO / "configs/callbacks/demo_eval.yaml").read_text())
    for cb in demo["trainer"]["callbacks+"]:
        if cb["class_path"].endswith("SampleGenerations"):
            cb["init_args"]["every_n_steps"] = plan.fit_steps // 2
        eval_every["trainer"]["callbacks+"].append(cb)
    (root / "eval.yaml").write_text(json.dumps(eval_every))  # JSON is YAML
    cmd = [sys.executable, "-m", "em_lightning.cli", "fit", "--config", str(root / "fit.yaml"),
           "--config", str(REPO / "configs/callbacks/phase_transition.yaml"), "--config", str(root / "eval.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        return {"error": f"em-fit fit failed (exit {proc.returncode}): " + proc.stderr[-2000:]}
    report = next(root.glob("fit-profile*.txt")).read_text()
    per_callback: dict[str, float] = {}
    nested = 0.0  # other callbacks' checkpoint hooks, which run inside StepCheckpoint's save
    for m in re.finditer(r"\[Callback\]([A-Za-z_]+)\.(\w+)[^|]*\|\s*[\d.e+-]+\s*\|\s*\d+\s*\|\s*([\d.e+-]+)", report):
        name, hook, seconds = m.group(1), m.group(2), float(m.group(3))
        per_callback[name] = per_callback.get(name, 0.0) + seconds
        if name != "StepCheckpoint" and hook in ("on_save_checkpoint", "state_dict"):
            nested += seconds
    if "StepCheckpoint" in per_callback:  # each second counted once: for the callback whose hook spent it
        per_callback["StepCheckpoint"] = max(per_callback["StepCheckpoint"] - nested, 0.0)
    total = re.search(r"\|\s*Total\s*\|\s*-\s*\|\s*\d+\s*\|\s*([\d.e+-]+)", report)
    profiled = float(total.group(1)) if total else wall  # the fit from the profiler's start (no process start-up)
    return {"steps": plan.fit_steps, "wall_seconds": wall, "profiled_fit_seconds": profiled,
            "callback_seconds": per_callback,
            "callback_share_of_fit": {k: v / profiled for k, v in per_callback.items()}}


# -- report --------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = [f"# gpu_check ({'SMOKE: tiny shapes on CPU, numbers mean nothing' if result['smoke'] else 'real shapes'})",
             "", f"device: {result['device']}; torch {result['torch']}; peaks (TFLOP/s): {result['peaks']}", "",
             "| shape | adapter | em tok/s | ref tok/s | em/ref | em MFU | em peak GiB | ref peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["training"]:
        if "em_tok_s" not in r:
            lines.append(f"| {r['shape']} | {r['adapter']} | memory only | | | | {r['em_peak_mem_gib']} | |")
            continue
        mfu = min((v for k, v in r.items() if k.startswith("em_mfu_")), default=float("nan"))
        lines.append(f"| {r['shape']} | {r['adapter']} | {r['em_tok_s']:,.0f} | {r['ref_tok_s']:,.0f} | "
                     f"{r['speedup']:.2f}x | {mfu:.1%} | {r['em_peak_mem_gib']} | {r['ref_peak_mem_gib']} |")
    e = result["eval_point"] or {}
    lines += [] if not e else ["", f"eval point (0.5B shape): {e['answers']} answers x {e['max_new_tokens']} tokens: em-lightning "
              f"{e['em_seconds']:.1f} s, generate(num_return_sequences) {e['ref_seconds']:.1f} s: {e['speedup']:.2f}x"]
    if result["attention"]:
        lines += ["", "| attention layout (0.5B shape, fwd+bwd) | tok/s | loss = padding-free | rows isolated |", "|---|---|---|---|"]
        for k, v in result["attention"]["layouts"].items():
            lines.append(f"| {k} | {v['tok_s']:,.0f} | {v['loss_matches_padding_free']} | {v.get('rows_isolated', '-')} |")
        lines += ["", f"fastest layout (the GPU's default): {result['attention']['fastest']}", ""]
    f = result["fit"]
    if f is None:
        pass
    elif "error" in f:
        lines.append(f"em-fit fit: {f['error'].splitlines()[0]}")
    else:
        lines.append(f"em-fit fit, {f['steps']} steps with live callbacks: {f['wall_seconds']:.1f} s wall "
                     f"({f['profiled_fit_seconds']:.1f} s profiled); share of the fit's time in each callback's hooks: "
                     + ", ".join(f"{k} {v:.1%}" for k, v in sorted(f["callback_share_of_fit"].items())))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (tests): the same code, < 2 min")
    p.add_argument("--skip", nargs="*", default=[], choices=["training", "memory", "eval", "attention", "fit"])
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("gpu_check: no CUDA device; run with --smoke for the CPU version", file=sys.stderr)
        return 2
    plan = Plan(args.smoke)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {platform.machine()} ({os.cpu_count()} cores)"
    peaks = {"measured_matmul": matmul_peak_tflops(device, args.smoke)}
    nominal = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)
    if nominal:
        peaks["nominal"] = nominal
    result = {"smoke": args.smoke, "device": name, "torch": torch.__version__, "peaks": peaks, "training": [],
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    t0 = time.perf_counter()
    if "training" not in args.skip:
        for shape in TRAIN_SHAPES[:1] if args.smoke else TRAIN_SHAPES:
            for adapter_name, spec in adapters(model_config(shape, args.smoke)).items():
                result["training"].append(train_case(shape, adapter_name, spec, plan, device, peaks))
                print(json.dumps(result["training"][-1]), flush=True)
    if "memory" not in args.skip:
        for shape in MEMORY_ONLY:
            spec = adapters(model_config(shape, args.smoke))["rank1-downproj"]
            result["training"].append(train_case(shape, "rank1-downproj", spec, plan, device, peaks, memory_only=True))
    result["eval_point"] = eval_point(plan, device) if "eval" not in args.skip else None
    result["attention"] = attention_layouts(plan, device) if "attention" not in args.skip else None
    with tempfile.TemporaryDirectory(prefix="gpu_check_fit_") as tmp:
        result["fit"] = fit_with_callbacks(plan, Path(tmp)) if "fit" not in args.skip else None
    result["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(copy.deepcopy(result)))
    print((args.out / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
