"""Volume nodes <-> numpy and geometry, masks <-> segments, on a real slicer-core scene."""

import importlib.util

import numpy as np
import pytest
import SimpleITK as sitk

import slicer
from slicer_test_helpers import GEOMETRIES, add_ct, blob_ct

from samliverseg.core.errors import InputError
from SAMLiverSegLogic import geometry, volume_nodes


def test_array_roundtrip_kji(scene, geometry_case):
    name, m = geometry_case
    arr = blob_ct((7, 9, 11))
    node = volume_nodes.add_volume_node(scene, arr, m, "CT")
    back = volume_nodes.array_from_volume_node(node)
    assert back.shape == (7, 9, 11)  # [k, j, i]
    np.testing.assert_array_equal(back, arr)
    # the voxel at array[k, j, i] is the image data's (i, j, k) scalar
    assert node.GetImageData().GetScalarComponentAsDouble(10, 2, 6, 0) == arr[6, 2, 10]
    np.testing.assert_allclose(geometry.ijk_to_ras(node), m, atol=1e-9)


def test_geometry_ijk_to_lps_matches_node_matrix(scene, geometry_case):
    name, m = geometry_case
    node = add_ct(scene, m, (6, 8, 10))
    spacing, origin_lps, direction_lps = geometry.geometry_from_ijk_to_ras(geometry.ijk_to_ras(node))
    rng = np.random.default_rng(1)
    for ijk in rng.uniform(-1, 10, size=(20, 3)):
        ras = (m @ np.array([*ijk, 1.0]))[:3]
        lps = np.asarray(origin_lps) + direction_lps @ (np.asarray(spacing) * ijk)
        np.testing.assert_allclose(lps, geometry.RAS_TO_LPS @ ras, atol=1e-9)
        np.testing.assert_allclose(geometry.ras_to_ijk_point(node, ras), ijk, atol=1e-9)
    np.testing.assert_allclose(geometry.ijk_to_ras_from_geometry(spacing, origin_lps, direction_lps), m, atol=1e-9)
    np.testing.assert_allclose(direction_lps.T @ direction_lps, np.eye(3), atol=1e-9)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_agrees_with_itk_reading_slicers_file(scene, tmp_path, name):
    """Slicer's own NRRD writer, read back by SimpleITK (LPS), gives the geometry we compute."""
    m = GEOMETRIES[name]
    arr = blob_ct((5, 6, 7))
    node = volume_nodes.add_volume_node(scene, arr, m, "CT")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    path = str(tmp_path / f"{name}.nrrd")
    storage.SetFileName(path)
    assert storage.WriteData(node)
    img = sitk.ReadImage(path)
    spacing, origin_lps, direction_lps = geometry.geometry_from_ijk_to_ras(geometry.ijk_to_ras(node))
    np.testing.assert_allclose(img.GetSpacing(), spacing, atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), origin_lps, atol=1e-6)
    np.testing.assert_allclose(np.array(img.GetDirection()).reshape(3, 3), direction_lps, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)


def index_map(ijk_to_ras_a, ijk_to_ras_b):
    """The integer index map b -> a of two grids covering the same voxels (a signed permutation)."""
    m = np.linalg.inv(ijk_to_ras_a) @ ijk_to_ras_b
    r = np.round(m)
    np.testing.assert_allclose(m, r, atol=1e-4)
    return r.astype(int)


def same_voxels(arr_a, m_a, arr_b, m_b):
    """True when two arrays [k, j, i] hold the same value at every physical voxel position."""
    idx = index_map(m_a, m_b)
    kb, jb, ib = np.indices(arr_b.shape)
    ijk_b = np.stack([ib.ravel(), jb.ravel(), kb.ravel(), np.ones(ib.size, int)])
    ia, ja, ka, _ = idx @ ijk_b
    return np.array_equal(arr_a[ka, ja, ia], arr_b.ravel())


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_slicer_reads_itk_file_with_the_same_physical_voxels(scene, tmp_path, name):
    """A NIfTI written by SimpleITK and read by Slicer's storage node: every voxel keeps its place.

    Slicer's ITK reader flips the k axis of a left-handed grid (the ``flipped`` case), so node IJK
    and SimpleITK IJK differ there: indices must go through physical coordinates, never be copied.
    """
    m = GEOMETRIES[name]
    arr = blob_ct((5, 6, 7), seed=3)
    spacing, origin_lps, direction_lps = geometry.geometry_from_ijk_to_ras(m)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(tuple(origin_lps))
    img.SetDirection(tuple(direction_lps.ravel()))
    path = str(tmp_path / f"{name}.nii.gz")
    sitk.WriteImage(img, path)
    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(path)
    assert storage.ReadData(node)
    node_arr = volume_nodes.array_from_volume_node(node)
    assert same_voxels(arr, m, node_arr, geometry.ijk_to_ras(node))
    left_handed = np.linalg.det(m[:3, :3]) < 0
    if left_handed:  # documented Slicer behaviour the logic must cope with
        assert not np.allclose(geometry.ijk_to_ras(node), m, atol=1e-4)
        np.testing.assert_array_equal(node_arr, arr[::-1])
    else:
        np.testing.assert_allclose(geometry.ijk_to_ras(node), m, atol=1e-4)
        np.testing.assert_array_equal(node_arr, arr)


@pytest.mark.skipif(importlib.util.find_spec("samliverseg.io.volume") is None,
                    reason="samliverseg.io.volume (core library) is not written yet")
