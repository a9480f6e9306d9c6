"""The one grid type and the one resampling function of the library.

Conventions (ARCHITECTURE.md):

* A :class:`Grid` is ``shape_ijk`` (voxels along i, j, k: SimpleITK's ``GetSize()``),
  ``spacing`` ``(si, sj, sk)`` mm, ``origin`` (the LPS position of voxel (0, 0, 0)) and
  ``direction``: ITK's 3×3 matrix whose **columns** are the LPS directions of the i, j, k axes.
  ``lps = origin + direction @ (spacing * ijk)``. numpy arrays on a grid are ``[k, j, i]``
  (``Grid.shape_kji``).
* Physical coordinates inside the library are LPS. RAS (3D Slicer) is ``diag(-1, -1, 1) @ lps``
  (:data:`LPS_TO_RAS`, its own inverse); it appears only at the edges (markups, Slicer nodes).

:func:`resample` moves an array from one grid onto another (or onto a new spacing) with
SimpleITK, every option explicit: the target (a :class:`Grid`, or a spacing plus the rule that
sizes the new grid: :meth:`Grid.resampled`), the interpolator (``nearest``, ``linear``,
``bspline``) and the value of target voxels that fall outside the source grid
(``default_value``). The output has the input's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from samliverseg.core.errors import InputError

Int3 = Tuple[int, int, int]
Float3 = Tuple[float, float, float]

#: LPS <-> RAS: flip the first two axes (the matrix is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
RAS_TO_LPS = LPS_TO_RAS

#: Interpolator names of :func:`resample` -> SimpleITK's.
INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}
#: How :meth:`Grid.resampled` sizes a grid of a new spacing (see there).
EXTENTS = ("round", "cover")


def as_points(points: Any) -> Tuple[np.ndarray, bool]:
    """(N×3 float array, whether a single 3-vector was given)."""
    p = np.asarray(points, dtype=float)
    if p.ndim == 1:
        if p.shape != (3,):
            raise ValueError(f"a point needs 3 coordinates, got {p.shape}")
        return p[None, :], True
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must be N×3, got {p.shape}")
    return p, False


def _fmt_mm(values: Sequence[float], digits: int) -> str:
    return "(" + ", ".join(f"{round(float(v), digits):g}" for v in values) + ")"


@dataclass(frozen=True)
class Grid:
    """A regular 3D grid: ``shape_ijk``, ``spacing`` (si, sj, sk) mm, LPS ``origin``, ``direction``
    (3×3, columns = LPS directions of i, j, k; stored as a tuple of rows, see
    :attr:`direction_matrix`). Any arrays/sequences are accepted and normalised."""

    shape_ijk: Int3
    spacing: Float3 = (1.0, 1.0, 1.0)
    origin: Float3 = (0.0, 0.0, 0.0)
    direction: Tuple[Float3, Float3, Float3] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in np.asarray(self.shape_ijk).reshape(3))
        spacing = tuple(float(v) for v in np.asarray(self.spacing, dtype=float).reshape(3))
        origin = tuple(float(v) for v in np.asarray(self.origin, dtype=float).reshape(3))
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if any(n < 1 for n in shape):
            raise InputError(f"a grid needs at least one voxel per axis, got {shape}")
        if any(not (s > 0 and math.isfinite(s)) for s in spacing):
            raise InputError(f"voxel spacing must be positive, got {spacing}")
        if abs(np.linalg.det(d)) < 1e-6:
            raise InputError("the direction matrix is singular")
        object.__setattr__(self, "shape_ijk", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", tuple(tuple(float(v) for v in row) for row in d))

    # -- shape and matrices ----------------------------------------------------------------------
    @property
    def shape_kji(self) -> Int3:
        """numpy shape ``(K, J, I)`` of an array on this grid."""
        ni, nj, nk = self.shape_ijk
        return nk, nj, ni

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float)

    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4×4 homogeneous matrix mapping (i, j, k, 1) to (L, P, S, 1)."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def lps_to_ijk_matrix(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_lps_matrix())

    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4×4 IJK→RAS matrix (Slicer's ``IJKToRASMatrix``)."""
        m = self.ijk_to_lps_matrix()
        m[:3, :] = LPS_TO_RAS @ m[:3, :]
        return m

    def ras_to_ijk_matrix(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras_matrix())

    # -- points ----------------------------------------------------------------------------------
    def ijk_to_lps(self, points: Any) -> np.ndarray:
        """IJK points (N×3 or one 3-vector, fractional allowed) -> LPS mm."""
        p, single = as_points(points)
        out = p @ (self.direction_matrix @ np.diag(self.spacing)).T + np.asarray(self.origin)
        return out[0] if single else out

    def lps_to_ijk(self, points: Any) -> np.ndarray:
        """LPS points (N×3 or a 3-vector) -> continuous IJK (not rounded)."""
        p, single = as_points(points)
        a = self.direction_matrix @ np.diag(self.spacing)
        out = np.linalg.solve(a, (p - np.asarray(self.origin)).T).T
        return out[0] if single else out

    def ijk_to_ras(self, points: Any) -> np.ndarray:
        p, single = as_points(points)
        out = self.ijk_to_lps(p) @ LPS_TO_RAS.T
        return out[0] if single else out

    def ras_to_ijk(self, points: Any) -> np.ndarray:
        p, single = as_points(points)
        out = self.lps_to_ijk(p @ LPS_TO_RAS.T)
        return out[0] if single else out

    # -- other grids -----------------------------------------------------------------------------
    def resampled(self, spacing: Sequence[float], extent: str = "round") -> "Grid":
        """The grid of another ``spacing`` (si, sj, sk) with the same origin and direction.

        ``extent`` says how many voxels it gets along an axis of ``n`` voxels of spacing ``s``
        (new spacing ``t``): ``"round"``: ``max(1, round(n s / t))`` (the same length ``n s``,
        rounded; ``samliverseg prepare --spacing`` and the automatic models); ``"cover"``:
        ``floor((n - 1/2) s / t) + 1``, enough to cover the input up to half an input voxel
        beyond its last voxel centre (the SAM-Med3D working grid).
        """
        t = [float(v) for v in np.asarray(spacing, dtype=float).reshape(3)]
        if any(not (v > 0 and math.isfinite(v)) for v in t):
            raise InputError(f"target spacing must be positive, got {tuple(t)}")
        if extent == "round":
            size = [max(1, int(round(n * s / v))) for n, s, v in zip(self.shape_ijk, self.spacing, t)]
        elif extent == "cover":
            size = [max(1, int(math.floor((n - 0.5) * s / v + 1e-6)) + 1) for n, s, v in zip(self.shape_ijk, self.spacing, t)]
        else:
            raise ValueError(f"extent must be one of {EXTENTS}, got {extent!r}")
        return Grid(tuple(size), tuple(t), self.origin, self.direction)  # type: ignore[arg-type]

    def sub_grid(self, start_ijk: Sequence[int], shape_ijk: Sequence[int]) -> "Grid":
        """The box of ``shape_ijk`` voxels of this grid whose voxel (0, 0, 0) is voxel ``start_ijk``."""
        origin = np.asarray(self.origin) + self.direction_matrix @ (np.asarray(self.spacing) * np.asarray(start_ijk))
        return Grid(tuple(int(n) for n in shape_ijk), self.spacing, tuple(float(v) for v in origin),  # type: ignore[arg-type]
                    self.direction)

    def mismatch(self, other: "Grid", tol_mm: float = 1e-3, mine: str = "the volume's") -> Optional[str]:
        """None when ``other`` is this grid; else a short description of the first difference
        (``mine`` names this grid in it: "spacing (...) differs from the volume's (...)").

        Positions are compared in mm: the origin within ``tol_mm``, the spacing within ``tol_mm``
        per voxel, and the direction columns so that the far corner moves less than ``tol_mm``
        (with a floor of 1e-5). Files round-trip their geometry through float32 (NIfTI) or
        decimal text (DICOM), hence a tolerance.
        """
        if tuple(other.shape_ijk) != tuple(self.shape_ijk):
            return f"size {'×'.join(map(str, other.shape_ijk))} differs from {mine} {'×'.join(map(str, self.shape_ijk))}"
        if np.abs(np.subtract(other.spacing, self.spacing)).max() > tol_mm:
            return f"spacing {_fmt_mm(other.spacing, 4)} differs from {mine} {_fmt_mm(self.spacing, 4)}"
        if np.abs(np.subtract(other.origin, self.origin)).max() > tol_mm:
            return f"origin {_fmt_mm(other.origin, 3)} differs from {mine} {_fmt_mm(self.origin, 3)}"
        extent = max(float(np.max(np.asarray(self.shape_ijk) * np.asarray(self.spacing))), 1.0)
        if np.abs(other.direction_matrix - self.direction_matrix).max() > max(tol_mm / extent, 1e-5):
            return f"direction (orientation) differs from {mine}"
        return None

    # -- SimpleITK and Slicer --------------------------------------------------------------------
    @classmethod
    def of_sitk(cls, image: sitk.Image) -> "Grid":
        """The grid of a 3D SimpleITK image."""
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(),
                   np.asarray(image.GetDirection(), dtype=float).reshape(3, 3))

    @classmethod
    def from_ijk_to_ras(cls, matrix: Any, shape_ijk: Sequence[int]) -> "Grid":
        """The grid of a Slicer volume: its 4×4 IJKToRAS matrix and its size (i, j, k)."""
        m = np.asarray(matrix, dtype=float)
        lin = m[:3, :3]
        spacing = np.linalg.norm(lin, axis=0)
        if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
            raise InputError(f"the volume has an invalid voxel spacing {tuple(spacing)}")
        return cls(tuple(shape_ijk), tuple(spacing), RAS_TO_LPS @ m[:3, 3], RAS_TO_LPS @ (lin / spacing))  # type: ignore[arg-type]

    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image of ``array`` ``[k, j, i]`` (shape :attr:`shape_kji`) on this grid."""
        arr = np.asarray(array)
        if arr.shape != self.shape_kji:
            raise InputError(f"array shape {arr.shape} (k, j, i) does not match the grid's {self.shape_kji}")
        if arr.dtype == bool:
            arr = arr.astype(np.uint8)
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(float(v) for v in self.direction_matrix.ravel()))
        return image


class Resampled(NamedTuple):
    """What :func:`resample` returns: the array ``[k, j, i]`` and the grid it lies on."""

    array: np.ndarray
    grid: Grid


def resample(array: np.ndarray, grid: Grid, target: Union[Grid, Sequence[float]], *, interpolator: str = "linear",
             default_value: float = 0.0, extent: str = "round") -> Resampled:
    """``array`` ``[k, j, i]`` on ``grid`` resampled onto ``target``.

    ``target``: a :class:`Grid`, or a spacing ``(si, sj, sk)`` mm: then the target is
    ``grid.resampled(spacing, extent)`` (same origin and direction; ``extent`` "round" or
    "cover", see :meth:`Grid.resampled`). ``interpolator``: ``"nearest"`` (labels),
    ``"linear"`` or ``"bspline"`` (cubic B-spline). ``default_value``: the value of target
    voxels outside the source grid. The output has the input's dtype (cast the input first for
    another one; bool becomes uint8). Physical positions decide: any orientation of either grid.
    """
    if interpolator not in INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {tuple(INTERPOLATORS)}, got {interpolator!r}")
    out_grid = target if isinstance(target, Grid) else grid.resampled(target, extent)
    image = grid.to_sitk(array)
    out = sitk.Resample(image, [int(n) for n in out_grid.shape_ijk], sitk.Transform(), INTERPOLATORS[interpolator],
                        out_grid.origin, out_grid.spacing, tuple(float(v) for v in out_grid.direction_matrix.ravel()),
                        float(default_value), image.GetPixelID())
    return Resampled(sitk.GetArrayFromImage(out), out_grid)


__all__ = ["EXTENTS", "Grid", "INTERPOLATORS", "LPS_TO_RAS", "RAS_TO_LPS", "Resampled", "as_points", "resample"]
