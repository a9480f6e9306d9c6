"""The real CT cases beside the project (``../shared/data``), for tests and benchmarks.

They are never copied into the repository. :func:`shared_data_dir` finds the folder (env
``SAMLIVERSEG_SHARED_DATA``, else ``<repo>/../shared/data``, else ``./../shared/data``) and
returns None when it is absent, so that tests can skip with a clear reason. Zipped DICOM series
are extracted once into the cache (env ``SAMLIVERSEG_CACHE``, else ``~/.cache/samliverseg``),
under ``sample-data/``; the extraction is atomic (a folder renamed into place) and is redone
when the zip changes (size or modification time).

* :func:`load_ircadb`: 3D-IRCADb-01 patient 1 (CC BY-NC-ND 4.0): the CT (a DICOM series, so
  ``volume.dicom_files`` is set) and its manual masks (0/1 uint8 ``[k, j, i]``). Masks are
  read straight from ``MASKS_DICOM.zip`` (645 MB once unzipped) and cached as bit-packed
  ``.npz`` files (4 MB), one per structure.
* :func:`load_totalseg_example`: TotalSegmentator's example CT (NIfTI, oblique-free but
  flipped LPS geometry) and its liver model output.
* :func:`totalseg_dicom_dir`: the example's 20-slice DICOM series folder.
* :func:`dcmqi_paths`: the dcmqi 3-slice CT, its ``liver.dcm`` SEG and ``liver_seg.nrrd``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from samliverseg.core.errors import InputError
from samliverseg.io.volume import Volume, read_volume

IRCADB = "ircadb-1.1"
TOTALSEG = "totalseg-example"
DCMQI = "dcmqi-liver-3slice"

#: The liver and its seven tumours (the default structures of :func:`load_ircadb`).
IRCADB_LIVER_STRUCTURES = ("liver",) + tuple(f"livertumor{i:02d}" for i in range(1, 8))


def shared_data_dir() -> Optional[Path]:
    """The shared data folder, or None when it is absent."""
    env = os.environ.get("SAMLIVERSEG_SHARED_DATA")
    if env:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    repo_root = Path(__file__).resolve().parents[2]
    for cand in (repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def missing_reason() -> str:
    return ("shared CT data not found (expected ../shared/data beside the repository, or set"
            " SAMLIVERSEG_SHARED_DATA)")


def _require(sub: str) -> Path:
    root = shared_data_dir()
    if root is None:
        raise InputError(missing_reason())
    p = root / sub
    if not p.exists():
        raise InputError(f"{p} is missing from the shared data folder")
    return p


def cache_dir() -> Path:
    """``<cache>/sample-data``: where zipped series are extracted."""
    base = os.environ.get("SAMLIVERSEG_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "samliverseg"
    d = root / "sample-data"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _stamp(zip_path: Path) -> dict:
    st = zip_path.stat()
    return {"zip": zip_path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def extract_zip_once(zip_path: Path, dest: Path) -> Path:
    """Extract ``zip_path`` into ``dest`` unless an extraction of the same zip is there."""
    stamp = _stamp(zip_path)
    marker = dest / ".extracted.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return dest
        except (OSError, ValueError):
            pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            root = tmp.resolve()
            for member in zf.infolist():
                target = (tmp / member.filename).resolve()
                if root not in target.parents and target != root:
                    raise InputError(f"{zip_path.name} holds an unsafe path {member.filename!r}")
            zf.extractall(tmp)
        (tmp / ".extracted.json").write_text(json.dumps(stamp))
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process won the race: its copy is as good as ours.
            if not (dest / ".extracted.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---------------------------------------------------------------------------------------------
# 3D-IRCADb-01 patient 1
# ---------------------------------------------------------------------------------------------
def ircadb_ct_dir(cache: Optional[Path] = None) -> Path:
    """The extracted ``PATIENT_DICOM`` folder (129 slices)."""
    src = _require(IRCADB) / "PATIENT_DICOM.zip"
    base = Path(cache) if cache is not None else cache_dir()
    return extract_zip_once(src, base / IRCADB / "patient") / "PATIENT_DICOM"


def ircadb_structures() -> Tuple[str, ...]:
    """Names of the structures in ``MASKS_DICOM.zip``."""
    with zipfile.ZipFile(_require(IRCADB) / "MASKS_DICOM.zip") as zf:
        names = {n.split("/")[1] for n in zf.namelist() if n.count("/") >= 2 and n.split("/")[1]}
    return tuple(sorted(names))


def _read_mask_from_zip(zf: zipfile.ZipFile, name: str, volume: Volume) -> np.ndarray:
    import pydicom

    members = [n for n in zf.namelist() if n.startswith(f"MASKS_DICOM/{name}/") and not n.endswith("/")]
    if not members:
        raise InputError(f"no mask named {name!r} in MASKS_DICOM.zip")
    mask = np.zeros(volume.shape, dtype=np.uint8)
    seen = set()
    for m in members:
        ds = pydicom.dcmread(io.BytesIO(zf.read(m)))
        ijk = volume.lps_to_ijk(np.array([float(v) for v in ds.ImagePositionPatient]))
        k = int(round(float(ijk[2])))
        if abs(ijk[2] - k) > 0.01 or abs(ijk[0]) > 0.01 or abs(ijk[1]) > 0.01 or not 0 <= k < volume.shape[0]:
            raise InputError(f"mask slice {m} at {list(ds.ImagePositionPatient)} is not a slice of the CT")
        if k in seen:
            raise InputError(f"two slices of mask {name!r} at k={k}")
        seen.add(k)
        mask[k] = ds.pixel_array > 0
    if len(seen) != volume.shape[0]:
        raise InputError(f"mask {name!r} has {len(seen)} slices, the CT {volume.shape[0]}")
    return mask


def load_ircadb(cache: Optional[Path] = None, structures: Optional[Iterable[str]] = None
                ) -> Tuple[Volume, Dict[str, np.ndarray]]:
    """(CT volume, {structure name: uint8 0/1 mask [k, j, i]}) of 3D-IRCADb-01 patient 1.

    ``structures`` defaults to the liver and its seven tumours (the ``liver`` mask includes the
    tumours). The masks are cached (bit-packed ``.npz``) beside the extracted CT.
    """
    base = Path(cache) if cache is not None else cache_dir()
    volume = read_volume(ircadb_ct_dir(base))
    names = tuple(structures) if structures is not None else IRCADB_LIVER_STRUCTURES
    zip_path = _require(IRCADB) / "MASKS_DICOM.zip"
    stamp = _stamp(zip_path)
    mdir = base / IRCADB / "masks"
    mdir.mkdir(parents=True, exist_ok=True)
    masks: Dict[str, np.ndarray] = {}
    todo = []
    for name in names:
        f = mdir / f"{name}.npz"
        if f.is_file():
            try:
                with np.load(f) as z:
                    if json.loads(str(z["stamp"])) == stamp and tuple(z["shape"]) == volume.shape:
                        n = int(np.prod(volume.shape))
                        masks[name] = np.unpackbits(z["bits"], count=n).reshape(volume.shape)
                        continue
            except (OSError, ValueError, KeyError):
                pass
        todo.append(name)
    if todo:
        with zipfile.ZipFile(zip_path) as zf:
            for name in todo:
                mask = _read_mask_from_zip(zf, name, volume)
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".npz", dir=mdir)
                os.close(fd)
                try:
                    # bit-packed, uncompressed: 1/8 of the size and no inflate on load
                    np.savez(tmp, bits=np.packbits(mask.reshape(-1)), shape=np.array(mask.shape),
                             stamp=json.dumps(stamp))
                    os.replace(tmp, mdir / f"{name}.npz")
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                masks[name] = mask
    return volume, {n: masks[n] for n in names}


def tumor_union(masks: Dict[str, np.ndarray], prefix: str = "livertumor") -> np.ndarray:
    """The union of the masks whose name starts with ``prefix`` (uint8 0/1)."""
    sel = [m for n, m in masks.items() if n.startswith(prefix)]
    if not sel:
        raise InputError(f"no mask named {prefix}*")
    return np.logical_or.reduce(sel).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# TotalSegmentator example, dcmqi fixture
# ---------------------------------------------------------------------------------------------
def load_totalseg_example() -> Tuple[Volume, np.ndarray]:
    """(CT volume from ``example_ct.nii.gz``, liver mask uint8 0/1 on its grid)."""
    from samliverseg.io.export import read_labelmap

    d = _require(TOTALSEG)
    volume = read_volume(d / "example_ct.nii.gz")
    liver = read_labelmap(d / "liver_model_output.nii.gz", volume)
    return volume, (liver > 0).astype(np.uint8)


def totalseg_dicom_dir(cache: Optional[Path] = None) -> Path:
    """The extracted 20-slice DICOM series folder of the TotalSegmentator example."""
    src = _require(TOTALSEG) / "example_ct_dicom.zip"
    base = Path(cache) if cache is not None else cache_dir()
    return extract_zip_once(src, base / TOTALSEG / "dicom") / "example_ct_dicom"


def dcmqi_paths() -> Dict[str, Path]:
    """``{"ct_dir", "seg", "labelmap"}`` of the dcmqi 3-slice liver fixture."""
    d = _require(DCMQI)
    return {"ct_dir": d / "ct-3slice", "seg": d / "liver.dcm", "labelmap": d / "liver_seg.nrrd"}
