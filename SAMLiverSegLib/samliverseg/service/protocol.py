"""The inference worker's protocol: JSON lines on the worker's stdin/stdout, arrays in ``.npy`` files.

Pure (json, numpy, ``core.errors``, ``core.jsonutil``): a client imports it without torch and
without the model code. The page that documents it is ``SAMLiverSegLib/WORKER_PROTOCOL.md``;
this module is its one implementation (constants, framing, arrays, errors, request checks).

* A message is one JSON object on one line (UTF-8, ``\\n``-terminated, no NaN).
* Requests carry ``"id"`` (an integer the client chooses) and ``"type"`` (:data:`REQUEST_TYPES`).
* The worker answers every request with exactly one final response, ``{"id", "ok": true,
  "result": {...}, "timings": {...}}`` or ``{"id", "ok": false, "error": one line, "exit_code"}``
  (the CLI's categories: 2 bad input, 3 checkpoint, 4 out of memory, 130 cancelled, 70
  unexpected), possibly preceded by events ``{"id", "event": "progress", "done", "total"}``.
  A message is final when it has ``"ok"``.
* Arrays never travel in the JSON: a reference ``{"npy": PATH, "shape": [...], "dtype": "uint8"}``
  names a ``.npy`` file in the session folder (``/dev/shm`` on Linux when present, so the file
  lives in memory); the reader memory-maps it. Never pickle.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from typing import Any, Dict, Optional, Tuple

import numpy as np

from samliverseg.core.errors import (EXIT_OUT_OF_MEMORY, EXIT_UNEXPECTED, CancelledError, InputError,
                                     SAMLiverSegError, is_out_of_memory, out_of_memory_kind)
from samliverseg.core.jsonutil import json_safe
from samliverseg.core.prompts import Prompts

#: Bumped whenever a request or response changes incompatibly; client and worker must agree.
PROTOCOL_VERSION = 1

#: The environment variable that gives a worker started with ``--connect`` the token it sends first.
WORKER_TOKEN_ENV = "SAMLIVERSEG_WORKER_TOKEN"

#: Where the protocol is documented (relative to the repository).
PROTOCOL_PAGE = "SAMLiverSegLib/WORKER_PROTOCOL.md"

EXIT_INPUT, EXIT_CHECKPOINT, EXIT_CANCELLED = 2, 3, CancelledError.exit_code

#: Request types, in the order the page documents them.
REQUEST_TYPES = ("hello", "load_volume", "prompt", "propagate", "correct", "prompt3d", "uncertainty", "prefetch",
                 "cancel", "status", "shutdown")

#: Slice orientations of a slice view -> the RAS normal of its plane.
ORIENTATION_NORMALS = {"axial": (0.0, 0.0, 1.0), "coronal": (0.0, 1.0, 0.0), "sagittal": (1.0, 0.0, 0.0)}

WORKER_HELP = f"""\
The persistent inference worker: holds the model, one volume and its slice embeddings, and answers
requests until `shutdown` (or until stdin closes). It serves 2D prompt models (prompt, propagate,
correct, uncertainty, prefetch) and SAM-Med3D models (prompt3d).

Protocol version {PROTOCOL_VERSION}, documented in {PROTOCOL_PAGE}:
  * stdin: one JSON request per line, {{"id": N, "type": T, ...}}; T is one of
    {", ".join(REQUEST_TYPES)}.
    The first request must be {{"id": 0, "type": "hello", "protocol": {PROTOCOL_VERSION}}}; a client of
    another protocol version is refused (exit code 2).
  * stdout: one JSON message per line: progress events {{"id", "event": "progress", ...}} and one
    final response per request, {{"id", "ok": true, "result", "timings"}} or
    {{"id", "ok": false, "error", "exit_code"}} (2 bad input, 3 checkpoint, 4 out of memory,
    130 cancelled, 70 unexpected). Logs go to stderr.
  * arrays (volumes, masks, uncertainty maps) are .npy files in the session folder
    (--session-dir; default a new folder in /dev/shm when present), referenced as
    {{"npy": PATH, "shape": [...], "dtype": "..."}}; never pickled.
"""


class ProtocolError(InputError):
    """A malformed message or request (exit code 2)."""


# -- framing -----------------------------------------------------------------------------------

def encode(message: Dict[str, Any]) -> bytes:
    """One message as one line of UTF-8 JSON (numpy values made plain, NaN/inf -> null)."""
    return json.dumps(json_safe(message), separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"


def decode(line: bytes) -> Dict[str, Any]:
    """One line -> a message (a JSON object); :class:`ProtocolError` for anything else."""
    try:
        text = line.decode("utf-8") if isinstance(line, (bytes, bytearray)) else str(line)
        message = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"not a JSON line: {one_line(str(exc))}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a JSON object, got {type(message).__name__}")
    return message


def is_final(message: Dict[str, Any]) -> bool:
    """True for a final response (it has ``"ok"``), False for an event."""
    return "ok" in message


# -- responses ---------------------------------------------------------------------------------

def one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def exit_code_of(exc: BaseException) -> int:
    """The CLI's exit code category of an exception (2, 3, 4, 130 or 70)."""
    if isinstance(exc, SAMLiverSegError):
        return int(exc.exit_code)
    if is_out_of_memory(exc):
        return EXIT_OUT_OF_MEMORY
    return EXIT_UNEXPECTED


