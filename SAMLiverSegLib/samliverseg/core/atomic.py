"""Atomic file writes that cannot lie: a reader never sees a half-written or empty output.

:func:`atomic_path` is the one helper every writer of the project uses (images, ``.seg.nrrd``,
DICOM SEG, JSON, checkpoints, caches). It yields a temporary path in the target's folder; when
the writer is done it

1. fsyncs the temporary file (a full disk that the writer did not notice shows up here),
2. checks it: not empty, and the optional ``check(tmp)`` (e.g. re-read an image's header),
3. gives it normal permissions (``0o666 & ~umask``, not ``mkstemp``'s 0600),
4. renames it over the target and fsyncs the folder.

Any error leaves the old target exactly as it was and removes the temporary file. A full disk
(ENOSPC, EDQUOT, EFBIG, also wrapped by torch in a RuntimeError) becomes a one-line
:class:`~samliverseg.core.errors.DiskFullError`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from samliverseg.core.errors import DiskFullError, InputError, SAMLiverSegError, WriteError, is_disk_full

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened (Windows): the rename is done all the same
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync folders
    finally:
        os.close(fd)


def temp_suffix(target: Path) -> str:
    """The temporary file's suffix: ``.tmp`` and the target's suffixes in lower case (writers that
    pick the format from the extension, like ITK, then see ``.nii.gz`` for ``RESULT.NII.GZ``).
    Every temporary file is ``.NAME.XXXXXXXX.tmp<suffixes>``: :func:`is_temp_name` knows them."""
    return ".tmp" + "".join(target.suffixes).lower()


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file :func:`atomic_path` makes (a write that never finished
    leaves one behind when its process is killed)."""
    return name.startswith(".") and ".tmp" in name


@contextlib.contextmanager
def atomic_path(path: PathLike, check: Optional[Callable[[Path], None]] = None,
                allow_empty: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, make it ``path``.

    ``check(tmp)`` runs on the finished temporary file before the rename and raises when it is
    not what was meant to be written. An empty file is refused unless ``allow_empty``.
    """
    target = Path(path)
    if target.is_dir():
        raise InputError(f"output {target} is a folder; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=temp_suffix(target),
                                        dir=target.parent)
        os.close(fd)
    except OSError as exc:
        if is_disk_full(exc, target.parent):
            raise DiskFullError(f"disk full: cannot write {target} ({exc.strerror})") from None
        raise InputError(f"cannot write {target}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        if not allow_empty and tmp.stat().st_size == 0:
            raise _failed_write(target, "the file came out empty")
        if check is not None:
            try:
                check(tmp)
            except WriteError:
                raise
            except Exception as exc:  # noqa: BLE001 - a writer that did not notice its own failure
                raise _failed_write(target, f"the written file does not read back ({_first_line(exc)})") from None
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(exc, SAMLiverSegError) and is_disk_full(exc, target.parent):
            raise DiskFullError(f"disk full: cannot write {target}; {_kept(target)}") from None
        raise


def _kept(target: Path) -> str:
    return "the previous file is kept" if target.exists() else "nothing was written"


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:160]


def _free_bytes(folder: Path) -> Optional[int]:
    try:
        st = os.statvfs(str(folder))
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _failed_write(target: Path, why: str) -> WriteError:
    """A writer that reported success but left a bad file: a full disk when the folder has
    (almost) no room left (ITK's writers do not always report ENOSPC), else a failed write."""
    free = _free_bytes(target.parent)
    if free is not None and free < (1 << 20):
        return DiskFullError(f"disk full: cannot write {target} ({why}); {_kept(target)}")
    return WriteError(f"cannot write {target}: {why}; {_kept(target)}")


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_path`, checked by reading it back."""
    data = text.encode(encoding)

    def same(tmp: Path) -> None:
        if tmp.read_bytes() != data:
            raise WriteError(f"{tmp.name} does not read back as written")

    target = Path(path)
    with atomic_path(target, check=same, allow_empty=not data) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return target
