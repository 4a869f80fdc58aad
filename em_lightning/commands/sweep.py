"""``em-fit sweep``: a grid of runs (seeds x settings) run one after another here or as a SLURM job
array; ``em-fit sweep report DIR``: means and 95% intervals across seeds, with figures.

    em-fit sweep --config BASE.yaml --grid GRID.yaml --out DIR [--launcher local|slurm] [-- em-fit options]
    em-fit sweep report DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from em_lightning.run.atomic_io import atomic_write
from em_lightning.sweep.figures import draw_sweep
from em_lightning.sweep.grid import load_grid
from em_lightning.sweep.local import run_local
from em_lightning.sweep.plan import SweepPlan, load_plan
from em_lightning.sweep.slurm import SBATCH_FILE, sbatch_script
from em_lightning.sweep.summary import summarize
from em_lightning.sweep.table import markdown_table


def report(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="em-fit sweep report", description="Means and 95%% intervals across seeds.")
    parser.add_argument("out", type=Path, help="the sweep's folder (its --out)")
    args = parser.parse_args(argv)
    plan = load_plan(args.out)
    summary, runs = summarize(plan)
    figure = draw_sweep(summary, runs, plan.out / "sweep_summary.png")
    summary["figures"] = [figure.name] if figure else []
    atomic_write(plan.out / "sweep_summary.json", json.dumps(summary, indent=1, default=str))
    atomic_write(plan.out / "sweep_summary.md", markdown_table(summary))
    missing = [r["cell"] for r in summary["runs"] if r["state"] != "done"]
    if missing:
        print(f"em-fit sweep report: note: {len(missing)} cell(s) not finished: {', '.join(missing)}", file=sys.stderr)
    print(f"em-fit sweep report: {plan.out / 'sweep_summary.json'}, sweep_summary.md"
          + (f", {figure.name}" if figure else ""))


def main(argv: list[str]) -> None:
    if argv[:1] == ["report"]:
        return report(argv[1:])
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(
        prog="em-fit sweep", usage="em-fit sweep --config BASE.yaml --grid GRID.yaml --out DIR [options] [-- em-fit options]",
        description="A grid of em-fit runs (seeds x settings), one after another here or as a SLURM job array; "
                    "options after -- go to every cell's em-fit fit.",
        epilog="em-fit sweep report DIR: means and 95%% intervals across seeds (sweep_summary.json, .md, .png)")
    parser.add_argument("--config", action="append", required=True, help="base config file(s), merged in order")
    parser.add_argument("--grid", type=Path, required=True, help="YAML: dotted option -> list of values")
    parser.add_argument("--out", type=Path, required=True, help="the sweep's folder (runs/, status/, logs/)")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="local: cells one after another here; slurm: write and submit a job array")
    parser.add_argument("--gpus", type=int, default=1, help="slurm: GPUs (tasks) per cell")
    parser.add_argument("--time", default="24:00:00", help="slurm: time limit per cell")
    args = parser.parse_args(argv)
    for config in args.config:
        if not Path(config).is_file():
            raise FileNotFoundError(f"--config {config}: no such file")
    plan = SweepPlan(args.out, list(args.config), load_grid(args.grid), extra)
    for cell in plan.cells:
        for i, arg in enumerate(cell.args()):
            if i and cell.args()[i - 1] == "--config" and not Path(arg).is_file():
                raise FileNotFoundError(f"{args.grid}: config: {arg}: no such file")
    plan.save()
    print(f"em-fit sweep: {len(plan.cells)} cell(s) in {plan.out / 'sweep.json'}")
    if args.launcher == "local":
        code = run_local(plan)
        if code == 0:
            print(f"em-fit sweep: all cells done; summary: em-fit sweep report {plan.out}")
        sys.exit(code)
    script = plan.out / SBATCH_FILE
    atomic_write(script, sbatch_script(plan, os.getcwd(), gpus=args.gpus, time=args.time))
    os.chmod(script, 0o755)
    (plan.out / "logs").mkdir(parents=True, exist_ok=True)
    if shutil.which("sbatch") is None:
        print(f"em-fit sweep: sbatch not found; submit on the cluster with: sbatch {script}")
        return
    done = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    print(done.stdout.strip() or done.stderr.strip())
    sys.exit(done.returncode)
