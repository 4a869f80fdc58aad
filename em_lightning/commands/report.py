"""``em-fit report RUN_DIR``: figures and a markdown summary of a run, finished or still running."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from em_lightning.commands import help_parser
from em_lightning.report.analysis import analyse_run
from em_lightning.report.figures import draw_all
from em_lightning.report.mechanistic import draw_mechanistic
from em_lightning.report.summary import write_summary


def main(argv: list[str]) -> None:
    parser = help_parser("em-fit report", __doc__)
    parser.add_argument("run_dir", type=Path, help="run directory (the logger's log_dir)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/report)")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 15], help="local cosine scales to plot")
    parser.add_argument("--detector-k", type=int, default=None,
                        help="transition detector scale (default: the run's, else 8)")
    parser.add_argument("--max-modules", type=int, default=12, help="most modules drawn as separate panels")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.k) or (args.detector_k is not None and args.detector_k < 1):
        raise ValueError("--k and --detector-k must be integers >= 1")

    report = analyse_run(args.run_dir, args.k, args.detector_k)
    out = args.out if args.out is not None else args.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for note in report.notes:
        print(f"em-fit report: note: {note}", file=sys.stderr)
    figures = draw_all(report, out, max_modules=args.max_modules) + draw_mechanistic(report, out)
    write_summary(report, figures, out / "report.md")
    print(f"em-fit report: {len(figures)} figure(s) and report.md in {out}")
