"""The worker loop: ``samliverseg worker`` (protocol: WORKER_PROTOCOL.md, ``protocol.py``).

Threads: a reader thread reads requests from stdin. ``cancel`` and ``status`` are answered
right there, so they work while a request computes; everything else goes on a queue that the
main thread works through in order (the main thread is the only one that touches the engine).
A ``prefetch`` runs in the background between requests: the main thread embeds one slice, then
looks at the queue again, so a prompt waits at most for the slice being embedded. When stdin
closes, the queued requests are answered and the worker stops; when stdout breaks (the client
is gone), everything is cancelled.
"""

from __future__ import annotations

import collections
import os
import shutil
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Deque, Dict, List, Optional

from samliverseg import __version__
from samliverseg.core.errors import CancelledError
from samliverseg.service import protocol
from samliverseg.service.handlers import EngineOptions, EngineState


@dataclass
class Job:
    """One request the main thread works on."""

    request: Dict[str, Any]
    received: float
    cancel: threading.Event = field(default_factory=threading.Event)
    started: Optional[float] = None
    plan: Optional[List[int]] = None  # prefetch: the slices still to embed
    axis: str = "k"
    computed: int = 0
    total: int = 0

    @property
    def id(self) -> int:
        return self.request["id"]

    @property
    def type(self) -> str:
        return self.request["type"]


