"""On-disk adapter trajectory: one adapter vector pair per module per recorded step, append-only.

Layout of a trajectory directory (``<run_dir>/trajectory/``)::

    meta.json          run facts (rank, alpha, use_rslora, kind, base, ...) plus "modules":
                       {name: {"d_in": int, "d_out": int}} once the first record is written
    index.jsonl        one line per record, {"step": s, "record": i}, written AFTER the record's data
    <name>.A.f32       raw float32 (native byte order: little-endian on x86/ARM), record i at bytes [i*d_in*4, (i+1)*d_in*4)
    <name>.B.f32       same for the d_out vector

The index is the source of truth: a record exists when its index line is complete. A crash mid-write leaves
at most a torn index line and/or data bytes past the last indexed record; readers ignore both, and a writer
reopening the directory cuts them off. Appending never rewrites history (fixed-size records, so offsets
follow from the record number). A data file holding fewer records than the index (truncated or damaged:
no process crash does that) makes a reopening writer copy the folder to ``<dir>.damaged-N`` first, then cut
every file to the last complete record (``TrajectoryWriter.damage`` says what happened); steps a resumed
run cannot record again are listed in meta.json's ``"gaps"``.

What a record holds (``meta["kind"]``):
- ``"vectors"`` (rank-1 LoRA): the raw factors, a = A[0] (d_in) and b = B[:, 0] (d_out). The adapter of
  that step is fully defined by them (see reconstruct.py).
- ``"direction"`` (rank > 1): the top singular direction of B @ A from ``lora_direction``: a = v (unit,
  d_in), b = s * u (d_out). Enough for rotation metrics, not to rebuild the adapter.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from em_lightning.run.atomic_io import atomic_write, named

INDEX = "index.jsonl"
META = "meta.json"
_F32 = 4  # bytes per float32


@dataclass
class Trajectory:
    steps: torch.Tensor  # (n,) int64 global steps, increasing
    a: dict[str, torch.Tensor]  # module name -> (n, d_in) float32
    b: dict[str, torch.Tensor]  # module name -> (n, d_out) float32
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.steps.numel())


def trajectory_dir(path: Path | str) -> Path:
    """Accept a trajectory directory or a run directory that holds ``trajectory/``."""
    path = Path(path)
    if not (path / INDEX).is_file() and (path / "trajectory" / INDEX).is_file():
        return path / "trajectory"
    return path


def _data_files(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.A.f32", directory / f"{name}.B.f32"


def _read_index(directory: Path) -> tuple[list[int], list[int]]:
    """(steps, byte offset where each line ends) of the complete, valid index lines."""
    steps, ends, pos = [], [], 0
    path = directory / INDEX
    if not path.is_file():
        return steps, ends
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # torn last line: the crash happened while writing it
            try:
                step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                break
            if steps and step <= steps[-1]:
                break
            pos += len(line)
            steps.append(step)
            ends.append(pos)
    return steps, ends


def _read_meta(directory: Path) -> dict:
    path = directory / META
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True))  # readers see the old or the new file


def _complete(directory: Path, modules: dict, n: int) -> int:
    """How many of the n indexed records are fully in the data files. Without fsync an OS crash may
    lose data the index already refers to; a process crash cannot (data is flushed first)."""
    for name, dims in modules.items():
        for path, d in zip(_data_files(directory, name), (dims["d_in"], dims["d_out"])):
            n = min(n, (path.stat().st_size if path.is_file() else 0) // (d * _F32))
    return n


def _short_files(directory: Path, modules: dict, n: int) -> list[str]:
    """Data files holding fewer than n complete records."""
    return [path.name for name, dims in modules.items()
            for path, d in zip(_data_files(directory, name), (dims["d_in"], dims["d_out"]))
            if (path.stat().st_size if path.is_file() else 0) // (d * _F32) < n]


def _keep_copy(directory: Path) -> Path:
    """Copy a damaged trajectory folder beside it (``trajectory.damaged-N``) before it is cut."""
    n = 1
    while (copy := directory.with_name(f"{directory.name}.damaged-{n}")).exists():
        n += 1
    shutil.copytree(directory, copy)
    return copy


def read_trajectory(directory: Path | str) -> Trajectory:
    """Read every complete record. Safe on a running run (reads the index first, then only indexed
    bytes) and after a crash (a torn last record is ignored). Accepts a run directory too."""
    directory = trajectory_dir(directory)
    if not (directory / META).is_file():
        raise FileNotFoundError(f"no trajectory at {directory} (missing {META})")
    steps, _ = _read_index(directory)
    meta = _read_meta(directory)
    modules = meta.get("modules", {})
    n = _complete(directory, modules, len(steps))
    a, b = {}, {}
    for name, dims in modules.items():
        for out, path, d in zip((a, b), _data_files(directory, name), (dims["d_in"], dims["d_out"])):
            with open(path, "rb") as f:
                raw = bytearray(f.read(n * d * _F32))
            out[name] = torch.frombuffer(raw, dtype=torch.float32).reshape(n, d) if n else torch.zeros(0, d)
    return Trajectory(torch.tensor(steps[:n], dtype=torch.int64), a, b, meta)


def _numel(v) -> int:
    return int(v.numel() if isinstance(v, torch.Tensor) else np.size(v))


def _f32_bytes(v) -> bytes:
    if isinstance(v, torch.Tensor):
        if v.dtype != torch.float32 or v.device.type != "cpu" or v.requires_grad:
            v = v.detach().to("cpu", torch.float32)
        v = v.numpy()  # one torch call on the hot path: each costs microseconds
    return np.ascontiguousarray(v, dtype=np.float32).tobytes()


class TrajectoryWriter:
    """Append records to a trajectory directory; reopening an existing one continues it.

    Each ``append`` writes the data files, flushes them, then writes and flushes the index line (with
    ``fsync=True`` also fsyncs both, so a record survives an OS crash, not just a process crash).
    """

    def __init__(self, directory: Path | str, meta: dict, fsync: bool = False):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        old = _read_meta(self.directory)
        steps, _ = _read_index(self.directory)
        complete = _complete(self.directory, old.get("modules", {}), len(steps))
        self.damage: str | None = None  # what a damaged trajectory lost when this writer opened it
        if complete < len(steps):
            short = _short_files(self.directory, old["modules"], len(steps))
            copy = _keep_copy(self.directory)
            kept = f"steps {steps[0]}-{steps[complete - 1]}" if complete else "no record"
            self.damage = (f"{', '.join(short)}: fewer records than the index's {len(steps)} (truncated or damaged); "
                           f"the trajectory keeps its {complete} complete record(s) ({kept}); the damaged files "
                           f"are kept in {copy}")
        steps = steps[:complete]
        if steps and old.get("kind", meta.get("kind")) != meta.get("kind", old.get("kind")):
            raise ValueError(f"{self.directory} holds {old['kind']!r} records; cannot append {meta['kind']!r} ones")
        self.meta = {**old, **meta}
        if "modules" in old:
            self.meta["modules"] = old["modules"]  # the layout of the records already on disk
        _write_json_atomic(self.directory / META, self.meta)
        self._files: dict[str, tuple] = {}
        self._index = None
        self._steps = steps
        self._cut(len(steps))  # drop a torn tail left by a crash

    @property
    def steps(self) -> list[int]:
        return list(self._steps)

    def note_gap(self, first: int, last: int, reason: str) -> None:
        """Record in meta.json that steps ``first``..``last`` are missing and will not be recorded."""
        self.meta.setdefault("gaps", []).append({"first_step": int(first), "last_step": int(last), "reason": reason})
        _write_json_atomic(self.directory / META, self.meta)

    def append(self, step: int, vectors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write the record of ``step`` (greater than every recorded step): {module: (a, b)} 1-D vectors
        (tensors, any dtype/device, or numpy arrays), stored as float32."""
        step = int(step)
        if self._steps and step <= self._steps[-1]:
            raise ValueError(f"trajectory steps must increase: got {step} after {self._steps[-1]}")
        modules = self.meta.get("modules")
        shapes = {n: {"d_in": _numel(a), "d_out": _numel(b)} for n, (a, b) in vectors.items()}
        if modules is None:
            if any(os.sep in n or n.startswith(".") for n in shapes):
                raise ValueError(f"module names must be plain file names: {sorted(shapes)}")
            self.meta["modules"] = modules = shapes
            _write_json_atomic(self.directory / META, self.meta)
        elif shapes != modules:
            raise ValueError(f"record modules/shapes {shapes} differ from the trajectory's {modules}")
        self._open()
        f = None
        try:  # a full disk: one OSError naming the file; the torn tail is cut when the writer reopens
            for name, (a, b) in vectors.items():
                for f, v in zip(self._files[name], (a, b)):
                    f.write(_f32_bytes(v))
            for pair in self._files.values():
                for f in pair:
                    self._flush(f)
            f = self._index
            f.write((json.dumps({"step": step, "record": len(self._steps)}) + "\n").encode())
            self._flush(f)
        except OSError as e:
            raise named(e, f.name if f is not None else self.directory) from None
        self._steps.append(step)

    def truncate_after(self, step: int) -> None:
        """Drop every record with a step greater than ``step`` (a resumed run re-records them). With no
        record left, the module layout is forgotten too, so a fresh run may record other modules."""
        keep = sum(1 for s in self._steps if s <= step)
        self._cut(keep)

    def _cut(self, keep: int) -> None:
        self.close()
        _, ends = _read_index(self.directory)
        index = self.directory / INDEX
        if index.is_file():  # index first: it is the truth, so data past it is already ignored
            os.truncate(index, ends[keep - 1] if keep else 0)
        for name, dims in self.meta.get("modules", {}).items():
            for path, d in zip(_data_files(self.directory, name), (dims["d_in"], dims["d_out"])):
                if path.is_file():
                    if keep:
                        os.truncate(path, min(path.stat().st_size, keep * d * _F32))
                    else:
                        path.unlink()
        self._steps = self._steps[:keep]
        if not keep and ("modules" in self.meta or "gaps" in self.meta):
            self.meta.pop("modules", None)
            self.meta.pop("gaps", None)
            _write_json_atomic(self.directory / META, self.meta)

    def _open(self) -> None:
        if self._index is None:
            self._files = {n: tuple(open(p, "ab") for p in _data_files(self.directory, n)) for n in self.meta["modules"]}
            self._index = open(self.directory / INDEX, "ab")

    def _flush(self, f) -> None:
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())

    def close(self) -> None:
        for f in [*(f for pair in self._files.values() for f in pair), *([self._index] if self._index else [])]:
            f.close()
        self._files, self._index = {}, None

