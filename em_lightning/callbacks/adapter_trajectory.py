"""AdapterTrajectory: record the LoRA adapter at every optimizer step, log its rotation, detect the turn.

Thin adapter from Lightning hooks to ``phase/`` (metrics, detector) and ``phase/store.py`` (files).
A trajectory point s is the adapter *after* s optimizer steps (point 0 = the initial adapter), i.e. the
weights that computed ``train/loss`` at step s, so both share the TensorBoard x axis. k counts recorded points.

TensorBoard tags, per module ``m`` (e.g. ``model.layers.24.mlp.down_proj``), logged by rank 0:
  phase/m/A_norm, B_norm                 norms of the vectors at point s
  phase/m/A_rotation_deg, B_rotation_deg angle to the previous point (B: NaN, so not logged, while B = 0)
  phase/m/B_rotation_cum_deg             running sum of B_rotation_deg
  phase/m/B_cos_lag{1,k}                 cos(b[s - k], b[s])
  phase/m/B_local_cos_k{k}               local cosine similarity (contract) of point i, logged at step i
                                         once point i + k exists (so k points late in wall time)
  phase/m/A_grad_norm, B_grad_norm       at step g, before optimizer step g (as train/grad_norm)
  phase/m/transition_step                the turn's step, at that step, when the detector fires
  phase/transitions (text)               one line per detected turn

Resume: every tag keeps exactly one value per step. A resumed run's logger purges the steps from the
checkpoint's on, so the checkpoint's own point is logged again; values that belong to steps before the
last checkpoint but became known after it (local cosines, detected turns) are held back until the next
checkpoint (or the end), since a purge would not remove them and the resumed run computes them again.
A trajectory folder that lost records the resumed run cannot record again (a truncated file, a deleted
folder) is repaired to its last complete record, with a warning naming the file and the missing steps,
which meta.json's ``"gaps"`` lists (the damaged files are copied beside it first: phase/store.py).
"""

from __future__ import annotations

import dataclasses
import json

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from em_lightning.model.adapters import ADAPTER_NAME, lora_layers
from em_lightning.loggers.dashboard import layout_summary, no_transition_text, phase_transition_layout
from em_lightning.lit.events import announce, resolve_run_dir
from em_lightning.loggers.logger_compat import purge_step
from em_lightning.phase import TransitionDetector, TransitionEvent, lora_direction
from em_lightning.phase.online import OnlineTrajectory
from em_lightning.phase.store import TrajectoryWriter
from em_lightning.loggers.run_logger import RunLogger
from em_lightning.model.sharding import full, is_sharded

_UNSUPPORTED = {"FSDPStrategy", "DeepSpeedStrategy"}  # FSDP1 / DeepSpeed: parameters flattened per unit
PREFIX = "phase/"  # this callback's namespace: phase/online.py returns plain <module>/<metric> names
TRANSITIONS = "phase/transitions"  # the TEXT tag listing detected turns


@dataclasses.dataclass(frozen=True)
class ModuleTransition(TransitionEvent):
    """A ``TransitionEvent`` plus the module whose B vector turned (what ``on_phase_transition`` receives)."""

    module: str = ""


