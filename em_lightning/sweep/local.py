"""The local launcher: a sweep's cells one after another, each an ``em-fit fit`` process (no pool, no
scheduler of our own; for many cells at once use the SLURM launcher). A signal (SIGTERM, Ctrl-C) is
passed on to the running cell, whose run keeps its last checkpoint; the cell is marked interrupted and
the sweep exits, so the same command later resumes it with ``--ckpt_path last``."""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time

from em_lightning.sweep.grid import Cell
from em_lightning.sweep.plan import DONE, FAILED, INTERRUPTED, RUNNING, SweepPlan

EM_FIT = [sys.executable, "-m", "em_lightning.cli"]


def cell_command(plan: SweepPlan, cell: Cell) -> tuple[list[str], bool]:
    """(em-fit arguments, resumed?): a cell with a last.ckpt resumes from it; one without starts afresh
    (whatever a run killed before its first checkpoint left in its run directory is removed first)."""
    args = plan.fit_args(cell)
    if plan.can_resume(cell):
        return args + ["--ckpt_path", "last"], True
    return args, False


def run_local(plan: SweepPlan, log=print) -> int:
    """Run every unfinished cell; returns 0, or the first failing exit code (143/130 when interrupted)."""
    stop: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum, frame):
        stop.append(signum)
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    before = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    failed = 0
    try:
        cells = plan.cells
        for cell in cells:
            if stop:
                break
            if plan.status(cell).get("state") == DONE:
                log(f"em-fit sweep: [{cell.index + 1}/{len(cells)}] {cell.name}: done already, skipped")
                continue
            args, resumed = cell_command(plan, cell)
            if not resumed and plan.run_dir(cell).exists():
                shutil.rmtree(plan.run_dir(cell))  # a run killed before any checkpoint: nothing to resume
            log(f"em-fit sweep: [{cell.index + 1}/{len(cells)}] {cell.name}: {'resuming' if resumed else 'starting'}"
                f" (log: {plan.log_path(cell)})")
            plan.log_path(cell).parent.mkdir(parents=True, exist_ok=True)
            plan.set_status(cell, RUNNING, resumed=resumed, command="em-fit " + shlex.join(args),
                            run_dir=str(plan.run_dir(cell)))
            start = time.monotonic()
            with open(plan.log_path(cell), "a") as out:
                # Its own session: a Ctrl-C reaches the sweep only, which passes it on exactly once.
                child[:] = [subprocess.Popen(EM_FIT + args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)]
                code = child[0].wait()
            state = DONE if code == 0 else INTERRUPTED if stop else FAILED
            plan.set_status(cell, state, returncode=code, wall_s=round(time.monotonic() - start, 1))
            log(f"em-fit sweep: {cell.name}: {state} (exit {code}, {time.monotonic() - start:.0f} s)")
            if state == FAILED:
                failed = failed or code
                log(f"em-fit sweep: {cell.name}: see {plan.log_path(cell)}")
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if stop:
        return 128 + stop[0]
    return failed
