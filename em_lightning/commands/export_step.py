"""``em-fit export-step RUN_DIR STEP OUT_DIR``: the rank-1 adapter of any recorded step, in PEFT format."""

from __future__ import annotations

import argparse

from em_lightning.commands import help_parser
from em_lightning.phase.reconstruct import export_step_adapter
from em_lightning.run.outputs import refuse_run_record


def main(argv: list[str] | None = None) -> None:
    """``em-fit export-step RUN_DIR STEP OUT_DIR``."""
    parser = help_parser("em-fit export-step", export_step_adapter.__doc__)
    parser.add_argument("run_dir", help="run directory (or its trajectory/ folder)")
    parser.add_argument("step", type=int, help="a recorded global step")
    parser.add_argument("out_dir", help="folder to write the PEFT adapter to")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow OUT_DIR inside a run's own adapter/, generations/, trajectory/ or checkpoints/")
    args = parser.parse_args(argv)
    refuse_run_record(args.out_dir, "OUT_DIR", args.overwrite)
    print(export_step_adapter(args.run_dir, args.step, args.out_dir))