def error_message(exc: BaseException) -> str:
    """The one-line message a user reads for ``exc`` (as the CLI prints it)."""
    if isinstance(exc, SAMLiverSegError):
        return one_line(str(exc))
    kind = out_of_memory_kind(exc)
    if kind is not None:
        advice = "close other programs or use a smaller volume" if kind == "cpu" else \
            "close other programs, use a smaller volume, or the CPU device"
        return f"out of memory ({kind}): {advice} ({one_line(str(exc), 200)})"
    return one_line(f"unexpected {type(exc).__name__}: {exc}")


def error_response(request_id: Any, exc: Optional[BaseException] = None, message: Optional[str] = None,
                   exit_code: Optional[int] = None) -> Dict[str, Any]:
    """``{"id", "ok": false, "error", "exit_code"}`` from an exception or a message."""
    if exc is not None:
        message = error_message(exc) if message is None else message
        exit_code = exit_code_of(exc) if exit_code is None else exit_code
    return {"id": request_id, "ok": False, "error": one_line(message or "error"),
            "exit_code": int(EXIT_UNEXPECTED if exit_code is None else exit_code)}


def ok_response(request_id: Any, result: Dict[str, Any], timings: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result, "timings": timings}


def progress_event(request_id: Any, done: int, total: int, stage: str = "") -> Dict[str, Any]:
    event = {"id": request_id, "event": "progress", "done": int(done), "total": int(total)}
    if stage:
        event["stage"] = stage
    return event


def partial_event(request_id: Any, result: Dict[str, Any]) -> Dict[str, Any]:
    """A part of a result sent before the final response (``correct``: the corrected slice)."""
    return {"id": request_id, "event": "partial", "result": result}


# -- arrays --------------------------------------------------------------------------------------