class Server:
    """Serves requests from ``stdin`` to ``stdout`` (binary streams) until shutdown."""

    def __init__(self, options: EngineOptions, stdin: BinaryIO, stdout: BinaryIO, session_dir: Optional[str] = None):
        self.own_session = session_dir is None
        self.session_dir = session_dir or protocol.make_session_dir()
        os.makedirs(self.session_dir, exist_ok=True)
        self.state = EngineState(options, self.session_dir)
        self.stdin, self.stdout = stdin, stdout
        self.out_lock = threading.Lock()
        self.cond = threading.Condition()
        self.queue: Deque[Job] = collections.deque()
        self.background: List[Job] = []  # prefetch jobs, oldest first
        self.current: Optional[Job] = None
        self.greeted = False
        self.stopping = False
        self.client_gone = False  # stdout broke
        self.exit_code = 0

    # -- output -----------------------------------------------------------------------------------
    def send(self, message: Dict[str, Any]) -> None:
        data = protocol.encode(message)
        with self.out_lock:
            try:
                self.stdout.write(data)
                self.stdout.flush()
            except (BrokenPipeError, ValueError, OSError):  # the client is gone: stop working for it
                if not self.client_gone:
                    self.client_gone = True
                    self.cancel(None)

    # -- reader thread ------------------------------------------------------------------------------
    def read_requests(self) -> None:
        for line in iter(self.stdin.readline, b""):
            if not line.strip():
                continue
            rid = None
            try:
                message = protocol.decode(line)
                rid = message.get("id") if isinstance(message.get("id"), int) else None
                request = protocol.check_request(message)
            except protocol.ProtocolError as exc:
                self.send(protocol.error_response(rid, exc))
                continue
            rtype = request["type"]
            if rtype == "cancel":
                self.send(protocol.ok_response(request["id"], {"cancelled": self.cancel(request.get("target"))}, {}))
            elif rtype == "status":
                self.send(protocol.ok_response(request["id"], self.status(), {}))
            else:
                with self.cond:
                    if rtype == "shutdown":
                        self.cancel(None)
                    self.queue.append(Job(request, time.perf_counter()))
                    self.cond.notify()
        self.end_of_input()

    def end_of_input(self) -> None:
        """The requests' stream closed (or, with ``--connect``, stdin): the queued requests are
        answered, then the worker stops."""
        with self.cond:
            self.queue.append(Job({"id": None, "type": "shutdown"}, time.perf_counter()))
            self.cond.notify()

    def cancel(self, target: Optional[int]) -> List[int]:
        """Flag the job ``target`` (None: every job) as cancelled; returns the ids flagged."""
        with self.cond:
            jobs = list(self.queue) + self.background + ([self.current] if self.current else [])
            hit = [j for j in jobs if j.type != "shutdown" and (target is None or j.id == target)]
            for j in hit:
                j.cancel.set()
            return sorted({j.id for j in hit if j.id is not None})

    def status(self) -> Dict[str, Any]:
        with self.cond:
            busy = self.current
            out = {"protocol": protocol.PROTOCOL_VERSION, "pid": os.getpid(),
                   "busy": {"id": busy.id, "type": busy.type} if busy else None,
                   "queued": [j.id for j in self.queue],
                   "prefetch": [{"id": j.id, "done": j.total - len(j.plan or []), "total": j.total}
                                for j in self.background]}
        out.update(self.state.status())
        return out

    # -- main thread -------------------------------------------------------------------------------
    def next_job(self) -> Optional[Job]:
        """The next queued request; None when only background work is left (waits otherwise)."""
        with self.cond:
            while not self.queue and not self.background:
                self.cond.wait()
            return self.queue.popleft() if self.queue else None

    def serve(self) -> int:
        reader = threading.Thread(target=self.read_requests, name="samliverseg-worker-reader", daemon=True)
        reader.start()
        try:
            while not self.stopping:
                job = self.next_job()
                if job is None:
                    self.prefetch_step(self.background[0])
                else:
                    self.run(job)
        finally:
            if self.own_session:
                shutil.rmtree(self.session_dir, ignore_errors=True)
        return self.exit_code

    def run(self, job: Job) -> None:
        if job.type == "shutdown":
            self.stopping = True
            for j in list(self.background):
                self.finish_prefetch(j)
            if job.id is not None:
                self.send(protocol.ok_response(job.id, {}, self.timings(job)))
            return
        if job.cancel.is_set():
            self.send(protocol.error_response(job.id, CancelledError(f"{job.type} cancelled before it started")))
            return
        if not self.greeted and job.type != "hello":
            self.send(protocol.error_response(job.id, protocol.ProtocolError(
                f"the first request must be hello (protocol {protocol.PROTOCOL_VERSION})")))
            return
        with self.cond:
            self.current = job
        job.started = time.perf_counter()
        try:
            if job.type == "prefetch":
                job.axis, job.plan = self.state.prefetch_plan(job.request)
                job.total = len(job.plan)
                with self.cond:
                    self.background.append(job)
                return
            result = self.compute(job)
        except Exception as exc:  # every failure becomes a one-line response
            self.fail(job, exc)
        else:
            self.send(protocol.ok_response(job.id, result, self.timings(job)))
        finally:
            with self.cond:
                self.current = None

    def compute(self, job: Job) -> Dict[str, Any]:
        req, state = job.request, self.state

        def progress(done: int, total: int) -> None:
            self.send(protocol.progress_event(job.id, done, total, job.type))

        if job.type == "hello":
            return self.hello(req)
        if job.type == "load_volume":
            with self.cond:  # a new volume: the prefetches of the old one are moot
                old, self.background = self.background, []
            for j in old:
                j.cancel.set()
                self.finish_prefetch(j)
            return state.load_volume(req)
        if job.type == "prompt":
            return state.prompt(req)
        if job.type == "propagate":
            return state.propagate(req, progress, job.cancel)
        if job.type == "correct":
            return state.correct(req, progress, job.cancel,
                                 partial=lambda result: self.send(protocol.partial_event(job.id, result)))
        if job.type == "uncertainty":
            return state.uncertainty(req, progress, job.cancel)
        if job.type == "prompt3d":
            return state.prompt3d(req, progress, job.cancel)
        raise protocol.ProtocolError(f"unknown request type {job.type!r}")  # check_request lets none through

    def hello(self, req: Dict[str, Any]) -> Dict[str, Any]:
        if req["protocol"] != protocol.PROTOCOL_VERSION:
            self.stopping = True  # a client of another version: refuse, then stop
            self.exit_code = protocol.EXIT_INPUT
            raise protocol.ProtocolError(
                f"protocol version mismatch: the client speaks {req['protocol']}, this worker "
                f"(samliverseg {__version__}) speaks {protocol.PROTOCOL_VERSION}: install matching versions")
        self.greeted = True
        o = self.state.options
        return {"protocol": protocol.PROTOCOL_VERSION, "version": __version__, "pid": os.getpid(),
                "session_dir": self.session_dir, "model": o.model, "device": o.device, "window": o.window,
                "requests": list(protocol.REQUEST_TYPES)}

    def prefetch_step(self, job: Job) -> None:
        """Embed the next slice of a background prefetch (or finish it)."""
        if job.cancel.is_set() or not job.plan:
            self.finish_prefetch(job)
            return
        with self.cond:
            self.current = job
        try:
            self.state.embed(job.axis, job.plan.pop(0))
            job.computed += 1
            self.send(protocol.progress_event(job.id, job.total - len(job.plan), job.total, "prefetch"))
        except Exception as exc:
            with self.cond:
                self.background.remove(job)
            self.fail(job, exc)
        finally:
            with self.cond:
                self.current = None

    def finish_prefetch(self, job: Job) -> None:
        with self.cond:
            if job in self.background:
                self.background.remove(job)
        if job.cancel.is_set():
            self.send(protocol.error_response(job.id, CancelledError(
                f"prefetch cancelled after {job.total - len(job.plan or [])} of {job.total} slices "
                f"(the embedded ones stay cached)")))
        else:
            self.send(protocol.ok_response(job.id, {"computed": job.computed, "slices": job.total,
                                                    "slice_axis": job.axis}, self.timings(job)))

    def fail(self, job: Job, exc: BaseException) -> None:
        code = protocol.exit_code_of(exc)
        if code == protocol.EXIT_UNEXPECTED:
            traceback.print_exc(file=sys.stderr)
        elif code == 4:
            self.state.forget_embeddings()
        self.send(protocol.error_response(job.id, exc))

    @staticmethod
    def timings(job: Job) -> Dict[str, float]:
        now = time.perf_counter()
        started = job.started if job.started is not None else now
        return {"queued_ms": round(1000 * (started - job.received), 2),
                "compute_ms": round(1000 * (now - started), 2),
                "total_ms": round(1000 * (now - job.received), 2)}


