"""The SLURM launcher: one job array, one array task per cell (the cluster schedules them). Each task runs
its cell's ``em-fit fit`` under ``srun`` (Lightning reads SLURM's environment for multi-GPU cells), with
``--ckpt_path last`` whenever the cell's run directory holds a checkpoint: a requeued task (preemption,
``--requeue``) or a resubmitted array continues each run where it stopped, and finished cells
(``status/<cell>.json`` says done) exit at once. As in scripts/slurm/em-fit.sbatch: SLURM sends SIGUSR1
``--signal`` seconds before the time limit, em-fit saves the step under way and exits 138, and the task
requeues itself; a preempted task (SIGTERM, exit 143) is requeued by SLURM (``--requeue``)."""

from __future__ import annotations

import shlex

from em_lightning.sweep.plan import SweepPlan

SBATCH_FILE = "sweep.sbatch"

HEADER = """#!/bin/bash
# em-fit sweep: {n} cells of {out}/sweep.json as one SLURM job array (written by em-fit sweep --launcher slurm).
#   sbatch {script}                     # submit (again: finished cells exit at once, others resume)
#   em-fit sweep report {out}            # means and 95% intervals across seeds, when the cells are done
# Adjust the resources below to one cell's run; --array=...%N caps how many cells run at once.
#SBATCH --job-name=em-sweep
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node={gpus}
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task=8
#SBATCH --time={time}
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={out}/logs/slurm-%A_%a.out
set -uo pipefail
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-8}}
cd {cwd}
"""

BODY = """
status="{out}/status/${{cell}}.json"
if grep -q '"state": "done"' "$status" 2>/dev/null; then echo "$cell: done already"; exit 0; fi
resume=()
if [ -e "{out}/runs/$cell/version_0/checkpoints/last.ckpt" ]; then resume=(--ckpt_path last); fi
mkdir -p "{out}/status"
echo "{{\\"state\\": \\"running\\", \\"job\\": \\"${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}\\"}}" > "$status"
srun em-fit "${{args[@]}}" "${{resume[@]}}" \\
  --trainer.num_nodes "$SLURM_JOB_NUM_NODES" --trainer.devices "$SLURM_NTASKS_PER_NODE"
code=$?
if [ $code -eq 0 ]; then
  echo "{{\\"state\\": \\"done\\", \\"returncode\\": 0}}" > "$status"
elif [ $code -eq 138 ] || [ $code -eq 143 ]; then  # stopped by a signal: the step under way is saved
  echo "{{\\"state\\": \\"interrupted\\", \\"returncode\\": $code}}" > "$status"
  # SIGUSR1 before the time limit: queue this task again (a preempted one, 143, SLURM requeues itself)
  if [ $code -eq 138 ]; then scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"; fi
else
  echo "{{\\"state\\": \\"failed\\", \\"returncode\\": $code}}" > "$status"
fi
exit $code
"""


def sbatch_script(plan: SweepPlan, cwd: str, gpus: int = 1, time: str = "24:00:00") -> str:
    """The job array script: a ``case`` over ``$SLURM_ARRAY_TASK_ID`` sets each cell's name and em-fit
    arguments (the same as the local launcher's), then the common body runs it."""
    cells = plan.cells
    out = shlex.quote(str(plan.out))
    lines = [HEADER.format(n=len(cells), out=out, script=f"{out}/{SBATCH_FILE}", last=len(cells) - 1, gpus=gpus,
                           time=time, cwd=shlex.quote(cwd)),
             "case $SLURM_ARRAY_TASK_ID in"]
    for cell in cells:
        args = " ".join(shlex.quote(a) for a in plan.fit_args(cell))
        lines.append(f"  {cell.index}) cell={shlex.quote(cell.name)}; args=({args}) ;;")
    lines.append('  *) echo "no cell $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;')
    lines.append("esac")
    return "\n".join(lines) + BODY.format(out=out)