def session_root() -> str:
    """Where session folders go: ``/dev/shm`` (memory) when present and writable, else the temp folder."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return tempfile.gettempdir()


def make_session_dir(prefix: str = "samliverseg-") -> str:
    """A new private folder for the arrays of one client/worker session."""
    return tempfile.mkdtemp(prefix=prefix, dir=session_root())


def write_array(folder: str, name: str, array: np.ndarray) -> Dict[str, Any]:
    """Write ``array`` to ``folder/NAME-<random>.npy`` (bool as uint8); return its reference.

    The file appears complete or not at all (written under a temporary name, then renamed).
    """
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.view(np.uint8)
    if a.dtype.kind not in "uif":
        raise ProtocolError(f"arrays must be numeric, got {a.dtype}")
    path = os.path.join(folder, f"{name}-{uuid.uuid4().hex[:12]}.npy")
    tmp = path + ".part"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=a.dtype, shape=a.shape)
    try:
        out[...] = a
        out.flush()
    finally:
        del out
    os.replace(tmp, path)
    return {"npy": path, "shape": [int(s) for s in a.shape], "dtype": a.dtype.str}


def check_array_ref(ref: Any, what: str = "array") -> Tuple[str, Tuple[int, ...], np.dtype]:
    """Validate a reference ``{"npy", "shape", "dtype"}``; returns (path, shape, dtype)."""
    if not isinstance(ref, dict) or not isinstance(ref.get("npy"), str):
        raise ProtocolError(f"{what} must be a reference {{\"npy\": PATH, \"shape\": [...], \"dtype\": ...}}")
    path = ref["npy"]
    if not path.endswith(".npy"):
        raise ProtocolError(f"{what}: {path!r} is not a .npy file")
    shape = ref.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ProtocolError(f"{what}: 'shape' must be a list of sizes")
    try:
        dtype = np.dtype(ref.get("dtype"))
    except TypeError:
        raise ProtocolError(f"{what}: unknown dtype {ref.get('dtype')!r}") from None
    return path, tuple(shape), dtype


def read_array(ref: Dict[str, Any], what: str = "array", copy: bool = True) -> np.ndarray:
    """The array a reference names (memory-mapped; ``copy`` reads it into memory so the file can go).

    :class:`ProtocolError` (exit 2) for a missing file, a pickled or malformed one, or one whose
    shape or dtype differs from the reference's.
    """
    path, shape, dtype = check_array_ref(ref, what)
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ProtocolError(f"{what}: file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise ProtocolError(f"{what}: cannot read {path}: {one_line(str(exc), 200)}") from None
    if tuple(mm.shape) != shape or mm.dtype != dtype:
        raise ProtocolError(f"{what}: {path} holds {mm.dtype.str} {list(mm.shape)}, the reference says "
                            f"{dtype.str} {list(shape)}")
    return np.array(mm) if copy else mm


# -- requests ------------------------------------------------------------------------------------

_NUMBER = (int, float)
#: type -> {field: (accepted Python types, required)}; fields not listed are refused.
REQUEST_FIELDS: Dict[str, Dict[str, Tuple[tuple, bool]]] = {
    "hello": {"protocol": ((int,), True)},
    "load_volume": {"path": ((str,), False), "array": ((dict,), False), "ijk_to_ras": ((list,), False)},
    "prompt": {"frame": ((str,), False), "orientation": ((str,), False), "normal": ((list,), False),
               "slice_axis": ((str,), False), "points": ((list,), False), "labels": ((list,), False),
               "box": ((list,), False), "boxes": ((list,), False), "roi": ((list,), False)},
    "uncertainty": {"mask": ((dict,), True), "slice_axis": ((str,), False), "members": ((int,), False),
                    "seed": ((int,), False)},
    "prefetch": {"slice_axis": ((str,), False), "slices": ((list,), False), "range": ((list,), False),
                 "around": (_NUMBER, False)},
    "cancel": {"target": ((int,), False)},
    "status": {},
    "shutdown": {},
}
REQUEST_FIELDS["propagate"] = dict(REQUEST_FIELDS["prompt"], propagate=((bool,), False))
#: ``correct``: all the prompts (as ``propagate``, without an ROI), the ``result_id`` of the result
#: they correct (``base``), and the one prompt among them that is new (``correction``: ``point`` and
#: ``label``, or ``box``, in the request's frame; or ``{"undo": true}``, the last one taken back).
REQUEST_FIELDS["correct"] = dict({k: v for k, v in REQUEST_FIELDS["prompt"].items() if k != "roi"},
                                 base=((str,), False), correction=((dict,), True))
REQUEST_FIELDS["prompt3d"] = {"frame": ((str,), False), "points": ((list,), True), "labels": ((list,), False)}


def check_request(message: Dict[str, Any]) -> Dict[str, Any]:
    """Check a request's envelope and fields against :data:`REQUEST_FIELDS`; returns it.

    :class:`ProtocolError` (one line, exit 2) for a missing or non-integer id, an unknown type,
    an unknown field, a missing required field or a field of the wrong JSON type.
    """
    rid = message.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ProtocolError("every request needs an integer \"id\"")
    rtype = message.get("type")
    if rtype not in REQUEST_FIELDS:
        raise ProtocolError(f"unknown request type {rtype!r}: use one of {', '.join(REQUEST_TYPES)}")
    fields = REQUEST_FIELDS[rtype]
    for key, value in message.items():
        if key in ("id", "type"):
            continue
        if key not in fields:
            raise ProtocolError(f"{rtype}: unknown field {key!r} (known: {', '.join(sorted(fields)) or 'none'})")
        types, _ = fields[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise ProtocolError(f"{rtype}: field {key!r} must be a {names}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"{rtype}: field {key!r} is not finite")
    for key, (_, required) in fields.items():
        if required and key not in message:
            raise ProtocolError(f"{rtype}: missing field {key!r}")
    return message


def prompt_fields(prompts: Prompts) -> Dict[str, Any]:
    """The fields of a ``prompt``/``propagate`` request (frame ``ijk``) for IJK :class:`Prompts`
    (e.g. the module panel's markups, ``SAMLiverSegLogic.markups_prompts``): the worker rebuilds
    exactly these prompts (``handlers.prompts_from_request``), so its mask is the in-process one."""
    fields: Dict[str, Any] = {"frame": "ijk", "slice_axis": prompts.slice_axis}
    points = [[float(v) for v in p] for p in list(prompts.positive) + list(prompts.negative)]
    if points:
        fields["points"] = points
        fields["labels"] = [1] * len(prompts.positive) + [0] * len(prompts.negative)
    corners = lambda b: [[float(v) for v in b.corner_a], [float(v) for v in b.corner_b]]  # noqa: E731
    if prompts.box is not None:
        fields["box"] = corners(prompts.box)
    if prompts.boxes:
        fields["boxes"] = [corners(b) for b in prompts.boxes]
    if prompts.roi is not None:
        r = prompts.roi
        fields["roi"] = [float(v) for v in (r.i0, r.j0, r.k0, r.i1, r.j1, r.k1)]
    return fields
