"""A CT volume with its geometry, and reading one from disk.

Conventions (see ARCHITECTURE.md):

* ``Volume.array`` is float32 HU indexed ``array[k, j, i]`` (numpy order of SimpleITK arrays).
* ``spacing`` is ``(si, sj, sk)`` in mm, ``origin`` is the LPS position of voxel (0, 0, 0).
* ``direction`` is ITK's 3×3 matrix whose **columns** are the LPS directions of the i, j, k
  axes, so ``lps = origin + direction @ (spacing * ijk)``.
* RAS (Slicer's world frame) is ``diag(-1, -1, 1) @ lps``.

``read_volume`` accepts NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``) and DICOM: a folder holding a series (the largest series is taken when
there are several; sub-folders are searched when the folder itself holds none) or one file of
a series (the whole series it belongs to is read). It rejects, with a one-line
:class:`~samliverseg.core.errors.InputError`: a missing path, a file that is not an image, a 2D
image, a single-slice volume (unless ``allow_single_slice=True``), a colour/vector image, an
empty image, and NaN or infinite intensities.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from samliverseg.core.errors import InputError, OutOfMemoryError
from samliverseg.core.geometry import LPS_TO_RAS, Grid  # noqa: F401 - LPS_TO_RAS: the old import place

PathLike = Union[str, os.PathLike]

#: File endings read with SimpleITK's ImageFileReader.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

_DICOM_TAGS = {
    "modality": "0008|0060",
    "series_instance_uid": "0020|000e",
    "study_instance_uid": "0020|000d",
    "frame_of_reference_uid": "0020|0052",
    "series_description": "0008|103e",
}


@dataclass(eq=False)
class Volume:
    """A 3D scalar image (HU) and its physical geometry.

    ``array`` is float32 ``[k, j, i]``; ``dicom_files`` is the list of the series' files in
    slice (k) order when the volume was read from DICOM (needed to write a DICOM SEG), else
    None. ``metadata`` holds a few DICOM attributes (series/study/frame-of-reference UIDs,
    series description) when known.
    """

    array: np.ndarray
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    source_path: Optional[str] = None
    dicom_files: Optional[List[str]] = None
    modality: Optional[str] = None
    metadata: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise InputError(f"a volume array must be 3D [k, j, i], got shape {self.array.shape}")
        g = Grid(self.array.shape[::-1], self.spacing, self.origin, self.direction)  # validates
        self.spacing, self.origin, self.direction = g.spacing, g.origin, g.direction_matrix
        if self.source_path is not None:
            self.source_path = str(self.source_path)
        if self.dicom_files is not None:
            self.dicom_files = [str(f) for f in self.dicom_files]

    # -- shape -------------------------------------------------------------------------------
    @property
    def shape_ijk(self) -> Tuple[int, int, int]:
        """Number of voxels along i, j, k (SimpleITK's ``GetSize()``)."""
        nk, nj, ni = self.array.shape
        return int(ni), int(nj), int(nk)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """numpy shape ``(K, J, I)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    # -- geometry: all of it is the grid's (core.geometry.Grid) --------------------------------
    @property
    def grid(self) -> Grid:
        """The volume's voxel grid (shape, spacing, LPS origin, direction)."""
        return Grid(self.shape_ijk, self.spacing, self.origin, self.direction)

    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4×4 homogeneous matrix mapping (i, j, k, 1) to (L, P, S, 1)."""
        return self.grid.ijk_to_lps_matrix()

    def lps_to_ijk_matrix(self) -> np.ndarray:
        return self.grid.lps_to_ijk_matrix()

    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4×4 IJK→RAS matrix (Slicer's ``IJKToRASMatrix``)."""
        return self.grid.ijk_to_ras_matrix()

    def ijk_to_lps(self, points: Any) -> np.ndarray:
        """Map IJK points (N×3 or a single 3-vector, fractional allowed) to LPS mm."""
        return self.grid.ijk_to_lps(points)

    def lps_to_ijk(self, points: Any) -> np.ndarray:
        """Map LPS points (N×3 or a 3-vector) to continuous IJK (not rounded)."""
        return self.grid.lps_to_ijk(points)

    def ijk_to_ras(self, points: Any) -> np.ndarray:
        return self.grid.ijk_to_ras(points)

    def ras_to_ijk(self, points: Any) -> np.ndarray:
        return self.grid.ras_to_ijk(points)

    def same_grid(self, other: "Volume", tol_mm: float = 1e-3) -> bool:
        """True when ``other`` has the same shape and (within ``tol_mm``) the same geometry."""
        return self.grid.mismatch(other.grid, tol_mm) is None

    # -- conversion --------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: sitk.Image, source_path: Optional[PathLike] = None,
                  allow_single_slice: bool = False, **kwargs: Any) -> "Volume":
        """A Volume (float32 array) from a 3D scalar SimpleITK image; validates it."""
        name = str(source_path) if source_path is not None else "image"
        _check_image(image, name, allow_single_slice)
        array = sitk.GetArrayFromImage(image)
        if array.dtype != np.float32:
            array = array.astype(np.float32)
        _check_values(array, name)
        g = Grid.of_sitk(image)
        return cls(array=array, spacing=g.spacing, origin=g.origin, direction=g.direction_matrix,
                   source_path=str(source_path) if source_path is not None else None, **kwargs)

    def to_sitk(self, array: Optional[np.ndarray] = None) -> sitk.Image:
        """A SimpleITK image with this volume's geometry and ``array`` (default: the HU array).

        Used to write masks on the exact input grid; ``array`` must have shape ``(K, J, I)``.
        """
        return self.grid.to_sitk(self.array if array is None else array)

    def with_array(self, array: np.ndarray, **changes: Any) -> "Volume":
        """A copy with another array of the same shape (e.g. a preprocessed one)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise InputError(f"array shape {array.shape} does not match the volume {self.array.shape}")
        return dataclasses.replace(self, array=array, **changes)

    def describe(self) -> dict:
        """A JSON-friendly summary (for reports)."""
        return {
            "source": self.source_path,
            "size_ijk": list(self.shape_ijk),
            "spacing_mm": list(self.spacing),
            "origin_lps_mm": list(self.origin),
            "direction": [list(map(float, r)) for r in self.direction],
            "modality": self.modality,
            "dicom_files": len(self.dicom_files) if self.dicom_files else 0,
        }


def geometry_mismatch(volume: Volume, shape_kji: Sequence[int], spacing: Sequence[float],
                      origin: Sequence[float], direction: Any, tol_mm: float = 1e-3) -> Optional[str]:
    """None when the given grid equals the volume's; else a short description of the difference
    (:meth:`samliverseg.core.geometry.Grid.mismatch`)."""
    return volume.grid.mismatch(Grid(tuple(shape_kji)[::-1], spacing, origin, direction), tol_mm)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _check_image(image: sitk.Image, name: str, allow_single_slice: bool = False) -> None:
    dim = image.GetDimension()
    size = image.GetSize()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour/vector image);"
            " a single-channel CT volume in HU is needed"
        )
    if any(s == 0 for s in size):
        raise InputError(f"{name} is empty (size {size})")
    if dim == 2:
        raise InputError(f"{name} is a 2D image; a 3D CT volume is needed")
    if dim != 3:
        raise InputError(f"{name} is a {dim}D image; a 3D CT volume is needed")
    if size[2] == 1 and not allow_single_slice:
        raise InputError(f"{name} has a single slice (a 2D image); a 3D CT volume with at least 2 slices is needed")
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{name} has complex voxels; a real-valued CT volume is needed")


def _check_values(array: np.ndarray, name: str) -> None:
    if array.size == 0:
        raise InputError(f"{name} is empty")
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        kind = "NaN" if np.isnan(array).any() else "infinite"
        raise InputError(f"{name} contains {bad} {kind} voxel value(s); fix or replace them before segmenting")


def check_ct_range(volume: Volume) -> Optional[str]:
    """A warning (one line) when the intensities do not look like CT HU, else None.

    This never rejects a volume: a user may still segment it with a custom window.
    """
    a = volume.array
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < 1e-6:
        return f"the image has a constant intensity ({lo:g}); there is nothing to segment"
    if lo >= 0.0 and hi <= 1.0:
        return f"intensities lie in [{lo:g}, {hi:g}]: looks normalised to 0..1, not HU; use a custom window"
    if lo >= 0.0 and hi <= 255.0:
        return f"intensities lie in [{lo:g}, {hi:g}]: looks like an 8-bit image, not HU; use a custom window"
    if lo >= 0.0:
        return (f"no negative intensities (range [{lo:g}, {hi:g}]): air should be near -1000 HU; the rescale"
                " intercept may be missing, or this is not CT; check the HU calibration or use a custom window")
    if lo < -10000.0 or hi > 100000.0:
        return f"intensities [{lo:g}, {hi:g}] are far outside the CT HU range; use a custom window"
    return None



#: Plausibility limits of a CT grid: a voxel edge of at most this many mm ...
MAX_SPACING_MM = 20.0
#: ... and a box (field of view x scan length) of at most this many litres. A whole-body CT,
#: 60 x 60 cm over 2 m, is 720 L; an abdomen 35 x 35 x 30 cm is 37 L (so 20 L would refuse real
#: scans). A spacing in the wrong unit (m read as mm) gives millions of litres.
MAX_VOLUME_L = 2000.0


def looks_like_label_map(volume: Volume) -> Optional[List[float]]:
    """The distinct values when ``volume`` looks like a label map or mask (whole non-negative
    numbers, at most 16 of them, on a sample of the voxels), else None."""
    a = volume.array
    step = max(1, int(round((a.size / 2_000_000) ** (1 / 3))))
    sample = a[::step, ::step, ::step]
    values = np.unique(sample)
    if values.size > 16 or values.size < 2 or values[0] < 0 or not np.array_equal(values, np.round(values)):
        return None
    return [float(v) for v in values]


def check_ct_input(volume: Volume, accept_non_hu: bool = False) -> None:
    """Refuse (one-line :class:`InputError`) a volume that is not a CT in HU, before any prompt is
    judged or any model loaded: a label map or mask, a constant image, an implausible grid,
    and, unless ``accept_non_hu``, intensities that are not HU (:func:`check_ct_range`)."""
    name = volume.source_path or "the image"
    sp = np.asarray(volume.spacing, dtype=float)
    if not np.all(np.isfinite(sp)) or (sp <= 0).any() or (sp > MAX_SPACING_MM).any():
        raise InputError(f"{name} has an implausible voxel spacing {tuple(round(float(v), 4) for v in sp)} mm "
                         f"(a CT's is above 0 and at most {MAX_SPACING_MM:g} mm); fix the spacing in its header")
    litres = float(np.prod(sp)) * volume.array.size / 1e6
    if litres > MAX_VOLUME_L:
        raise InputError(f"{name} covers {litres:.3g} L ({volume.shape_ijk} voxels of "
                         f"{tuple(round(float(v), 4) for v in sp)} mm): too large for a CT; the spacing in its header"
                         " is probably wrong (in mm?)")
    lo, hi = float(volume.array.min()), float(volume.array.max())
    if hi - lo < 1e-6:
        raise InputError(f"{name} has a constant intensity ({lo:g}): there is nothing to segment")
    if accept_non_hu:
        return
    values = looks_like_label_map(volume)
    if values is not None:
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise InputError(f"{name} looks like a label map or mask (values {shown}), not a CT: give the CT image")
    warning = check_ct_range(volume)
    if warning is not None:
        raise InputError(f"{name} does not look like a CT in HU: {warning}; if it is right, run again with "
                         "--accept-non-hu or an explicit --window LOW,HIGH")


# ---------------------------------------------------------------------------------------------
# ITK's own messages, and files cut short
# ---------------------------------------------------------------------------------------------
class NativeStderr:
    """What native code (ITK, NIfTI, GDCM, HDF5) printed to file descriptor 2 inside
    :func:`itk_quiet`; ``last_line`` is the most telling line of it."""

    def __init__(self) -> None:
        self.text = ""

    @property
    def last_line(self) -> str:
        lines = [ln.strip() for ln in self.text.splitlines() if ln.strip() and not ln.startswith("WARNING: In ")]
        return lines[-1][:200] if lines else ""


@contextlib.contextmanager
def itk_quiet() -> Iterator[NativeStderr]:
    """Capture what native code prints on stderr (fd 2) during the block, and ITK's warnings.

    The one place that keeps ITK/NIfTI/GDCM chatter ("** ERROR: NWAD ...", MetaImage warnings)
    from appearing before the CLI's one-line message; the text is kept for the message.
    """
    captured = NativeStderr()
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedding application): nothing to capture
        try:
            yield captured
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(warn)
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sitk.ProcessObject.SetGlobalWarningDisplay(warn)
            sink.seek(0)
            captured.text = sink.read(1 << 16).decode("utf-8", errors="replace")


def _nifti_data_bytes(p: Path) -> Optional[Tuple[int, int]]:
    """(voxel data offset, voxel data bytes) from a NIfTI-1/2 header, or None when unreadable."""
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    try:
        with opener(str(p), "rb") as f:  # type: ignore[operator]
            head = f.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
        elif len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
        else:
            continue
        n = int(dims[0])
        if not 1 <= n <= 7 or bitpix <= 0:
            return None
        count = 1
        for d in dims[1:n + 1]:
            count *= max(int(d), 1)
        return max(offset, 348), count * bitpix // 8
    return None


def check_nifti_complete(p: Path) -> None:
    """Refuse a NIfTI file that holds less voxel data than its header announces.

    ITK (like nibabel) fills the missing part of a cut ``.nii``/``.nii.gz`` with zeros and
    reports success; this check reads the (decompressed) length instead.
    """
    info = _nifti_data_bytes(p)
    if info is None:
        return  # not NIfTI-1/2: the image reader decides
    offset, nbytes = info
    need = offset + nbytes
    if p.name.lower().endswith(".gz"):
        got, complete = _gunzipped_length(p, need)
        if not complete:
            raise InputError(f"{p} is truncated or corrupt: its compressed data ends early "
                             f"({got} of {need} bytes readable); copy the file again")
    else:
        got = p.stat().st_size
    if got < need:
        raise InputError(f"{p} is truncated: it holds {got} of the {need} bytes its header announces; "
                         "copy the file again")


def _gunzipped_length(p: Path, need: int) -> Tuple[int, bool]:
    """(bytes decompressed, whether the gzip stream is whole) of ``p``; stops after ``need`` bytes."""
    got = 0
    d = zlib.decompressobj(47)
    try:
        with open(p, "rb") as f:
            while True:
                raw = f.read(1 << 20)
                if not raw:
                    return got, d.eof or got >= need
                while raw:
                    got += len(d.decompress(raw))
                    raw = d.unused_data if d.eof else b""
                    if d.eof and raw:  # a second gzip member
                        d = zlib.decompressobj(47)
                if got >= need:
                    return got, True
    except zlib.error:
        return got, False


def _refuse_unloadable_nifti(p: Path, exc: BaseException) -> None:
    """A NIfTI file ITK could not load: truncated (InputError), or, when the file is whole, out
    of memory (the NIfTI library's only other reason to fail once the header was read)."""
    if "nifti_image_load failed" not in str(exc):
        return
    check_nifti_complete(p)
    info = _nifti_data_bytes(p)
    size = f" ({info[1] / 2**20:.0f} MB of voxels, {info[1] / 2**20 * 2:.0f} MB more as float32 HU)" if info else ""
    raise OutOfMemoryError(f"out of memory reading {p}{size}: close other programs, or crop the CT to the region "
                           "of interest first")


def _is_segmentation_file(p: Path) -> bool:
    """A Slicer segmentation (``.seg.nrrd``, or a NRRD with Slicer's ``Segment0_`` fields)."""
    if p.name.lower().endswith(".seg.nrrd"):
        return True
    if not p.name.lower().endswith((".nrrd", ".nhdr")):
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    end = head.find(b"\n\n")
    return head.startswith(b"NRRD") and b"\nSegment0_" in head[: end if end >= 0 else len(head)]


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_volume(path: PathLike, allow_single_slice: bool = False) -> Volume:
    """Read a CT volume from an image file or a DICOM series; see the module docstring."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p} does not exist")
    if p.is_dir():
        return _read_dicom_dir(p, allow_single_slice)
    if not p.is_file():
        raise InputError(f"{p} is not a file or a folder")
    if p.stat().st_size == 0:
        raise InputError(f"{p} is an empty file")
    if _is_dicom_file(p):
        kind = _non_image_dicom_kind(p)
        if kind:
            raise InputError(f"{p} is a DICOM {kind} object, not an image; give the CT series it belongs to")
        return _read_dicom_dir(p.parent, allow_single_slice, member=p)
    if _is_segmentation_file(p):
        raise InputError(f"{p} is a segmentation (.seg.nrrd), not a CT: give the CT image it belongs to")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with itk_quiet() as said:
            image = reader.Execute()
    except RuntimeError as exc:
        _refuse_unloadable_nifti(p, exc)
        if any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES):
            why = said.last_line if "data not read completely" in said.text else _first_line(exc)
            raise InputError(f"cannot read {p} as an image (truncated or corrupt?): {why}") from None
        raise InputError(f"{p} is not a readable image (supported: {', '.join(IMAGE_SUFFIXES)} files"
                         " or a DICOM series folder)") from None
    check_nifti_complete(p)  # ITK zero-fills a cut NIfTI file and reports success
    return Volume.from_sitk(image, source_path=p, allow_single_slice=allow_single_slice, modality=None)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with the file/line of the exception; the last line says what happened.
    msg = lines[-1] if lines else type(exc).__name__
    return msg[:200]


def _is_dicom_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


#: SOP classes that hold no image (segmentations, structure sets, reports, ...).
_NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.88.11": "Structured Report",
    "1.2.840.10008.5.1.4.1.1.88.22": "Structured Report",
    "1.2.840.10008.5.1.4.1.1.88.33": "Structured Report",
    "1.2.840.10008.5.1.4.1.1.88.34": "Structured Report",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.11.1": "Presentation State",
}


def _non_image_dicom_kind(p: Path) -> Optional[str]:
    """The kind of a DICOM file that holds no image (e.g. "Segmentation"), else None."""
    try:
        import pydicom

        ds = pydicom.dcmread(str(p), stop_before_pixels=True, specific_tags=["SOPClassUID"])
        return _NON_IMAGE_SOP_CLASSES.get(str(ds.get("SOPClassUID", "")))
    except Exception:  # noqa: BLE001 - unreadable header: let the image reader decide
        return None


def _series_in(folder: Path) -> List[Tuple[str, List[str]]]:
    reader = sitk.ImageSeriesReader
    out = []
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" is not news here
    try:
        ids = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        ids = ()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    for sid in ids:
        files = list(reader.GetGDCMSeriesFileNames(str(folder), sid))
        if files and not _non_image_dicom_kind(Path(files[0])):
            out.append((sid, files))
    return out


def _series_kind(files: List[str]) -> Tuple[Optional[str], bool, str]:
    """(modality, mask-like, description) of a series, from its middle file: mask-like when that
    slice holds at most 16 whole non-negative values (0/255 masks are stored as "CT" too)."""
    modality, description = None, ""
    try:
        import pydicom

        ds = pydicom.dcmread(files[0], stop_before_pixels=True,
                             specific_tags=["Modality", "SeriesDescription", "BitsStored"])
        modality = str(ds.get("Modality", "") or "").strip().upper() or None
        description = str(ds.get("SeriesDescription", "") or "").strip()
    except Exception:  # noqa: BLE001 - an unreadable header: judged by its pixels only
        pass
    mask_like = False
    try:
        with itk_quiet():
            a = sitk.GetArrayFromImage(sitk.ReadImage(files[len(files) // 2]))
        values = np.unique(a)
        mask_like = values.size <= 16 and values[0] >= 0 and np.array_equal(values, np.round(values))
    except (RuntimeError, ValueError):
        pass
    return modality, bool(mask_like), description


def _refuse_unreadable_members(folder: Path, series: List[Tuple[str, List[str]]]) -> None:
    """Refuse a series folder holding DICOM files that no series could use: GDCM leaves a file cut
    short out of its series, and the gap would otherwise read as a missing slice."""
    used = {os.path.abspath(f) for _, files in series for f in files}
    try:
        entries = [e.path for e in os.scandir(folder) if e.is_file()]
    except OSError:
        return
    bad = sorted(f for f in entries if os.path.abspath(f) not in used and _is_dicom_file(Path(f))
                 and not _non_image_dicom_kind(Path(f)) and _dicom_unreadable(Path(f)))
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise InputError(f"{bad[0]}{more} in {folder} cannot be read as DICOM (truncated or corrupt?); "
                         "copy the series again")


def _dicom_unreadable(p: Path) -> bool:
    """True for a DICOM image file whose header or pixels cannot be read (cut short); a file
    that holds no image (a DICOMDIR, a report) is not judged here."""
    try:
        import pydicom

        ds = pydicom.dcmread(str(p))
        if "Rows" not in ds:
            return False
        _ = ds.pixel_array
        return False
    except Exception:  # noqa: BLE001 - any failure is "cannot be read"
        return True


def _choose_series(series: List[Tuple[str, List[str]]], folder: Path) -> Tuple[str, List[str]]:
    """The CT among the image series of a folder: by modality (CT first), never a mask-like
    series when another is there; several candidates left: an InputError naming them."""
    if len(series) == 1:
        return series[0]
    kinds = {sid: _series_kind(files) for sid, files in series}
    images = [s for s in series if not kinds[s[0]][1]] or series
    cts = [s for s in images if kinds[s[0]][0] in ("CT", None)] or images
    if len(cts) == 1:
        return cts[0]

    def describe(s: Tuple[str, List[str]]) -> str:
        modality, _, text = kinds[s[0]]
        what = ", ".join(x for x in (modality or "", repr(text) if text else "", f"{len(s[1])} files") if x)
        return f"{Path(s[1][0]).parent / Path(s[1][0]).name} ({what})"

    shown = "; ".join(describe(s) for s in cts[:4]) + ("; ..." if len(cts) > 4 else "")
    raise InputError(f"{folder} holds {len(cts)} image series that could be the CT: {shown}; give one file of the "
                     "series you mean (its whole series is read), or a folder that holds only that series")


def _subdirs(folder: Path) -> List[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return []


def _read_dicom_dir(folder: Path, allow_single_slice: bool, member: Optional[Path] = None) -> Volume:
    series = _series_in(folder)
    if not series and member is None:
        # A study folder: look one or two levels down (not further: it may be a big tree).
        level = [folder]
        for _ in range(2):
            level = sorted(d for parent in level for d in _subdirs(parent))
            for sub in level:
                series.extend(_series_in(sub))
    if not series:
        raise InputError(f"{folder} holds no DICOM series (and is not an image file)")
    if member is not None:
        mine = [s for s in series if any(Path(f).resolve() == member.resolve() for f in s[1])]
        series = mine or series
    sid, files = _choose_series(series, folder)
    _refuse_unreadable_members(Path(files[0]).parent, series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    try:
        with itk_quiet() as said:
            image = reader.Execute()
    except RuntimeError as exc:
        why = said.last_line or _first_line(exc)
        raise InputError(f"cannot read the DICOM series in {folder} (a file cut short or corrupt?): {why}") from None
    meta = {}
    for key, tag in _DICOM_TAGS.items():
        try:
            if reader.HasMetaDataKey(0, tag):
                meta[key] = reader.GetMetaData(0, tag).strip()
        except RuntimeError:
            pass
    meta.setdefault("series_instance_uid", sid)
    meta["number_of_series_found"] = len(series)
    name = f"the DICOM series in {folder}"
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and image.GetSize()[2] == 1 and not allow_single_slice):
        raise InputError(f"{name} has a single slice (a 2D image); a 3D CT volume is needed")
    _check_dicom_spacing(reader, len(files), image, name)
    modality = meta.pop("modality", None)
    return Volume.from_sitk(image, source_path=folder, allow_single_slice=allow_single_slice,
                            dicom_files=files, modality=modality, metadata=meta)


def _check_dicom_spacing(reader: sitk.ImageSeriesReader, n: int, image: sitk.Image, name: str) -> None:
    """Reject series with missing or duplicated slices: one spacing could not describe them."""
    if n < 3:
        return
    pos = []
    for idx in range(n):
        try:
            pos.append([float(v) for v in reader.GetMetaData(idx, "0020|0032").split("\\")])
        except (RuntimeError, ValueError):
            return  # no positions: nothing to check against
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    z = np.asarray(pos) @ normal
    gaps = np.diff(z)
    sk = image.GetSpacing()[2]
    if np.any(np.abs(gaps) < 1e-3 * sk):
        raise InputError(f"{name} has two slices at the same position; remove the duplicates")
    if np.abs(np.abs(gaps) - sk).max() > 0.1 * sk:
        raise InputError(
            f"{name} has unevenly spaced slices (gaps {np.abs(gaps).min():.3g} to {np.abs(gaps).max():.3g} mm);"
            " a slice may be missing: resample it to a regular grid first"
        )
