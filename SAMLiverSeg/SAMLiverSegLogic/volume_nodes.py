"""Volume nodes <-> numpy / ``samliverseg.io.volume.Volume``, masks <-> segments.

Arrays are always indexed ``[k, j, i]`` (what ``slicer.util.arrayFromVolume`` returns, and what
SimpleITK returns), on the voxel grid of the source volume. Geometry goes through the node's
IJKToRAS matrix; the RAS -> LPS conversion for the core library is explicit (``geometry.py``).

Nothing here needs ``slicer.app`` or ``slicer.mrmlScene``: the scene is always passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from samliverseg.core.errors import InputError

from . import geometry

# -- voxel arrays ---------------------------------------------------------------------------------


def array_from_image_data(image: vtk.vtkImageData) -> np.ndarray:
    """A copy of the scalars of a (single-component) vtkImageData as ``[k, j, i]``."""
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        raise InputError("the image has no voxel data")
    comps = scalars.GetNumberOfComponents()
    arr = numpy_support.vtk_to_numpy(scalars)
    shape = (dims[2], dims[1], dims[0]) + ((comps,) if comps > 1 else ())
    return np.array(arr.reshape(shape), copy=True)


def image_data_from_array(array: np.ndarray, vtk_type: Optional[int] = None) -> vtk.vtkImageData:
    """A vtkImageData (origin 0, spacing 1, extent from 0) holding a deep copy of ``array[k, j, i]``."""
    a = np.ascontiguousarray(array)
    if a.ndim != 3:
        raise InputError(f"expected a 3D array [k, j, i]; got shape {a.shape}")
    image = vtk.vtkImageData()
    image.SetDimensions(a.shape[2], a.shape[1], a.shape[0])
    vtk_array = numpy_support.numpy_to_vtk(a.ravel(), deep=True, array_type=vtk_type)
    vtk_array.SetName("ImageScalars")
    image.GetPointData().SetScalars(vtk_array)
    return image


def add_volume_node(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "Volume",
                    label: bool = False):
    """Add a scalar (or labelmap) volume node holding ``array[k, j, i]`` with geometry ``ijk_to_ras``."""
    cls = slicer.vtkMRMLLabelMapVolumeNode if label else slicer.vtkMRMLScalarVolumeNode
    node = cls()
    node.SetName(name)
    scene.AddNode(node)
    node.SetAndObserveImageData(image_data_from_array(array))
    geometry.set_ijk_to_ras(node, ijk_to_ras)
    return node


def update_volume_node(node, array: np.ndarray) -> None:
    """Replace the voxels of ``node`` (keeps its geometry)."""
    node.SetAndObserveImageData(image_data_from_array(array))


def array_from_volume_node(node) -> np.ndarray:
    """A copy of the voxels of a volume node, ``[k, j, i]``."""
    if node is None or node.GetImageData() is None:
        raise InputError("the volume has no voxel data")
    return array_from_image_data(node.GetImageData())


# -- source volume checks -----------------------------------------------------------------------


def check_source_volume(node) -> Tuple[int, int, int]:
    """Raise :class:`InputError` (one-line message) unless ``node`` is a usable 3D scalar CT volume.

    Returns its dimensions (I, J, K).
    """
    if node is None:
        raise InputError("no source volume: select a CT volume first")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"'{node.GetName()}' is not a scalar volume: select a CT volume")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{node.GetName()}' is a labelmap, not a CT image: select the CT volume")
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"'{node.GetName()}' has no voxel data")
    if image.GetNumberOfScalarComponents() != 1 or node.IsA("vtkMRMLVectorVolumeNode"):
        raise InputError(
            f"'{node.GetName()}' is an RGB/vector image ({image.GetNumberOfScalarComponents()} components): "
            "SAMLiverSeg needs a single-channel CT volume"
        )
    dims = image.GetDimensions()
    if sum(1 for d in dims if d > 1) < 3:
        raise InputError(
            f"'{node.GetName()}' is 2D ({dims[0]} x {dims[1]} x {dims[2]} voxels): SAMLiverSeg needs a 3D CT volume"
        )
    if dims[0] < 2 or dims[1] < 2:
        raise InputError(f"'{node.GetName()}' is too small to segment ({dims[0]} x {dims[1]} x {dims[2]})")
    return dims


@dataclass
class IntensityCheck:
    """Whether the intensities look like CT Hounsfield units, and what to do if not."""

    looks_like_ct: bool
    low: float
    high: float
    message: str = ""
    #: a custom window (``"low,high"``) from the 1st and 99th percentiles, offered when not CT
    suggested_window: str = ""


def check_ct_intensities(array: np.ndarray, max_samples: int = 2_000_000) -> IntensityCheck:
    """Decide whether ``array`` is in CT Hounsfield units.

    CT of the abdomen has air (about -1000 HU) around or inside the body and soft tissue near
    0..100 HU. An MR image, an unscaled CT (0..4095) or a normalised image does not; for those the
    GUI offers a custom window instead of the CT presets.
    """
    a = np.asarray(array)
    flat = a.ravel()
    if flat.size > max_samples:
        flat = flat[:: int(np.ceil(flat.size / max_samples))]
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return IntensityCheck(False, float("nan"), float("nan"), "the volume contains no finite values")
    p1, p50, p99 = (float(v) for v in np.percentile(flat, [1, 50, 99]))
    lo, hi = float(flat.min()), float(flat.max())
    suggested = f"{p1:.6f},{p99:.6f}".replace(".000000", "") if p99 > p1 else f"{lo:.6f},{hi:.6f}".replace(".000000", "")
    has_air = lo <= -500
    has_tissue = hi >= 0 and p99 >= -100
    plausible_range = lo >= -4000 and hi <= 40000
    if has_air and has_tissue and plausible_range:
        return IntensityCheck(True, lo, hi)
    msg = (
        f"the intensities ({lo:g} to {hi:g}) do not look like CT Hounsfield units "
        f"(no air near -1000 HU or no soft tissue near 0 HU): use a custom window, for example {suggested}"
    )
    return IntensityCheck(False, lo, hi, msg, suggested)


# -- samliverseg.io.volume.Volume ------------------------------------------------------------------


def volume_from_node(node, dtype=np.float32):
    """A ``samliverseg.io.volume.Volume`` (HU float32, LPS geometry) from a scalar volume node.

    The geometry is the node's own IJKToRAS (its parent transform is not applied: the mask goes
    back onto the same voxel grid, and the model only needs spacing and the voxel array).
    """
    from samliverseg.io.volume import Volume

    check_source_volume(node)
    array = array_from_volume_node(node).astype(dtype, copy=False)
    g = geometry.volume_grid(node)
    return Volume(array=array, spacing=g.spacing, origin=g.origin, direction=g.direction_matrix)


def add_volume_node_from_volume(scene, volume, name: str = "Volume"):
    """The inverse of :func:`volume_from_node`: a ``Volume`` (LPS) -> a scalar volume node (RAS)."""
    return add_volume_node(scene, np.asarray(volume.array), volume.ijk_to_ras_matrix(), name)


# -- masks <-> vtkOrientedImageData / segments ----------------------------------------------------


def ijk_to_segmentation_frame(volume_node, segmentation_node=None) -> np.ndarray:
    """Volume IJK -> the segmentation node's own RAS frame (accounts for different parent transforms)."""
    m = geometry.world_ijk_to_ras(volume_node)
    if segmentation_node is not None:
        m = np.linalg.inv(geometry.node_to_world(segmentation_node)) @ m
    return m


