"""The run folder (``--out``): checked before anything starts, never reused silently, locked for
the run's life.

* A path that cannot be a folder (an existing file, a path under a file, a place that cannot be
  written) is a :class:`ConfigError` before any process starts.
* A folder that already holds files is refused: a second run would truncate the first one's
  ``metrics.jsonl`` and leave its ``summary.json``, plot and checkpoint next to the new files, so a
  failed re-run would look finished. ``--overwrite`` moves the old folder aside whole
  (``NAME.old-STAMP``) and starts an empty one: runs are never mixed.
* The run holds an exclusive ``flock`` on ``.lock`` inside the folder until it ends (the kernel
  drops it when the process dies, however it dies), so a second run into the same folder, even
  with ``--overwrite``, is refused while the first is alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from paratrain.errors import ConfigError

LOCK_NAME = ".lock"


class RunFolder:
    """A claimed run folder; ``moved_to`` is where ``--overwrite`` put the previous run."""

    def __init__(self, path: Path, lock_fd: int, moved_to: Path | None = None) -> None:
        self.path, self._fd, self.moved_to = path, lock_fd, moved_to

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_out_path(path: Path) -> None:
    """Refuse a ``--out`` that can never be a folder: an existing file, or a path under a file."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is an existing file, not a folder; give a new or empty "
                          f"folder for the run's outputs.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {str(path)!r} is under {str(parent)!r}, which is a file; give a "
                                  f"folder path whose parents are folders.")
            return


def claim(path: Path, overwrite: bool = False, resume: bool = False) -> RunFolder:
    """Create (or reuse an empty) run folder and lock it; with ``overwrite``, move a previous run
    aside first; with ``resume`` (``--resume``), lock the run's own folder and keep its files.
    Every failure is a ConfigError saying what to do instead."""
    check_out_path(path)
    fd = _lock(path)
    leftovers = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)
    if not leftovers or resume:
        return _held(path, fd)
    if not overwrite:
        os.close(fd)
        shown = ", ".join(leftovers[:6]) + (", ..." if len(leftovers) > 6 else "")
        raise ConfigError(
            f"run folder {str(path)!r} already holds a run ({shown}). A new run would mix its files with "
            f"those. Give a new --out folder, or add --overwrite to move the old folder aside (to "
            f"{path.name}.old-<time>) and start afresh"
            + (f", or continue that run from its latest checkpoint with: paratrain train --resume {path}"
               if (path / "checkpoints" / "latest").is_file() else " (it has no checkpoint to continue from)")
            + ".")
    aside = _aside_name(path)
    os.rename(path, aside)  # whole, lock file included: the old run stays one folder
    os.close(fd)
    return _held(path, _lock(path), moved_to=aside)


def _lock(path: Path) -> int:
    """mkdir -p ``path`` and take the exclusive lock on its lock file."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ConfigError(f"--out {str(path)!r}: cannot create the run folder there ({e.strerror}); give a "
                          f"folder you can write.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"run folder {str(path)!r} is in use by another run (pid {holder}); wait for it "
                          f"to end or give another --out.") from None
    return fd


def _held(path: Path, fd: int, moved_to: Path | None = None) -> RunFolder:
    """The claim succeeded: record our pid (for the message another run gets) and hand it over."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunFolder(path, fd, moved_to)


def _aside_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = path.with_name(f"{path.name}.old-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.old-{stamp}-{n}")
    return aside
