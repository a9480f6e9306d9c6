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

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from samliverseg.core.errors import InputError
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
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        if any(p.name.lower().endswith(s) for s in IMAGE_SUFFIXES):
            raise InputError(f"cannot read {p} as an image: {_first_line(exc)}") from None
        raise InputError(f"{p} is not a readable image (supported: {', '.join(IMAGE_SUFFIXES)} files"
                         " or a DICOM series folder)") from None
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
    sid, files = max(series, key=lambda s: len(s[1]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read the DICOM series in {folder}: {_first_line(exc)}") from None
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