def oriented_image_from_mask(mask: np.ndarray, ijk_to_ras: np.ndarray) -> "slicer.vtkOrientedImageData":
    """A binary (uint8 0/1) vtkOrientedImageData on the voxel grid given by ``ijk_to_ras``."""
    m = np.asarray(mask)
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(image_data_from_array((m > 0).astype(np.uint8), vtk.VTK_UNSIGNED_CHAR))
    image.SetImageToWorldMatrix(geometry.vtk_matrix_from_array(ijk_to_ras))
    return image


def reference_image(volume_node, segmentation_node=None) -> "slicer.vtkOrientedImageData":
    """An empty (all 0) uint8 oriented image with the volume's grid, in the segmentation's frame."""
    dims = volume_node.GetImageData().GetDimensions()
    zeros = np.zeros((dims[2], dims[1], dims[0]), np.uint8)
    return oriented_image_from_mask(zeros, ijk_to_segmentation_frame(volume_node, segmentation_node))


def resample_to(image, reference) -> "slicer.vtkOrientedImageData":
    """Nearest-neighbour resampling of ``image`` onto the grid (and extent) of ``reference``."""
    out = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        image, reference, out, False, False
    ):
        raise InputError("could not resample the labelmap onto the volume grid")
    return out


def array_from_oriented_image_on(image, reference) -> np.ndarray:
    """Voxels of ``image`` on the grid of ``reference`` as ``[k, j, i]`` (0 where ``image`` has none)."""
    ext = image.GetExtent()
    if ext[0] > ext[1] or ext[2] > ext[3] or ext[4] > ext[5]:
        d = reference.GetDimensions()
        return np.zeros((d[2], d[1], d[0]), np.uint8)
    resampled = resample_to(image, reference)
    out = array_from_image_data(resampled)
    d = reference.GetDimensions()
    if out.shape != (d[2], d[1], d[0]):  # never expected; guard against silent misalignment
        raise InputError(f"resampled labelmap has shape {out.shape}, expected {(d[2], d[1], d[0])}")
    return out


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a uint8 0/1 array ``[k, j, i]`` on the voxel grid of ``volume_node``."""
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    if segment is None:
        raise InputError(f"segment '{segment_id}' does not exist")
    reference = reference_image(volume_node, segmentation_node)
    labelmap = slicer.vtkOrientedImageData()
    if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap):
        return np.zeros_like(array_from_image_data(reference))
    arr = array_from_oriented_image_on(labelmap, reference)
    return (arr > 0).astype(np.uint8)


def all_segment_masks(segmentation_node, volume_node) -> dict:
    """{segment id: uint8 mask [k, j, i]} of every segment, on the volume grid."""
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    return {ids.GetValue(n): segment_mask(segmentation_node, ids.GetValue(n), volume_node)
            for n in range(ids.GetNumberOfValues())}


def add_labelmap_node_from_mask(scene, mask: np.ndarray, volume_node, name: str = "Labelmap", label: int = 1):
    """A labelmap volume node holding ``mask * label`` on the volume's grid."""
    arr = (np.asarray(mask) > 0).astype(np.uint8) * np.uint8(label)
    return add_volume_node(scene, arr, geometry.ijk_to_ras(volume_node), name, label=True)


def ensure_segmentation_converters() -> None:
    """Register the segmentation representation converters if nobody has (slicer-core outside Slicer).

    Inside Slicer the Segmentations module registers them at startup; ``slicer-core`` alone does
    not, and then an empty segment cannot even be created.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    rules = factory.GetConverterRules()
    names = {r.GetClassName() for r in rules} if rules else set()
    for cls in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if cls.__name__ not in names:
            factory.RegisterConverterRule(cls())


def add_segmentation_node(scene, volume_node, name: str = "Segmentation"):
    """A segmentation node with display node whose geometry is the volume's voxel grid."""
    ensure_segmentation_converters()
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node


def add_segment(segmentation_node, name: str, color: Optional[Sequence[float]] = None) -> str:
    """Add an empty segment (or return the existing one with that name); returns its id."""
    ensure_segmentation_converters()
    segmentation = segmentation_node.GetSegmentation()
    existing = segmentation.GetSegmentIdBySegmentName(name)
    if existing:
        return existing
    if color is not None:
        return segmentation.AddEmptySegment("", name, list(color))
    return segmentation.AddEmptySegment("", name)
