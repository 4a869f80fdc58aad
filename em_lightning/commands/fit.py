"""EMFitCLI: the LightningCLI behind ``em-fit fit|validate``."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from em_lightning.run.atomic_io import TMP_MARK, remove_stale_temporaries
from em_lightning.callbacks.checkpointing import AtomicCheckpointIO, StepCheckpoint
from em_lightning.callbacks.progress import StepProgressBar
from em_lightning.callbacks.step_validation import StepValidation
from em_lightning.run.checkpoint_integrity import check_checkpoint, check_resume_checkpoint
from em_lightning.run.checkpoints import (
    checkpoint_fingerprint,
    checkpoint_global_step,
    checkpoint_mid_epoch,
    checkpoint_run_limits,
    run_finished,
)
from em_lightning.lit.datamodule import ChatDataModule
from em_lightning.run.fingerprint import ALL, GLOBAL_BATCH, compare, file_identity, flatten, model_identity
from em_lightning.loggers.logger_compat import (
    hide_epoch_scalar,
    open_csv,
    pin_version,
    purge_step,
    set_purge_step,
    version_unset,
)
from em_lightning.lit.module import EMFineTune
from em_lightning.run.run_dir import RunDirLock, reserve_version
from em_lightning.loggers.run_logger import drop_texts_from
from em_lightning.training.schedule import planned_steps, resolve_schedule_steps

DEFAULT_RUNS_DIR = "runs"
LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
RESUME_LOG = "resume_log.jsonl"  # in the run directory: every change a resume accepted with --allow_changed
# Never part of the fingerprint: options that do not decide the trained result (speed, memory, workers), and
# the run's length, which an extension changes (model.schedule_steps like trainer.max_steps: see README).
NOT_FINGERPRINTED = ("model.padding_free", "model.validate_before_training", "model.sharding",
                     "model.base.gradient_checkpointing", "model.base.attn_implementation", "data.num_workers",
                     "data.base", "model.schedule_steps")  # data.base is a linked copy of model.base


class PinnedRunConfig(SaveConfigCallback):
    """Saves config.yaml in the run directory with the logger's resolved version written in, so that
    ``--config <run_dir>/config.yaml`` (resume, extend) points at the same run directory. Written when
    training starts, after the checkpoint was restored: a resume that fails before (a checkpoint that does
    not fit the model) leaves the run's config.yaml as it was."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass  # see on_train_start; `em-fit validate` on a run must not replace the run's training config

    def on_train_start(self, trainer, pl_module) -> None:
        logger_cfg = self.config.get("trainer", {}).get("logger")
        if trainer.logger is not None and logger_cfg is not None and "init_args" in logger_cfg:
            logger_cfg.init_args.version = trainer.logger.version
        self.config.allow_changed = None  # one resume's permission, not the run's: recorded in resume_log.jsonl
        # Written under a temporary name, then renamed: a crash mid-write keeps the previous config.yaml.
        log_dir = trainer.log_dir  # collective (a broadcast): every rank
        final, self.config_filename = self.config_filename, f"{self.config_filename}{TMP_MARK}{os.getpid()}"
        try:
            super().setup(trainer, pl_module, "fit")
        finally:
            tmp, self.config_filename = Path(log_dir, self.config_filename), final
        if trainer.is_global_zero and tmp.is_file():
            os.replace(tmp, Path(log_dir, final))


class EMFitCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", PinnedRunConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # EMFineTune owns its optimizer and LR schedule
        kwargs.setdefault(
            "trainer_defaults",
            {
                "logger": {"class_path": LOGGER, "init_args": {"save_dir": DEFAULT_RUNS_DIR, "name": "em"}},
                "use_distributed_sampler": False,  # ChatDataModule shards itself (resumable order)
                "log_every_n_steps": 1,
                "enable_model_summary": False,  # its FLOPs column reads 0; configure_optimizers prints counts
            },
        )
        try:
            super().__init__(EMFineTune, ChatDataModule, *args, **kwargs)
        except BaseException:
            self._discard_failed_start()
            raise

    def _discard_failed_start(self) -> None:
        """A fresh run that failed before its first training step (target modules that resolve to nothing, a
        missing judge key: found while the trainer sets up, after the run directory was claimed) leaves no
        ``version_N`` behind: remove what it wrote. A resumed run's directory is never removed."""
        fresh = getattr(self, "_fresh_run_dir", None)
        model = getattr(self, "model", None)
        if fresh is None or model is None or getattr(model, "training_started", False):
            return
        lock = getattr(self, "_run_dir_lock", None)
        if lock is not None:
            lock.release()
        shutil.rmtree(fresh, ignore_errors=True)
        try:
            fresh.parent.rmdir()  # the run name's folder, when this was its only run
        except OSError:
            pass

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would replace the config's model options by the checkpoint's hyperparameters: a
        checkpoint of another run would silently become the model trained. Here the config decides, and
        the run fingerprint (fingerprint.py) refuses a checkpoint that is not of the config's run."""

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        # An explicit --ckpt_path is checked right after parsing: a corrupt file is one line naming it, not an
        # UnpicklingError traceback.
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt != "last" and Path(ckpt).is_file():
            check_checkpoint(ckpt)
            self._checked_ckpt = str(ckpt)

    def instantiate_trainer(self, **kwargs):
        # The step-counting bar, unless the user turned bars off or brought their own.
        trainer_cfg = self.config_init[self.subcommand]["trainer"]
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if trainer_cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            trainer_cfg["callbacks"] = [*callbacks, StepProgressBar()]
        # val/loss every trainer.val_check_interval optimizer steps of the run, across epochs (step_validation.py);
        # first, so that its schedule is printed before the bar starts
        trainer_cfg["callbacks"] = [StepValidation(), *(trainer_cfg.get("callbacks") or [])]
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:  # no "epoch" card first in TensorBoard: the x axis is the optimizer step
            hide_epoch_scalar(logger)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own CheckpointIO stays
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.base", "data.base")
        parser.add_argument(
            "--allow_changed", type=list[str] | str | None, default=None,
            help="resume although these fields changed since the checkpoint: a field, a group like model.adapter, "
                 "or all; several as F1,F2 or [F1, F2]. Each accepted change is printed and recorded in "
                 "<run_dir>/resume_log.jsonl")
        # Always on, configurable as `checkpoint.every_n_train_steps: N` etc.
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        logger = cfg.trainer.get("logger")
        root = cfg.trainer.get("default_root_dir")
        # --trainer.default_root_dir DIR places the run directory under DIR.
        if root and logger and "init_args" in logger and logger.init_args.get("save_dir") == DEFAULT_RUNS_DIR:
            logger.init_args.save_dir = root
        if logger and "init_args" in logger and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
            # Its hp_metric is a -1 placeholder logged at step 0 by every start: a resumed run would log it twice.
            logger.init_args.default_hp_metric = False

    def _run_dir(self) -> Path:
        return Path(self.trainer.logger.log_dir)

    def before_fit(self) -> None:
        self._check_inputs()
        cfg = self.config_init[self.subcommand]
        self.model.run_fingerprint = self._fingerprint()  # written into every checkpoint (module.on_save_checkpoint)
        accepted: list[str] = []
        if cfg.get("ckpt_path"):
            accepted = self._check_same_run(Path(cfg["ckpt_path"]))
            self._apply_extension_policy(Path(cfg["ckpt_path"]))
        self._check_warmup()
        if cfg.get("ckpt_path"):
            self._continue_curves(Path(cfg["ckpt_path"]))
        self._claim_run_dir()
        if accepted:
            self._record_accepted(Path(cfg["ckpt_path"]), accepted)

    def after_fit(self) -> None:
        # The one line a newcomer needs at the end: where the run is and how to look at it (rank 0).
        log_dir, logger = self.trainer.log_dir, self.trainer.logger
        if self.trainer.is_global_zero and log_dir is not None and logger is not None:
            view = (f"view with: tensorboard --logdir {logger.save_dir}" if isinstance(logger, TensorBoardLogger)
                    else f"metrics written by {type(logger).__name__}")
            print(f"em-fit: run in {log_dir}; {view}; summary: em-fit report {log_dir}", flush=True)

    def before_validate(self) -> None:
        self._check_inputs()
        self._claim_run_dir()

    def _check_inputs(self) -> None:
        """Bad inputs fail here, on every rank, before anything is written: rows (file:line), the chat
        template on every row and the tokenizer (a missing model path or hub id), the checkpoint to resume
        from. (Question files were checked when the callbacks were built, options by their classes.)"""
        self.datamodule.load_rows()
        self.datamodule.setup(self.subcommand)  # encodes every row; Lightning's own setup call then returns
        cfg = self.config_init[self.subcommand]
        asked = cfg.get("ckpt_path")
        if asked == "last":
            cfg["ckpt_path"] = str(self._resolve_last())
        if cfg.get("ckpt_path") and str(cfg["ckpt_path"]) != getattr(self, "_checked_ckpt", None):
            check_resume_checkpoint(cfg["ckpt_path"], resolved_from_last=asked == "last")

    def _claim_run_dir(self) -> None:
        """One writer per run directory. Rank 0 creates a fresh run's ``version_N`` exclusively (two runs
        started at once get two versions) and holds ``<run_dir>/.lock`` until it exits, so a resume of a
        directory a live process holds is refused. Other ranks get rank 0's directory through
        ``trainer.log_dir`` (a broadcast), as every callback asks for it."""
        if self.trainer.global_rank != 0:
            return
        logger = self.trainer.logger
        if logger is not None and hasattr(logger, "root_dir") and version_unset(logger):
            pin_version(logger, reserve_version(logger.root_dir))  # TensorBoard/CSV loggers pick it lazily
            self._fresh_run_dir = Path(logger.log_dir)  # created here: removed again if the start fails
        for each in self.trainer.loggers:  # a resume replaces what the interrupted run logged from its checkpoint on
            open_csv(each)  # a CSVLogger would delete the run's metrics.csv on its first write
            if (step := purge_step(each)) is not None:
                drop_texts_from(each, step)
        log_dir = self.trainer.log_dir  # no process group yet: the local value, no broadcast
        if log_dir is None:  # a logger with no local folder: nothing of the run is written here
            return
        run_dir = Path(log_dir)
        self._run_dir_lock = RunDirLock(run_dir)
        remove_stale_temporaries(run_dir)  # what a killed writer left; no other writer can be alive now

    def _resolve_last(self) -> Path:
        path = self._run_dir() / "checkpoints" / "last.ckpt"
        if not path.exists():  # a file, or a folder of shards (FSDP2)
            raise FileNotFoundError(
                f"--ckpt_path last: no checkpoint at {path}; resume with --config <run_dir>/config.yaml "
                "(it pins the run directory) or pass --ckpt_path PATH"
            )
        return path

    def _apply_extension_policy(self, ckpt: Path) -> None:
        """Extending a run: the limit raised on resume governs, the other one no longer stops it.

        A run planned with ``max_epochs: 1`` and extended with ``--trainer.max_steps 800`` trains to step
        800 (the epoch limit is lifted); one planned with ``max_steps`` and extended with a larger
        ``--trainer.max_epochs`` trains those epochs. Unchanged limits (a plain resume) stay as they are.
        """
        before = checkpoint_run_limits(ckpt)
        if before is None:
            return
        loop = self.trainer.fit_loop

        def raised(now, then) -> bool:  # -1 / None: no limit; setting one where there was none raises it
            return now not in (-1, None) and (then in (-1, None) or now > then)

        steps_raised = raised(loop.max_steps, before["max_steps"])
        epochs_raised = raised(loop.max_epochs, before["max_epochs"])
        if steps_raised and not epochs_raised and loop.max_epochs not in (-1, None):
            rank_zero_info(f"extension: max_steps {before['max_steps']} -> {loop.max_steps}; "
                           f"max_epochs={loop.max_epochs} lifted")
            loop.max_epochs = -1
        elif epochs_raised and not steps_raised and loop.max_steps != -1:
            rank_zero_info(f"extension: max_epochs {before['max_epochs']} -> {loop.max_epochs}; "
                           f"max_steps={loop.max_steps} lifted")
            loop.max_steps = -1

    def _continue_curves(self, ckpt: Path) -> None:
        # TensorBoard drops events at or after purge_step from earlier files: steps logged after the
        # checkpoint by the interrupted run are replaced by the resumed run's, never duplicated. train/* of
        # step k are logged at k (before the step's update), so the purge is at the checkpoint's step k; tags
        # logged at the step whose weights they measure (val/loss, phase/*) are logged again at k by the
        # resumed run. A finished run resumed with nothing left to train purges nothing (it logs nothing).
        # A CSVLogger's metrics.csv keeps its rows before k (logger_compat.open_csv, when rank 0 claims the run
        # directory); W&B and MLflow have no purge: there the steps from k on are logged twice.
        loop = self.trainer.fit_loop
        if not run_finished(ckpt, loop.max_steps, loop.max_epochs):
            for logger in self.trainer.loggers:
                set_purge_step(logger, checkpoint_global_step(ckpt))

    # -- the same run, or refused ----------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, object]:
        """Everything that decides the trained result (fingerprint.py), from the parsed config and the
        files it names: model and adapter options, the base model's files, data options and the data files'
        content, seed, optimizer and schedule, the global batch and its factors, gradient clipping and
        precision, and the init args of callbacks that declare ``affects_training = True``."""
        cfg = self.config[self.subcommand]
        t, dm = self.trainer, self.datamodule
        fields = flatten({"seed_everything": cfg.get("seed_everything"),
                          "model": cfg.model.as_dict(), "data": cfg.data.as_dict()})
        fields = {k: v for k, v in fields.items() if not any(k == n or k.startswith(n + ".") for n in NOT_FINGERPRINTED)}
        base = self.model.base
        fields.update(flatten({"model.base.files": model_identity(base.name_or_path, base.gguf_file) or {}}))
        fields["data.train_files.content"] = [file_identity(f) for f in dm.train_files]
        fields.update({
            "trainer.world_size": t.world_size,
            "trainer.accumulate_grad_batches": t.accumulate_grad_batches,
            GLOBAL_BATCH: t.world_size * dm.batch_size * t.accumulate_grad_batches,
            "trainer.gradient_clip_val": t.gradient_clip_val,
            "trainer.gradient_clip_algorithm": str(t.gradient_clip_algorithm),
            "trainer.precision": str(t.precision),
        })
        for i, entry in enumerate(cfg.trainer.get("callbacks") or []):
            class_path = str(entry.get("class_path", ""))
            module, _, name = class_path.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError, ValueError):
                continue
            if getattr(cls, "affects_training", False):  # e.g. a defense that adds a loss term
                args = entry.get("init_args")
                fields.update(flatten({f"callbacks.{i}.{name}": args.as_dict() if args is not None else {}}))
        return fields

    def _check_same_run(self, ckpt: Path) -> list[str]:
        """Refuse a checkpoint whose fingerprint differs from this config's, one line per field; returns the
        changes --allow_changed accepted."""
        given = self.config[self.subcommand].get("allow_changed") or []
        allowed = [f.strip() for item in ([given] if isinstance(given, str) else given) for f in item.split(",") if f.strip()]
        saved = checkpoint_fingerprint(ckpt)
        if saved is None:
            if ALL not in allowed:
                raise ValueError(
                    f"--ckpt_path {ckpt}: saved before em-fit recorded a run fingerprint, so it cannot be checked "
                    "against this config; if this config is the checkpoint's run, resume with --allow_changed all")
            return [f"{ckpt}: checkpoint without a run fingerprint, accepted as it is (--allow_changed all)"]
        refused, accepted = compare(saved, self.model.run_fingerprint, allowed,
                                    factors_may_change=not checkpoint_mid_epoch(ckpt))
        if refused:
            if self.trainer.global_rank == 0:
                for line in refused:
                    print(f"em-fit: changed since the checkpoint: {line}", file=sys.stderr)
            raise ValueError(
                f"--ckpt_path {ckpt}: this config is not the checkpoint's run ({len(refused)} field(s) changed, listed "
                "above); start a new run, or resume anyway with --allow_changed FIELD ... (recorded in the run directory)")
        return accepted

    def _record_accepted(self, ckpt: Path, accepted: list[str]) -> None:
        for line in accepted:
            rank_zero_info(f"resume: accepted change (--allow_changed): {line}")
        log_dir = self.trainer.log_dir
        if self.trainer.global_rank != 0 or log_dir is None:
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(ckpt),
                  "step": checkpoint_global_step(ckpt), "accepted": accepted, "argv": sys.argv[1:]}
        with open(Path(log_dir, RESUME_LOG), "a") as f:  # append-only: one line per resume
            f.write(json.dumps(record) + "\n")

    def _check_warmup(self) -> None:
        """A warmup longer than the run never reaches model.lr: an error naming both numbers, before
        anything is written."""
        if self.subcommand != "fit":
            return
        t, hp = self.trainer, self.model.hparams
        steps = planned_steps(t.max_steps, t.max_epochs, self.datamodule.batches_per_epoch(t.world_size),
                              t.accumulate_grad_batches)
        total = resolve_schedule_steps(hp.schedule_steps, steps, hp.schedule)
        if hp.warmup_steps > total:
            raise ValueError(f"model.warmup_steps: {hp.warmup_steps} is longer than the run's {total} optimizer steps "
                             f"(its LR schedule): the learning rate would never reach model.lr={hp.lr}; lower "
                             "model.warmup_steps")
