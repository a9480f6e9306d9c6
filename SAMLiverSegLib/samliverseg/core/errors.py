"""Errors whose message is meant for the user.

Every error the library raises on bad input derives from :class:`SAMLiverSegError`. Its message
is one line that says what is wrong and, where possible, what to do. The CLI prints it as
``error: <message>`` and exits non-zero without a traceback; the Slicer module shows it in a
message box.
"""


class SAMLiverSegError(Exception):
    """Base class: the message is shown to the user as is."""

    exit_code = 2


class InputError(SAMLiverSegError):
    """A missing, unreadable or unsuitable input file or image (2D, RGB, NaNs, ...)."""


class PromptError(InputError):
    """A prompt that cannot be used: outside the volume, an empty box, an empty slice."""


class CheckpointError(SAMLiverSegError):
    """A checkpoint that is missing, corrupt, or of another architecture."""

    exit_code = 3


class WeightsMissingError(CheckpointError):
    """The weights of a model are not present; the message says where to put them."""


class OutOfMemoryError(SAMLiverSegError):
    """Not enough memory for the input (the message says how much was needed and what to do)."""

    exit_code = 4


class WriteError(SAMLiverSegError):
    """An output that could not be written completely (it failed its check after writing).

    The previous file at that path, if any, is kept as it was; no partial file is left.
    """

    exit_code = 5


class DiskFullError(WriteError):
    """No space left (ENOSPC), quota exceeded (EDQUOT) or file too large (EFBIG) while writing.

    The CLI exits with 5 (training keeps its documented code 3 for a full disk).
    """


class CancelledError(SAMLiverSegError):
    """A long operation (embedding prefetch, propagation) was cancelled by the user."""

    exit_code = 130


#: Exit code of an error nobody foresaw (``--debug`` shows its traceback), for every command.
EXIT_UNEXPECTED = 70
#: Exit code of an out-of-memory failure, for every command.
EXIT_OUT_OF_MEMORY = 4
#: Exit code of an output that could not be written (a full disk, a write that failed its check).
EXIT_WRITE_FAILED = 5

#: Less free space than this where a write failed: the failure was the full disk.
DISK_FULL_FREE_BYTES = 1 << 20
#: Text of the OS errors that mean "no room": ENOSPC, EDQUOT, EFBIG, as strerror words them.
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file too large", "errno 28", "errno 122",
                   "errno 27")


def is_disk_full(exc: BaseException, folder=None) -> bool:
    """True when ``exc`` (or an exception it wraps) means the disk is full.

    The one disk-full detector of the project: an OSError with errno ENOSPC, EDQUOT or EFBIG,
    or an exception whose text says so (torch re-raises a failed write as a RuntimeError,
    e.g. "... file write failed ... No space left on device"). ``__cause__`` and
    ``__context__`` are followed. ``folder``: where the failed write went; torch sometimes words a
    full disk without its errno (e.g. "unexpected pos"), so an OSError/RuntimeError there counts
    when the folder has under :data:`DISK_FULL_FREE_BYTES` free.
    """
    import errno
    import shutil

    first = exc

    codes = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in codes:
            return True
        if isinstance(exc, (OSError, RuntimeError, IOError)) and any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    if folder is not None and isinstance(first, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(str(folder)).free < DISK_FULL_FREE_BYTES
        except OSError:
            return False
    return False


def out_of_memory_kind(exc: BaseException):
    """``"cuda"`` or ``"cpu"`` when ``exc`` is an out-of-memory failure of that device, else None.

    The one out-of-memory detector of the project. CUDA raises ``torch.cuda.OutOfMemoryError``
    (a RuntimeError); torch's CPU allocator raises a RuntimeError ("DefaultCPUAllocator: can't
    allocate memory"), not a MemoryError; other code raises MemoryError. torch is looked up in
    ``sys.modules`` only: an exception from torch implies torch is imported.
    """
    import sys

    torch = sys.modules.get("torch")
    cuda_oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch is not None else None
    text = str(exc)
    if (cuda_oom is not None and isinstance(exc, cuda_oom)) or "CUDA out of memory" in text:
        return "cuda"
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "DefaultCPUAllocator" in text:
        return "cpu"
    if isinstance(exc, RuntimeError) and "out of memory" in text.lower():
        return "cuda" if "cuda" in text.lower() or "mps" in text.lower() else "cpu"
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` is an out-of-memory failure of any device (see :func:`out_of_memory_kind`)."""
    return out_of_memory_kind(exc) is not None
