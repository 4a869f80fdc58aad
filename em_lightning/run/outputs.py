"""A run directory's own records are written by its run alone: ``export-step`` and ``eval --out`` pointed at
them (a typo, a tab-completed path) would silently replace the run's final adapter or its judged points.
No Lightning."""

from __future__ import annotations

from pathlib import Path

# What a run writes for itself: its final adapter, judged in-loop points, trajectory and checkpoints.
RUN_RECORDS = ("adapter", "generations", "trajectory", "checkpoints")


def run_record(path: str | Path) -> Path | None:
    """The run-owned folder (``<run_dir>/adapter`` etc.) that ``path`` is or lies inside, else None.
    A run directory is a folder holding ``config.yaml``."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if folder.name in RUN_RECORDS and (folder.parent / "config.yaml").is_file():
            return folder
    return None


def refuse_run_record(path: str | Path, option: str, overwrite: bool) -> None:
    """Raise one line when ``path`` is inside a run's own records and ``overwrite`` was not given."""
    folder = run_record(path)
    if folder is not None and not overwrite:
        raise ValueError(f"{option} {path}: that is the run's own {folder.name}/ folder ({folder}); writing there "
                         "would replace what the run recorded: choose another folder, or pass --overwrite")