def run_worker(args) -> int:
    """``samliverseg worker``: serve the protocol on stdin/stdout until shutdown; returns the exit code.

    The protocol keeps the real stdout; file descriptor 1 is pointed at stderr, so that stray
    prints (of any library, C code included) never corrupt the message stream.
    """
    options = EngineOptions(model=args.model, checkpoint=args.checkpoint, device=args.device, window=args.window,
                            precision=args.precision, cache_mb=args.cache_mb, backend=args.backend,
                            decoder_precision=args.decoder_precision)
    if args.connect:
        requests_in, proto_out = connect_back(args.connect)
    else:
        requests_in, proto_out = sys.stdin.buffer, os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    server = Server(options, requests_in, proto_out, session_dir=args.session_dir)
    if args.connect:  # stdin now only tells when the client is gone
        threading.Thread(target=lambda: (sys.stdin.buffer.read(), server.end_of_input()),
                         name="samliverseg-worker-stdin", daemon=True).start()
    print(f"samliverseg worker {__version__} (protocol {protocol.PROTOCOL_VERSION}), pid {os.getpid()}, "
          f"session folder {server.session_dir}" + (f", connected to {args.connect}" if args.connect else ""),
          file=sys.stderr, flush=True)
    code = server.serve()
    # The reader thread may sit in stdin.readline(): leave without waiting for it (an interpreter
    # shutdown would abort on its lock). Everything the client needs was flushed.
    sys.stderr.flush()
    proto_out.close()
    os._exit(code)


def connect_back(address: str):
    """``--connect HOST:PORT``: connect to the client, send the token of ``WORKER_TOKEN_ENV`` as the
    first line; the (requests, messages) streams of the connection."""
    host, _, port = address.rpartition(":")
    try:
        sock = socket.create_connection((host or "127.0.0.1", int(port)), timeout=60)
    except (OSError, ValueError) as exc:
        print(f"error: cannot connect to the client at {address}: {protocol.one_line(str(exc), 200)}",
              file=sys.stderr, flush=True)
        os._exit(protocol.EXIT_INPUT)
    sock.settimeout(None)
    sock.sendall((os.environ.pop(protocol.WORKER_TOKEN_ENV, "") + "\n").encode("ascii"))
    return sock.makefile("rb"), sock.makefile("wb")


def add_worker_arguments(parser) -> None:
    """The worker's own options (the CLI adds the model options)."""
    parser.add_argument("--session-dir", default=None,
                        help="folder for the arrays exchanged with the client (default: a new folder in /dev/shm "
                             "when present, else the temp folder; removed at exit)")
    parser.add_argument("--cache-mb", type=float, default=768.0, help="memory for cached slice embeddings (MB)")
    parser.add_argument("--connect", metavar="HOST:PORT", default=None,
                        help="speak the protocol on a TCP connection to a client listening there (127.0.0.1) "
                             "instead of stdin/stdout; its first line is the token in $" + protocol.WORKER_TOKEN_ENV +
                             "; stdin then only tells the end (its closing stops the worker). For Windows, where "
                             "select() does not work on pipes")
