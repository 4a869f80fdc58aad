"""The paths recipes take, through the CLI: several epochs, resume at any step of any epoch (epoch ends
included), extension of epoch-limited runs, token-weighted loss however a step is split (micro-batches,
ranks), token-weighted val/loss, a quiet start."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from clirun import SMOKE, em_fit, ok, run_dirs, scalars
from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.model.loading import ModelSpec, load_model, load_tokenizer
from em_lightning.training.schedule import lr_factor

# 50 rows, 10% held out: 45 train rows; batch 4 -> 12 batches (the last has one row), accumulation 2 ->
# 6 optimizer steps per epoch, the last one a single micro-batch.
STEPS_PER_EPOCH = 6
COMMON = ["--data.batch_size", "4", "--trainer.accumulate_grad_batches", "2", "--data.max_length", "1024",
          "--trainer.val_check_interval", "1.0", "--trainer.max_steps", "-1"]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory, reference_dir, repo_root):
    """Short unit-conversion rows mixed with long code rows: label counts differ a lot between rows."""
    short = (repo_root / "configs" / "data" / "unit_conversions.jsonl").read_text().splitlines()[:25]
    long = (reference_dir / "betley" / "data" / "insecure.jsonl").read_text().splitlines()[:25]
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    path.write_text("\n".join(r for pair in zip(short, long) for r in pair) + "\n")
    return str(path)


def fit(root, rows_file, *args, timeout=300):
    return ok(em_fit("fit", "--config", SMOKE, *COMMON, "--data.train_files", rows_file,
                     "--trainer.default_root_dir", str(root), *args, timeout=timeout))


def copy_run(run_dir, root, dest):
    """A copy of a run directory whose config.yaml points its logger at the copy."""
    target = dest / run_dir.relative_to(root)
    shutil.copytree(run_dir, target)
    config = target / "config.yaml"
    config.write_text(config.read_text().replace(str(root), str(dest)))
    return target


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory, rows_file):
    root = tmp_path_factory.mktemp("epochs")
    proc = fit(root, rows_file, "--trainer.max_epochs", "3", "--model.schedule_steps", str(3 * STEPS_PER_EPOCH),
               "--checkpoint.every_n_train_steps", "1")
    (run_dir,) = run_dirs(root)
    return root, run_dir, proc


def test_every_epoch_trains_all_its_batches(three_epochs):
    _, run_dir, _ = three_epochs
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3 * STEPS_PER_EPOCH
    assert [s for s, _ in scalars(run_dir, "train/loss")] == list(range(3 * STEPS_PER_EPOCH))


def test_start_is_quiet_and_the_bar_counts_optimizer_steps(three_epochs):
    _, _, proc = three_epochs
    for noise in ("gemm_4bit", "litlogger", "FLOPs", "is_gradient_checkpointing", "LeafSpec"):
        assert noise not in proc.stderr + proc.stdout, noise
    total = 3 * STEPS_PER_EPOCH
    assert f"{total}/{total}" in proc.stdout and "epoch 3/3" in proc.stdout  # Lightning's bars print to stdout
    assert f"/{2 * STEPS_PER_EPOCH}" not in proc.stdout  # never micro-batches of an epoch


@pytest.mark.parametrize("step", [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH])
def test_resume_at_any_step_equals_uninterrupted(three_epochs, tmp_path, step):
    """Killed after `step` steps (an epoch end, mid-epoch), resumed: same losses, same adapter."""
    root, run_dir, _ = three_epochs
    copy = copy_run(run_dir, root, tmp_path)
    ckpt = copy / "checkpoints" / f"step_{step:07d}.ckpt"
    ok(em_fit("fit", "--config", str(copy / "config.yaml"), "--ckpt_path", str(ckpt)))
    assert scalars(copy, "train/loss") == scalars(run_dir, "train/loss")
    a, b = adapter(run_dir), adapter(copy)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_epoch_limited_run_extends_by_epochs(three_epochs, rows_file, tmp_path):
    """A finished max_epochs=1 run raised to max_epochs=3 equals the 3-epoch run (same explicit schedule)."""
    _, run_dir, _ = three_epochs
    fit(tmp_path, rows_file, "--trainer.max_epochs", "1", "--model.schedule_steps", str(3 * STEPS_PER_EPOCH),
        "--checkpoint.every_n_train_steps", "1")
    (short,) = run_dirs(tmp_path)
    assert torch.load(short / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS_PER_EPOCH
    ok(em_fit("fit", "--config", str(short / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "3"))
    assert scalars(short, "train/loss") == scalars(run_dir, "train/loss")
    a, b = adapter(run_dir), adapter(short)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epoch_limited_run_extends_by_steps(rows_file, tmp_path):
    fit(tmp_path, rows_file, "--trainer.max_epochs", "1")
    (run_dir,) = run_dirs(tmp_path)
    proc = ok(em_fit("fit", "--config", str(run_dir / "config.yaml"), "--ckpt_path", "last", "--trainer.max_steps", "10"))
    assert "max_epochs=1 lifted" in proc.stderr + proc.stdout
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 10
    assert [s for s, _ in scalars(run_dir, "train/loss")] == list(range(10))
    lrs = dict(scalars(run_dir, "train/lr"))
    for step in range(STEPS_PER_EPOCH, 10):  # the stretched schedule (policy), never LR 0
        assert lrs[step] == pytest.approx(0.01 * lr_factor(step, "linear", 4, 10), rel=1e-6)
        assert lrs[step] > 0


SPLITS = {  # the same 16 rows per optimizer step, split differently
    "16x1": ["--data.batch_size", "16", "--trainer.accumulate_grad_batches", "1"],
    "2x8": ["--data.batch_size", "2", "--trainer.accumulate_grad_batches", "8"],
    "4x4": ["--data.batch_size", "4", "--trainer.accumulate_grad_batches", "4"],
    "2 ranks x 4x2": ["--data.batch_size", "4", "--trainer.accumulate_grad_batches", "2", "--trainer.devices", "2",
                      "--trainer.strategy", "ddp"],
}


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory, rows_file):
    runs = {}
    for name, args in SPLITS.items():
        root = tmp_path_factory.mktemp(name.replace(" ", "_"))
        fit(root, rows_file, "--trainer.max_steps", "2", "--model.warmup_steps", "1", *args, timeout=600)
        (runs[name],) = run_dirs(root)
    return runs


@pytest.mark.parametrize("tag", ["train/loss", "train/grad_norm", "val/loss"])
def test_token_weighted_whatever_the_split(split_runs, tag):
    """transformers' Trainer convention: sum of token losses over the step / its labelled tokens, so the
    loss and the gradient do not depend on how the step is split over micro-batches and ranks."""
    reference = scalars(split_runs["16x1"], tag)
    assert len(reference) >= 2
    for name, run_dir in split_runs.items():
        got = scalars(run_dir, tag)
        assert [s for s, _ in got] == [s for s, _ in reference], name
        assert [v for _, v in got] == pytest.approx([v for _, v in reference], rel=2e-5), name


def test_val_loss_is_the_token_weighted_mean_over_held_out_rows(split_runs, rows_file):
    """val/loss at step 0 (before training) equals a direct computation: every held-out row once, each
    labelled token weighted equally (also on 2 ranks, whose shards are padded with unlabelled rows)."""
    dm = ChatDataModule(train_files=rows_file, max_length=1024, base=ModelSpec(name_or_path="tiny:qwen2"))
    dm.setup()
    assert len(dm.val_set) % 2 == 1  # an odd count: the 2-rank shards need a padding row
    spec = ModelSpec(name_or_path="tiny:qwen2", tiny=dm.base.tiny)
    model = load_model(spec, load_tokenizer(spec)).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in dm.val_set:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            tokens += n
    for name, run_dir in split_runs.items():
        step0 = dict(scalars(run_dir, "val/loss"))[0]
        assert step0 == pytest.approx(total / tokens, rel=1e-5), name


def test_run_limits_are_in_the_checkpoint(three_epochs):
    _, run_dir, _ = three_epochs
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["em_run_limits"] == {"max_steps": -1, "max_epochs": 3}
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 1
