"""Run em-fit as a subprocess (the way users run it) and read what a run directory holds."""

import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[2]
SMOKE = str(REPO / "configs" / "smoke.yaml")
# Small and fast, same code path as the demo.
FAST = ["--trainer.val_check_interval", "4", "--checkpoint.every_n_train_steps", "2"]


def em_fit(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("EM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "em_lightning.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def fake_slurm(tmp_path: Path, **env: str) -> dict[str, str]:
    """An environment whose ``srun`` and ``scontrol`` are stand-ins: each call appends its arguments to
    ``tmp_path/srun.log`` / ``scontrol.log``; srun exits with ``$SRUN_EXIT`` (default 0). No cluster needed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/srun.log\nexit ${{SRUN_EXIT:-0}}\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("config.yaml"))


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]
