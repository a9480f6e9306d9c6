"""``samliverseg prepare``: convert a CT dataset once into a training cache of ``.npz`` files.

This is the ``.nii.gz`` → ``.npz`` conversion of the design digest (section 1), made robust: each
case is read once, windowed to uint8, optionally resampled, and saved compressed with its geometry;
a ``manifest.json`` lists the cases, their train/val split and the cases that were skipped.

Inputs
------
``DATASET`` (positional) is one of:

* an MSD-style ``dataset.json`` (or a folder holding one). ``"training"``: a list of
  ``{"image": ..., "label": ...}`` (an entry without ``"label"`` is an unlabelled case);
  ``"test"``: image paths (or ``{"image": ...}``), taken as unlabelled cases in the ``test``
  split; ``"unlabelled"``/``"unlabeled"``: image paths, unlabelled cases. Paths are relative to
  the json's folder. An entry may carry a ``"patient"`` key (see patient ids below) and a
  ``"split"`` key, ``"train"``, ``"val"`` or ``"test"`` (see the explicit split below).
* a folder of image/label pairs. Pairing rule, first that applies:

  1. sub-folders ``imagesTr/`` + ``labelsTr/`` (or ``images/`` + ``labels/``): an image and its
     label have the **same file name**; an nnU-Net channel suffix ``_0000`` on the image name is
     also accepted (``imagesTr/case_0000.nii.gz`` ↔ ``labelsTr/case.nii.gz``). Images in
     ``imagesTs/`` become unlabelled cases of the ``test`` split.
  2. one flat folder: ``NAME.ext`` is an image and ``NAME_label.ext``, ``NAME_labels.ext``,
     ``NAME_seg.ext``, ``NAME_segmentation.ext`` or ``NAME_mask.ext`` (any supported ending,
     case-insensitive) is its label.

  An image without a label, or a label without an image, is reported in ``problems`` (put
  unlabelled images in a separate ``--unlabelled`` folder).

``--unlabelled DIR``: a folder of unlabelled images (every image file directly in it). It may be
given alone or beside ``DATASET``. Supported files: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``,
``.mha``, ``.mhd``; hidden files (``._x.nii.gz`` from macOS archives) are ignored.

Patient ids and the split
-------------------------
The patient id is the entry's ``"patient"`` key in a dataset.json when present; otherwise the
case name (the image file name without its ending, and without an nnU-Net ``_0000``) with **one**
trailing ``_<digits>`` or ``-<digits>`` series/phase suffix removed, **provided that what remains
still contains a digit** (``p1_0``, ``p1_1`` → ``p1``; ``case012-2`` → ``case012``), so that MSD
names such as ``liver_12``, whose number *is* the patient, stay one patient each.

The split is seeded and by patient: the patients that have at least one labelled case are
shuffled (``random.Random(seed)`` over the sorted ids) and taken into ``val`` while that brings the
number of labelled val cases closer to ``val_fraction`` × the labelled cases (at least one val
patient when there are two or more patients and ``val_fraction > 0``; at least one train patient
always). Every case of a val patient, labelled or not, is in ``val``; all other cases are in
``train``, except the dataset's own test cases (``"test"`` in dataset.json, ``imagesTs/``), which
are in ``test``. So unlabelled cases go to ``train`` unless their patient is a val patient.

Explicit split. A case's split can be fixed instead: by a ``"split"`` key on its dataset.json
entry, or by ``--split-file JSON``, a JSON object mapping case ids to ``"train"``, ``"val"`` or
``"test"`` (``{"liver_0": "train", "liver_7": "test"}``; the split file wins over the entry's
key, which wins over the dataset's own test section). A split file naming a case id that is not
in the input, or any value other than those three, is an :class:`InputError` (a typo must not
silently put a case into training). The seeded patient split above then runs over the remaining
cases only (``val_fraction`` of *their* labelled cases). An explicit split may put cases of one
patient into different splits (a lesion-wise split of one patient's derived labels, say); this
is allowed and logged, since it is the caller's decision. Each manifest entry records where its
split came from in ``split_source``: ``"explicit"``, ``"dataset"`` (the dataset's test cases) or
``"random"``. The split is no part of ``case_hash``: changing it reuses the converted ``.npz``.

Conversion and the cache
------------------------
Each good case becomes ``OUTPUT/cases/<case id>.npz`` (``np.savez_compressed``, written
atomically) with:

* ``image``: uint8 ``[k, j, i]``, the HU image windowed with ``--window`` (``windowing.py``);
* ``label``: uint8 ``[k, j, i]`` (labelled cases only), label values kept (0 background, 1 liver,
  2 tumour) or mapped with ``--labels SRC:DST,...`` (values not listed become 0);
* ``spacing`` (si, sj, sk mm), ``origin`` (LPS mm), ``direction`` (3×3, columns = i, j, k axes):
  the geometry of the saved arrays; ``original_shape`` (k, j, i), ``original_spacing``,
  ``original_origin``, ``original_direction``: the source grid;
* ``source_image``, ``source_label`` ('' when unlabelled), ``case_id``, ``patient_id``,
  ``window`` (spec), ``window_hu`` (low, high), ``settings_hash``, ``case_hash``.

With ``--spacing SX SY SZ`` the image is resampled with SimpleITK (linear; outside voxels get the
image minimum) and the label with nearest neighbour, on a grid with the same origin and
direction and ``round(size × spacing / new spacing)`` voxels per axis. Without it the source grid
is kept. ``case_hash`` covers the conversion settings (window, spacing, label mapping, cache
format) and the source files (resolved path, size, modification time); a rerun reuses an
existing ``.npz`` whose ``case_hash`` matches instead of converting it again (``--force``
reconverts everything).

Bad cases (an unreadable file, an image that is not CT-like by ``check_ct_range``, a label not on
the image's grid, an empty label, a pairing problem) are skipped and recorded in the manifest's
``problems`` list with a one-line reason; the run succeeds when at least one case was converted
or reused and raises :class:`~samliverseg.core.errors.InputError` otherwise, or when the input holds
no image at all.

manifest.json (written atomically)
----------------------------------
::

    {"format": "samliverseg-training-cache", "version": 1, "created": "...",
     "inputs": {"dataset": ".../dataset.json" | null, "unlabelled": "..." | null},
     "settings": {"window": "abdomen", "window_hu": [-160, 240], "spacing": null | [sx, sy, sz],
                  "labels": null | {"1": 1, "2": 2}, "val_fraction": 0.2, "seed": 0,
                  "split_file": null | "...", "explicit_splits": n, "settings_hash": "..."},
     "dataset_labels": {"0": "background", ...} | null,        # from an MSD dataset.json
     "cases": [{"id": "p1_0", "patient": "p1", "file": "cases/p1_0.npz", "image": "...",
                "label": "..." | null, "labelled": true, "split": "train" | "val" | "test",
                "split_source": "random" | "explicit" | "dataset",
                "shape": [k, j, i], "spacing": [si, sj, sk], "original_shape": [k, j, i],
                "original_spacing": [si, sj, sk], "label_values": [0, 1, 2],
                "case_hash": "...", "reused": false}],
     "problems": [{"case": "p7", "image": "..." | null, "label": "..." | null,
                   "kind": "unreadable" | "grid_mismatch" | "empty_label" | "non_ct" |
                           "bad_label" | "missing_label" | "missing_image",
                   "reason": "one line"}],
     "summary": {"cases": n, "converted": n, "reused": n, "skipped": n,
                 "train": n, "val": n, "test": n, "patients": n}}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import SimpleITK as sitk

from samliverseg.core.atomic import atomic_path
from samliverseg.core.geometry import resample
from samliverseg.core.errors import InputError, SAMLiverSegError
from samliverseg.io.export import read_labelmap
from samliverseg.io.volume import IMAGE_SUFFIXES, Volume, check_ct_range, geometry_mismatch, read_volume
from samliverseg.core.windowing import Window, apply_window, get_window

#: Bump when the content of the .npz files changes: old caches are then reconverted.
CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
CASES_DIR = "cases"

LABEL_SUFFIXES = ("_label", "_labels", "_seg", "_segmentation", "_mask")
_PAIR_DIRS = (("imagesTr", "labelsTr"), ("images", "labels"))
_SERIES_SUFFIX = re.compile(r"^(?P<base>.+?)[_-]\d+$")
_NNUNET_CHANNEL = re.compile(r"_0000$")
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------
# case discovery
# ---------------------------------------------------------------------------------------------
@dataclass
class CaseSource:
    """One case found in the input, before conversion."""

    id: str
    image: Path
    label: Optional[Path]
    patient: str
    test: bool = False  # the dataset's own test case (MSD "test", imagesTs/)
    split: Optional[str] = None  # an explicit split ("train" | "val" | "test"), else None


@dataclass
class Problem:
    case: Optional[str]
    image: Optional[str]
    label: Optional[str]
    kind: str
    reason: str

    def as_dict(self) -> Dict[str, Any]:
        return {"case": self.case, "image": self.image, "label": self.label, "kind": self.kind,
                "reason": self.reason}


@dataclass
class _Found:
    cases: List[CaseSource] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)
    dataset_labels: Optional[Dict[str, Any]] = None


def _image_suffix(name: str) -> Optional[str]:
    low = name.lower()
    for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(s):
            return name[len(name) - len(s):]
    return None


def case_name(path: Path) -> str:
    """The file name without its image ending (``liver_0.nii.gz`` → ``liver_0``)."""
    suffix = _image_suffix(path.name)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.stem


def patient_id(name: str) -> str:
    """The patient of a case name: see the module docstring (``p1_0`` → ``p1``, ``liver_12`` stays)."""
    name = _NNUNET_CHANNEL.sub("", name)
    m = _SERIES_SUFFIX.match(name)
    if m and re.search(r"\d", m.group("base")):
        return m.group("base")
    return name


def _image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.resolve().iterdir()
                  if not p.name.startswith(".") and p.is_file() and _image_suffix(p.name) is not None)


def _label_base(name: str) -> Optional[str]:
    low = name.lower()
    for s in LABEL_SUFFIXES:
        if low.endswith(s) and len(name) > len(s):
            return name[: len(name) - len(s)]
    return None


def _discover_dataset_json(path: Path) -> _Found:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not an MSD-style dataset.json (a JSON object with a 'training' list)")
    root = path.parent
    found = _Found(dataset_labels=data.get("labels") if isinstance(data.get("labels"), dict) else None)
    sections = [(k, data.get(k)) for k in ("training", "test", "unlabelled", "unlabeled") if data.get(k) is not None]
    if not sections:
        raise InputError(f"{path} lists no cases: expected a 'training' list of {{'image': ..., 'label': ...}}")
    for key, entries in sections:
        if not isinstance(entries, list):
            raise InputError(f"'{key}' in {path} must be a list")
        for n, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                found.problems.append(Problem(f"{key}[{n}]", None, None, "bad_entry",
                                              f"entry {n} of '{key}' has no 'image' path"))
                continue
            image = (root / entry["image"]).resolve()
            label = entry.get("label") if key == "training" else None
            label_path = (root / label).resolve() if isinstance(label, str) else None
            name = case_name(image)
            pid = str(entry["patient"]) if entry.get("patient") not in (None, "") else patient_id(name)
            split = entry.get("split")
            if split is not None and split not in SPLITS:
                raise InputError(f"entry {n} of '{key}' in {path}: 'split' must be one of {', '.join(SPLITS)}, "
                                 f"got {split!r}")
            found.cases.append(CaseSource(name, image, label_path, pid, test=(key == "test"), split=split))
    return found


def _discover_pairs_folder(folder: Path) -> _Found:
    if (folder / "dataset.json").is_file():
        return _discover_dataset_json(folder / "dataset.json")
    found = _Found()
    for img_dir, lab_dir in _PAIR_DIRS:
        if (folder / img_dir).is_dir():
            labels = {p.name.lower(): p for p in _image_files(folder / lab_dir)} if (folder / lab_dir).is_dir() else {}
            used: Set[str] = set()
            for image in _image_files(folder / img_dir):
                name = case_name(image)
                suffix = _image_suffix(image.name) or ""
                candidates = [image.name.lower(), (_NNUNET_CHANNEL.sub("", name) + suffix).lower()]
                key = next((c for c in candidates if c in labels), None)
                if key is None:
                    found.problems.append(Problem(name, str(image), None, "missing_label",
                                                  f"no label named {image.name} in {lab_dir}/"))
                    continue
                used.add(key)
                found.cases.append(CaseSource(name, image, labels[key], patient_id(name)))
            for key, lab in labels.items():
                if key not in used:
                    found.problems.append(Problem(case_name(lab), None, str(lab), "missing_image",
                                                  f"label {lab.name} has no image of the same name in {img_dir}/"))
            if (folder / "imagesTs").is_dir() and img_dir == "imagesTr":
                for image in _image_files(folder / "imagesTs"):
                    name = case_name(image)
                    found.cases.append(CaseSource(name, image, None, patient_id(name), test=True))
            return found
    files = _image_files(folder)
    labels: Dict[str, Path] = {}
    images: Dict[str, Path] = {}
    for f in files:
        name = case_name(f)
        base = _label_base(name)
        if base is not None:
            labels.setdefault(base.lower(), f)
        else:
            images[name.lower()] = f
    for key, image in images.items():
        name = case_name(image)
        if key not in labels:
            found.problems.append(Problem(name, str(image), None, "missing_label",
                                          f"no label file {name}{{{','.join(LABEL_SUFFIXES)}}}.ext beside it"))
            continue
        found.cases.append(CaseSource(name, image, labels[key], patient_id(name)))
    for key, lab in labels.items():
        if key not in images:
            found.problems.append(Problem(case_name(lab), None, str(lab), "missing_image",
                                          f"label {lab.name} has no image file beside it"))
    return found


def discover(dataset: Optional[Path], unlabelled: Optional[Path]) -> _Found:
    """The cases of the inputs (no file is read but dataset.json); raises InputError on no input."""
    if dataset is None and unlabelled is None:
        raise InputError("nothing to prepare: give a dataset.json, a folder of image/label pairs, or --unlabelled DIR")
    found = _Found()
    if dataset is not None:
        dataset = Path(dataset).expanduser()
        if not dataset.exists():
            raise InputError(f"{dataset} does not exist")
        if dataset.is_file():
            if dataset.suffix.lower() != ".json":
                raise InputError(f"{dataset} is neither a dataset.json nor a folder of image/label pairs")
            found = _discover_dataset_json(dataset)
        else:
            found = _discover_pairs_folder(dataset)
        if not found.cases and not found.problems:
            raise InputError(f"{dataset} holds no images (supported: {', '.join(IMAGE_SUFFIXES)})")
    if unlabelled is not None:
        unlabelled = Path(unlabelled).expanduser()
        if not unlabelled.is_dir():
            raise InputError(f"--unlabelled {unlabelled} is not a folder")
        files = _image_files(unlabelled)
        if not files:
            raise InputError(f"--unlabelled folder {unlabelled} holds no images (supported: {', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            name = case_name(f)
            found.cases.append(CaseSource(name, f.resolve(), None, patient_id(name)))
    # unique case ids (they name the .npz files)
    seen: Dict[str, int] = {}
    for c in found.cases:
        key = c.id.lower()
        if key in seen:
            seen[key] += 1
            c.id = f"{c.id}__{seen[key]}"
        else:
            seen[key] = 1
    return found


# ---------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------
def split_patients(labelled_per_patient: Mapping[str, int], val_fraction: float = 0.2, seed: int = 0) -> Set[str]:
    """The val patients; see the module docstring. ``labelled_per_patient``: patient → labelled cases."""
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction must lie in [0, 1), got {val_fraction:g}")
    ids = sorted(labelled_per_patient)
    if val_fraction == 0.0 or len(ids) < 2:
        return set()
    random.Random(seed).shuffle(ids)
    target = val_fraction * sum(labelled_per_patient.values())
    val: Set[str] = set()
    count = 0
    for pid in ids:
        if len(val) >= len(ids) - 1:
            break
        n = labelled_per_patient[pid]
        if abs(count + n - target) < abs(count - target):
            val.add(pid)
            count += n
    if not val:
        val.add(min(ids, key=lambda p: labelled_per_patient[p]))  # first smallest in shuffled order
    return val


def load_split_file(path: Path) -> Dict[str, str]:
    """``--split-file``: a JSON object ``{case id: "train" | "val" | "test"}``; InputError otherwise."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"--split-file {p} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read --split-file {p}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"--split-file {p} must be a JSON object mapping case ids to "
                         f"{', '.join(SPLITS)} (e.g. {{\"liver_0\": \"train\"}})")
    bad = {k: v for k, v in data.items() if v not in SPLITS}
    if bad:
        k, v = next(iter(bad.items()))
        raise InputError(f"--split-file {p}: the split of {k!r} must be one of {', '.join(SPLITS)}, got {v!r}")
    return {str(k): str(v) for k, v in data.items()}


