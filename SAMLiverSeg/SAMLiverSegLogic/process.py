"""A Qt-free manager for one background process (batch segmentation, training, ...).

The pattern of SlicerMONAIAuto3DSeg, without Qt and **without threads**: Python threads barely
run inside Slicer (its main thread holds the GIL while Qt idles), so the child's stdout/stderr
pipes are read non-blocking by :meth:`BackgroundProcess.poll`, which the GUI calls from a
``QTimer`` (or from a ``QSocketNotifier`` on :meth:`BackgroundProcess.read_fds`, POSIX). Each
``poll()`` reads what the pipes hold now and returns at once; the pipes are drained on every
call, so a chatty child never blocks on a full pipe for longer than one timer period.

Non-blocking reads: on POSIX ``os.set_blocking(fd, False)`` and ``os.read`` until EAGAIN; on
Windows (where ``os.set_blocking`` on pipes needs Python 3.12) ``_winapi.PeekNamedPipe`` says how
many bytes wait, and only those are read. The POSIX path is what the tests run; the Windows path
is written from the documented API and untested here. ``QSocketNotifier`` on the fds is POSIX only.

Lines that are JSON objects are parsed (``samliverseg`` progress events); other lines arrive as
``{"event": "log", "text": line}``. By default stderr is merged into stdout; with
``separate_stderr=True`` it is read from its own pipe and its lines always arrive as
``{"event": "log", "text": line, "stream": "stderr"}`` (never parsed as JSON: the training
protocol keeps progress on stdout and human logs on stderr).

Stopping: :meth:`BackgroundProcess.cancel` terminates the tree and waits (blocking, up to
``kill_timeout``); :meth:`BackgroundProcess.terminate` only asks the main process to stop
(SIGTERM; CTRL_BREAK_EVENT on Windows) and returns at once. A signal to a process started
through a launcher (Slicer's ``PythonSlicer`` is a CTK launcher that does not forward signals)
reaches the launcher only: a trainer is stopped through its control file instead
(``training_process``), with :func:`kill_process_tree` as the last resort.
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
import sys
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
    # binary pipes, unbuffered on our side: BackgroundProcess reads the file descriptors directly
    return subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                            env=env, cwd=cwd, bufsize=0, **kwargs)


def _alive(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs, timeout: float) -> list:
    """Wait until ``procs`` have exited; return those still alive. Never reaps (``waitpid``) a
    process: a child of this process is reaped by its ``Popen``, which then gets its real exit
    status (reaped here, ``Popen`` would report 0 for a killed process)."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [p for p in alive if _alive(p)]
    return alive


