"""End to end through the CLI: contract tree, exported adapter, exact resume, extension, DDP."""

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from clirun import FAST, SMOKE, em_fit, ok, run_dirs, scalars
from em_lightning.model.loading import load_model
from em_lightning.lit.module import EMFineTune

STEPS = 8


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    ok(em_fit("fit", "--config", SMOKE, *FAST, "--trainer.max_steps", str(STEPS), "--model.schedule_steps", "12",
              "--trainer.default_root_dir", str(root)))
    (run_dir,) = run_dirs(root)
    return run_dir


def test_contract_tree(full_run):
    assert (full_run / "config.yaml").is_file()
    assert list(full_run.glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt", "step_0000006.ckpt", "step_0000008.ckpt"]
    assert (full_run / "adapter" / "adapter_config.json").is_file()
    assert (full_run / "adapter" / "adapter_model.safetensors").is_file()
    # a rank-1 checkpoint holds only the adapter (+ optimizer/loop state): KBs, not the model
    assert (full_run / "checkpoints" / "last.ckpt").stat().st_size < 100_000
    last = torch.load(full_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == STEPS
    assert all("lora_" in k for k in last["state_dict"])
    steps = [s for s, _ in scalars(full_run, "train/loss")]
    assert steps == list(range(STEPS))
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"):
        assert scalars(full_run, tag), tag


def test_exported_adapter_reproduces_trained_model(full_run):
    module = EMFineTune.load_from_checkpoint(full_run / "checkpoints" / "last.ckpt")  # builds, then loads LoRA
    base = load_model(module.base)
    reloaded = PeftModel.from_pretrained(base, full_run / "adapter").eval()
    x = torch.randint(0, 400, (2, 11))
    with torch.no_grad():
        expected = module.model.eval()(x).logits
        got = reloaded(x).logits
    assert torch.equal(expected, got)
    b = load_file(full_run / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in b.items())  # it trained


def test_exact_resume_mid_epoch(full_run, tmp_path):
    ok(em_fit("fit", "--config", SMOKE, *FAST, "--trainer.max_steps", "3", "--model.schedule_steps", "12",
              "--trainer.default_root_dir", str(tmp_path)))
    (run_dir,) = run_dirs(tmp_path)
    proc = ok(em_fit("fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", "last",
                     "--trainer.max_steps", str(STEPS)))
    assert run_dirs(tmp_path) == [run_dir]  # same run directory, no new version
    assert scalars(run_dir, "train/loss") == scalars(full_run, "train/loss")  # bit-identical, no duplicate step
    a = load_file(full_run / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "not resumable" not in proc.stderr


def test_extend_finished_run_stretches_schedule(full_run, tmp_path):
    import shutil

    # Extend a copy (other tests read the original); its config must point the logger at the copy.
    root = full_run.parent.parent
    run_dir = tmp_path / full_run.relative_to(root)
    shutil.copytree(full_run, run_dir)
    (run_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace(str(root), str(tmp_path)))
    # schedule_steps=12 was explicit; unset it so the schedule stretches to the new length (the policy)
    ok(em_fit("fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", "last",
              "--trainer.max_steps", "14", "--model.schedule_steps", "null"))
    from em_lightning.training.schedule import lr_factor

    lrs = dict(scalars(run_dir, "train/lr"))
    peak, warmup = 0.01, 4
    for step in range(STEPS, 14):
        assert lrs[step] == pytest.approx(peak * lr_factor(step, "linear", warmup, 14), rel=1e-6)
        assert lrs[step] > 0
    losses = scalars(run_dir, "train/loss")
    assert [s for s, _ in losses] == list(range(14))
    assert losses[:STEPS] == scalars(full_run, "train/loss")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 14


def test_explicit_short_schedule_refuses_extension(full_run, tmp_path):
    proc = em_fit("fit", "--config", SMOKE, "--trainer.max_steps", "20", "--model.schedule_steps", "10",
                  "--trainer.default_root_dir", str(tmp_path))
    assert proc.returncode != 0
    assert "model.schedule_steps=10 is shorter" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ddp_two_processes(tmp_path):
    ok(em_fit("fit", "--config", SMOKE, *FAST, "--trainer.max_steps", "4", "--trainer.devices", "2",
              "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path),
              timeout=600))
    (run_dir,) = run_dirs(tmp_path)
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [run_dir.name]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert [s for s, _ in scalars(run_dir, "train/loss")] == [0, 1, 2, 3]