def apply_split_file(cases: Sequence[CaseSource], splits: Mapping[str, str], source: str = "--split-file") -> int:
    """Set ``case.split`` from ``splits`` (case id -> split); every id must be a case. Returns the count."""
    by_id = {c.id: c for c in cases}
    unknown = sorted(k for k in splits if k not in by_id)
    if unknown:
        known = ", ".join(sorted(by_id)[:5]) + (", ..." if len(by_id) > 5 else "")
        raise InputError(f"{source} names {len(unknown)} case id(s) that are not in the input: "
                         f"{', '.join(unknown[:5])} (case ids are the image file names without their ending: {known})")
    for k, v in splits.items():
        by_id[k].split = v
    return len(splits)


# ---------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------
def parse_label_map(spec: Optional[str]) -> Optional[Dict[int, int]]:
    """``"1:1,2:1"`` → {1: 1, 2: 1}; None/'' → None (keep the values)."""
    if spec is None or not str(spec).strip():
        return None
    out: Dict[int, int] = {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        bits = part.replace("=", ":").split(":")
        try:
            src, dst = (int(b) for b in bits)
        except ValueError:
            raise InputError(f"--labels {spec!r}: each item must be SRC:DST with integer label values, e.g. '1:1,2:2'") from None
        if not (0 <= src <= 255 and 0 <= dst <= 255):
            raise InputError(f"--labels {spec!r}: label values must lie in 0..255")
        out[src] = dst
    return out or None


def settings_hash(window: Window, spacing: Optional[Sequence[float]], labels: Optional[Mapping[int, int]]) -> str:
    blob = json.dumps({"version": CACHE_VERSION, "window": [window.low, window.high, window.keep_zero],
                       "spacing": [float(s) for s in spacing] if spacing else None,
                       "labels": sorted((int(k), int(v)) for k, v in labels.items()) if labels else None},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _file_key(p: Optional[Path]) -> str:
    if p is None:
        return "-"
    try:
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{p}|missing"


def _case_hash(settings: str, case: CaseSource) -> str:
    blob = f"{settings}|{_file_key(case.image)}|{_file_key(case.label)}|{case.id}|{case.patient}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Skip(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())[:300]


def _load_case(case: CaseSource, lut: Optional[np.ndarray]) -> Tuple[Volume, Optional[np.ndarray]]:
    try:
        vol = read_volume(case.image)
    except InputError as exc:
        raise _Skip("unreadable", f"image: {_one_line(exc)}") from None
    warn = check_ct_range(vol)
    if warn:
        raise _Skip("non_ct", f"not a CT intensity range: {warn}")
    if case.label is None:
        return vol, None
    if not case.label.is_file():
        raise _Skip("unreadable", f"label file {case.label} does not exist")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(case.label))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        raise _Skip("unreadable", f"label: cannot read {case.label.name}: {_one_line(lines[-1])}") from None
    why = None
    if reader.GetDimension() == 3:
        why = geometry_mismatch(vol, tuple(reversed(reader.GetSize())), reader.GetSpacing(), reader.GetOrigin(),
                                np.asarray(reader.GetDirection(), dtype=float).reshape(3, 3))
    try:
        label = read_labelmap(case.label, vol)  # also accepts a cropped label on a sub-box of the grid
    except InputError as exc:
        if why is not None:
            raise _Skip("grid_mismatch", _one_line(f"label not on the image grid: {why}")) from None
        if "cannot read" in str(exc):
            raise _Skip("unreadable", f"label: {_one_line(exc)}") from None
        raise _Skip("bad_label", f"label: {_one_line(exc)}") from None
    if lut is not None:
        label = lut[label]
    if not label.any():
        raise _Skip("empty_label", "the label is empty (no foreground voxel" + (" after --labels mapping)" if lut is not None else ")"))
    return vol, label


def _convert(case: CaseSource, target: Path, window: Window, spacing: Optional[Sequence[float]],
             lut: Optional[np.ndarray], s_hash: str, c_hash: str) -> Dict[str, Any]:
    vol, label = _load_case(case, lut)
    original = {"original_shape": np.asarray(vol.shape, dtype=np.int64),
                "original_spacing": np.asarray(vol.spacing, dtype=np.float64),
                "original_origin": np.asarray(vol.origin, dtype=np.float64),
                "original_direction": np.asarray(vol.direction, dtype=np.float64)}
    hu = vol.array
    out_spacing, out_origin, out_direction = vol.spacing, vol.origin, vol.direction
    if spacing is not None:
        # same origin and direction, round(n s / t) voxels per axis (automatic.unet resamples alike)
        hu, grid = resample(hu, vol.grid, spacing, interpolator="linear", default_value=float(hu.min()), extent="round")
        hu = hu.astype(np.float32, copy=False)
        if label is not None:
            label = resample(label.astype(np.uint8), vol.grid, grid, interpolator="nearest", default_value=0).array
            if not label.any():
                raise _Skip("empty_label", f"the label is empty after resampling to {tuple(spacing)} mm")
        out_spacing, out_origin, out_direction = grid.spacing, grid.origin, grid.direction_matrix
    arrays: Dict[str, Any] = {
        "image": np.ascontiguousarray(apply_window(hu, window)),
        "spacing": np.asarray(out_spacing, dtype=np.float64),
        "origin": np.asarray(out_origin, dtype=np.float64),
        "direction": np.asarray(out_direction, dtype=np.float64),
        **original,
        "source_image": np.asarray(str(case.image)),
        "source_label": np.asarray(str(case.label) if case.label else ""),
        "case_id": np.asarray(case.id),
        "patient_id": np.asarray(case.patient),
        "window": np.asarray(window.spec()),
        "window_hu": np.asarray([window.low, window.high], dtype=np.float64),
        "settings_hash": np.asarray(s_hash),
        "case_hash": np.asarray(c_hash),
    }
    if label is not None:
        arrays["label"] = np.ascontiguousarray(label.astype(np.uint8, copy=False))
    try:
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
    except OSError as exc:
        raise SAMLiverSegError(f"cannot write {target}: {exc.strerror or exc} (is the disk full?)") from None
    return _entry_info(arrays)


def _entry_info(arrays: Mapping[str, Any]) -> Dict[str, Any]:
    return {"shape": [int(v) for v in arrays["image"].shape],
            "spacing": [float(v) for v in arrays["spacing"]],
            "original_shape": [int(v) for v in arrays["original_shape"]],
            "original_spacing": [float(v) for v in arrays["original_spacing"]],
            "label_values": [int(v) for v in np.unique(arrays["label"])] if "label" in arrays else None}


def _cached_info(target: Path, c_hash: str) -> Optional[Dict[str, Any]]:
    """The manifest info of an existing .npz converted with the same settings, else None."""
    if not target.is_file():
        return None
    try:
        with np.load(target, allow_pickle=False) as z:
            if str(z["case_hash"]) != c_hash:
                return None
            info = {"spacing": [float(v) for v in z["spacing"]],
                    "original_shape": [int(v) for v in z["original_shape"]],
                    "original_spacing": [float(v) for v in z["original_spacing"]]}
            # the array shape from the .npy header, without decompressing the data
            info["shape"] = _npz_shape(z, "image")
            info["label_values"] = [int(v) for v in np.unique(z["label"])] if "label" in z.files else None
            return info
    except Exception:  # noqa: BLE001 - unreadable or partial cache file: convert again
        return None


def _npz_shape(z: Any, key: str) -> List[int]:
    with z.zip.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)
    return [int(v) for v in shape]


