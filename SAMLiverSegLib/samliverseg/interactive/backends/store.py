"""The on-disk cache of converted models: one folder per (part, weights, backend, version, precision).

``<weights cache>/backends/<part>-<sha16>-<backend>-<version>-<precision>/`` holds the converted
files and ``meta.json``: the full key (weights SHA-256, backend, its version, precision, the
export format, the torch and samliverseg versions), each file's size and SHA-256, the conversion
time and the self-check result. An entry is used only when all of that matches and every file
hashes as recorded; anything else (unreadable meta, a missing or altered file, another version)
is stale or corrupt: it is removed and rebuilt, never trusted. Entries are built in a temporary
folder beside them and renamed into place when complete, so a crash leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Dict, Mapping, Optional

from samliverseg.models.weights import cache_dir

META = "meta.json"
#: Bumped whenever the exported graphs change (inputs, outputs, what is baked in).
FORMAT = 1


def backends_dir() -> Path:
    """Root of the converted-model cache (inside the weights cache folder)."""
    return cache_dir() / "backends"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_name(key: Mapping[str, object]) -> str:
    """The folder name of an entry: readable, and distinct for distinct keys."""
    raw = f"{key['part']}-{str(key['weights_sha256'])[:16]}-{key['backend']}-{key['backend_version']}-{key['precision']}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)


def entry_dir(key: Mapping[str, object]) -> Path:
    return backends_dir() / entry_name(key)


def read_meta(folder: Path) -> Optional[dict]:
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def check_entry(folder: Path, key: Mapping[str, object]) -> Optional[str]:
    """None when ``folder`` is a complete, intact entry for ``key``; else why it is not."""
    if not folder.is_dir():
        return "absent"
    meta = read_meta(folder)
    if meta is None:
        return "its meta.json is missing or unreadable"
    for name, value in key.items():
        if meta.get("key", {}).get(name) != value:
            return f"stale ({name} {meta.get('key', {}).get(name)!r}, expected {value!r})"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return "it lists no files"
    for rel, rec in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != rec.get("size") or file_sha256(p) != rec.get("sha256"):
            return f"{rel} does not match its recorded size and SHA-256"
    return None


def write_entry(folder: Path, key: Mapping[str, object], extra: Optional[Dict[str, object]] = None) -> dict:
    """Write ``meta.json`` for the files already in ``folder`` (every file but the meta)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != META:
            rel = p.relative_to(folder).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    meta = {"key": dict(key), "files": files}
    meta.update(extra or {})
    tmp = folder / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / META)
    return meta


def update_meta(folder: Path, **fields: object) -> None:
    """Add fields to an entry's meta (the self-check result), atomically."""
    meta = read_meta(folder) or {}
    meta.update(fields)
    tmp = folder / (META + f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / META)


def new_build_dir() -> Path:
    """An empty temporary folder beside the entries, for building one (builds a crash left behind
    more than a day ago are removed)."""
    root = backends_dir()
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(".build-*"):
        try:
            if time.time() - old.stat().st_mtime > 86400:
                remove(old)
        except OSError:
            pass
    path = root / f".build-{uuid.uuid4().hex}"
    path.mkdir()
    return path


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def commit(build: Path, key: Mapping[str, object]) -> Path:
    """Move a finished build into place (replacing a stale entry); returns the entry folder.

    Another process may have committed the same entry meanwhile: an intact one is kept and the
    build discarded.
    """
    final = entry_dir(key)
    if final.exists():
        if check_entry(final, key) is None:
            remove(build)
            return final
        remove(final)
    try:
        os.rename(build, final)
    except OSError:
        if check_entry(final, key) is None:
            remove(build)
            return final
        raise
    return final
