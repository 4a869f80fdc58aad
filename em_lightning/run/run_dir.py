"""One writer per run directory: an exclusively created ``version_N`` and a lock held for the whole run.

``reserve_version`` creates ``<root>/version_N`` with an exclusive ``mkdir``: two runs started at the same
moment under one root get different versions (choosing a number and creating the folder are one step).
``RunDirLock`` holds ``fcntl.flock`` on ``<run_dir>/.lock`` until the process exits (the kernel releases it
even after kill -9), so a second process that resumes or validates a directory in use is refused with one
line instead of writing beside the first. No Lightning.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"
_VERSION = re.compile(r"version_(\d+)")


class RunDirInUse(ValueError):
    """Another live process holds the run directory."""


def _writable(error: OSError, path: Path) -> OSError:
    return OSError(error.errno, f"cannot write the run directory ({error.strerror})", str(path))


def reserve_version(root: str | Path) -> int:
    """Create the next free ``<root>/version_N`` exclusively and return N."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.fullmatch(p.name)) and p.is_dir()]
        n = max(taken, default=-1) + 1
        while True:
            try:
                (root / f"version_{n}").mkdir()
                return n
            except FileExistsError:  # another run took it between our listing and our mkdir
                n += 1
    except OSError as e:
        raise _writable(e, Path(e.filename) if e.filename else root) from None


class RunDirLock:
    """An exclusive, non-blocking lock on a run directory, held until ``release`` or process exit."""

    def __init__(self, run_dir: str | Path):
        self._fd: int | None = None
        self.run_dir = Path(run_dir)
        path = self.run_dir / LOCK_FILE
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _writable(e, self.run_dir) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _writable(e, self.run_dir) from None
            raise RunDirInUse(
                f"{self.run_dir}: in use by another em-fit process ({_holder(path)}); one run directory has one "
                "writer: wait for that run to end, or start a new run (without this config.yaml)"
            ) from None
        self._fd = fd
        try:  # who holds it, for the message a second process prints
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        except OSError:
            pass  # the lock is what matters; the note is a courtesy

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __del__(self) -> None:  # an in-process caller (tests, notebooks) that drops it frees the directory
        self.release()

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        note = path.read_text().strip()
    except OSError:
        note = ""
    return note or "holder unknown"
