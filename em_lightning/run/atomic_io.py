"""Writes that cannot half-happen: a temporary file in the same directory, flushed, fsynced, renamed.

A crash, a kill -9 or a full disk leaves the previous file (or none) under the final name, never a
truncated one; what is left is a ``<name>.em-tmp-<pid>`` file that the next run holding the run
directory removes (``remove_stale_temporaries``). Errors are OSErrors that name the final path. No Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_MARK = ".em-tmp-"


def named(error: OSError, path: str | Path, what: str = "") -> OSError:
    """The same error with ``path`` as its filename (``f.write`` errors carry none), so cli.py can print
    one line: ``<path>: <strerror><what>``."""
    return OSError(error.errno, f"{error.strerror or error}{what}", str(path))


class _Recorder:
    """A file wrapper that keeps the first OSError: torch.save turns a failed write into a cryptic
    RuntimeError ('unexpected pos 768 vs 662') and the real cause would be lost."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object] | bytes | str, fsync: bool = True) -> Path:
    """Write ``path`` all or nothing: ``write`` is the content (bytes or text) or a function that writes
    to a binary file object."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise named(e, path.parent) from None
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            f = _Recorder(raw)
            try:
                if callable(write):
                    write(f)
                else:
                    f.write(write.encode("utf-8") if isinstance(write, str) else write)
            except Exception as e:
                if f.error is not None and not isinstance(e, OSError):
                    raise f.error from None
                raise
            raw.flush()
            if fsync:
                os.fsync(raw.fileno())
        os.replace(tmp, path)  # atomic on one file system: readers see the old file or the new one
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise named(e, path, f" (not written; {path.name} keeps its previous content, if any)") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(directory: str | Path, depth: int = 2) -> list[Path]:
    """Delete ``*.em-tmp-*`` files left by a killed writer under ``directory`` (``depth`` levels). Only
    safe while holding the directory's lock (run_dir.RunDirLock): then no writer is alive."""
    directory = Path(directory)
    found = [p for level in range(depth) for p in directory.glob("/".join(["*"] * level + [f"*{TMP_MARK}*"]))]
    for p in found:
        if p.is_file():
            p.unlink(missing_ok=True)
    return found
