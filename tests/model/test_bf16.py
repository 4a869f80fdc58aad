"""bf16 where the hardware has it: which dtype `auto` picks, what bf16 weights change in the token-weighted
loss (fp32 loss over bf16 logits, fp32 adapter), and one smoke run of the whole CLI stack in bf16 (training,
trajectory, in-loop sampling and judging), the path every GPU user takes. The real-model bf16 tier is in
test_real_model.py."""

import json
from pathlib import Path

import pytest
import torch
from clirun import FAST, SMOKE, em_fit, ok, run_dirs, scalars

from em_lightning.model.adapters import ADAPTER_NAME, AdapterSpec, apply_adapter, lora_layers
from em_lightning.training.loss import labelled_loss_sum
from em_lightning.training.masking import tokenize_chat
from em_lightning.model.loading import ModelSpec, bf16_native, load_model, load_tokenizer, resolve_dtype, weights_dtype
from em_lightning.phase.store import read_trajectory
from em_lightning.model.tiny import TinySpec

REPO = Path(__file__).resolve().parents[2]
# A tiny model wide enough that bf16 rounding looks like a real model's (not 64 dimensions).
WIDE = TinySpec(hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2, seed=0)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def test_bf16_native_follows_the_cpu_flags():
    if torch.cuda.is_available():
        assert bf16_native() == torch.cuda.is_bf16_supported()
    else:
        assert bf16_native() == bool({"amx_bf16", "amx_tile", "avx512_bf16"} & cpu_flags())


def test_auto_dtype_is_bf16_where_native_and_tiny_models_stay_fp32(monkeypatch):
    import em_lightning.model.loading as models

    real = ModelSpec(name_or_path="/some/folder")
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "bf16_native", lambda: native)
        assert weights_dtype(real) == resolve_dtype("auto") == expected
    assert weights_dtype(ModelSpec(name_or_path="tiny:qwen2")) == torch.float32
    assert weights_dtype(ModelSpec(name_or_path="tiny:qwen2", dtype="bfloat16")) == torch.bfloat16
    assert resolve_dtype("checkpoint") == "auto"  # transformers' word for the checkpoint's own dtype
    assert ModelSpec().dtype == "auto"


def _loss_and_grad(dtype: str, rows, tok):
    model = load_model(ModelSpec(name_or_path="tiny:qwen2", dtype=dtype, tiny=WIDE), tok)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    model = apply_adapter(model, AdapterSpec(r=1, alpha=8, use_rslora=True, target_modules=["down_proj"], layers=[1]))
    ((_, layer),) = lora_layers(model)
    b = layer.lora_B[ADAPTER_NAME].weight
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(1)) * 0.05)  # non-zero: A gets a gradient
    total, count = torch.zeros(()), 0
    for ids, labels in rows:
        s, c = labelled_loss_sum(model, torch.tensor([ids]), None, torch.tensor([labels]), row_lengths=[len(ids)])
        assert s.dtype == torch.float32  # the loss in fp32 whatever the weights
        s.backward()
        total, count = total + s.detach(), count + int(c)
    a = layer.lora_A[ADAPTER_NAME].weight
    assert a.dtype == b.dtype == torch.float32 and layer.base_layer.weight.dtype == getattr(torch, dtype)
    return float(total) / count, a.grad.flatten() / count, b.grad.flatten() / count


def test_bf16_weights_change_the_token_weighted_loss_by_under_half_a_percent():
    """The stated tolerance (README, Performance): token-weighted loss within 0.5% relative of fp32, adapter
    gradients within cosine 0.99. Measured here: 0.003% and > 0.9999 (SmolLM2: test_real_model.py)."""
    tok = load_tokenizer(ModelSpec(name_or_path="tiny:qwen2", tiny=WIDE))
    lines = (REPO / "configs" / "data" / "unit_conversions.jsonl").read_text().splitlines()[:6]
    rows = [tokenize_chat(tok, json.loads(line)["messages"]) for line in lines]
    loss32, ga32, gb32 = _loss_and_grad("float32", rows, tok)
    loss16, ga16, gb16 = _loss_and_grad("bfloat16", rows, tok)
    assert abs(loss16 - loss32) <= 5e-3 * loss32, (loss32, loss16)
    assert loss16 != loss32  # bf16 really ran
    for g32, g16 in ((ga32, ga16), (gb32, gb16)):
        assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99


@pytest.mark.slow
def test_smoke_run_in_bf16_trains_records_and_samples(tmp_path):
    """The demo's whole stack (training, trajectory + phase metrics, in-loop sampling and judging) with bf16
    base weights: what runs on a GPU in bf16 runs here too."""
    ok(em_fit("fit", "--config", SMOKE, "--config", "configs/callbacks/phase_transition.yaml", "--config",
              "configs/callbacks/demo_eval.yaml", *FAST, "--trainer.max_steps", "6", "--model.base.dtype", "bfloat16",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.enable_progress_bar", "false", timeout=600))
    (run,) = run_dirs(tmp_path)
    losses = [v for _, v in scalars(run, "train/loss")]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    traj = read_trajectory(run)
    assert traj.steps.tolist() == list(range(7))
    (name,) = traj.b
    assert traj.b[name].dtype == torch.float32 and traj.b[name][-1].norm() > 0  # the adapter trains in fp32
    phase = [t for t in _scalar_tags(run) if t.startswith("phase/")]
    assert phase and all(v == v for t in phase for _, v in scalars(run, t))  # trajectory metrics, no NaN
    answers = [json.loads(line)["answer"] for p in (run / "generations").glob("*.jsonl") for line in p.read_text().splitlines()]
    assert answers and all(isinstance(a, str) for a in answers)


def _scalar_tags(run: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return acc.Tags()["scalars"]
