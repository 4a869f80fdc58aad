"""StepCheckpoint on a multi-epoch run with gradient accumulation: save_top_k keeps the newest step files,
last.ckpt holds the final step, and a step's last.ckpt shares the step file's bytes (one serialization)."""

import os

import lightning.pytorch as pl
import pytest
import torch

from em_lightning.model.adapters import AdapterSpec
from em_lightning.callbacks.checkpointing import AtomicCheckpointIO, StepCheckpoint
from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.model.loading import ModelSpec
from em_lightning.lit.module import EMFineTune


def _fit(tmp_path, repo_root, save_top_k, max_steps):
    base = ModelSpec(name_or_path="tiny:qwen2", dtype="float32")
    torch.manual_seed(0)
    model = EMFineTune(base=base, adapter=AdapterSpec(r=1, layers=[1]), lr=1e-2, warmup_steps=0,
                       validate_before_training=False)
    rows = str(repo_root / "configs" / "data" / "unit_conversions.jsonl")
    data = ChatDataModule(train_files=rows, base=base, val_fraction=0.0, batch_size=8)
    ckpt = StepCheckpoint(every_n_train_steps=3, save_top_k=save_top_k)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=2, logger=False,
                         default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ckpt], use_distributed_sampler=False, limit_val_batches=0,
                         plugins=[AtomicCheckpointIO()])
    trainer.fit(model, data)
    per_epoch = data.batches_per_epoch() // 2
    assert max_steps > 2 * per_epoch, "the run should span several epochs"
    return ckpt.dirpath


def _step(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.parametrize("save_top_k", [2, 0])
def test_save_top_k_keeps_the_newest_and_last_holds_the_final_step(tmp_path, repo_root, save_top_k):
    folder = _fit(tmp_path, repo_root, save_top_k, max_steps=40)
    names = sorted(p.name for p in folder.glob("step_*.ckpt"))
    assert names == ["step_0000036.ckpt", "step_0000039.ckpt"][:save_top_k] if save_top_k else names == []
    assert _step(folder / "last.ckpt") == 40
    for name in names:  # rewriting last.ckpt at step 40 left the linked step files intact
        assert _step(folder / name) == int(name[5:12])
    assert not list(folder.glob("*em-tmp*"))


def test_last_is_the_step_file_not_a_second_serialization(tmp_path, repo_root):
    folder = _fit(tmp_path, repo_root, -1, max_steps=39)  # the final step is a checkpoint step
    last, step = folder / "last.ckpt", folder / "step_0000039.ckpt"
    assert os.path.samefile(last, step)  # a hard link here (a copy only where the file system has none)
    assert _step(last) == 39 and len(list(folder.glob("step_*.ckpt"))) == 13
