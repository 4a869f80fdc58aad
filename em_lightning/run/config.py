"""A run's recorded config: ``<run>/config.yaml`` as ``em-fit fit`` saved it (every init arg written out).
The one reader of it, for the commands that work on a finished run (eval, steer, direction) and for
judge-config files that hold a callbacks preset."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml


def find_callback(config: Mapping, name: str) -> dict | None:
    """The init args of the first ``trainer.callbacks`` (or a preset's ``callbacks+``) entry whose
    ``class_path`` ends with ``name``; None when there is none."""
    trainer = config.get("trainer") if isinstance(config, Mapping) else None
    if not isinstance(trainer, Mapping):
        return None
    for key in ("callbacks+", "callbacks"):
        entries = trainer.get(key)
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, Mapping) and str(entry.get("class_path", "")).endswith(name):
                return dict(entry.get("init_args") or {})
    return None


class RunConfig:
    """The parsed ``config.yaml`` of a run directory."""

    def __init__(self, run: str | Path):
        self.path = Path(run) / "config.yaml"
        if not self.path.is_file():
            raise ValueError(f"{run}: no config.yaml there (is it a run directory?)")
        data = yaml.safe_load(self.path.read_text())
        self.data: dict = data if isinstance(data, dict) else {}

    def callback_args(self, name: str) -> dict | None:
        """The init args of the run's callback whose class name is ``name`` (None: the run had none)."""
        return find_callback(self.data, name)

    def model_base(self) -> dict:
        """``model.base``: the ModelSpec fields of the base model ({} when not recorded)."""
        model = self.data.get("model")
        base = model.get("base") if isinstance(model, Mapping) else None
        return dict(base) if isinstance(base, Mapping) else {}
