"""A Qt-free manager for one background process (batch segmentation, training, ...).

The pattern of SlicerMONAIAuto3DSeg, without Qt: the process writes lines on stdout; a reader
thread puts them on a queue; the GUI polls (:meth:`BackgroundProcess.poll`) from a ``QTimer``,
so Slicer never blocks. :meth:`BackgroundProcess.cancel` terminates the whole process tree
(children first, with psutil), waits, then kills what is left.

Lines that are JSON objects are parsed (``samliverseg`` progress events); other lines arrive as
``{"event": "log", "text": line}``. By default stderr is merged into stdout; with
``separate_stderr=True`` it is read by a second thread and its lines always arrive as
``{"event": "log", "text": line, "stream": "stderr"}`` (never parsed as JSON: the training
protocol keeps progress on stdout and human logs on stderr).

Stopping: :meth:`BackgroundProcess.cancel` terminates the tree and waits (blocking, up to
``kill_timeout``); :meth:`BackgroundProcess.terminate` only asks the main process to stop
(SIGTERM; CTRL_BREAK_EVENT on Windows, where the process has its own process group) and returns
at once, so that a GUI can let a trainer finish its step and kill the tree later if it must
(``kill_process_tree(pid, force=True)``).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

#: Exit code reported when the user cancelled.
CANCELLED = -1001


def samliverseg_command(*args: str, python: Optional[str] = None) -> List[str]:
    """The command line of ``samliverseg ARGS`` run by ``python`` (default: this interpreter)."""
    return [python or sys.executable, "-m", "samliverseg.cli.commands", *[str(a) for a in args]]


def parse_line(line: str) -> Dict:
    text = line.rstrip("\r\n")
    s = text.strip()
    if s.startswith("{") and s.endswith("}"):
        try:
            obj = json.loads(s)
            if isinstance(obj, dict):
                obj.setdefault("event", "json")
                return obj
        except ValueError:
            pass
    return {"event": "log", "text": text}


def _default_launcher(args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                      separate_stderr: bool = False):
    kwargs = {}
    if os.name == "nt":
        kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(
            subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
    stderr = subprocess.PIPE if separate_stderr else subprocess.STDOUT
    return subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                            env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)


def kill_process_tree(pid: int, timeout: float = 5.0, force: bool = False) -> List[int]:
    """Terminate ``pid`` and all its descendants; kill whatever is alive after ``timeout`` s.

    Returns the pids that had to be killed (did not exit on terminate). ``force``: kill at once
    (no terminate first; every process of the tree is returned).
    """
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    procs = parent.children(recursive=True) + [parent]
    for p in procs:
        try:
            p.kill() if force else p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=0 if force else timeout)
    if force:
        alive = procs
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in alive]


@dataclass
class BackgroundProcess:
    """One subprocess whose stdout lines are read in a thread and polled by the caller."""

    args: Sequence[str]
    env: Optional[Dict[str, str]] = None
    cwd: Optional[str] = None
    launcher: Callable = _default_launcher
    kill_timeout: float = 5.0
    #: read stderr apart (its lines are logs, never JSON events); the launcher is then called
    #: with ``separate_stderr=True`` and must return a Popen whose ``stderr`` is a text pipe
    separate_stderr: bool = False

    proc: Optional[subprocess.Popen] = field(default=None, init=False)
    returncode: Optional[int] = field(default=None, init=False)
    #: the real exit status (``returncode`` is :data:`CANCELLED` after :meth:`cancel`)
    exit_code: Optional[int] = field(default=None, init=False)
    cancelled: bool = field(default=False, init=False)
    lines: List[str] = field(default_factory=list, init=False)
    started_at: float = field(default=0.0, init=False)
    _queue: "queue.Queue" = field(default_factory=queue.Queue, init=False)
    _thread: Optional[threading.Thread] = field(default=None, init=False)
    _reader_done: threading.Event = field(default_factory=threading.Event, init=False)
    _err_done: threading.Event = field(default_factory=threading.Event, init=False)

    def start(self) -> "BackgroundProcess":
        if self.proc is not None:
            raise RuntimeError("the process was already started")
        self.started_at = time.monotonic()
        env = self.env
        if env is None:
            env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.separate_stderr:
            self.proc = self.launcher(list(self.args), env=env, cwd=self.cwd, separate_stderr=True)
        else:
            self.proc = self.launcher(list(self.args), env=env, cwd=self.cwd)
        self._thread = threading.Thread(target=self._read, args=(self.proc.stdout, "stdout", self._reader_done),
                                        name="samliverseg-process-reader", daemon=True)
        self._thread.start()
        if self.separate_stderr and self.proc.stderr is not None:
            threading.Thread(target=self._read, args=(self.proc.stderr, "stderr", self._err_done),
                             name="samliverseg-process-stderr", daemon=True).start()
        else:
            self._err_done.set()
        return self

    def _read(self, stream, name: str, done: threading.Event) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((name, line))
        except (ValueError, OSError):  # stream closed under us on cancel
            pass
        finally:
            done.set()

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def is_running(self) -> bool:
        return self.proc is not None and self.returncode is None and self.proc.poll() is None

    def _drain(self) -> List[Dict]:
        events = []
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                return events
            self.lines.append(line.rstrip("\r\n"))
            if name == "stderr":
                events.append({"event": "log", "text": line.rstrip("\r\n"), "stream": "stderr"})
            else:
                events.append(parse_line(line))

    def poll(self) -> List[Dict]:
        """New events since the last call (never blocks); sets :attr:`returncode` when done."""
        events = self._drain()
        if self.proc is not None and self.returncode is None:
            rc = self.proc.poll()
            if rc is not None and self._reader_done.wait(timeout=0.5) and self._err_done.wait(timeout=0.5):
                events += self._drain()  # what the readers queued after our first pass
                self.exit_code = rc
                self.returncode = CANCELLED if self.cancelled else rc
                events.append({"event": "finished", "returncode": self.returncode})
        return events

    def finished(self) -> bool:
        return self.returncode is not None

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until the process ends (for scripts and tests; a GUI polls instead)."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader_done.wait(timeout=5)
        self._err_done.wait(timeout=5)
        self.poll()
        return self.returncode

    def terminate(self) -> bool:
        """Ask the main process to stop (SIGTERM; CTRL_BREAK_EVENT on Windows); never blocks.

        Its children are not signalled (a trainer stops its own workers; data-loader workers
        killed under it would turn a clean stop into a crash). Returns False if it has ended.
        """
        if self.proc is None or self.returncode is not None or self.proc.poll() is not None:
            return False
        try:
            self.proc.send_signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGTERM)
        except (OSError, ValueError):
            return False
        return True

    def cancel(self) -> List[int]:
        """Stop the process and everything it started. Returns the pids that needed a kill."""
        if self.proc is None or self.returncode is not None:
            return []
        self.cancelled = True
        killed = kill_process_tree(self.proc.pid, timeout=self.kill_timeout)
        try:
            self.proc.wait(timeout=self.kill_timeout)
        except subprocess.TimeoutExpired:
            pass
        self._reader_done.wait(timeout=2)
        self._err_done.wait(timeout=2)
        self.poll()
        return killed