def kill_process_tree(pid: int, timeout: float = 5.0, force: bool = False) -> List[int]:
    """Terminate ``pid`` and all its descendants; kill whatever is alive after ``timeout`` s.

    Returns the pids that had to be killed (did not exit on terminate). ``force``: kill at once
    (no terminate first; every process of the tree is returned). The descendants are listed
    before anything is signalled, so that none escapes by being re-parented.
    """
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.kill() if force else p.terminate()
        except psutil.NoSuchProcess:
            pass
    alive = procs if force else _wait_gone(procs, timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _wait_gone(alive, timeout)
    return [p.pid for p in alive]


class PipeReader:
    """Reads one pipe without blocking and without a thread; splits it into text lines.

    Works on the file descriptor (a text-mode ``Popen`` stream works too: its Python buffer is
    bypassed, and nothing else may read from it)."""

    def __init__(self, stream, name: str):
        self.name = name
        self.fd = stream.fileno()
        self.stream = stream
        self.eof = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._handle = None
        if os.name == "nt":  # pragma: no cover - Windows
            import msvcrt

            self._handle = msvcrt.get_osfhandle(self.fd)
        else:
            os.set_blocking(self.fd, False)

    def _read_available(self) -> bytes:
        chunks = []
        while not self.eof:
            if self._handle is not None:  # pragma: no cover - Windows
                import _winapi

                try:
                    avail = _winapi.PeekNamedPipe(self._handle, 0)[0]
                except (BrokenPipeError, OSError):
                    self.eof = True
                    break
                if avail <= 0:
                    break
                data = os.read(self.fd, avail)
            else:
                try:
                    data = os.read(self.fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    self.eof = True
                    break
            if not data:
                self.eof = True
                break
            chunks.append(data)
        return b"".join(chunks)

    def read_lines(self, final: bool = False) -> List[str]:
        """The complete lines that arrived since the last call; at EOF or when ``final`` (the
        process has ended), the unterminated rest too."""
        final = final or self.eof
        text = self._partial + self._decoder.decode(self._read_available(), final=final)
        lines = text.split("\n")
        self._partial = lines.pop()
        if final and self._partial:
            lines.append(self._partial)
            self._partial = ""
        return [ln.rstrip("\r") for ln in lines]

    def close(self) -> None:
        self.eof = True
        try:
            self.stream.close()
        except OSError:
            pass


@dataclass
class BackgroundProcess:
    """One subprocess whose stdout (and stderr) lines :meth:`poll` reads without blocking."""

    args: Sequence[str]
    env: Optional[Dict[str, str]] = None
    cwd: Optional[str] = None
    launcher: Callable = _default_launcher
    kill_timeout: float = 5.0
    #: read stderr apart (its lines are logs, never JSON events); the launcher is then called
    #: with ``separate_stderr=True`` and must return a Popen whose ``stderr`` is a pipe
    separate_stderr: bool = False

    proc: Optional[subprocess.Popen] = field(default=None, init=False)
    returncode: Optional[int] = field(default=None, init=False)
    #: the real exit status (``returncode`` is :data:`CANCELLED` after :meth:`cancel`)
    exit_code: Optional[int] = field(default=None, init=False)
    cancelled: bool = field(default=False, init=False)
    lines: List[str] = field(default_factory=list, init=False)
    started_at: float = field(default=0.0, init=False)
    _readers: List[PipeReader] = field(default_factory=list, init=False)

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
        self._readers = [PipeReader(self.proc.stdout, "stdout")]
        if self.separate_stderr and self.proc.stderr is not None:
            self._readers.append(PipeReader(self.proc.stderr, "stderr"))
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def read_fds(self) -> List[int]:
        """The pipe file descriptors still open (for a ``QSocketNotifier``, POSIX only)."""
        return [r.fd for r in self._readers if not r.eof]

    def is_running(self) -> bool:
        return self.proc is not None and self.returncode is None and self.proc.poll() is None

    def _read(self, final: bool = False) -> List[Dict]:
        events = []
        for reader in self._readers:
            for line in reader.read_lines(final):
                self.lines.append(line)
                if reader.name == "stderr":
                    events.append({"event": "log", "text": line, "stream": "stderr"})
                else:
                    events.append(parse_line(line))
        return events

    def poll(self) -> List[Dict]:
        """New events since the last call; never blocks. Sets :attr:`returncode` when done.

        Once the process has exited, what it wrote is already in the pipes: one more read
        takes it all, without waiting for an EOF that a leftover grandchild holding the pipe
        would delay forever."""
        if self.proc is None or self.returncode is not None:
            return []
        rc = self.proc.poll()
        events = self._read()
        if rc is not None:
            events += self._read(final=True)
            for reader in self._readers:
                reader.close()
            self.exit_code = rc
            self.returncode = CANCELLED if self.cancelled else rc
            events.append({"event": "finished", "returncode": self.returncode})
        return events

    def finished(self) -> bool:
        return self.returncode is not None

    def wait(self, timeout: Optional[float] = None, interval: float = 0.01) -> Optional[int]:
        """Poll until the process ends (scripts and tests; a GUI polls from a timer instead).
        Returns the return code, or None on timeout. Events polled here are only in :attr:`lines`."""
        if self.proc is None:
            return None
        t0 = time.monotonic()
        while not self.finished():
            self.poll()
            if self.finished():
                break
            if timeout is not None and time.monotonic() - t0 > timeout:
                return None
            time.sleep(interval)
        return self.returncode

    def terminate(self) -> bool:
        """Ask the main process to stop (SIGTERM; CTRL_BREAK_EVENT on Windows); never blocks.

        Its children are not signalled, and a launcher that does not forward signals
        (PythonSlicer) keeps them from its child: see the module docstring. Returns False if it
        has ended.
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
        self.poll()
        return killed