def test_volume_from_node_and_back(scene, geometry_case):
    name, m = geometry_case
    node = add_ct(scene, m, (6, 8, 10))
    vol = volume_nodes.volume_from_node(node)
    assert vol.array.dtype == np.float32 and vol.array.shape == (6, 8, 10)
    spacing, origin_lps, direction_lps = geometry.geometry_from_ijk_to_ras(m)
    np.testing.assert_allclose(vol.spacing, spacing, atol=1e-9)
    np.testing.assert_allclose(vol.origin, origin_lps, atol=1e-9)
    np.testing.assert_allclose(np.asarray(vol.direction), direction_lps, atol=1e-9)
    if hasattr(vol, "ijk_to_ras"):
        for ijk in [(0, 0, 0), (9, 7, 5), (2.5, 3.25, 1.0)]:
            np.testing.assert_allclose(np.ravel(vol.ijk_to_ras(ijk)), (m @ np.array([*ijk, 1.0]))[:3], atol=1e-6)
    node2 = volume_nodes.add_volume_node_from_volume(scene, vol, "copy")
    np.testing.assert_allclose(geometry.ijk_to_ras(node2), m, atol=1e-9)


def test_mask_roundtrip_through_segment(scene, geometry_case):
    name, m = geometry_case
    node = add_ct(scene, m, (10, 12, 14))
    seg = volume_nodes.add_segmentation_node(scene, node)
    sid = volume_nodes.add_segment(seg, "Liver")
    mask = np.zeros((10, 12, 14), np.uint8)
    mask[2:7, 3:9, 4:12] = 1
    mask[5, 0, 0] = 1  # a lone voxel at the border
    image = volume_nodes.oriented_image_from_mask(mask, geometry.ijk_to_ras(node))
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, seg, sid, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    np.testing.assert_array_equal(volume_nodes.segment_mask(seg, sid, node), mask)


def test_mask_roundtrip_with_parent_transform(scene):
    """Volume and segmentation under different transforms: the mask still lands on the volume voxels."""
    node = add_ct(scene, GEOMETRIES["oblique"], (8, 10, 12))
    t = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(t)
    t.SetMatrixTransformToParent(geometry.vtk_matrix_from_array(
        np.array([[1, 0, 0, 15.0], [0, 1, 0, -4.0], [0, 0, 1, 2.5], [0, 0, 0, 1]])))
    node.SetAndObserveTransformNodeID(t.GetID())
    seg = volume_nodes.add_segmentation_node(scene, node)  # not under the transform
    sid = volume_nodes.add_segment(seg, "Liver")
    mask = np.zeros((8, 10, 12), np.uint8)
    mask[2:6, 2:8, 3:9] = 1
    image = volume_nodes.oriented_image_from_mask(mask, volume_nodes.ijk_to_segmentation_frame(node, seg))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, seg, sid, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    np.testing.assert_array_equal(volume_nodes.segment_mask(seg, sid, node), mask)


def test_labelmap_node_from_mask(scene):
    node = add_ct(scene, GEOMETRIES["anisotropic"], (4, 5, 6))
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1:3, 2:4, 1:5] = 1
    lab = volume_nodes.add_labelmap_node_from_mask(scene, mask, node, "lab", label=2)
    assert lab.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(volume_nodes.array_from_volume_node(lab), mask * 2)
    np.testing.assert_allclose(geometry.ijk_to_ras(lab), GEOMETRIES["anisotropic"])


# -- bad input: clear messages ------------------------------------------------------------------

def test_no_source_volume_message():
    with pytest.raises(InputError, match="no source volume"):
        volume_nodes.check_source_volume(None)


def test_2d_volume_message(scene):
    node = volume_nodes.add_volume_node(scene, np.zeros((1, 32, 32), np.int16), np.eye(4), "xray")
    with pytest.raises(InputError, match="2D"):
        volume_nodes.check_source_volume(node)


def test_rgb_volume_message(scene):
    node = slicer.vtkMRMLVectorVolumeNode()
    node.SetName("photo")
    scene.AddNode(node)
    import vtk
    img = vtk.vtkImageData()
    img.SetDimensions(8, 8, 4)
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    node.SetAndObserveImageData(img)
    with pytest.raises(InputError, match="RGB"):
        volume_nodes.check_source_volume(node)


def test_labelmap_as_source_message(scene):
    node = volume_nodes.add_volume_node(scene, np.zeros((4, 8, 8), np.uint8), np.eye(4), "seg", label=True)
    with pytest.raises(InputError, match="labelmap"):
        volume_nodes.check_source_volume(node)


def test_ct_intensity_check():
    ok = volume_nodes.check_ct_intensities(blob_ct())
    assert ok.looks_like_ct and ok.message == ""
    mr = np.random.default_rng(0).uniform(0, 900, (10, 20, 20)).astype(np.float32)
    bad = volume_nodes.check_ct_intensities(mr)
    assert not bad.looks_like_ct
    assert "custom window" in bad.message and bad.suggested_window.count(",") == 1
    lo, hi = (float(v) for v in bad.suggested_window.split(","))
    assert 0 <= lo < hi <= 900
    unscaled = (blob_ct().astype(np.int32) + 1024).astype(np.uint16)  # raw CT without rescale
    assert not volume_nodes.check_ct_intensities(unscaled).looks_like_ct
