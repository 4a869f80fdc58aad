"""EMFitCLI: the LightningCLI behind ``em-fit fit|validate``."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from em_lightning.callbacks.checkpointing import StepCheckpoint, checkpoint_global_step
from em_lightning.data import ChatDataModule
from em_lightning.module import EMFineTune

DEFAULT_RUNS_DIR = "runs"
LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


class PinnedRunConfig(SaveConfigCallback):
    """Saves config.yaml in the run directory with the logger's resolved version written in, so that
    ``--config <run_dir>/config.yaml`` (resume, extend) points at the same run directory."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":  # `em-fit validate` on a run must not replace the run's training config
            return
        logger_cfg = self.config.get("trainer", {}).get("logger")
        if trainer.logger is not None and logger_cfg is not None and "init_args" in logger_cfg:
            logger_cfg.init_args.version = trainer.logger.version
        super().setup(trainer, pl_module, stage)


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
            },
        )
        super().__init__(EMFineTune, ChatDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.base", "data.base")
        # Always on, configurable as `checkpoint.every_n_train_steps: N` etc.
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        logger = cfg.trainer.get("logger")
        root = cfg.trainer.get("default_root_dir")
        # --trainer.default_root_dir DIR places the run directory under DIR.
        if root and logger and "init_args" in logger and logger.init_args.get("save_dir") == DEFAULT_RUNS_DIR:
            logger.init_args.save_dir = root

    def _run_dir(self) -> Path:
        return Path(self.trainer.logger.log_dir)

    def before_fit(self) -> None:
        self.datamodule.load_rows()  # bad rows fail here, on every rank, before anything is written
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") == "last":
            cfg["ckpt_path"] = str(self._resolve_last())
        if cfg.get("ckpt_path"):
            self._continue_curves(Path(cfg["ckpt_path"]))

    def before_validate(self) -> None:
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") == "last":
            cfg["ckpt_path"] = str(self._resolve_last())

    def _resolve_last(self) -> Path:
        path = self._run_dir() / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(
                f"--ckpt_path last: no checkpoint at {path}; resume with --config <run_dir>/config.yaml "
                "(it pins the run directory) or pass --ckpt_path PATH"
            )
        return path

    def _continue_curves(self, ckpt: Path) -> None:
        # TensorBoard drops events at or after purge_step from earlier files: steps logged after the
        # checkpoint by the interrupted run are replaced by the resumed run's, never duplicated.
        logger = self.trainer.logger
        if logger is None or not hasattr(logger, "_kwargs"):
            return
        logger._kwargs["purge_step"] = checkpoint_global_step(ckpt)