# ---------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------
def prepare_dataset(output: Path, dataset: Optional[Path] = None, unlabelled: Optional[Path] = None,
                    window: str = "abdomen", spacing: Optional[Sequence[float]] = None,
                    val_fraction: float = 0.2, seed: int = 0, labels: Optional[str] = None,
                    force: bool = False, log: Optional[Callable[[str], None]] = None,
                    split_file: Optional[Path] = None) -> Dict[str, Any]:
    """Convert the inputs into the cache at ``output``; returns the manifest (also written there).

    ``split_file``: a JSON file ``{case id: "train" | "val" | "test"}`` fixing those cases' split
    (module docstring). Raises :class:`InputError` for unusable input (no images, no case that
    could be converted, a bad split file).
    """
    log = log or (lambda msg: None)
    w = get_window(window)
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
            raise InputError(f"--spacing needs three positive values in mm (SX SY SZ), got {spacing}")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction must lie in [0, 1), got {val_fraction:g}")
    mapping = parse_label_map(labels)
    lut = None
    if mapping is not None:
        lut = np.zeros(256, dtype=np.uint8)
        for src, dst in mapping.items():
            lut[src] = dst
    found = discover(Path(dataset) if dataset is not None else None, Path(unlabelled) if unlabelled is not None else None)
    if split_file is not None:
        apply_split_file(found.cases, load_split_file(Path(split_file)), f"--split-file {split_file}")
    explicit = {c.id: c.split for c in found.cases if c.split is not None}
    if not found.cases:
        reasons = "; ".join(f"{p.case}: {p.reason}" for p in found.problems[:3])
        raise InputError(f"no usable case in the input ({len(found.problems)} problem(s): {reasons})")

    output = Path(output).expanduser()
    cases_dir = output / CASES_DIR
    try:
        cases_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the cache folder {cases_dir}: {exc.strerror or exc}") from None
    s_hash = settings_hash(w, spacing, mapping)

    entries: List[Dict[str, Any]] = []
    problems = list(found.problems)
    n_conv = n_reused = 0
    for n, case in enumerate(found.cases, 1):
        target = cases_dir / f"{case.id}.npz"
        c_hash = _case_hash(s_hash, case)
        info = None if force else _cached_info(target, c_hash)
        reused = info is not None
        if info is None:
            try:
                info = _convert(case, target, w, spacing, lut, s_hash, c_hash)
            except _Skip as skip:
                problems.append(Problem(case.id, str(case.image), str(case.label) if case.label else None,
                                        skip.kind, skip.reason))
                log(f"[{n}/{len(found.cases)}] {case.id}: skipped ({skip.kind}): {skip.reason}")
                continue
            n_conv += 1
            log(f"[{n}/{len(found.cases)}] {case.id}: converted {tuple(info['shape'])}")
        else:
            n_reused += 1
            log(f"[{n}/{len(found.cases)}] {case.id}: up to date")
        entries.append({"id": case.id, "patient": case.patient, "file": f"{CASES_DIR}/{case.id}.npz",
                        "image": str(case.image), "label": str(case.label) if case.label else None,
                        "labelled": case.label is not None, "split": None, "test": case.test,
                        "shape": info["shape"], "spacing": info["spacing"],
                        "original_shape": info["original_shape"], "original_spacing": info["original_spacing"],
                        "label_values": info.get("label_values"), "case_hash": c_hash, "reused": reused})

    if not entries:
        reasons = "; ".join(f"{p.case}: {p.reason}" for p in problems[:3])
        raise InputError(f"no case could be converted: {len(problems)} problem(s), e.g. {reasons}")

    per_patient: Dict[str, int] = {}
    for e in entries:
        if e["labelled"] and not e["test"] and e["id"] not in explicit:
            per_patient[e["patient"]] = per_patient.get(e["patient"], 0) + 1
    val_patients = split_patients(per_patient, val_fraction, seed)
    for e in entries:
        test = e.pop("test")
        if e["id"] in explicit:
            e["split"], e["split_source"] = explicit[e["id"]], "explicit"
        elif test:
            e["split"], e["split_source"] = "test", "dataset"
        else:
            e["split"], e["split_source"] = ("val" if e["patient"] in val_patients else "train"), "random"
    patient_splits: Dict[str, Set[str]] = {}
    for e in entries:
        patient_splits.setdefault(e["patient"], set()).add(e["split"])
    for pid, sp in sorted(patient_splits.items()):
        if len(sp) > 1 and any(e["patient"] == pid and e["split_source"] == "explicit" for e in entries):
            log(f"note: patient {pid} has cases in {' and '.join(s for s in SPLITS if s in sp)} "
                f"(explicit split): make sure no label of a test/val case is used in training")

    counts = {s: sum(e["split"] == s for e in entries) for s in ("train", "val", "test")}
    manifest = {
        "format": "samliverseg-training-cache",
        "version": CACHE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {"dataset": str(Path(dataset).expanduser().resolve()) if dataset is not None else None,
                   "unlabelled": str(Path(unlabelled).expanduser().resolve()) if unlabelled is not None else None},
        "settings": {"window": w.spec(), "window_hu": [w.low, w.high], "spacing": list(spacing) if spacing else None,
                     "labels": {str(k): v for k, v in sorted(mapping.items())} if mapping else None,
                     "val_fraction": val_fraction, "seed": seed,
                     "split_file": str(Path(split_file).expanduser().resolve()) if split_file is not None else None,
                     "explicit_splits": sum(e["split_source"] == "explicit" for e in entries),
                     "settings_hash": s_hash},
        "dataset_labels": found.dataset_labels,
        "cases": entries,
        "problems": [p.as_dict() for p in problems],
        "summary": {"cases": len(entries), "converted": n_conv, "reused": n_reused, "skipped": len(problems),
                    **counts, "patients": len({e["patient"] for e in entries})},
    }
    try:
        with atomic_path(output / MANIFEST_NAME) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise SAMLiverSegError(f"cannot write {output / MANIFEST_NAME}: {exc.strerror or exc}") from None
    return manifest


