"""Checkpoints and run configs saved before the package was grouped into folders still load: their pickled
classes and class_paths name the old module paths (em_lightning/legacy_paths.py)."""

import importlib
import pickle
import zipfile
from pathlib import Path

import torch

from em_lightning.legacy_paths import OLD_TO_NEW
from em_lightning.model.loading import ModelSpec

PACKAGE = Path(__file__).resolve().parents[1] / "em_lightning"


def test_an_old_checkpoint_unpickles_its_classes_from_their_new_modules():
    spec = ModelSpec(name_or_path="tiny:qwen2")
    old = pickle.dumps({"hyper_parameters": {"base": spec}}, protocol=0).replace(
        b"em_lightning.model.loading", b"em_lightning.models")
    assert b"em_lightning.models\n" in old and b"em_lightning.model.loading" not in old
    assert pickle.loads(old)["hyper_parameters"]["base"] == spec


def test_an_old_torch_checkpoint_loads(tmp_path):
    """The same through torch.load, as Lightning reads a checkpoint (its pickle renamed to the old path)."""
    spec = ModelSpec(name_or_path="tiny:qwen2")
    torch.save({"hyper_parameters": {"base": spec}, "w": torch.ones(2)}, tmp_path / "new.ckpt")
    with zipfile.ZipFile(tmp_path / "new.ckpt") as src, zipfile.ZipFile(tmp_path / "old.ckpt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"em_lightning.model.loading\n" in data
                data = data.replace(b"em_lightning.model.loading\n", b"em_lightning.models\n")
            dst.writestr(item, data)
    loaded = torch.load(tmp_path / "old.ckpt", weights_only=False)
    assert loaded["hyper_parameters"]["base"] == spec and loaded["w"].tolist() == [1.0, 1.0]


def test_every_old_path_is_the_module_that_holds_the_code_now():
    for old, new in OLD_TO_NEW.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    demo = importlib.import_module("em_lightning.judges.demo")  # a config's class_path: judges.demo.DemoJudge
    assert demo.DemoJudge.__module__ == "em_lightning.demos.demo_judge"


def test_no_module_lives_at_an_old_path():
    """A file at an old path would win over the alias (and hide the code that moved)."""
    for old in OLD_TO_NEW:
        rel = Path(*old.split(".")[1:])
        assert not (PACKAGE / rel).with_suffix(".py").exists() and not (PACKAGE / rel).is_dir(), old
