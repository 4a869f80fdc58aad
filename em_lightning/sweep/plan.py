"""A sweep on disk: ``DIR/sweep.json`` (the base configs, the grid, every cell's run directory) and one
status file per cell (``DIR/status/<cell>.json``), so a half-finished sweep resumes: finished cells are
skipped, an interrupted one continues from its ``last.ckpt``.

Every cell's run directory is pinned (``DIR/runs/<cell>/version_0``) through the logger options, so the
same command plus ``--ckpt_path last`` resumes the same run."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_lightning.run.atomic_io import atomic_write
from em_lightning.sweep.grid import Cell, expand

PLAN_FILE = "sweep.json"
DONE, RUNNING, FAILED, INTERRUPTED = "done", "running", "failed", "interrupted"


@dataclass
class SweepPlan:
    out: Path
    configs: list[str]  # base config files, merged first in this order
    grid: dict[str, list]
    extra_args: list[str] = field(default_factory=list)  # passed to every cell after its grid options

    @property
    def cells(self) -> list[Cell]:
        return expand(self.grid)

    def run_dir(self, cell: Cell) -> Path:
        return self.out / "runs" / cell.name / "version_0"

    def status_path(self, cell: Cell) -> Path:
        return self.out / "status" / f"{cell.name}.json"

    def log_path(self, cell: Cell) -> Path:
        return self.out / "logs" / f"{cell.name}.log"

    def fit_args(self, cell: Cell) -> list[str]:
        """``em-fit`` arguments of a cell's fresh run (``fit`` first); a resume appends ``--ckpt_path last``."""
        args = ["fit"]
        for config in self.configs:
            args += ["--config", config]
        args += cell.args() + list(self.extra_args)
        return args + ["--trainer.logger.init_args.save_dir", str(self.out / "runs"),
                       "--trainer.logger.init_args.name", cell.name, "--trainer.logger.init_args.version", "0"]

    def can_resume(self, cell: Cell) -> bool:
        return (self.run_dir(cell) / "checkpoints" / "last.ckpt").exists()

    # -- files ---------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"configs": self.configs, "grid": self.grid, "extra_args": self.extra_args,
                "cells": [{"index": c.index, "name": c.name, "values": c.values, "setting": c.setting,
                           "run_dir": str(self.run_dir(c).relative_to(self.out))} for c in self.cells]}

    def save(self) -> None:
        """Write DIR/sweep.json, or check that the one there describes the same sweep (a different grid or
        base config in the same folder would mix two sweeps' runs: refused)."""
        path = self.out / PLAN_FILE
        if path.exists():
            before = load_plan(self.out)
            for what in ("configs", "grid", "extra_args"):
                if getattr(before, what) != getattr(self, what):
                    raise ValueError(f"{path}: this folder holds a sweep with other {what} "
                                     f"({getattr(before, what)!r}, now {getattr(self, what)!r}); use another --out")
            return
        atomic_write(path, json.dumps(self.to_json(), indent=1))

    def status(self, cell: Cell) -> dict[str, Any]:
        try:
            return json.loads(self.status_path(cell).read_text())
        except (OSError, ValueError):
            return {}

    def set_status(self, cell: Cell, state: str, **info: Any) -> None:
        record = {**self.status(cell), "state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        atomic_write(self.status_path(cell), json.dumps(record, indent=1))


def load_plan(out: str | Path) -> SweepPlan:
    out = Path(out)
    path = out / PLAN_FILE
    try:
        data = json.loads(path.read_text())
    except OSError:
        raise FileNotFoundError(f"{path}: no sweep here (em-fit sweep --config ... --grid ... --out {out})") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    try:
        return SweepPlan(out, list(data["configs"]), dict(data["grid"]), list(data.get("extra_args", [])))
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected fields configs, grid ({e})") from None