def load_manifest(output: Path) -> Dict[str, Any]:
    """The manifest of a prepared cache (for the trainers)."""
    p = Path(output).expanduser() / MANIFEST_NAME
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{p} not found: run `samliverseg prepare` first") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {p}: {str(exc).splitlines()[0]}") from None


def summary_text(manifest: Mapping[str, Any]) -> str:
    s = manifest["summary"]
    lines = [f"prepared {s['cases']} case(s) ({s['converted']} converted, {s['reused']} already up to date) "
             f"from {s['patients']} patient(s): train {s['train']}, val {s['val']}, test {s['test']}; "
             f"skipped {s['skipped']}"]
    for p in manifest["problems"]:
        lines.append(f"  skipped {p['case']}: {p['kind']}: {p['reason']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``prepare`` arguments to an (sub)parser."""
    parser.add_argument("dataset", nargs="?", default=None,
                        help="an MSD-style dataset.json, or a folder of image/label pairs "
                             "(imagesTr/+labelsTr/ with the same names, or NAME.nii.gz + NAME_label|_seg.nii.gz)")
    parser.add_argument("--unlabelled", "--unlabeled", dest="unlabelled", default=None, metavar="DIR",
                        help="a folder of unlabelled images (for semi-supervised training)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="the training cache folder")
    parser.add_argument("--window", default="abdomen",
                        help="CT window: wide, liver, abdomen (default) or 'low,high' in HU")
    parser.add_argument("--spacing", nargs=3, type=float, default=None, metavar=("SX", "SY", "SZ"),
                        help="resample to this spacing in mm (default: keep each case's spacing)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="fraction of the labelled cases in the validation split, by patient (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    parser.add_argument("--split-file", default=None, metavar="JSON",
                        help="a JSON object {case id: train|val|test} fixing those cases' split (the others are "
                             "split by patient as usual); a dataset.json entry may also carry \"split\"")
    parser.add_argument("--labels", default=None, metavar="SRC:DST,...",
                        help="map label values, e.g. '1:1,2:2' (unlisted values become 0); default: keep them "
                             "(0 background, 1 liver, 2 tumour)")
    parser.add_argument("--force", action="store_true", help="convert every case again, even if up to date")
    return parser


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``prepare`` from parsed arguments; prints a summary. Returns 0 (InputError on unusable input)."""
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    manifest = prepare_dataset(output=Path(args.output), dataset=args.dataset, unlabelled=args.unlabelled,
                               window=args.window, spacing=args.spacing, val_fraction=args.val_fraction,
                               seed=args.seed, labels=args.labels, force=getattr(args, "force", False), log=log,
                               split_file=getattr(args, "split_file", None))
    print(summary_text(manifest))
    print(f"manifest: {Path(args.output).expanduser() / MANIFEST_NAME}")
    return 0
