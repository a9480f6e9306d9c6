"""A Qt-free client of the persistent inference worker (``samliverseg worker``).

Slicer's process never runs model code: the worker (a separate Python, ``PythonSlicer`` or any
Python that has ``samliverseg``) holds the model, the volume and the embedding cache. This client
starts it, says ``hello`` (a worker of another protocol version is refused with a clear
message), sends requests and reads the answers. The protocol is ``SAMLiverSegLib/WORKER_PROTOCOL.md``;
its constants, framing and array files come from ``samliverseg.service.protocol``, which is pure
(json and numpy: importing this module imports neither torch nor any model code).

Two ways to wait:

* a GUI never blocks: it watches :meth:`WorkerClient.fileno` (the worker's stdout pipe) with a
  ``QSocketNotifier`` (or QProcess-like signals) and calls :meth:`WorkerClient.poll`, which returns
  at once with whatever messages are complete (progress events and final responses). After a
  restart the pipe is a new one: :attr:`WorkerClient.starts` counts the starts, so a GUI that
  sees it change makes a new notifier.
* scripts and tests call :meth:`WorkerClient.wait` (or :meth:`WorkerClient.request`), which
  blocks in ``select`` on that pipe until the answer arrives or the timeout passes.

A worker that dies (killed, crashed, out of memory) is noticed on the pipe: every request in
flight gets a one-line error response (exit code 70), and the next :meth:`WorkerClient.send`
starts a new worker, says hello again and reloads the last volume before the new request, all
pipelined (nothing waits). A request sent with a ``timeout`` that passes gets an error response
and a ``cancel`` is sent for it. :meth:`WorkerClient.shutdown` asks the worker to stop and
kills its process tree if it does not within ``shutdown_timeout``.

One worker for the whole module: :func:`shared_client` is the accessor the Segment Editor effect,
the module panel's "Segment liver/tumor" and the uncertainty overlay all use. It returns the one
client while the settings (python, model, checkpoint, device, backend, precision, decoder_precision,
window, env, cache_mb) stay the same; when they change it shuts the old worker down and makes a new client,
which starts its worker on its first request. :func:`shutdown_shared_client` stops it (module or
effect cleanup, application exit; it is also registered with ``atexit``).

How a GUI uses it without ever blocking (WORKER_PROTOCOL.md, "How the GUI uses the client"):
each user (the effect session, a panel run) opens its own :class:`Channel`
(:meth:`WorkerClient.channel`); ``rid = channel.send(...)`` (starts the worker if needed, never
waits for it); then :meth:`WorkerClient.watch` says which pipe to watch (a new
``QSocketNotifier`` when it changed); when the pipe is readable, :meth:`Channel.poll` returns the
complete messages of that user's requests at once. Whichever user's notifier fires first reads
the pipe for all of them: the others' messages wait in their inboxes and their ``notify``
callback is called (their notifier will not fire for them). Messages of a closed channel are
dropped with a log line. :meth:`WorkerClient.next_timeout` says when to poll anyway for a request
timeout (``QTimer.singleShot``). :meth:`WorkerClient.cancel` returns at once; the cancelled
request ends with its own exit-code-130 response. ``client.send``/``client.poll`` without a
channel are the plain single-user API (scripts, tests): one more owner.

The worker holds one volume: :attr:`WorkerClient.volume_key` is the :func:`volume_node_key` of the
volume last sent, and :meth:`Channel.ensure_volume_node` sends ``load_volume`` only when the worker
holds another (the panel loaded its own, maybe of the same geometry; or the voxels changed), so
each user's requests run on its own volume (requests run in the order sent: nothing waits).

Arrays (the volume, masks) travel as ``.npy`` files in a session folder this client owns (in
``/dev/shm`` when present); :meth:`WorkerClient.read_array` reads a result into memory and removes
its file.

Transports (``transport=``): ``"pipe"`` (the POSIX default: requests on the worker's stdin,
messages on its stdout) or ``"socket"`` (the Windows default, where ``select`` and
``QSocketNotifier`` do not work on pipes: the client listens on 127.0.0.1, the worker started with
``--connect`` connects back and proves itself with a token from its environment; its stdin then
only tells it when the client is gone). The messages are the same. Both are tested on Linux; the
socket transport has not been run on Windows itself (no Windows here).
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from samliverseg.service import protocol

from .process import kill_process_tree

log = logging.getLogger(__name__)

#: ``pending(owner=ANY_OWNER)``: the requests of every owner.
ANY_OWNER = object()

#: The fields of a prompt/propagate request for IJK Prompts (markups): ``client.send("propagate", **prompt_fields(p))``.
prompt_fields = protocol.prompt_fields

#: The exit code of a response the client makes up itself (the worker died, a timeout passed).
EXIT_WORKER_LOST = protocol.EXIT_UNEXPECTED


class WorkerError(Exception):
    """A request that failed; ``str()`` is the one-line message for the user."""

    def __init__(self, message: str, exit_code: int = EXIT_WORKER_LOST, request_id: Optional[int] = None):
        super().__init__(message)
        self.exit_code = int(exit_code)
        self.request_id = request_id


class WorkerTimeout(WorkerError):
    """:meth:`WorkerClient.wait` ran out of time (the request itself goes on unless cancelled)."""


def check_hello(result: Dict[str, Any], expected: int = protocol.PROTOCOL_VERSION) -> None:
    """Refuse a worker that answered ``hello`` with another protocol version (WorkerError, exit 2)."""
    theirs = result.get("protocol")
    if theirs != expected:
        raise WorkerError(f"the inference worker speaks protocol {theirs} (samliverseg {result.get('version', '?')}), "
                          f"this SAMLiverSeg module speaks {expected}: install the library that comes with the module",
                          protocol.EXIT_INPUT)


#: Exit codes 128 + N a launcher reports when the Python it started died of signal N (POSIX shells
#: do so; the worker itself never exits with them).
LAUNCHER_SIGNAL_CODES = tuple(128 + int(getattr(signal, n)) for n in ("SIGKILL", "SIGSEGV", "SIGABRT", "SIGBUS")
                              if hasattr(signal, n))


def describe_exit(returncode: Optional[int], log_tail: str = "") -> str:
    """Why a worker ended, in words (for the one-line error of the requests it left behind)."""
    if returncode is None:
        return "the inference worker stopped answering"
    signum = -returncode if returncode < 0 else 0
    if returncode in LAUNCHER_SIGNAL_CODES:  # a launcher (PythonSlicer, a shell) whose Python was killed
        signum = returncode - 128
    if signum:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        if signum == getattr(signal, "SIGKILL", 9):
            return f"the inference worker was killed ({name}, perhaps out of memory)"
        return f"the inference worker was killed ({name})"
    text = f"the inference worker exited with code {returncode}"
    return f"{text}: {log_tail}" if log_tail else text


class PipeTransport:
    """Requests on the worker's stdin, messages on its stdout (POSIX: ``select`` works on pipes)."""

    name = "pipe"

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None

    def popen_args(self) -> Tuple[List[str], Dict[str, str], Any]:
        """Extra worker arguments, extra environment, and what its stdout is."""
        return [], {}, subprocess.PIPE

    def attach(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        os.set_blocking(proc.stdout.fileno(), False)

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def write(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read(self) -> Optional[bytes]:
        """What is there (never waits); None: nothing now; b"": end of file."""
        try:
            return os.read(self.proc.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            return None
        except (OSError, ValueError):
            return b""

    def close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            try:
                self.proc.stdout.close()
            except OSError:
                pass


class SocketTransport:
    """The worker connects back to a socket on 127.0.0.1 that this client listens on (``select``
    and ``QSocketNotifier`` work on sockets on Windows too, where they do not on pipes).

    ``fileno()`` is the listening socket until the worker connected, then the connection (the
    GUI remakes its notifier when :meth:`WorkerClient.watch` changes). The worker proves it is
    the one started here by sending, first, a random token it got in its environment. Requests
    sent before it connected wait in a buffer and go out once it has.
    """

    name = "socket"

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.setblocking(False)
        self.conn: Optional[socket.socket] = None
        self.out = b""

    def popen_args(self) -> Tuple[List[str], Dict[str, str], Any]:
        port = self.listener.getsockname()[1]
        return ["--connect", f"127.0.0.1:{port}"], {protocol.WORKER_TOKEN_ENV: self.token}, None

    def attach(self, proc: subprocess.Popen) -> None:
        pass

    def fileno(self) -> int:
        return (self.conn or self.listener).fileno()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, OSError):
            return
        conn.settimeout(2.0)  # the worker sends its token as soon as it has connected
        line = b""
        try:
            while not line.endswith(b"\n") and len(line) < 100:
                byte = conn.recv(1)
                if not byte:
                    break
                line += byte
        except OSError:
            line = b""
        if line.strip().decode("ascii", "replace") != self.token:  # not our worker: keep listening
            conn.close()
            return
        conn.setblocking(False)
        self.conn = conn
        self.flush()

    def write(self, data: bytes) -> None:
        self.out += data
        self.flush()

    def flush(self) -> None:
        while self.conn is not None and self.out:
            try:
                n = self.conn.send(self.out)
            except BlockingIOError:
                return
            except OSError:  # the worker is gone: its end is noticed by the reader
                self.out = b""
                return
            self.out = self.out[n:]

    def read(self) -> Optional[bytes]:
        if self.conn is None:
            self._accept()
            if self.conn is None:
                return None
        self.flush()
        try:
            return self.conn.recv(1 << 16)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def close(self) -> None:
        for s in (self.conn, self.listener):
            if s is not None:
                s.close()
        self.conn = None


def _end_group(pgid: int) -> None:
    """Kill what is left of the worker's process group (POSIX; the worker leads its own group):
    children it or its launcher forked, orphaned when it ended."""
    if os.name != "posix":
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class WorkerClient:
    """One worker process and the requests in flight (see the module docstring)."""

    def __init__(self, python: Optional[str] = None, model: str = "lite_medsam", checkpoint: Optional[str] = None,
                 device: str = "auto", window: Optional[str] = None, precision: str = "fp32",
                 cache_mb: Optional[float] = None, env: Optional[Dict[str, str]] = None, backend: str = "auto",
                 protocol_version: int = protocol.PROTOCOL_VERSION, shutdown_timeout: float = 5.0,
                 transport: Optional[str] = None, decoder_precision: str = "fp32"):
        self.python = python or sys.executable
        self.model, self.checkpoint, self.device, self.window = model, checkpoint, device, window
        self.precision, self.cache_mb = precision, cache_mb
        self.backend = backend  # auto | torch | openvino | onnxruntime (samliverseg.interactive.backends)
        self.decoder_precision = decoder_precision  # fp32 | bf16 (the mask decoder; bf16: OpenVINO with native bf16)
        self.env = env
        self.protocol_version = int(protocol_version)
        self.shutdown_timeout = float(shutdown_timeout)
        #: "pipe" (stdin/stdout; the POSIX default) or "socket" (127.0.0.1; the Windows default)
        self.transport = transport or ("socket" if os.name == "nt" else "pipe")
        if self.transport not in ("pipe", "socket"):
            raise ValueError(f"transport must be 'pipe' or 'socket', got {self.transport!r}")
        self._io: Any = None  # the PipeTransport / SocketTransport of the running worker
        self.proc: Optional[subprocess.Popen] = None
        self.session_dir: Optional[str] = None
        self.starts = 0
        self.hello_result: Optional[Dict[str, Any]] = None
        #: why the last worker ended, one line (None while none has ended)
        self.last_exit: Optional[str] = None
        self._refused: Optional[str] = None  # a version mismatch: never restart
        self._buf = b""
        self._next_id = 1
        self._pending: Dict[int, Dict[str, Any]] = {}  # id -> {"type", "deadline", "internal"}
        self._abandoned: set = set()  # ids answered by a timeout: their late answer is dropped
        #: the messages not yet polled, per owner (None: the plain single-user API; else a :class:`Channel`)
        self._inboxes: Dict[Any, List[Dict[str, Any]]] = {None: []}
        self._woken: List["Channel"] = []  # channels that got messages while another owner read the pipe
        self._volume_key: Any = None  # what identifies the volume the worker holds (see volume_node_key)
        self._hello_id: Optional[int] = None
        self._volume_fields: Optional[Dict[str, Any]] = None  # the last load_volume, replayed after a restart
        self._volume_file: Optional[str] = None
        self._volume_file_rid: Optional[int] = None  # the load_volume that sent _volume_file
        self._superseded: List[Tuple[Optional[int], str]] = []  # older volume files: removed once read
        self._volume_rid: Optional[int] = None
        #: the pids the last stop had to kill (the worker did not stop within shutdown_timeout)
        self.killed_pids: List[int] = []

    # -- process ------------------------------------------------------------------------------------
    def command(self) -> List[str]:
        cmd = [self.python, "-m", "samliverseg", "worker", "--model", self.model, "--device", self.device,
               "--precision", self.precision, "--decoder-precision", self.decoder_precision,
               "--backend", self.backend, "--session-dir", str(self.session_dir)]
        if self.checkpoint:
            cmd += ["--checkpoint", str(self.checkpoint)]
        if self.window:
            cmd += ["--window", str(self.window)]
        if self.cache_mb is not None:
            cmd += ["--cache-mb", str(self.cache_mb)]
        return cmd

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def fileno(self) -> Optional[int]:
        """What to watch for messages (readable when they arrive), for a QSocketNotifier: the
        worker's stdout pipe, or (socket transport) the listening socket until the worker
        connected, then the connection. None while no worker runs."""
        return self._io.fileno() if self.proc is not None else None

    def listening_port(self) -> Optional[int]:
        """Socket transport: the 127.0.0.1 port the worker connects back to (None otherwise)."""
        if self.proc is None or not isinstance(self._io, SocketTransport):
            return None
        return self._io.listener.getsockname()[1]

    def start(self, wait: bool = True, timeout: float = 300.0) -> Optional[Dict[str, Any]]:
        """Start the worker (if it is not running) and say hello; ``wait``: block for the answer.

        Returns the hello result when waiting. Raises :class:`WorkerError` for a worker of
        another protocol version, or one that could not start (its last log line says why).
        """
        if self._refused:
            raise WorkerError(self._refused, protocol.EXIT_INPUT)
        if not self.is_running():
            if self.proc is not None:
                self._read()  # what the last one said before it ended
                self._reap()
            if self.session_dir is None or not os.path.isdir(self.session_dir):
                self.session_dir = protocol.make_session_dir("samliverseg-client-")
            self.starts += 1
            self.hello_result = None
            log_path = os.path.join(self.session_dir, f"worker-{self.starts}.log")
            io = SocketTransport() if self.transport == "socket" else PipeTransport()
            args, env, stdout = io.popen_args()
            if env:
                env = dict(os.environ if self.env is None else self.env, **env)
            kwargs: Dict[str, Any] = {"start_new_session": True} if os.name == "posix" else {
                "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                | getattr(subprocess, "CREATE_NO_WINDOW", 0)}
            with open(log_path, "wb") as log:
                try:
                    # its own process group: what it or its launcher forks is ended with it (_end_group)
                    self.proc = subprocess.Popen(self.command() + args, stdin=subprocess.PIPE,
                                                 stdout=log if stdout is None else stdout, stderr=log,
                                                 env=env or self.env, bufsize=0, close_fds=True, **kwargs)
                except OSError as exc:  # no such Python, not executable
                    io.close()
                    raise WorkerError(f"cannot start the inference worker with {self.python}: "
                                      f"{protocol.one_line(str(exc), 200)}") from None
            self._log_path = log_path
            io.attach(self.proc)
            self._io = io
            self._buf = b""
            self._hello_id = self._write("hello", {"protocol": self.protocol_version}, internal=True)
            if self._volume_fields is not None:
                self._volume_rid = self._write("load_volume", self._volume_fields, internal=True)
        if wait:
            return self.wait_ready(timeout)
        return None

    def wait_ready(self, timeout: float = 300.0) -> Dict[str, Any]:
        """Block until the worker answered hello; its result (WorkerError if it refused or died)."""
        deadline = time.monotonic() + timeout
        while self.hello_result is None:
            if self._refused:
                raise WorkerError(self._refused, protocol.EXIT_INPUT)
            if self.proc is None:
                raise WorkerError(f"{self.last_exit or 'the inference worker is not running'}", EXIT_WORKER_LOST)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerTimeout(f"the inference worker did not answer hello within {timeout:g} s")
            if not self._notice_exit():
                self._read(min(remaining, 1.0))
        return self.hello_result

    def _log_tail(self) -> str:
        try:
            with open(self._log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            return protocol.one_line(lines[-1], 300) if lines else ""
        except (OSError, AttributeError):
            return ""

    def _reap(self) -> None:
        """The worker ended: fail what it left unanswered, close its pipes."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            rc = proc.wait(timeout=self.shutdown_timeout)
        except subprocess.TimeoutExpired:  # it closed stdout but lives on: end it
            kill_process_tree(proc.pid, timeout=1.0, force=True)
            rc = proc.wait()
        _end_group(proc.pid)
        self._close_streams(proc)
        why = describe_exit(rc, self._log_tail())
        self.last_exit = why
        for rid, info in sorted(self._pending.items()):
            if not info["internal"] and rid not in self._abandoned:
                self._deliver(protocol.error_response(
                    rid, message=f"{why} during request {rid} ({info['type']}); the next request restarts it",
                    exit_code=EXIT_WORKER_LOST), info["owner"])
        self._pending.clear()
        self._abandoned.clear()
        self._remove_superseded()

    # -- messages -------------------------------------------------------------------------------------
    def _write(self, rtype: str, fields: Dict[str, Any], internal: bool = False,
               timeout: Optional[float] = None, owner: Optional["Channel"] = None) -> int:
        rid = self._next_id
        self._next_id += 1
        self._pending[rid] = {"type": rtype, "internal": internal, "owner": owner,
                              "deadline": time.monotonic() + timeout if timeout else None, "timeout": timeout}
        try:
            self._io.write(protocol.encode(dict(fields, id=rid, type=rtype)))
        except (BrokenPipeError, OSError, ValueError):
            del self._pending[rid]  # never sent: no answer is owed for it
            raise
        return rid

    def _read(self, timeout: float = 0.0) -> None:
        """Take in whatever the worker wrote; wait up to ``timeout`` s for the first bytes."""
        if self.proc is None:
            return
        if timeout > 0:
            select.select([self._io.fileno()], [], [], timeout)
        while self.proc is not None:
            chunk = self._io.read()
            if chunk is None:
                return
            if not chunk:  # end of file: the worker is gone
                self._handle_lines(self._buf + b"\n")
                self._buf = b""
                self._reap()
                return
            self._handle_lines(self._buf + chunk)

    def _notice_exit(self) -> bool:
        """If the worker has ended: take what it wrote (all of it is in the pipe by now) and reap
        it, without waiting for the end of file a child of it may still hold back. True if it ended."""
        if self.proc is None or self.proc.poll() is None:
            return False
        self._read()
        if self.proc is not None:
            self._handle_lines(self._buf + b"\n")
            self._buf = b""
            self._reap()
        return True

    def _handle_lines(self, data: bytes) -> None:
        *lines, self._buf = data.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    self._handle(protocol.decode(line))
                except protocol.ProtocolError:  # not ours (never expected: stdout is the protocol's alone)
                    continue

    def _handle(self, message: Dict[str, Any]) -> None:
        rid = message.get("id")
        info = self._pending.get(rid)
        if rid in self._abandoned:
            self.discard_result(message)  # a late answer (or a part of one): its array files go
            if protocol.is_final(message):
                self._abandoned.discard(rid)
                self._pending.pop(rid, None)
            return
        if info is None:  # nobody sent it (a response to a line the worker could not read: id null)
            log.warning("SAMLiverSeg worker client: dropped a message of no request of ours: %s",
                        protocol.one_line(str(message), 200))
            return
        if not protocol.is_final(message):
            if not info["internal"]:
                self._deliver(message, info["owner"])
            return
        del self._pending[rid]
        if info["type"] == "load_volume" and self._superseded:
            self._remove_superseded()
        if info["type"] == "load_volume" and not message["ok"] and rid == self._volume_rid:
            self._volume_fields = None  # a volume the worker refused is never replayed after a restart
            self._volume_key = None  # nor taken as loaded: the next ensure_volume_node sends it again
        if not info["internal"]:
            self._deliver(message, info["owner"])
            return
        if rid == self._hello_id:
            try:
                if not message["ok"]:
                    raise WorkerError(message["error"], message.get("exit_code", protocol.EXIT_INPUT))
                check_hello(message["result"], self.protocol_version)
                self.hello_result = message["result"]
            except WorkerError as exc:
                self._refuse(str(exc))

    def _deliver(self, message: Dict[str, Any], owner: Optional["Channel"]) -> None:
        """Put a message in its owner's inbox; an owner that closed its channel gets nothing: the
        message is dropped with a log line (and a result's array files are removed)."""
        if owner is not None and owner.closed:
            if protocol.is_final(message):
                log.info("SAMLiverSeg worker client: dropped the answer to request %s (%s): its owner %r is gone",
                         message.get("id"), "ok" if message.get("ok") else "failed", owner.name)
            self.discard_result(message)  # (also a partial event's)
            return
        self._inboxes.setdefault(owner, []).append(message)
        if owner is not None and owner not in self._woken:
            self._woken.append(owner)

    def discard_result(self, message: Dict[str, Any]) -> None:
        """Remove the array files of an answer (or a ``partial`` event) nobody reads (never raises)."""
        for value in (message.get("result") or {}).values():
            if isinstance(value, dict) and "npy" in value:
                try:
                    os.remove(value["npy"])
                except OSError:
                    pass

    def _wake_others(self, reader: Optional["Channel"]) -> None:
        """Call the ``notify`` of every channel that got messages while ``reader`` read the pipe
        (its own notifier will not fire for them: the pipe is empty now)."""
        woken, self._woken = self._woken, []
        for channel in woken:
            if channel is not reader and not channel.closed and channel.notify is not None \
                    and self._inboxes.get(channel):
                try:
                    channel.notify()
                except Exception:  # a GUI callback must not break the reader
                    log.exception("SAMLiverSeg worker client: the notify callback of %r failed", channel.name)

    def _refuse(self, why: str) -> None:
        """A worker of another protocol version: fail every request with ``why``; no restarts."""
        self._refused = why
        for rid, info in sorted(self._pending.items()):
            if not info["internal"]:
                self._deliver(protocol.error_response(rid, message=why, exit_code=protocol.EXIT_INPUT), info["owner"])
        self._pending.clear()
        self._stop_process()

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for rid, info in list(self._pending.items()):
            if info["deadline"] is not None and now > info["deadline"] and rid not in self._abandoned:
                self._abandoned.add(rid)
                self._deliver(protocol.error_response(
                    rid, message=f"request {rid} ({info['type']}) got no answer within {info['timeout']:g} s "
                                 f"and was cancelled", exit_code=EXIT_WORKER_LOST), info["owner"])
                self.cancel(rid)

    # -- the API ---------------------------------------------------------------------------------------
    def send(self, rtype: str, timeout: Optional[float] = None, owner: Optional["Channel"] = None,
             **fields: Any) -> int:
        """Send a request; returns its id at once. Starts (or restarts) the worker when needed.

        ``timeout`` (s): if no final answer came by then, :meth:`poll`/:meth:`wait` return an
        error response for it and it is cancelled. ``owner``: the :class:`Channel` whose
        :meth:`Channel.poll` gets its messages (None: :meth:`poll` without an owner).
        """
        if owner is not None and owner.closed:
            raise ValueError(f"the channel {owner.name!r} is closed")
        if rtype == "load_volume":
            self._volume_fields = None  # sent below; a restart must not replay the old volume first
            self._volume_key = None  # load_volume / load_volume_node set it once sent
        if not self.is_running():
            self.start(wait=False)
        try:
            rid = self._write(rtype, fields, timeout=timeout, owner=owner)
        except (BrokenPipeError, OSError, ValueError):  # it died just now (or is dying): once more, on a new one
            if self.proc is not None and self.proc.poll() is None:
                kill_process_tree(self.proc.pid, timeout=1.0, force=True)
            self._read()
            self._notice_exit()
            self.start(wait=False)
            rid = self._write(rtype, fields, timeout=timeout, owner=owner)
        if rtype == "load_volume":
            self._volume_fields, self._volume_rid = dict(fields), rid
        self._wake_others(owner)  # a worker found dead here failed other owners' requests
        return rid

    def poll(self, owner: Optional["Channel"] = None) -> List[Dict[str, Any]]:
        """The messages of ``owner``'s requests that arrived since its last poll (never blocks):
        progress events and final responses (``"ok"`` present), including the ones the client makes
        up for a dead worker or a passed timeout. ``owner`` None: the requests sent without one.

        Whoever polls drains the pipe for every owner: the messages of the others wait in their
        inboxes, and their channels' ``notify`` is called (:meth:`Channel.poll` is the usual way in).
        """
        self._read()
        self._notice_exit()
        self._check_deadlines()
        out: List[Dict[str, Any]] = []
        if owner is None or not owner.closed:
            out = self._inboxes.get(owner) or []
            self._inboxes[owner] = []
        self._wake_others(owner)
        return out

    def channel(self, name: str, notify: Optional[Callable[[], None]] = None) -> "Channel":
        """A new owner of requests on this client (the effect session, one panel run): its
        :meth:`Channel.poll` returns only the messages of its own requests. ``notify`` (optional) is
        called when another owner's poll took messages of this one from the pipe (a GUI schedules
        its own poll then: ``qt.QTimer.singleShot(0, ...)``)."""
        return Channel(self, name, notify)

    def forget_owner(self, owner: "Channel") -> None:
        """Drop what waits in a closed channel's inbox (a result's array files are removed)."""
        for msg in self._inboxes.pop(owner, []):
            if protocol.is_final(msg):
                self.discard_result(msg)
        if owner in self._woken:
            self._woken.remove(owner)

    def ready(self, owner: Optional["Channel"] = None) -> bool:
        """True when messages of ``owner`` wait in its inbox (taken from the pipe by another poll)."""
        return bool(self._inboxes.get(owner))

    def watch(self) -> Optional[Tuple[int, int]]:
        """What a GUI watches: ``(starts, fileno)`` of the running worker's stdout pipe, or None.

        When the value differs from the one the GUI's ``QSocketNotifier`` was made for, the GUI
        drops that notifier and, unless None, makes one on the new ``fileno`` (after a restart the
        pipe is a new one, possibly with the same number).
        """
        if self.proc is None:
            return None
        return self.starts, self._io.fileno()

    def next_timeout(self) -> Optional[float]:
        """Seconds until the earliest request ``timeout`` passes (0 if one has), None if none is set.

        A silent worker wakes no notifier: a GUI that sends requests with a timeout polls once
        more after this many seconds (``QTimer.singleShot``).
        """
        deadlines = [info["deadline"] for rid, info in self._pending.items()
                     if info["deadline"] is not None and rid not in self._abandoned]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def wait(self, rid: int, timeout: Optional[float] = None,
             on_event: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """Block until the final response of request ``rid`` (events of it go to ``on_event``).

        Messages of other requests stay for :meth:`poll`. :class:`WorkerTimeout` after ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self._take(rid)
            if msg is not None:
                if protocol.is_final(msg):
                    self._wake_others(None)
                    return msg
                if on_event is not None:
                    on_event(msg)
            else:
                if rid not in self._pending:
                    raise WorkerError(f"request {rid} is not waiting for an answer (already taken by poll?)")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WorkerTimeout(f"request {rid} ({self._pending[rid]['type']}) got no answer within "
                                        f"{timeout:g} s", EXIT_WORKER_LOST, rid)
                if not self._notice_exit():
                    self._read(0.5 if remaining is None else min(remaining, 0.5))
                self._check_deadlines()

    def _take(self, rid: int) -> Optional[Dict[str, Any]]:
        """The first message of request ``rid`` out of whichever inbox holds it (None: none yet)."""
        for inbox in self._inboxes.values():
            for n, msg in enumerate(inbox):
                if msg.get("id") == rid:
                    del inbox[n]
                    return msg
        return None

    def request(self, rtype: str, timeout: Optional[float] = None, **fields: Any) -> Dict[str, Any]:
        """Send and wait; the result, or :class:`WorkerError` with the worker's one-line message."""
        rid = self.send(rtype, **fields)  # (no owner: the plain API)
        resp = self.wait(rid, timeout)
        if not resp["ok"]:
            raise WorkerError(resp["error"], resp.get("exit_code", EXIT_WORKER_LOST), rid)
        return resp["result"]

    def cancel(self, target: Optional[int] = None) -> Optional[int]:
        """Ask the worker to cancel request ``target`` (None: everything); never starts a worker."""
        if not self.is_running():
            return None
        fields = {} if target is None else {"target": int(target)}
        try:
            return self._write("cancel", fields, internal=True)
        except (BrokenPipeError, OSError):
            return None

    def pending(self, owner: Any = ANY_OWNER) -> List[int]:
        """The ids of the requests still waiting for their final answer (of ``owner`` when given)."""
        return sorted(r for r, info in self._pending.items() if not info["internal"] and r not in self._abandoned
                      and (owner is ANY_OWNER or info["owner"] is owner))

    # -- arrays ---------------------------------------------------------------------------------------
    def write_array(self, name: str, array: np.ndarray) -> Dict[str, Any]:
        """Put an array in the session folder for a request; its reference."""
        if self.session_dir is None or not os.path.isdir(self.session_dir):
            self.session_dir = protocol.make_session_dir("samliverseg-client-")
        return protocol.write_array(self.session_dir, f"c-{name}", array)

    def read_array(self, ref: Dict[str, Any], remove: bool = True) -> np.ndarray:
        """A result array, read into memory; its file is removed (``remove``)."""
        arr = protocol.read_array(ref, "result")
        if remove:
            try:
                os.remove(ref["npy"])
            except OSError:
                pass
        return arr

    def load_volume(self, array: Optional[np.ndarray] = None, ijk_to_ras: Optional[np.ndarray] = None,
                    path: Optional[str] = None, timeout: Optional[float] = None,
                    owner: Optional["Channel"] = None, key: Any = None) -> int:
        """Send ``load_volume`` for an array [k, j, i] with its IJKToRAS 4x4, or a file; the request id.

        The array's file stays until another volume replaces it (a restarted worker reloads it).
        ``key``: what identifies this volume (:attr:`volume_key` until another one is sent, or the
        worker refuses it); None: a volume no key matches.
        An older volume's file is removed once the worker answered its ``load_volume`` (several
        users may send volumes one after the other, pipelined: the worker reads each in turn).
        """
        if (array is None) == (path is None):
            raise ValueError("give either array (with ijk_to_ras) or path")
        old = (self._volume_file_rid, self._volume_file)
        if path is not None:
            rid = self.send("load_volume", timeout=timeout, owner=owner, path=str(path))
            self._volume_file = None
        else:
            if ijk_to_ras is None:
                raise ValueError("an array needs its ijk_to_ras matrix")
            ref = self.write_array("volume", array)
            rid = self.send("load_volume", timeout=timeout, owner=owner, array=ref,
                            ijk_to_ras=np.asarray(ijk_to_ras, dtype=float).tolist())
            self._volume_file = ref["npy"]
        self._volume_file_rid = rid
        self._volume_key = key
        if old[1]:
            self._superseded.append(old)
        self._remove_superseded()
        return rid

    def _remove_superseded(self) -> None:
        """Remove the files of older volumes whose load_volume is no longer waiting for its answer."""
        keep = []
        for rid, path in self._superseded:
            if rid in self._pending:
                keep.append((rid, path))
                continue
            try:
                os.remove(path)
            except OSError:
                pass
        self._superseded = keep

    def load_volume_node(self, volume_node, timeout: Optional[float] = None,
                         owner: Optional["Channel"] = None) -> int:
        """``load_volume`` for a scalar volume node: its voxels and its world IJKToRAS (parent
        transforms included, so prompts in the slice views' RAS land on the right voxels); its
        :func:`volume_node_key` becomes :attr:`volume_key`."""
        from . import geometry, volume_nodes

        volume_nodes.check_source_volume(volume_node)
        return self.load_volume(volume_nodes.array_from_volume_node(volume_node),
                                geometry.world_ijk_to_ras(volume_node), timeout=timeout, owner=owner,
                                key=volume_node_key(volume_node))

    @property
    def volume_key(self) -> Any:
        """The key of the volume the worker holds, or will hold once the requests sent so far are
        done (requests run in the order sent): None when unknown (none sent, refused, no key)."""
        return self._volume_key if self._volume_fields is not None else None

    def ensure_volume_node(self, volume_node, owner: Optional["Channel"] = None,
                           timeout: Optional[float] = None) -> Tuple[Optional[int], bool]:
        """Make the worker hold ``volume_node`` for the requests sent next: ``load_volume`` it
        unless the volume last sent is this node with the same voxels (image MTime) and world
        geometry (:func:`volume_node_key`). Never waits: the requests sent after it run after the
        load. Returns ``(id of the load_volume, True)`` when it sent one, else ``(None, False)``."""
        key = volume_node_key(volume_node)
        if key is not None and key == self.volume_key:
            return None, False
        return self.load_volume_node(volume_node, timeout=timeout, owner=owner), True

    # -- shutdown -------------------------------------------------------------------------------------
    def _stop_process(self) -> None:
        proc, self.proc = self.proc, None
        self.killed_pids = []
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self._io.write(protocol.encode({"id": 0, "type": "shutdown"}))
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                proc.stdin.close()  # (socket transport: the end of stdin stops it too)
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                proc.wait(timeout=self.shutdown_timeout)
            except subprocess.TimeoutExpired:
                self.killed_pids = kill_process_tree(proc.pid, timeout=1.0, force=True)
                proc.wait()
        _end_group(proc.pid)
        self._close_streams(proc)

    def _close_streams(self, proc: subprocess.Popen) -> None:
        if self._io is not None:
            self._io.close()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass

    def shutdown(self) -> None:
        """Stop the worker (``shutdown``; its process tree is killed after ``shutdown_timeout``)
        and remove the session folder. Requests in flight are dropped."""
        self._stop_process()
        self._pending.clear()
        self._abandoned.clear()
        self._inboxes = {None: []}
        self._woken = []
        self._volume_fields = self._volume_file = self._volume_key = self._volume_file_rid = None
        self._superseded = []
        if self.session_dir is not None:
            shutil.rmtree(self.session_dir, ignore_errors=True)
            self.session_dir = None

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def volume_node_key(volume_node) -> Optional[Tuple[Any, ...]]:
    """What identifies a volume node's content for the worker: its ID, the MTime of its image data
    (VTK's modification counter is global and grows: new or changed voxels give a new value) and
    its world IJKToRAS (parent transforms included; rounded to 1e-9). None without image data."""
    from . import geometry

    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        return None
    return (volume_node.GetID(), int(image.GetMTime()),
            tuple(float(v) for v in np.round(geometry.world_ijk_to_ras(volume_node), 9).ravel()))


class Channel:
    """One owner of requests on a shared :class:`WorkerClient` (the effect session, a panel run).

    Its :meth:`send` records it as the owner of the request; its :meth:`poll` returns only the
    messages of its own requests, whoever's notifier fired first: any poll drains the pipe into
    per-owner inboxes, and ``notify`` (when given) is called for an owner whose messages another
    poll took (its notifier will not fire for them). :meth:`close`: its requests in flight are
    cancelled and their answers dropped with a log line. Everything else (``watch``,
    ``next_timeout``, ``write_array``, ``read_array``) is the client's.
    """

    def __init__(self, client: WorkerClient, name: str, notify: Optional[Callable[[], None]] = None):
        self.client, self.name, self.notify = client, str(name), notify
        self.closed = False

    def __repr__(self) -> str:
        return f"Channel({self.name!r}{', closed' if self.closed else ''})"

    def send(self, rtype: str, timeout: Optional[float] = None, **fields: Any) -> int:
        return self.client.send(rtype, timeout=timeout, owner=self, **fields)

    def poll(self) -> List[Dict[str, Any]]:
        """This owner's messages since its last poll (never blocks; see :meth:`WorkerClient.poll`)."""
        return self.client.poll(owner=self)

    def ready(self) -> bool:
        """True when messages of this owner wait (another owner's poll took them from the pipe)."""
        return self.client.ready(owner=self)

    def ensure_volume_node(self, volume_node, timeout: Optional[float] = None) -> Tuple[Optional[int], bool]:
        """See :meth:`WorkerClient.ensure_volume_node` (the load, when sent, is this owner's)."""
        return self.client.ensure_volume_node(volume_node, owner=self, timeout=timeout)

    def pending(self) -> List[int]:
        return self.client.pending(owner=self)

    def cancel(self, target: Optional[int] = None) -> Optional[int]:
        """Cancel one request of this owner (None: all of them; never another owner's)."""
        if target is not None:
            return self.client.cancel(target)
        for rid in self.pending():
            self.client.cancel(rid)
        return None

    def wait(self, rid: int, timeout: Optional[float] = None,
             on_event: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """Blocking, for scripts and tests (:meth:`WorkerClient.wait`)."""
        return self.client.wait(rid, timeout, on_event)

    def close(self) -> None:
        """This owner is gone: cancel its requests in flight; their answers are dropped from now on."""
        if self.closed:
            return
        self.cancel()
        self.closed = True
        self.client.forget_owner(self)

    # the client's, for the GUI's notifier
    def watch(self) -> Optional[Tuple[int, int]]:
        return self.client.watch()

    def fileno(self) -> Optional[int]:
        return self.client.fileno()

    def next_timeout(self) -> Optional[float]:
        return self.client.next_timeout()

    def write_array(self, name: str, array: np.ndarray) -> Dict[str, Any]:
        return self.client.write_array(name, array)

    def read_array(self, ref: Dict[str, Any], remove: bool = True) -> np.ndarray:
        return self.client.read_array(ref, remove)

    def discard_result(self, message: Dict[str, Any]) -> None:
        self.client.discard_result(message)


# -- the one shared worker of the module ------------------------------------------------------------

#: The settings that make a worker; another value of any of them means another worker.
SHARED_SETTINGS = ("python", "model", "checkpoint", "device", "backend", "precision", "decoder_precision", "window",
                   "env", "cache_mb")

_shared: Optional[WorkerClient] = None
_shared_key: Optional[Tuple[Any, ...]] = None
_atexit_registered = False


def _settings_key(settings: Dict[str, Any]) -> Tuple[Any, ...]:
    """The settings as a comparable key (defaults filled in, the environment as sorted pairs)."""
    unknown = sorted(set(settings) - set(SHARED_SETTINGS))
    if unknown:
        raise TypeError(f"shared_client() got unknown settings {unknown}; known: {', '.join(SHARED_SETTINGS)}")
    defaults = {"python": sys.executable, "model": "lite_medsam", "checkpoint": None, "device": "auto",
                "backend": "auto", "precision": "fp32", "decoder_precision": "fp32", "window": None, "env": None,
                "cache_mb": None}
    values = dict(defaults, **{k: v for k, v in settings.items() if v is not None})
    values["python"] = values["python"] or sys.executable
    values["checkpoint"] = str(values["checkpoint"]) if values["checkpoint"] else None
    values["window"] = str(values["window"]) if values["window"] else None
    env = values["env"]
    values["env"] = None if env is None else tuple(sorted((str(k), str(v)) for k, v in dict(env).items()))
    values["cache_mb"] = None if values["cache_mb"] is None else float(values["cache_mb"])
    return tuple(values[name] for name in SHARED_SETTINGS)


def shared_client(**settings: Any) -> WorkerClient:
    """The module's one worker client for these settings (keyword arguments of :class:`WorkerClient`
    named in :data:`SHARED_SETTINGS`; None means the default).

    Same settings as the last call: the same client (its worker, model, volume and embeddings
    stay). Other settings: the old worker is shut down (which may take up to its
    ``shutdown_timeout`` when it is busy) and a new client is made; it starts its worker on its
    first request. Never starts a worker itself.
    """
    global _shared, _shared_key, _atexit_registered
    key = _settings_key(settings)
    if _shared is not None and key == _shared_key:
        return _shared
    shutdown_shared_client()
    kwargs = dict(zip(SHARED_SETTINGS, key))
    if kwargs["env"] is not None:
        kwargs["env"] = dict(kwargs["env"])
    _shared, _shared_key = WorkerClient(**kwargs), key
    if not _atexit_registered:
        import atexit

        atexit.register(shutdown_shared_client)
        _atexit_registered = True
    return _shared


def current_shared_client() -> Optional[WorkerClient]:
    """The shared client if one was made (and not shut down), without making one."""
    return _shared


def shutdown_shared_client() -> None:
    """Shut the shared worker down (its process tree, its session folder); the next
    :func:`shared_client` makes a new one. Safe to call any time, also when there is none."""
    global _shared, _shared_key
    client, _shared, _shared_key = _shared, None, None
    if client is not None:
        client.shutdown()
