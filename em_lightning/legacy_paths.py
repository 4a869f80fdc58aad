"""Module paths from before the package was grouped into folders (2026-12), for what was saved with them:
a checkpoint pickles its hyper-parameters' classes (ModelSpec, AdapterSpec, ...) by module path, and a run's
config.yaml names classes by ``class_path``. An old path imports the module that holds the code now (the
same module object), so runs started before the move still resume, and their configs still load."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

OLD_TO_NEW = {
    "em_lightning.models": "em_lightning.model.loading",
    "em_lightning.tiny": "em_lightning.model.tiny",
    "em_lightning.gguf_cache": "em_lightning.model.gguf_cache",
    "em_lightning.adapters": "em_lightning.model.adapters",
    "em_lightning.sharding": "em_lightning.model.sharding",
    "em_lightning.decoding": "em_lightning.model.decoding",
    "em_lightning.loss": "em_lightning.training.loss",
    "em_lightning.masking": "em_lightning.training.masking",
    "em_lightning.rows": "em_lightning.training.rows",
    "em_lightning.resumable": "em_lightning.training.resumable",
    "em_lightning.schedule": "em_lightning.training.schedule",
    "em_lightning.finite": "em_lightning.training.finite",
    "em_lightning.validation_plan": "em_lightning.training.validation_plan",
    "em_lightning.atomic_io": "em_lightning.run.atomic_io",
    "em_lightning.run_dir": "em_lightning.run.run_dir",
    "em_lightning.run_outputs": "em_lightning.run.outputs",
    "em_lightning.checkpoints": "em_lightning.run.checkpoints",
    "em_lightning.checkpoint_check": "em_lightning.run.checkpoint_integrity",
    "em_lightning.fingerprint": "em_lightning.run.fingerprint",
    "em_lightning.data_registry": "em_lightning.published.registry",
    "em_lightning.data_fetch": "em_lightning.published.fetch",
    "em_lightning.judged_answers": "em_lightning.published.judged_answers",
    "em_lightning.questions": "em_lightning.published.question_files",
    "em_lightning.judge_prompts": "em_lightning.published.judge_prompts",
    "em_lightning.module": "em_lightning.lit.module",
    "em_lightning.data": "em_lightning.lit.datamodule",
    "em_lightning.strategies": "em_lightning.lit.strategies",
    "em_lightning.events": "em_lightning.lit.events",
    "em_lightning.run_logger": "em_lightning.loggers.run_logger",
    "em_lightning.logger_compat": "em_lightning.loggers.logger_compat",
    "em_lightning.dashboard": "em_lightning.loggers.dashboard",
    "em_lightning.eval_logging": "em_lightning.loggers.eval_logging",
    "em_lightning.judges.demo": "em_lightning.demos.demo_judge",
    "em_lightning.judges.loopback": "em_lightning.testing.loopback_judge",
    "em_lightning.phase.directions": "em_lightning.phase.lora_direction",
    "em_lightning.probes.directions": "em_lightning.probes.misalignment_direction",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds only the old paths (no module lives there any more), loading each as its new module."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in OLD_TO_NEW else None

    def create_module(self, spec):
        return importlib.import_module(OLD_TO_NEW[spec.name])

    def exec_module(self, module) -> None:
        pass  # already executed under its new name


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
