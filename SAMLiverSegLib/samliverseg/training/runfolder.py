"""The run folder of a training: who may write in it, what it holds, where a resume starts.

* **The lock**: ``OUTPUT/.lock`` holds ``PID host`` of the trainer that owns the folder, taken with
  an OS lock (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows) that the OS releases when the
  process ends, however it ends: a second trainer in the same folder is refused (exit 2) while the
  first runs; the lock file a killed trainer leaves behind does not block (its lock died with it).
  The file itself is kept (emptied on release): removing it could let two trainers lock two files.
* **What the folder holds** (:func:`run_state`): ``model.pth`` = a finished run, ``last.pt`` /
  ``best.pt`` = a started run. A new run (no ``--resume``) into a folder that holds either is
  refused (exit 2, nothing touched) unless ``--overwrite`` is given, which removes them first.
* **Stale temporary files** (``.last.pt.*.tmp`` ...: a process killed while writing a checkpoint)
  never block anything: the owner of the lock removes them (:func:`remove_stale_tmp`).
* **Where ``--resume`` starts** (:func:`resume_source`): the newest complete checkpoint, ``last.pt``,
  else ``best.pt`` when it holds the same or a later step (a kill while ``last.pt`` was being
  written right after ``best.pt``); ``None`` when there is none.
* **The stop file** ``OUTPUT/STOP`` (:class:`StopFile`): its appearance asks the trainer to stop
  exactly as SIGTERM does; a STOP written before the trainer started is removed when a run starts
  (one written while it starts stops it at its first check).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from samliverseg.core.atomic import is_temp_name
from samliverseg.core.errors import CheckpointError, InputError
from samliverseg.training import checkpoint as ck

LOCK_NAME = ".lock"
STOP_NAME = "STOP"
#: The environment variable a launcher sets to the text it writes into ``STOP`` (see StopFile).
STOP_TOKEN_ENV = "SAMLIVERSEG_STOP_TOKEN"
#: Files that make a folder hold a run (a new run there needs --resume or --overwrite).
RUN_FILES = (ck.MODEL_NAME, ck.LAST_NAME, ck.BEST_NAME)


class RunLock:
    """An exclusive OS lock on ``folder/.lock`` (see the module docstring); :meth:`acquire` raises
    InputError (exit 2) naming the PID and host of the trainer that holds it."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.fd: Optional[int] = None
        self.marked = False

    def acquire(self) -> "RunLock":
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_fd(fd)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise InputError(f"the run folder {self.path.parent} is in use by another trainer ({holder}); "
                             f"wait for it, stop it, or choose another --output") from None
        self.fd = fd
        return self

    def mark(self) -> None:
        """Write ``PID host`` into the lock file (after the folder checks passed: a refused run leaves
        the folder as it was); for the message of a refused second trainer only, so a write error
        (a full disk) is ignored."""
        if self.fd is None:
            return
        self.marked = True
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.write(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode())

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        if self.marked:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            _unlock_fd(fd)
        os.close(fd)


#: Windows locks byte ranges (mandatory): lock one far beyond the ``PID host`` text.
_WIN_LOCK_OFFSET = 1 << 20


def _lock_fd(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt
        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)  # a byte past the text: the PID stays readable
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
    else:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock_fd(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt
        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
    else:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_UN)


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 200).decode(errors="replace").split()
    except OSError:
        text = []
    return f"PID {text[0]} on {text[1]}" if len(text) >= 2 else "PID unknown"


def run_state(folder: Path) -> Optional[str]:
    """``"finished"`` (``model.pth``), ``"started"`` (``last.pt``/``best.pt``) or None."""
    folder = Path(folder)
    if (folder / ck.MODEL_NAME).exists():
        return "finished"
    if (folder / ck.LAST_NAME).exists() or (folder / ck.BEST_NAME).exists():
        return "started"
    return None


def refuse_new_run(folder: Path, state: str) -> InputError:
    what = "a finished run (model.pth)" if state == "finished" else "a started run (last.pt/best.pt)"
    return InputError(f"the run folder {folder} holds {what}: continue it with --resume, start it over with "
                      f"--overwrite, or choose another --output")


def remove_run_files(folder: Path) -> List[str]:
    """--overwrite: remove the checkpoints and model of the previous run (embeddings, keyed by their
    content, are kept and reused). Returns the names removed."""
    gone = []
    for name in RUN_FILES:
        p = Path(folder) / name
        if p.exists():
            p.unlink()
            gone.append(name)
    return gone


def remove_stale_tmp(folder: Path) -> List[Path]:
    """Remove the temporary files of writes that never finished (only the lock's owner calls this):
    ``.NAME.*.tmp*`` (``core.atomic.is_temp_name``) in the folder and in ``embeddings/``."""
    gone = []
    for where in (Path(folder), Path(folder) / "embeddings"):
        if not where.is_dir():
            continue
        for p in where.iterdir():
            if is_temp_name(p.name) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    gone.append(p)
    return gone


def resume_source(folder: Path, log: Any = None) -> Optional[Path]:
    """The checkpoint a ``--resume`` starts from (module docstring); a checkpoint that cannot be
    read is skipped (and logged) when the other one is complete."""
    found: Dict[Path, int] = {}
    errors: List[str] = []
    for name in (ck.LAST_NAME, ck.BEST_NAME):
        p = Path(folder) / name
        if not p.exists():
            continue
        try:
            found[p] = int(ck.load_checkpoint(p).get("step") or 0)
        except CheckpointError as exc:
            errors.append(str(exc))
    if not found:
        if errors:
            raise CheckpointError(f"--resume: no readable checkpoint in {folder} ({errors[0]})")
        return None
    if errors and log is not None:
        log(f"warning: {errors[0]}; resuming from the other checkpoint")
    last, best = Path(folder) / ck.LAST_NAME, Path(folder) / ck.BEST_NAME
    if last in found and (best not in found or found[last] >= found[best]):
        return last
    return best


class StopFile:
    """``folder/STOP``: :meth:`seen` is True once it has appeared (checked at most once per call)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / STOP_NAME
        self.hit = False

    def seen(self) -> bool:
        if not self.hit and self.path.exists():
            self.hit = True
        return self.hit

    def remove_left_over(self) -> bool:
        """At start: remove a ``STOP`` left by an earlier run, never one meant for this run.

        A launcher that manages the file (the Slicer panel) gives the trainer a token in
        ``SAMLIVERSEG_STOP_TOKEN`` and writes that token into ``STOP``: a file holding it is this
        run's (a Stop pressed while the trainer was starting) and stops the run at its first check,
        before any step. Without a token, a file written before this process started (with 0.5 s
        for the rounding of the start time) is a left-over."""
        try:
            token = os.environ.get(STOP_TOKEN_ENV, "").strip()
            if token:
                if self.path.read_text(encoding="utf-8", errors="replace").strip() == token:
                    return False
            else:
                import psutil

                if self.path.stat().st_mtime >= psutil.Process().create_time() + 0.5:
                    return False
        except FileNotFoundError:
            return False
        except Exception:  # noqa: BLE001 - unreadable, or no start time: a left-over
            pass
        return self.remove()

    def remove(self) -> bool:
        """Remove the file (a left-over one at start, or the one that stopped this run)."""
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError:
            return False


__all__ = ["LOCK_NAME", "RUN_FILES", "STOP_NAME", "STOP_TOKEN_ENV", "RunLock", "StopFile", "refuse_new_run", "remove_run_files",
           "remove_stale_tmp", "resume_source", "run_state"]
