"""Writing (and reading back) label maps on the exact grid of the input volume.

* :func:`write_labelmap`: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``) or MetaImage
  (``.mha``), uint8, with the volume's origin, spacing and direction. Two-file formats
  (``.nhdr``, ``.mhd``) are refused: they cannot be written atomically.
* :func:`write_seg_nrrd`: a 3D Slicer segmentation (``.seg.nrrd``): one uint8 labelmap layer on
  the full input grid, plus Slicer's ``Segment<N>_*`` header fields (ID, name, colour, label
  value, layer, extent, terminology tags), so Slicer opens it as named, coloured segments.
  Written by a small NRRD writer here (gzip), with ``space: left-posterior-superior``;
  ``space directions`` are the columns of ``direction · diag(spacing)``.
* :func:`write_dicom_seg`: a DICOM Segmentation (BINARY, highdicom) referencing the source
  series; needs ``volume.dicom_files`` (a volume read from a DICOM series).
* :func:`read_labelmap`, :func:`read_dicom_seg`: read labels back onto a volume's grid, with a
  clear :class:`~samliverseg.core.errors.InputError` when the grid differs.

Every write goes through :func:`samliverseg.core.atomic.atomic_path`: on failure no file (and no
temporary file) is left behind.

Terminology follows 3D Slicer's conventions ("3D Slicer General Anatomy list"): Liver is
category SCT 123037004 "Anatomical Structure", type SCT 10200004 "Liver"; a liver tumour is
category SCT 49755003 "Morphologically Altered Structure", type SCT 108369006 "Neoplasm", with
anatomic region SCT 10200004 "Liver". (Current DICOM editions name 49755003 "Morphologically
Abnormal Structure" and list SCT 91723000 for "Anatomical Structure" in CID 7150; the codes
above are the ones Slicer's terminology and dcmqi-exported Slicer segmentations use.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from samliverseg import __version__
from samliverseg.core.atomic import atomic_path
from samliverseg.core.errors import DiskFullError, InputError, WriteError, is_disk_full
from samliverseg.io.volume import Volume, check_nifti_complete, geometry_mismatch, itk_quiet

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.7"

SLICER_CATEGORY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


class Code(NamedTuple):
    """A coded concept: (code value, coding scheme designator, code meaning)."""

    value: str
    scheme: str
    meaning: str

    def slicer(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"

    @staticmethod
    def from_slicer(text: str) -> Optional["Code"]:
        parts = text.split("^")
        if len(parts) != 3 or not parts[1]:
            return None
        return Code(parts[1], parts[0], parts[2])


SCT_ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
SCT_MORPHOLOGICALLY_ALTERED_STRUCTURE = Code("49755003", "SCT", "Morphologically Altered Structure")
SCT_LIVER = Code("10200004", "SCT", "Liver")
SCT_NEOPLASM = Code("108369006", "SCT", "Neoplasm")


@dataclass(frozen=True)
class SegmentInfo:
    """One segment: its value in the label map, name, display colour (RGB 0..1) and coded
    terminology (DICOM code triplets)."""

    label_value: int
    name: str
    color: Tuple[float, float, float]
    category: Code
    type: Code
    type_modifier: Optional[Code] = None
    anatomic_region: Optional[Code] = None
    anatomic_region_modifier: Optional[Code] = None
    segment_id: Optional[str] = None
    algorithm_type: str = "SEMIAUTOMATIC"

    @property
    def slicer_id(self) -> str:
        return self.segment_id or f"Segment_{self.label_value}"

    def terminology_entry(self) -> str:
        """Slicer's ``TerminologyEntry`` tag value:
        ``context~category~type~typeModifier~anatomicContext~region~regionModifier``."""
        empty = "^^"
        return "~".join([
            SLICER_CATEGORY_CONTEXT,
            self.category.slicer(),
            self.type.slicer(),
            self.type_modifier.slicer() if self.type_modifier else empty,
            SLICER_ANATOMIC_CONTEXT,
            self.anatomic_region.slicer() if self.anatomic_region else empty,
            self.anatomic_region_modifier.slicer() if self.anatomic_region_modifier else empty,
        ])

    def with_label(self, label_value: int, name: Optional[str] = None, segment_id: Optional[str] = None) -> "SegmentInfo":
        """A copy with another label value (and optionally another name / segment ID); the
        colour and terminology are kept. The segment ID follows the label value unless given."""
        return dataclasses.replace(self, label_value=int(label_value), name=self.name if name is None else str(name),
                                   segment_id=segment_id)

    def rgb255(self) -> Tuple[int, int, int]:
        return tuple(int(round(min(max(c, 0.0), 1.0) * 255)) for c in self.color)  # type: ignore[return-value]


#: Liver: Slicer's colour for liver (221, 130, 101).
LIVER = SegmentInfo(1, "Liver", (221 / 255, 130 / 255, 101 / 255), SCT_ANATOMICAL_STRUCTURE, SCT_LIVER)
#: Liver tumour: light green, distinct from the liver's colour.
LIVER_TUMOR = SegmentInfo(2, "Liver tumor", (144 / 255, 238 / 255, 144 / 255),
                          SCT_MORPHOLOGICALLY_ALTERED_STRUCTURE, SCT_NEOPLASM, anatomic_region=SCT_LIVER)
DEFAULT_SEGMENTS: Tuple[SegmentInfo, ...] = (LIVER, LIVER_TUMOR)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def _as_labels(labels: np.ndarray, volume: Volume) -> np.ndarray:
    """Labels as uint8 [k, j, i] on the volume's grid; InputError otherwise."""
    a = np.asarray(labels)
    if a.shape != volume.shape:
        raise InputError(f"labels of shape {a.shape} (k, j, i) do not match the volume's {volume.shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
            raise InputError("labels must be whole numbers (a label map), not probabilities")
    elif not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"labels must be integers, got {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise InputError(f"label values must lie in 0..255, got {a.min()}..{a.max()}")
    return a.astype(np.uint8)


def _check_segments(segments: Sequence[SegmentInfo], labels: np.ndarray) -> List[SegmentInfo]:
    segs = list(segments)
    if not segs:
        raise InputError("no segment given")
    values = [int(s.label_value) for s in segs]
    if any(v < 1 or v > 255 for v in values):
        raise InputError(f"segment label values must be 1..255, got {values}")
    if len(set(values)) != len(values):
        raise InputError(f"two segments share a label value: {values}")
    ids = [s.slicer_id for s in segs]
    if len(set(ids)) != len(ids):
        raise InputError(f"two segments share an ID: {ids}")
    present = set(np.unique(labels).tolist()) - {0}
    missing = sorted(present - set(values))
    if missing:
        raise InputError(f"label value(s) {missing} have no segment description; give a SegmentInfo for each")
    return segs


# ---------------------------------------------------------------------------------------------
# plain label maps
# ---------------------------------------------------------------------------------------------
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def write_labelmap(labels: np.ndarray, volume: Volume, path: PathLike) -> Path:
    """Write uint8 labels [k, j, i] on the volume's exact grid (format from the extension)."""
    target = Path(path)
    name = target.name.lower()
    if not any(name.endswith(s) for s in LABELMAP_SUFFIXES):
        raise InputError(f"cannot write a label map to {target.name!r}: use one of {', '.join(LABELMAP_SUFFIXES)}")
    image = volume.to_sitk(_as_labels(labels, volume))
    with atomic_path(target, check=image_file_check(volume)) as tmp:
        try:
            with itk_quiet() as said:
                sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as exc:
            if is_disk_full(exc) or "no space left" in said.text.lower():
                raise DiskFullError(f"disk full: cannot write {target}; "
                                    f"{'the previous file is kept' if target.exists() else 'nothing was written'}") from None
            raise WriteError(f"cannot write {target}: {_itk_message(exc)}") from None
    return target


def image_file_check(volume: Volume):
    """A ``check`` for :func:`~samliverseg.core.atomic.atomic_path`: the written image file reads
    back whole (a cut NIfTI is caught too; ITK's NIfTI writer reports success on a full disk)
    with the volume's size."""
    def check(tmp: Path) -> None:
        check_nifti_complete(tmp)
        with itk_quiet():
            image = sitk.ReadImage(str(tmp))
        if tuple(image.GetSize()) != tuple(volume.shape_ijk):
            raise WriteError(f"{tmp.name} reads back with size {image.GetSize()}, not {volume.shape_ijk}")
    return check


def _itk_message(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def read_labelmap(path: PathLike, volume: Optional[Volume] = None, tol_mm: float = 1e-3) -> np.ndarray:
    """Read a label image as uint8 [k, j, i].

    With ``volume``, the label grid must be the volume's (within ``tol_mm``), or a sub-box of
    it with the same spacing and direction (as Slicer writes cropped ``.seg.nrrd`` files), in
    which case the labels are placed into a volume-sized array. Anything else is an
    :class:`InputError` that says how the grids differ (resample the labels first).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"label file {p} does not exist")
    try:
        with itk_quiet():
            image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"cannot read {p} as a label image (truncated or corrupt?): {_itk_message(exc)}") from None
    check_nifti_complete(p)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{p.name} has {image.GetNumberOfComponentsPerPixel()} layers/components per voxel"
                         " (overlapping segments?); a single label map is needed")
    if image.GetDimension() != 3:
        raise InputError(f"{p.name} is a {image.GetDimension()}D image; a 3D label map is needed")
    arr = sitk.GetArrayFromImage(image)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise InputError(f"{p.name} holds non-integer values; a label map is needed")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise InputError(f"{p.name} holds values {arr.min()}..{arr.max()}; label values must lie in 0..255")
    arr = arr.astype(np.uint8, copy=False)
    if volume is None:
        return arr
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    why = geometry_mismatch(volume, arr.shape, image.GetSpacing(), image.GetOrigin(), direction, tol_mm)
    if why is None:
        return arr
    placed = _place_subgrid(arr, image, volume, tol_mm)
    if placed is not None:
        return placed
    raise InputError(f"{p.name} is not on the volume's grid: {why}; resample it onto the CT first")


def _place_subgrid(arr: np.ndarray, image: sitk.Image, volume: Volume, tol_mm: float) -> Optional[np.ndarray]:
    sp = np.asarray(image.GetSpacing(), dtype=float)
    d = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if np.abs(sp - np.asarray(volume.spacing)).max() > tol_mm or np.abs(d - volume.direction).max() > 1e-5:
        return None
    offset = volume.lps_to_ijk(np.asarray(image.GetOrigin(), dtype=float))
    off = np.round(offset)
    if np.abs((offset - off) * np.asarray(volume.spacing)).max() > tol_mm:
        return None
    i0, j0, k0 = (int(v) for v in off)
    nk, nj, ni = arr.shape
    NK, NJ, NI = volume.shape
    if i0 < 0 or j0 < 0 or k0 < 0 or i0 + ni > NI or j0 + nj > NJ or k0 + nk > NK:
        return None
    out = np.zeros(volume.shape, dtype=np.uint8)
    out[k0:k0 + nk, j0:j0 + nj, i0:i0 + ni] = arr
    return out


# ---------------------------------------------------------------------------------------------
# Slicer .seg.nrrd
# ---------------------------------------------------------------------------------------------
def _clean(text: str) -> str:
    """Header values are one line; '|' and '~' separate tags and terminology fields."""
    return re.sub(r"[\r\n|~]", " ", str(text)).strip()


def _fmt(v: float) -> str:
    return repr(float(v)) if v != 0 else "0"


def _extent(mask: np.ndarray) -> str:
    """``i0 i1 j0 j1 k0 k1`` of the voxels in ``mask``; ``0 -1 0 -1 0 -1`` when empty."""
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    js = np.flatnonzero(mask.any(axis=(0, 2)))
    is_ = np.flatnonzero(mask.any(axis=(0, 1)))
    return f"{is_[0]} {is_[-1]} {js[0]} {js[-1]} {ks[0]} {ks[-1]}"


def seg_nrrd_header(labels: np.ndarray, volume: Volume, segments: Sequence[SegmentInfo]) -> str:
    """The NRRD header (text, ending with the blank line) of a Slicer segmentation file."""
    labels = _as_labels(labels, volume)
    segs = _check_segments(segments, labels)
    ni, nj, nk = volume.shape_ijk
    cols = volume.direction @ np.diag(volume.spacing)
    dirs = " ".join("(" + ",".join(_fmt(v) for v in cols[:, c]) + ")" for c in range(3))
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        "# Written by samliverseg " + __version__,
        "type: unsigned char",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {ni} {nj} {nk}",
        f"space directions: {dirs}",
        "kinds: domain domain domain",
        "encoding: gzip",
        "space origin: (" + ",".join(_fmt(v) for v in volume.origin) + ")",
    ]
    for n, s in enumerate(segs):
        r, g, b = (min(max(float(c), 0.0), 1.0) for c in s.color)
        lines += [
            f"Segment{n}_Color:={r:.6g} {g:.6g} {b:.6g}",
            f"Segment{n}_ColorAutoGenerated:=0",
            f"Segment{n}_Extent:={_extent(labels == s.label_value)}",
            f"Segment{n}_ID:={_clean(s.slicer_id)}",
            f"Segment{n}_LabelValue:={int(s.label_value)}",
            f"Segment{n}_Layer:=0",
            f"Segment{n}_Name:={_clean(s.name)}",
            f"Segment{n}_NameAutoGenerated:=0",
            f"Segment{n}_Tags:=Segmentation.Status:inprogress|TerminologyEntry:{s.terminology_entry()}|",
        ]
    lines += [
        "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
        "Segmentation_MasterRepresentation:=Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
    ]
    return "\n".join(lines) + "\n\n"


def write_seg_nrrd(labels: np.ndarray, volume: Volume, path: PathLike,
                   segments: Sequence[SegmentInfo] = DEFAULT_SEGMENTS, compression_level: int = 4) -> Path:
    """Write a Slicer segmentation (``.seg.nrrd``) on the volume's full grid.

    Every non-zero label value must have a :class:`SegmentInfo`; segments whose value does not
    occur are written as empty segments (Slicer shows them, empty).
    """
    target = Path(path)
    if not target.name.lower().endswith(".nrrd"):
        raise InputError(f"a Slicer segmentation file must end in .seg.nrrd, got {target.name!r}")
    labels = _as_labels(labels, volume)
    header = seg_nrrd_header(labels, volume, segments).encode("utf-8")
    with atomic_path(target, check=image_file_check(volume)) as tmp:
        with open(tmp, "wb") as f:
            f.write(header)
            # gzip stream of the raw voxels, i fastest (C order of array[k, j, i])
            comp = zlib.compressobj(compression_level, zlib.DEFLATED, 31)
            data = np.ascontiguousarray(labels)
            step = 1 << 24
            flat = data.reshape(-1)
            for start in range(0, flat.size, step):
                f.write(comp.compress(flat[start:start + step].tobytes()))
            f.write(comp.flush())
    return target


def read_seg_nrrd_segments(path: PathLike) -> List[SegmentInfo]:
    """The segments described in a ``.seg.nrrd`` header (label values, names, colours, codes)."""
    p = Path(path)
    header = _read_nrrd_header(p)
    fields: Dict[int, Dict[str, str]] = {}
    for key, value in header.items():
        m = re.fullmatch(r"Segment(\d+)_(\w+)", key)
        if m:
            fields.setdefault(int(m.group(1)), {})[m.group(2)] = value
    out = []
    for n in sorted(fields):
        f = fields[n]
        try:
            color = tuple(float(v) for v in f.get("Color", "0.5 0.5 0.5").split())
            label_value = int(f.get("LabelValue", n + 1))
        except ValueError:
            raise InputError(f"{p.name}: bad Segment{n} header fields") from None
        codes = _parse_terminology(f.get("Tags", ""))
        out.append(SegmentInfo(label_value, f.get("Name", f"Segment_{n}"), color,  # type: ignore[arg-type]
                               codes.get("category") or Code("", "", ""), codes.get("type") or Code("", "", ""),
                               codes.get("type_modifier"), codes.get("anatomic_region"),
                               codes.get("anatomic_region_modifier"), segment_id=f.get("ID")))
    return out


def _parse_terminology(tags: str) -> Dict[str, Optional[Code]]:
    for tag in tags.split("|"):
        key, _, value = tag.partition(":")
        if key == "TerminologyEntry":
            parts = value.split("~")
            if len(parts) >= 7:
                return {"category": Code.from_slicer(parts[1]), "type": Code.from_slicer(parts[2]),
                        "type_modifier": Code.from_slicer(parts[3]), "anatomic_region": Code.from_slicer(parts[5]),
                        "anatomic_region_modifier": Code.from_slicer(parts[6])}
    return {}


def _read_nrrd_header(p: Path) -> Dict[str, str]:
    try:
        with open(p, "rb") as f:
            raw = f.read(1 << 20)
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc}") from None
    if not raw.startswith(b"NRRD"):
        raise InputError(f"{p.name} is not a NRRD file")
    end = raw.find(b"\n\n")
    text = raw[: end if end >= 0 else len(raw)].decode("utf-8", errors="replace")
    out: Dict[str, str] = {}
    for line in text.splitlines()[1:]:
        if line.startswith("#"):
            continue
        if ":=" in line:
            k, _, v = line.partition(":=")
        else:
            k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


# ---------------------------------------------------------------------------------------------
# DICOM SEG
# ---------------------------------------------------------------------------------------------
def _coded(code: Code):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _source_datasets(volume: Volume) -> list:
    import pydicom

    files = volume.dicom_files
    if not files:
        raise InputError("DICOM SEG needs a DICOM series as input")
    if len(files) != volume.shape[0]:
        raise InputError(f"the volume has {volume.shape[0]} slices but {len(files)} DICOM files;"
                         " DICOM SEG needs the volume as read from its series")
    datasets = []
    for k, fname in enumerate(files):
        try:
            ds = pydicom.dcmread(fname, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read the source DICOM file {fname}: {exc}") from None
        ipp = ds.get("ImagePositionPatient")
        if ipp is not None:
            expected = volume.ijk_to_lps(np.array([0.0, 0.0, float(k)]))
            if np.abs(np.asarray([float(v) for v in ipp]) - expected).max() > max(0.01, 0.05 * volume.spacing[2]):
                raise InputError(f"source file {Path(fname).name} is not slice k={k} of the volume;"
                                 " the volume's geometry no longer matches its DICOM series")
        # Tidy attributes some scanners/anonymisers leave empty and highdicom would reject
        # (in memory only): empty character set; SOP class/instance UIDs blanked in the data
        # set but still in the file meta information.
        if "SpecificCharacterSet" in ds and not str(ds.SpecificCharacterSet or "").strip():
            del ds.SpecificCharacterSet
        meta = getattr(ds, "file_meta", None)
        for attr, meta_attr in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(ds.get(attr, "") or "").strip():
                value = str(meta.get(meta_attr, "") or "").strip() if meta is not None else ""
                if not value:
                    raise InputError(f"source file {Path(fname).name} has no {attr}; cannot reference it in a DICOM SEG")
                setattr(ds, attr, value)
        datasets.append(ds)
    return datasets


def write_dicom_seg(labels: np.ndarray, volume: Volume, path: PathLike,
                    segments: Sequence[SegmentInfo] = DEFAULT_SEGMENTS, series_description: str = "SAMLiverSeg",
                    series_number: int = 901, content_label: str = "SAMLIVERSEG") -> Path:
    """Write a DICOM Segmentation (BINARY) of ``labels`` referencing the volume's series.

    Segment numbers are 1..N in the order of ``segments``; frames are written only for slices
    where a segment is present (highdicom's ``omit_empty_frames``), all of them when the labels
    are empty. A source series without a FrameOfReferenceUID (some anonymised datasets) gets
    one derived deterministically from its SeriesInstanceUID, with a warning.
    """
    import highdicom as hd
    import pydicom

    labels = _as_labels(labels, volume)
    segs = _check_segments(segments, labels)
    sources = _source_datasets(volume)
    if not all(str(ds.get("FrameOfReferenceUID", "") or "").strip() for ds in sources):
        series_uid = str(sources[0].get("SeriesInstanceUID", ""))
        for_uid = pydicom.uid.generate_uid(entropy_srcs=["samliverseg-frame-of-reference", series_uid])
        log.warning("the source series has no FrameOfReferenceUID; the SEG uses %s derived from the series UID",
                    for_uid)
        for ds in sources:
            ds.FrameOfReferenceUID = for_uid
    seg_numbers = np.zeros_like(labels)
    for n, s in enumerate(segs, start=1):
        seg_numbers[labels == s.label_value] = n
    algorithm = hd.AlgorithmIdentificationSequence(name="SAMLiverSeg", version=__version__, family=_ai_family())
    descriptions = []
    for n, s in enumerate(segs, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=_clean(s.name)[:64],
            segmented_property_category=_coded(s.category),
            segmented_property_type=_coded(s.type),
            algorithm_type=s.algorithm_type,
            algorithm_identification=algorithm if s.algorithm_type != "MANUAL" else None,
            tracking_uid=hd.UID(),
            tracking_id=s.slicer_id,
            anatomic_regions=[_coded(s.anatomic_region)] if s.anatomic_region else None,
        )
        # set here, not through ``display_color=`` (highdicom >= 0.23 only), the same on every version
        description.RecommendedDisplayCIELabValue = list(rgb_to_dicom_lab(s.color))
        descriptions.append(description)
    try:
        with warnings.catch_warnings():
            # highdicom re-checks the source's patient name; a one-component name is common.
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
            with _numpy_float_alias():
                seg = hd.seg.Segmentation(
                    source_images=sources,
                    pixel_array=seg_numbers,
                    segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                    segment_descriptions=descriptions,
                    series_instance_uid=hd.UID(),
                    series_number=int(series_number),
                    sop_instance_uid=hd.UID(),
                    instance_number=1,
                    manufacturer="SAMLiverSeg",
                    manufacturer_model_name="samliverseg",
                    software_versions=__version__,
                    device_serial_number="0",
                    content_label=content_label,
                    content_description=series_description[:64],
                    series_description=series_description[:64],
                    omit_empty_frames=bool(seg_numbers.any()),
                )
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"cannot build a DICOM SEG from this series: {exc}") from None
    target = Path(path)
    with atomic_path(target, check=_dicom_file_check) as tmp:
        seg.save_as(str(tmp))
    return target


@contextlib.contextmanager
def _numpy_float_alias():
    """``np.float_`` while highdicom builds a SEG, where NumPy (>= 2) lacks it: highdicom < 0.23
    (the newest that pydicom 2.4, bundled with Slicer 5.8-5.10, allows) names it in every
    ``Segmentation(...)``. Nothing changes where NumPy has it."""
    if hasattr(np, "float_"):
        yield
        return
    np.float_ = np.float64  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del np.float_


def _dicom_file_check(tmp: Path) -> None:
    """The written DICOM SEG reads back whole (pixel data included)."""
    import pydicom

    ds = pydicom.dcmread(str(tmp))
    if "PixelData" not in ds or len(ds.PixelData) == 0:
        raise WriteError(f"{tmp.name} has no pixel data")


def _ai_family():
    from pydicom.sr.codedict import codes

    return codes.cid7162.ArtificialIntelligence


def read_dicom_seg(path: PathLike, volume: Volume, segments: Optional[Sequence[SegmentInfo]] = None,
                   with_segments: bool = False):
    """Labels uint8 [k, j, i] on ``volume``'s grid from a DICOM Segmentation.

    Parsed with highdicom (``segread``: segment descriptions); the frames are placed here,
    one by one, from their own functional groups (same code on highdicom 0.22 / pydicom 2.4
    as in Slicer 5.8-5.10, and on the newest): a frame's ImagePositionPatient (LPS) must be
    voxel (0, 0, k) of the volume for a whole slice index k, its rows and columns the volume's
    j and i (same orientation and pixel spacing), otherwise :class:`InputError`. A voxel's
    value is its segment number, or, when ``segments`` are given, the ``label_value`` of the
    segment whose name equals the DICOM segment label. Where segments overlap, the higher
    segment number wins. BINARY, FRACTIONAL (fractions >= 0.5) and LABELMAP segmentations
    are read.

    With ``with_segments=True`` returns ``(labels, [(segment number, label, SegmentInfo)])``.
    """
    import highdicom as hd

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"DICOM SEG file {p} does not exist")
    try:
        seg = hd.seg.segread(str(p))
    except Exception as exc:  # noqa: BLE001 - pydicom/highdicom raise many kinds
        raise InputError(f"{p.name} is not a DICOM Segmentation ({_first_line(exc)})") from None
    nk, nj, ni = volume.shape
    if int(seg.Rows) != nj or int(seg.Columns) != ni:
        raise InputError(f"{p.name} frames are {seg.Columns}×{seg.Rows}, the volume's slices {ni}×{nj}")
    desc = {n: _segment_info(seg.get_segment_description(n)) for n in sorted(seg.segment_numbers)}
    value_of: Dict[int, int] = {n: n for n in desc}
    if segments is not None:
        by_name = {s.name.lower(): int(s.label_value) for s in segments}
        for n, info in desc.items():
            if info.name.lower() not in by_name:
                raise InputError(f"{p.name}: segment {n} {info.name!r} matches none of the given segments")
            value_of[n] = by_name[info.name.lower()]
    if any(v > 255 for v in value_of.values()):
        raise InputError(f"{p.name} has more than 255 segments")
    numbers = sorted(desc)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    if numbers:
        frames = _seg_frames(seg, p.name)
        ks = _frame_slices_on(volume, frames, p.name)
        kind = str(seg.get("SegmentationType", "BINARY")).upper()
        if kind == "FRACTIONAL":
            masks = frames.pixels.astype(np.float32) >= 0.5 * float(seg.get("MaximumFractionalValue", 255) or 255)
        else:
            masks = frames.pixels > 0
        for n in numbers:  # ascending: a higher segment number wins where they overlap
            # LABELMAP: every frame holds all segments, its pixel values are the segment numbers
            on = np.arange(len(ks)) if kind == "LABELMAP" else np.flatnonzero(frames.segment == n)
            for f in on:
                mask = frames.pixels[f] == n if kind == "LABELMAP" else masks[f]
                labels[ks[f]][mask] = np.uint8(value_of[n])
    if with_segments:
        return labels, [(n, desc[n].name, desc[n]) for n in numbers]
    return labels


def _first_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:200]


class _SegFrames(NamedTuple):
    """The frames of a DICOM SEG with their own geometry (all LPS mm, DICOM order)."""

    pixels: np.ndarray  #: [F, rows, columns] stored values (BINARY unpacked to 0/1)
    segment: np.ndarray  #: [F] ReferencedSegmentNumber (0 where absent: LABELMAP)
    position: np.ndarray  #: [F, 3] ImagePositionPatient: LPS of the frame's first pixel (row 0, column 0)
    orientation: np.ndarray  #: [F, 6] ImageOrientationPatient: LPS direction along a row (column index +1), along a column (row index +1)
    spacing: np.ndarray  #: [F, 2] PixelSpacing: (between rows, between columns)


def _seg_frames(seg, name: str) -> _SegFrames:
    """Each frame's pixels, segment number and plane (per-frame functional group, else the
    shared one), read with plain pydicom attributes that pydicom 2.4 and 3 both have."""
    n_frames = int(seg.get("NumberOfFrames", 1) or 1)
    per_frame = list(seg.get("PerFrameFunctionalGroupsSequence", None) or [])
    shared = (list(seg.get("SharedFunctionalGroupsSequence", None) or []) or [None])[0]
    if len(per_frame) != n_frames:
        raise InputError(f"{name}: {n_frames} frames but {len(per_frame)} per-frame functional groups")

    def item(group, keyword: str, attr: str):
        for fg in (group, shared):
            seq = fg.get(keyword, None) if fg is not None else None
            if seq and attr in seq[0]:
                return seq[0].get(attr)
        raise InputError(f"{name}: a frame has no {attr} (in {keyword})")

    try:
        position = np.array([[float(v) for v in item(g, "PlanePositionSequence", "ImagePositionPatient")]
                             for g in per_frame], dtype=float).reshape(n_frames, 3)
        orientation = np.array([[float(v) for v in item(g, "PlaneOrientationSequence", "ImageOrientationPatient")]
                                for g in per_frame], dtype=float).reshape(n_frames, 6)
        spacing = np.array([[float(v) for v in item(g, "PixelMeasuresSequence", "PixelSpacing")]
                            for g in per_frame], dtype=float).reshape(n_frames, 2)
    except ValueError as exc:
        raise InputError(f"{name}: unreadable frame geometry ({_first_line(exc)})") from None
    # (per frame; newer highdicom puts it in the shared group when all frames show one segment)
    segment = np.array([int(item(g, "SegmentIdentificationSequence", "ReferencedSegmentNumber"))
                        if str(seg.get("SegmentationType", "")).upper() != "LABELMAP" else 0
                        for g in per_frame], dtype=int)
    try:
        pixels = np.asarray(seg.pixel_array)
    except Exception as exc:  # noqa: BLE001 - pydicom's decoders raise many kinds
        raise InputError(f"{name}: cannot decode its frames ({_first_line(exc)})") from None
    rows, cols = int(seg.Rows), int(seg.Columns)
    if pixels.size != n_frames * rows * cols:
        raise InputError(f"{name}: pixel data holds {pixels.size} values, not {n_frames} frames of {cols}×{rows}")
    return _SegFrames(pixels.reshape(n_frames, rows, cols), segment, position, orientation, spacing)


def _frame_slices_on(volume: Volume, frames: _SegFrames, name: str) -> np.ndarray:
    """The volume's slice index k of each frame; InputError unless the frame's rows and columns
    are the volume's j and i (same directions and spacing) and its first pixel is voxel
    (i, j, k) = (0, 0, k) for a whole k inside the volume."""
    m = volume.grid.lps_to_ijk_matrix()  # (L, P, S, 1) -> (i, j, k, 1)
    a = m[:3, :3]
    ks = np.zeros(len(frames.position), dtype=int)
    for f in range(len(frames.position)):
        along_row, along_col = frames.orientation[f, :3], frames.orientation[f, 3:]
        row_spacing, col_spacing = frames.spacing[f]
        # one mm along the frame's row / column, in the volume's voxel axes (mm): must be i / j
        unit = [a @ (v / max(np.linalg.norm(v), 1e-12)) * volume.spacing for v in (along_row, along_col)]
        if np.abs(unit[0] - (1, 0, 0)).max() > 1e-3 or np.abs(unit[1] - (0, 1, 0)).max() > 1e-3:
            raise InputError(f"{name}: frames are not parallel to the volume's slices (another orientation)")
        if abs(col_spacing - volume.spacing[0]) > 1e-3 * volume.spacing[0] \
                or abs(row_spacing - volume.spacing[1]) > 1e-3 * volume.spacing[1]:
            mm = (round(float(col_spacing), 4), round(float(row_spacing), 4))
            raise InputError(f"{name}: pixel spacing {mm} differs from the volume's {volume.spacing[:2]}")
        ijk = (m @ np.append(frames.position[f], 1.0))[:3]
        k = int(np.round(ijk[2]))
        if np.abs(ijk[:2]).max() > 0.01 or abs(ijk[2] - k) > 0.01 or not 0 <= k < volume.shape[0]:
            raise InputError(f"{name} frames are not on a slice of the volume (a frame at i, j, k = "
                             f"{np.round(ijk, 2).tolist()})")
        ks[f] = k
    return ks


#: sRGB (IEC 61966-2-1) linear RGB -> CIE XYZ (Y of white = 1); its row sums are the D65 white.
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_D65 = _SRGB_TO_XYZ.sum(axis=1)  # (0.95047, 1.0, 1.08883)
_LAB_EPS = (6.0 / 29.0) ** 3


def rgb_to_dicom_lab(rgb: Sequence[float]) -> Tuple[int, int, int]:
    """An sRGB colour (components 0..1) as a DICOM CIELab value (PS3.3 C.10.7.1.1, e.g.
    RecommendedDisplayCIELabValue): CIE L*a*b* with the D65 white point, L* 0..100 scaled to
    0..65535, a* and b* -128..127 to 0..65535, rounded."""
    c = np.clip(np.asarray(rgb, dtype=float).reshape(3), 0.0, 1.0)
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = (_SRGB_TO_XYZ @ linear) / _D65
    f = np.where(xyz > _LAB_EPS, np.cbrt(xyz), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    lab = np.array([116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])])
    lab = np.clip(lab, (0.0, -128.0, -128.0), (100.0, 127.0, 127.0))
    scaled = (lab[0] * 65535.0 / 100.0, (lab[1] + 128.0) * 65535.0 / 255.0, (lab[2] + 128.0) * 65535.0 / 255.0)
    return tuple(int(round(v)) for v in scaled)  # type: ignore[return-value]


def dicom_lab_to_rgb(value: Sequence[int]) -> Tuple[float, float, float]:
    """The inverse of :func:`rgb_to_dicom_lab`: sRGB components 0..1 (clipped to the sRGB gamut)."""
    v = np.asarray([float(x) for x in value], dtype=float)
    if v.shape != (3,):
        raise ValueError(f"a CIELab value has 3 components, not {v.size}")
    lab = (v[0] * 100.0 / 65535.0, v[1] * 255.0 / 65535.0 - 128.0, v[2] * 255.0 / 65535.0 - 128.0)
    fy = (lab[0] + 16.0) / 116.0
    f = np.array([fy + lab[1] / 500.0, fy, fy - lab[2] / 200.0])
    xyz = np.where(f > 6.0 / 29.0, f ** 3, 3 * (6.0 / 29.0) ** 2 * (f - 4.0 / 29.0)) * _D65
    linear = np.linalg.solve(_SRGB_TO_XYZ, xyz)
    c = np.where(linear > 0.0031308, 1.055 * np.maximum(linear, 0.0) ** (1 / 2.4) - 0.055, 12.92 * linear)
    return tuple(float(x) for x in np.clip(c, 0.0, 1.0))  # type: ignore[return-value]


def _segment_info(d) -> SegmentInfo:
    """A highdicom SegmentDescription as a SegmentInfo (label value = segment number)."""
    def code(c):
        return Code(str(c.value), str(c.scheme_designator), str(c.meaning)) if c is not None else Code("", "", "")

    color: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    lab = d.get("RecommendedDisplayCIELabValue")
    if lab is not None:
        try:
            color = tuple(round(c, 4) for c in dicom_lab_to_rgb(list(lab)))  # type: ignore[assignment]
        except (ValueError, TypeError):  # a colour is not worth failing for
            pass
    regions = d.anatomic_regions
    return SegmentInfo(int(d.segment_number), str(d.segment_label), color, code(d.segmented_property_category),
                       code(d.segmented_property_type), anatomic_region=code(regions[0]) if regions else None)


# ---------------------------------------------------------------------------------------------
# output by file name (the CLI's -o)
# ---------------------------------------------------------------------------------------------
#: What :func:`write_segmentation` writes, by the end of the file name.
OUTPUT_SUFFIXES = (".seg.nrrd", ".dcm") + LABELMAP_SUFFIXES


#: The kinds of file the CLI writes, by what each may end in (lower case).
JSON_SUFFIXES = (".json",)


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_output_path(path: PathLike, volume: Optional[Volume] = None, inputs: Sequence[PathLike] = (),
                      suffixes: Sequence[str] = OUTPUT_SUFFIXES, option: str = "-o") -> Path:
    """Refuse, before any work, an output the CLI could not write or must not write; the one
    place these checks live. Returns the resolved path.

    * its extension is one of ``suffixes`` (case-insensitive: ``RESULT.NII.GZ`` is written as
      NIfTI), and a DICOM SEG (``.dcm``) needs a volume read from a DICOM series;
    * it is not a folder, its folder exists or can be created, and is writable; an existing
      file there is writable;
    * it is none of ``inputs`` (resolved paths, links followed) and lies inside none of the
      input folders (a DICOM series).
    """
    text = str(path)
    low = text.lower()
    if Path(path).expanduser().is_dir():
        raise InputError(f"{option} {text}: is a folder; give a file name")
    if not low.endswith(tuple(suffixes)):
        raise InputError(f"{option} {text!r}: unknown output format; use one of {', '.join(suffixes)}")
    if low.endswith(".dcm") and volume is not None and not volume.dicom_files:
        raise InputError("a DICOM SEG output (.dcm) needs a DICOM series as input")
    target = Path(path).expanduser().resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).expanduser().resolve()
        if target == src:
            raise InputError(f"{option} {text}: is an input of this command; it would be overwritten; "
                             "choose another output name")
        if src.is_dir() and _is_inside(target, src):
            raise InputError(f"{option} {text}: lies inside the input folder {src}; write it elsewhere")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {text}: cannot write to {parent} (no permission, or not a folder)")
    if target.exists() and (not os.access(target, os.W_OK) or not target.stat().st_mode & 0o222):
        raise InputError(f"{option} {text}: the existing file is read-only; it is kept as it is")
    return target


def check_outputs(outputs: Sequence[Tuple[str, Optional[PathLike], Sequence[str]]], inputs: Sequence[PathLike] = (),
                  volume: Optional[Volume] = None) -> None:
    """:func:`check_output_path` for each ``(option, path, suffixes)`` given (``path`` None: not
    asked for), and no two of them the same file."""
    seen: Dict[Path, str] = {}
    for option, path, suffixes in outputs:
        if path is None:
            continue
        target = check_output_path(path, volume, inputs, suffixes, option)
        if target in seen:
            raise InputError(f"{option} and {seen[target]} are the same file {path}; give each its own name")
        seen[target] = option


def segments_for(label: int, name: Optional[str] = None) -> List[SegmentInfo]:
    """The one segment of a single-object result: label 1 Liver, 2 Liver tumor (others: Liver's
    terminology); a ``name`` containing "tum" takes the tumour's terminology."""
    if name is None:
        return [{1: LIVER, 2: LIVER_TUMOR}.get(int(label), LIVER).with_label(label)]
    base = LIVER_TUMOR if "tum" in name.lower() else LIVER
    return [base.with_label(label, name=name)]


def write_segmentation(labels: np.ndarray, volume: Volume, path: PathLike,
                       segments: Sequence[SegmentInfo] = DEFAULT_SEGMENTS) -> Path:
    """Write labels [k, j, i] in the format the file name says: ``.seg.nrrd`` (Slicer
    segmentation), ``.dcm`` (DICOM SEG) or a plain label map (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``)."""
    low = str(path).lower()
    if low.endswith(".seg.nrrd"):
        return write_seg_nrrd(labels, volume, path, segments)
    if low.endswith(".dcm"):
        return write_dicom_seg(labels, volume, path, segments)
    if low.endswith(LABELMAP_SUFFIXES):
        return write_labelmap(labels, volume, path)
    raise InputError(f"unknown output format {str(path)!r}: use .nii.gz, .nrrd, .mha, .seg.nrrd or .dcm")


__all__ = [
    "Code", "SegmentInfo", "LIVER", "LIVER_TUMOR", "DEFAULT_SEGMENTS", "write_labelmap", "read_labelmap",
    "write_seg_nrrd", "seg_nrrd_header", "read_seg_nrrd_segments", "write_dicom_seg", "read_dicom_seg",
    "rgb_to_dicom_lab", "dicom_lab_to_rgb",
    "LABELMAP_SUFFIXES", "OUTPUT_SUFFIXES", "JSON_SUFFIXES", "check_output_path", "check_outputs", "segments_for",
    "write_segmentation",
]
