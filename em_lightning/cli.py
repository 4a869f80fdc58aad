"""``em-fit``: one registry of subcommands (``SUBCOMMANDS``). ``em-fit --help`` lists it without importing
anything heavy; each subcommand's module is imported only when it runs (``fit``/``validate`` then start
LightningCLI, the others never import Lightning)."""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
import warnings


def _fail(message: str, code: int = 1) -> None:
    print(f"em-fit: error: {message}", file=sys.stderr)
    sys.exit(code)


# The subcommands, in the order `em-fit --help` lists them: name -> (module, one line for the listing).
# A module runs as ``module.main(argv)`` with the arguments after the name; those in LIGHTNING_CLI are
# LightningCLI's subcommands instead (EMFitCLI in that module). To add one: a module with main(argv) in
# commands/ and a line here.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("em_lightning.commands.fit", "train (LightningCLI: --config, --print_config=comments, --ckpt_path last)"),
    "validate": ("em_lightning.commands.fit", "val/loss of a config (or --ckpt_path) without training (LightningCLI)"),
    "report": ("em_lightning.commands.report", "figures + report.md of a run directory, finished or running"),
    "eval": ("em_lightning.commands.eval", "sample and judge a run's step, checkpoint or adapter (post hoc)"),
    "export-step": ("em_lightning.commands.export_step", "the rank-1 adapter of any recorded step, PEFT format"),
    "steer": ("em_lightning.commands.steer", "steer the base model with a run's misalignment direction, or ablate it"),
    "direction": ("em_lightning.commands.direction", "compute a misalignment direction after training (for steer)"),
    "data": ("em_lightning.commands.data", "list / fetch the published EM datasets and question files"),
    "judge": ("em_lightning.commands.judge", "calibrate a judge against the published GPT-4o scores (judge calibrate)"),
    "cache": ("em_lightning.commands.cache", "list / clean the converted-GGUF cache"),
    "sweep": ("em_lightning.commands.sweep", "a grid of runs (seeds x settings), here or as a SLURM array; `sweep report`: 95% intervals"),
}
LIGHTNING_CLI = ("fit", "validate")
REFUSED = {  # LightningCLI's other subcommands: no test set or predict step in a fine-tuning run
    "test": "em-fit has no test set: `em-fit validate` (val/loss) or `em-fit eval` (sampled, judged answers)",
    "predict": "em-fit has no predict step: `em-fit eval` samples answers from a run's model",
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: em-fit <subcommand> [options]      (em-fit <subcommand> --help: its options)", "",
             "subcommands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def quiet_known_noise() -> None:
    """Silence start-up lines that say nothing about this run: bitsandbytes' CPU-kernel note (printed on
    every ``import peft``; 4-bit runs on CPU still work), Lightning's litlogger tip, two deprecation
    warnings raised inside PEFT and Lightning, and torch.distributed.checkpoint's notice each time
    Lightning rewrites a sharded last.ckpt (meant). Other warnings stay."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    class _NoTip(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "litlogger" not in str(record.msg)

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTip())
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"Detected an existing checkpoint in .* overwriting since self.overwrite=True")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        sys.exit(0 if args else 2)
    name = args[0]
    if name in REFUSED:
        _fail(f"`em-fit {name}`: {REFUSED[name]}", code=2)
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
        _fail(f"unknown subcommand {name!r}{f' (did you mean {close[0]}?)' if close else ''}; em-fit --help lists them",
              code=2)
    quiet_known_noise()
    try:
        module = importlib.import_module(SUBCOMMANDS[name][0])
        if name not in LIGHTNING_CLI:
            module.main(args[1:])
            return
        module.EMFitCLI(args=argv)  # None: LightningCLI reads sys.argv itself (given both, it warns)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("EM_DEBUG"):
            raise
        # jsonargparse wraps errors raised while building a class (e.g. a callback's bad questions file)
        while isinstance(e.__cause__, (ValueError, FileNotFoundError)):
            e = e.__cause__
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except OSError as e:  # a full disk, a read-only run directory: one line when the error names its path
        # A full disk also fails the teardown's writes (TensorBoard's flush): report the first error
        # that names a path, the one that happened first.
        named = e
        while named is not None and not (isinstance(named, OSError) and named.filename):
            named = named.__context__
        if os.environ.get("EM_DEBUG") or named is None:
            raise
        _fail(f"{named.filename}: {named.strerror or named}")


if __name__ == "__main__":
    main()
