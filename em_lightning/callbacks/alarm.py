"""Alarm: a run that reacts to what it sees. Triggers (each fires once per run):

- ``em_rate_above``: the EM rate (adapter scale 1) of a judged evaluation point, heard through
  ``on_point_judged`` (InLoopJudge announces it on every rank with the scored records);
- ``cos_direction_above``: cos(B, misalignment direction at B's layer) of a residual-writing adapter,
  checked every ``check_every_n_steps`` against the ``direction`` file, or else the run's newest
  ``directions/step_*.safetensors`` (MechanisticProbes writes them);
- ``on_transition``: a detected turn of the adapter, heard through ``on_phase_transition``
  (AdapterTrajectory announces it).

What a trigger does (every alarm is printed, logged as text ``alarm`` and appended to
``<run_dir>/alarms.jsonl``):

- ``stop``: Lightning's early-stopping semantics: a checkpoint of the alarm step
  (``checkpoints/step_XXXXXXX.ckpt``), then ``trainer.should_stop`` (the decision reduced over ranks, as
  EarlyStopping does, so every rank stops at the same step); last.ckpt is the same step.
- ``dense_window`` > 0: a transition densifies instead of stopping (EM and cos triggers still stop, so
  "look closely at the turn, stop when EM appears" is one alarm): a checkpoint at the detection step, then
  for the next ``dense_window`` steps a step checkpoint every
  ``dense_every`` steps (the published analysis needs checkpoints every 5 steps only around the turn;
  a SampleGenerations with ``at_checkpoints: true`` evaluates at each of them too). The change and its
  estimated cost (checkpoints, disk, time: the alarm-step checkpoint's own size and save time, evaluation
  inside the save included) are printed, logged as text (``alarm``), written to ``<run_dir>/alarms.jsonl``
  and announced as ``on_cadence_change(trainer, pl_module, change)``. Every alarm is announced as
  ``on_alarm(trainer, pl_module, alarm)``.

The fired triggers and the dense window live in the checkpoint, so a resumed run keeps the window and
does not fire a trigger twice.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from em_lightning.evaluation.metrics import em_summary
from em_lightning.lit.events import announce, resolve_run_dir
from em_lightning.probes.alignment import cosine, layer_of, output_vectors
from em_lightning.probes.misalignment_direction import latest_direction, load_direction
from em_lightning.loggers.run_logger import RunLogger

ALARMS_FILE = "alarms.jsonl"


class Alarm(pl.Callback):
    def __init__(self, em_rate_above: float | None = None, cos_direction_above: float | None = None,
                 on_transition: bool = True, stop: bool = True, dense_window: int = 0, dense_every: int = 5,
                 direction: str | None = None, check_every_n_steps: int = 5, after_step: int = 0):
        """
        Args:
            em_rate_above: trigger when a judged point's EM rate (scale 1) exceeds this (None: off).
            cos_direction_above: trigger when cos(B, direction) of any adapter exceeds this (None: off).
            on_transition: trigger on a detected phase transition.
            stop: stop the run at a trigger (checkpoint kept at the alarm step); false: only record it.
            dense_window: after a transition, steps of denser checkpoints (0: none); the transition then
                densifies instead of stopping.
            dense_every: step interval of the dense checkpoints.
            direction: direction file for the cos trigger (default: the run's newest directions/ file).
            check_every_n_steps: step interval of the cos check.
            after_step: ignore triggers at or before this step (e.g. the base model's own EM rate).
        """
        if dense_window < 0 or dense_every < 1 or check_every_n_steps < 1:
            raise ValueError("Alarm: need dense_window >= 0, dense_every >= 1 and check_every_n_steps >= 1")
        if direction is not None and not Path(direction).is_file():
            raise FileNotFoundError(f"Alarm: direction: no such file {direction}")
        self.em_rate_above, self.cos_direction_above, self.on_transition = em_rate_above, cos_direction_above, on_transition
        self.stop, self.dense_window, self.dense_every = stop, dense_window, dense_every
        self.direction_file, self.check_every, self.after_step = direction, check_every_n_steps, after_step
        self.fired: list[dict[str, Any]] = []  # (checkpointed) alarms so far
        self.window: dict[str, int] | None = None  # (checkpointed) {"start", "end", "every"} of the dense cadence
        self.run_dir: Path | None = None
        self._seen_step: int | None = None

    @property
    def state_key(self) -> str:
        return "Alarm"

    def state_dict(self) -> dict[str, Any]:
        return {"fired": list(self.fired), "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fired, self.window = list(state.get("fired", [])), state.get("window")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.run_dir = resolve_run_dir(trainer)  # collective: every rank

    # -- triggers ------------------------------------------------------------------------------------------
    def on_point_judged(self, trainer, pl_module, step: int, records: list[dict]) -> None:
        if self.em_rate_above is None:
            return
        rate = em_summary([r for r in records if float(r.get("scale", 1.0)) == 1.0])["em_rate"]
        self._maybe_fire(trainer, pl_module, "em_rate", step, rate, self.em_rate_above)

    def on_phase_transition(self, trainer, pl_module, event) -> None:
        if not self.on_transition:
            return
        step, dense = trainer.global_step, self.dense_window > 0 and self.window is None
        fired = self._maybe_fire(trainer, pl_module, "transition", step, float(event.local_cosine), None,
                                 detail=f"{getattr(event, 'module', '')} turned at step {event.step}",
                                 stop=self.stop and not dense)
        if fired and dense:
            self._densify(trainer, pl_module, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen_step:
            return  # mid gradient accumulation: the optimizer has not stepped
        self._seen_step = step
        w = self.window
        if w and w["start"] < step <= w["end"] and (step - w["start"]) % w["every"] == 0:
            self._checkpoint(trainer, step)
        if self.cos_direction_above is not None and step % self.check_every == 0:
            self._check_cos(trainer, pl_module, step)

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen_step = trainer.global_step

    def _check_cos(self, trainer, pl_module, step: int) -> None:
        vectors = output_vectors(pl_module.model)  # collective under FSDP2: every rank, every check
        direction = (load_direction(self.direction_file) if self.direction_file
                     else latest_direction(self.run_dir, at_most=step) if self.run_dir else None)
        cos = [cosine(b, direction.vectors[layer_of(n)]) for n, b in vectors.items()
               if direction is not None and layer_of(n) in direction.vectors]
        self._maybe_fire(trainer, pl_module, "cos_direction", step, max(cos, default=math.nan), self.cos_direction_above)

    def _maybe_fire(self, trainer, pl_module, trigger: str, step: int, value: float, above: float | None,
                    detail: str = "", stop: bool | None = None) -> bool:
        stop = self.stop if stop is None else stop
        hit = step > self.after_step and all(a["trigger"] != trigger for a in self.fired)
        hit = hit and (above is None or (value == value and value > above))
        # The same decision on every rank (as EarlyStopping): a direction file read at a slightly different
        # moment on one rank must not leave the others training alone.
        if not trainer.strategy.reduce_boolean_decision(bool(hit), all=False):
            return False
        alarm = {"trigger": trigger, "step": step, "value": value, "threshold": above, "detail": detail,
                 "action": "stop" if stop else "dense checkpoints" if trigger == "transition" and self.dense_window
                 else "recorded"}
        self.fired.append(alarm)
        self._record(trainer, alarm)
        announce(trainer, "on_alarm", pl_module, alarm)
        if stop:
            self._checkpoint(trainer, step)  # the state at the alarm is kept
            trainer.should_stop = True
        return True

    # -- actions -------------------------------------------------------------------------------------------
    def _densify(self, trainer, pl_module, step: int) -> None:
        self.window = {"start": step, "end": step + self.dense_window, "every": self.dense_every}
        saved = self._checkpoint(trainer, step)  # holds the window: a run resumed from here keeps it
        n = self.dense_window // self.dense_every
        size, seconds = saved or (math.nan, math.nan)
        change = {"trigger": "cadence", "step": step, **self.window, "checkpoints": n,
                  "est_disk_bytes": n * size, "est_seconds": n * seconds,
                  "detail": f"a checkpoint every {self.dense_every} steps from step {step} to {step + self.dense_window} "
                            f"({n} more; estimated from the checkpoint just saved: {size / 1e6:.3g} MB and {seconds:.2g} s "
                            "each, an evaluation at checkpoints included, if one runs)"}
        self._record(trainer, change)
        announce(trainer, "on_cadence_change", pl_module, change)

    def _checkpoint(self, trainer, step: int) -> tuple[float, float] | None:
        """A step checkpoint at ``step`` (every rank calls save_checkpoint; the strategy decides who writes).
        Returns (size in bytes, seconds) of the save."""
        if self.run_dir is None:
            return None
        path = self.run_dir / "checkpoints" / f"step_{step:07d}.ckpt"
        start = time.perf_counter()
        trainer.save_checkpoint(path)
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*"))) if path.exists() else 0
        return float(size), seconds

    def _record(self, trainer, entry: dict[str, Any]) -> None:
        line = f"Alarm at step {entry['step']}: {entry['trigger']}" + (
            f" {entry['value']:.4g} > {entry['threshold']}" if entry.get("threshold") is not None else "") + (
            f" ({entry['detail']})" if entry.get("detail") else "") + (
            f" -> {entry['action']}" if "action" in entry else "")
        rank_zero_info(line)
        RunLogger.of(trainer).text("alarm", line, entry["step"])
        if trainer.is_global_zero and self.run_dir is not None:
            with open(self.run_dir / ALARMS_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")