class AdapterTrajectory(pl.Callback):
    """Record every LoRA adapter every ``every_n_steps`` optimizer steps to ``<run_dir>/trajectory/`` and
    log ``phase/<module>/...`` scalars; announce ``on_phase_transition`` when a module's B vector turns.

    Args:
        every_n_steps: optimizer steps between recorded points (rank-1 vectors are tiny: 1 is cheap).
        k_values: scales (in recorded points) of the cosine-to-k-back and local cosine similarity metrics.
        detector_k, detector_min_rise, detector_min_z, detector_baseline, detector_min_snr,
            detector_threshold: ``phase.TransitionDetector`` settings (a turn is a peak of the local cosine
            that rises above the median of its recent values). One detector per module watches the B vector
            (the output direction, as in the EM papers).
        log_grad_norms: log the gradient norm of each module's A and B before every optimizer step.
        fsync: fsync every record (survives an OS crash, not only a process crash; slower).

    Rank > 1 adapters are recorded as their top singular direction (``kind: direction`` in meta.json).
    Under DDP every rank holds the same adapter, so each computes metrics and runs the detectors locally
    (no collective); rank 0 alone writes and logs; events are announced on every rank. FSDP2: shards are
    gathered on every rank (collective), rank 0 writes. FSDP1/DeepSpeed are refused.
    """

    def __init__(self, every_n_steps: int = 1, k_values: list[int] | tuple[int, ...] = (5, 10, 15), detector_k: int = 8,
                 detector_threshold: float = -1.0, detector_min_snr: float = 2.0, log_grad_norms: bool = True,
                 fsync: bool = False, detector_min_rise: float = 0.25, detector_min_z: float = 6.0,
                 detector_baseline: int = 40):
        if every_n_steps < 1 or not k_values or min(k_values) < 1:
            raise ValueError(f"every_n_steps and k_values must be >= 1, got {every_n_steps} and {k_values}")
        self.every_n_steps, self.k_values = int(every_n_steps), tuple(int(k) for k in k_values)
        self.detector_args = dict(k=detector_k, threshold=detector_threshold, min_snr=detector_min_snr,
                                  min_rise=detector_min_rise, min_z=detector_min_z, baseline=detector_baseline)
        TransitionDetector(**self.detector_args)  # invalid settings fail at construction, not at step 1
        self.log_grad_norms, self.fsync = log_grad_norms, fsync
        self._dir = None
        self._factors: list = []  # (name, A weight, B weight), found once: walking the model each step is not free
        self._writer: TrajectoryWriter | None = None
        self._quiet = False  # True while the run (resumed or not) has detected no transition
        self._held: list[tuple[int, dict[str, float], list[str]]] = []  # (step, scalars, texts) before _ckpt_step
        self._ckpt_step: int | None = None  # step of the newest checkpoint (saved, or resumed from)
        self._relogged = False
        self._grad_norms: tuple[int, dict[str, float]] | None = None  # of the optimizer step under way
        self._restored = False
        self._reset()

    def _reset(self) -> None:
        self._online = OnlineTrajectory(self.k_values, self.detector_args)  # the metrics: phase/online.py
        self._seen_step: int | None = None

    @property
    def state_key(self) -> str:
        return "AdapterTrajectory"

    # -- checkpoint state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self._online.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._reset()
        self._online.load_state_dict(state)
        self._restored = True

    @property
    def last_step(self) -> int | None:
        return self._online.last_step

    # -- hooks -------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if type(trainer.strategy).__name__ in _UNSUPPORTED:
            raise ValueError(f"AdapterTrajectory does not support {type(trainer.strategy).__name__}; use DDP or "
                             "FSDP2 (configs/strategies/fsdp2.yaml), or remove the callback")
        self._dir = resolve_run_dir(trainer) / "trajectory"  # collective: every rank
        self._held, self._ckpt_step, self._relogged = [], None, False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._seen_step = trainer.global_step  # restored from the checkpoint by now
        self._ckpt_step = step if self._restored else None
        self._factors = self._find_factors(pl_module)
        if not self._factors:
            rank_zero_warn("AdapterTrajectory: the model has no LoRA adapter; nothing is recorded")
            self._dir = None
            return
        if not self._restored:
            self._reset()
            self._seen_step = step
        if trainer.is_global_zero:
            self._writer = TrajectoryWriter(self._dir, self._meta(pl_module), fsync=self.fsync)
            # Resume: records the killed run wrote after its checkpoint are dropped and re-recorded.
            # Otherwise keep only records before this fit's first point (a fresh run: none).
            self._writer.truncate_after(step if self._restored else step - 1)
            RunLogger.of(trainer).summary(layout_summary(phase_transition_layout(self.k_values)))
            if not self._restored:  # the TEXT tab says "none so far" instead of showing nothing
                self._quiet = True
                RunLogger.of(trainer).text(TRANSITIONS, no_transition_text(step, final=False), step)
            if self._restored:  # the checkpoint's detectors say whether the run has turned before it
                self._quiet = not any(d.fired for d in self._online.detectors.values())
                self._check_continuity(step)
        self._relog_checkpoint_point(trainer)
        if (self.last_step is None or self.last_step < step) and step % self.every_n_steps == 0:
            self._record(trainer, pl_module, step)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not (self.log_grad_norms and self._dir):
            return
        grads = [(f"{name}/{kind}_grad_norm", p.grad) for name, a, b in self._factors
                 for kind, p in (("A", a), ("B", b)) if p.grad is not None]
        if grads and (trainer.is_global_zero or is_sharded(pl_module.model)):
            # DDP: every rank holds the all-reduced gradients, rank 0 reads them. FSDP2: shards, gathered
            # on every rank (collective). One device->host copy of every (tiny) gradient, norms in numpy.
            flat = torch.cat([full(g.detach()).reshape(-1) for _, g in grads]).float().cpu().numpy()
            bounds = np.cumsum([0] + [g.numel() for _, g in grads])
            norms = {tag: float(np.linalg.norm(flat[i:j])) for (tag, _), i, j in zip(grads, bounds[:-1], bounds[1:])}
            # Logged once the step is done (on_train_batch_end): a step that EMFineTune stops as non-finite
            # never reaches that hook, so its NaN norms never reach the curves.
            self._grad_norms = (trainer.global_step, norms)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self._dir is None or step == self._seen_step:
            return  # no adapter, or mid gradient accumulation: the optimizer has not stepped
        self._seen_step = step
        if self._grad_norms is not None:
            self._add(trainer, self._grad_norms[1], self._grad_norms[0])
            self._grad_norms = None
        if step % self.every_n_steps == 0:
            self._record(trainer, pl_module, step)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._flush(trainer, held=True)  # a run resumed from this checkpoint re-logs only later steps
        self._ckpt_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, held=True)
        if self._quiet and trainer.is_global_zero:  # a run without a detected turn says so at its end
            RunLogger.of(trainer).text(TRANSITIONS, no_transition_text(trainer.global_step, True), trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._relog_checkpoint_point(trainer)  # a resume with nothing left to train has no on_train_start

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._held = []  # a resume from the last checkpoint computes these again: logged now, they would be twice
        self.teardown(trainer, pl_module, "fit")  # every record is already on disk; log and release the files

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._flush(trainer, held=True)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._restored = False

    # -- resume ------------------------------------------------------------------------------------------
    def _relog_checkpoint_point(self, trainer: pl.Trainer) -> None:
        """Log the checkpoint's own point again when the logger purges its step (once per fit)."""
        step, now = trainer.global_step, self._online.last_now
        if self._relogged or not self._restored or self.last_step != step or not now:
            return
        self._relogged = True
        if any(purge_step(logger) is not None and purge_step(logger) <= step for logger in trainer.loggers):
            RunLogger.of(trainer).scalars(now, step, prefix=PREFIX)

    def _check_continuity(self, step: int) -> None:
        """After a resume the files must end at the checkpoint's last point; say loudly what is missing."""
        last, have = self.last_step, self._writer.steps
        if last is None or (have and have[-1] == last):
            return
        first_missing = have[-1] + 1 if have else 0
        why = self._writer.damage or (f"{self._dir} holds no record (deleted?)" if not have else
                                      f"{self._dir} ends at step {have[-1]}")
        reason = (f"AdapterTrajectory: {why}; steps {first_missing}-{last} are missing from the trajectory and "
                  f"cannot be recorded again (export-step cannot rebuild them); recording continues at step "
                  f"{step + 1} (meta.json lists the gap)")
        self._writer.note_gap(first_missing, last, reason)
        rank_zero_warn(reason)

    def _add(self, trainer: pl.Trainer, metrics: dict[str, float], step: int, texts: list[str] = ()) -> None:
        """Scalars (plain names, logged under ``phase/``) and phase/transitions lines of ``step``: held back when
        the step lies before the newest checkpoint (see the module doc), else buffered by the run logger."""
        if self._ckpt_step is not None and step < self._ckpt_step:
            if trainer.is_global_zero:
                self._held.append((step, metrics, list(texts)))
            return
        self._write(trainer, metrics, step, texts)

    def _write(self, trainer: pl.Trainer, metrics: dict[str, float], step: int, texts: list[str]) -> None:
        run_logger = RunLogger.of(trainer)
        run_logger.scalars(metrics, step, prefix=PREFIX, buffered=True)
        for text in texts:
            run_logger.text(TRANSITIONS, text, step)

    def _flush(self, trainer: pl.Trainer, held: bool = False) -> None:
        if held:
            for step, metrics, texts in self._held:
                self._write(trainer, metrics, step, texts)
            self._held = []
        RunLogger.of(trainer).flush()

    # -- recording ---------------------------------------------------------------------------------------
    def _meta(self, pl_module: pl.LightningModule) -> dict:
        config = pl_module.model.peft_config["default"]
        base = getattr(pl_module, "base", None)
        return {
            "rank": config.r, "alpha": config.lora_alpha, "use_rslora": config.use_rslora,
            "kind": "vectors" if config.r == 1 else "direction",
            "target_modules": sorted(config.target_modules) if isinstance(config.target_modules, set)
            else config.target_modules,
            "layers": config.layers_to_transform,
            "base": getattr(base, "name_or_path", None) or config.base_model_name_or_path,
            "base_spec": dataclasses.asdict(base) if dataclasses.is_dataclass(base) else None,
            "every_n_steps": self.every_n_steps, "detector": dict(self.detector_args),  # em-fit report reads it
            "peft_config": json.loads(json.dumps({**config.to_dict(), "inference_mode": True}, default=sorted)),
        }

    @staticmethod
    def _find_factors(pl_module: pl.LightningModule) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return [(n, m.lora_A[ADAPTER_NAME].weight, m.lora_B[ADAPTER_NAME].weight)
                for n, m in lora_layers(pl_module.model)]

    def _vectors(self, pl_module: pl.LightningModule) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{module: (a, b)} as float32 numpy vectors; rank > 1: (v, s * u) of the top singular direction."""
        factors = self._factors or self._find_factors(pl_module)
        # One device->host copy for every module, then numpy views: torch calls cost most at this size.
        flat = torch.cat([full(t.detach()).reshape(-1) for _, a, b in factors for t in (a, b)]).float().cpu().numpy()
        out, i = {}, 0
        for name, a, b in factors:
            A, B = flat[i : i + a.numel()], flat[i + a.numel() : i + a.numel() + b.numel()]
            i += a.numel() + b.numel()
            if a.shape[0] == 1:
                out[name] = (A, B)  # A is 1 x d_in and B is d_out x 1: flat, they are a = A[0] and b = B[:, 0]
            else:  # sign kept continuous with the previous point
                d = lora_direction(torch.from_numpy(A).view(a.shape), torch.from_numpy(B).view(b.shape),
                                   reference=self._online.last_b(name))
                out[name] = (d.v.numpy(), (d.s * d.u).numpy())
        return out

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._process(trainer, pl_module, step, self._vectors(pl_module))

    def _process(self, trainer, pl_module, step: int, vectors: dict[str, tuple]) -> None:
        """Write, compute metrics, run the detectors and announce events for one recorded point.
        ``vectors``: {module: (a, b)} 1-D numpy arrays or CPU tensors."""
        if self._writer is not None:
            self._writer.append(step, vectors)
        point = self._online.update(step, vectors)
        events = [ModuleTransition(**dataclasses.asdict(e), module=name) for name, e in point.events]
        self._add(trainer, point.now, step)
        for at in sorted(point.lagged):  # per tag, steps still arrive in increasing order
            self._add(trainer, point.lagged[at], at)
        for event in events:
            self._add(trainer, {f"{event.module}/transition_step": float(event.step)}, event.step,
                      [f"{event.module}: turn at step {event.step} (local cosine {event.local_cosine:.3f} at "
                       f"k={event.k}), detected at step {event.detected_step}"])
        if events:
            RunLogger.of(trainer).flush()
            self._quiet = False
        for event in events:
            announce(trainer, "on_phase_transition", pl_module, event)
