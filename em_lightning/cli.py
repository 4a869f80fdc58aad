"""``em-fit``: extra subcommands (report, eval) are dispatched first, so they start without importing
Lightning; everything else goes to EMFitCLI (LightningCLI: fit, validate, ...)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings


def _fail(message: str) -> None:
    print(f"em-fit: error: {message}", file=sys.stderr)
    sys.exit(1)


# Subcommands that are not LightningCLI's: name -> "module:function(argv)"; imported only when used.
EXTRA_SUBCOMMANDS = {
    "report": "em_lightning.commands.report:main",
    "eval": "em_lightning.commands.eval:main",
    "export-step": "em_lightning.commands.export_step:main",
    "data": "em_lightning.commands.data:main",
    "steer": "em_lightning.commands.steer:main",
}


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
    quiet_known_noise()
    try:
        if args and args[0] in EXTRA_SUBCOMMANDS:
            module, function = EXTRA_SUBCOMMANDS[args[0]].split(":")
            getattr(importlib.import_module(module), function)(args[1:])
            return
        from em_lightning.commands.fit import EMFitCLI

        EMFitCLI(args=argv)  # None: LightningCLI reads sys.argv itself
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
