"""Metrics (MONAI) with hand-computed expectations, edge cases, and the file front end."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.distance import cdist

from samliverseg.core.errors import InputError
from samliverseg.core.evaluation import METRIC_KEYS, dice, evaluate, evaluate_files
from samliverseg.core.jsonutil import json_safe

ANISO = (1.5, 1.0, 2.5)  # (si, sj, sk) mm


def _cube(shape, k0, j0, i0, n):
    m = np.zeros(shape, dtype=np.uint8)
    m[k0:k0 + n, j0:j0 + n, i0:i0 + n] = 1
    return m


def _brute_force_surface_metrics(a, b, spacing_ijk):
    """HD95 and ASSD from scratch: surface voxels (mask minus erosion), distances in mm."""
    scale = np.array(spacing_ijk[::-1], dtype=float)  # array order (sk, sj, si)
    sa = np.argwhere(a & ~ndimage.binary_erosion(a)) * scale
    sb = np.argwhere(b & ~ndimage.binary_erosion(b)) * scale
    d = cdist(sa, sb)
    ab, ba = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.percentile(ab, 95), np.percentile(ba, 95))
    assd = np.concatenate([ab, ba]).mean()
    return hd95, assd


def test_identical_masks():
    a = _cube((12, 12, 12), 2, 3, 4, 5)
    r = evaluate(a, a, ANISO)
    assert list(r)[:len(METRIC_KEYS)] == list(METRIC_KEYS)
    assert r["dice"] == pytest.approx(1) and r["iou"] == pytest.approx(1)
    assert r["precision"] == pytest.approx(1) and r["recall"] == pytest.approx(1)
    assert r["hd95_mm"] == 0 and r["assd_mm"] == 0 and r["empty"] == "none"


def test_overlap_metrics_of_known_cubes():
    shape = (12, 12, 12)
    a = _cube(shape, 2, 2, 2, 4)           # 64 voxels
    b = _cube(shape, 2, 2, 4, 4)           # shifted by 2 along i: 32 voxels overlap
    r = evaluate(a, b, ANISO)
    assert r["dice"] == pytest.approx(2 * 32 / 128)
    assert r["iou"] == pytest.approx(32 / 96)
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(0.5)
    big = _cube(shape, 1, 1, 1, 6)         # 216 voxels containing a 27-voxel cube
    small = _cube(shape, 2, 2, 2, 3)
    r = evaluate(big, small, ANISO)
    assert r["precision"] == pytest.approx(27 / 216) and r["recall"] == pytest.approx(1)
    assert r["dice"] == pytest.approx(2 * 27 / 243)
    disjoint = evaluate(_cube(shape, 0, 0, 0, 2), _cube(shape, 8, 8, 8, 2), ANISO)
    assert disjoint["dice"] == 0 and disjoint["precision"] == 0 and disjoint["recall"] == 0


def test_volumes_in_ml():
    a = _cube((12, 12, 12), 0, 0, 0, 4)
    b = _cube((12, 12, 12), 0, 0, 0, 6)
    r = evaluate(a, b, ANISO)
    assert r["voxels_pred"] == 64 and r["voxels_ref"] == 216
    assert r["volume_pred_ml"] == pytest.approx(64 * 1.5 * 1.0 * 2.5 / 1000)
    assert r["volume_ref_ml"] == pytest.approx(216 * 3.75 / 1000)


@pytest.mark.parametrize("axis, expected_mm", [("k", 4 * 2.5), ("j", 4 * 1.0), ("i", 4 * 1.5)])
def test_parallel_planes_distance_uses_spacing_in_array_order(axis, expected_mm):
    """Two one-voxel-thick planes 4 voxels apart: every surface voxel is exactly 4 * s mm from the other."""
    shape = (10, 11, 12)
    a = np.zeros(shape, dtype=np.uint8)
    b = np.zeros(shape, dtype=np.uint8)
    ax = {"k": 0, "j": 1, "i": 2}[axis]
    sl_a = [slice(None)] * 3
    sl_b = [slice(None)] * 3
    sl_a[ax], sl_b[ax] = 2, 6
    a[tuple(sl_a)] = 1
    b[tuple(sl_b)] = 1
    r = evaluate(a, b, ANISO)
    assert r["hd95_mm"] == pytest.approx(expected_mm)
    assert r["assd_mm"] == pytest.approx(expected_mm)
    assert r["dice"] == 0


def test_shifted_cubes_match_brute_force():
    shape = (16, 16, 16)
    a = _cube(shape, 3, 3, 3, 7).astype(bool)
    b = np.zeros(shape, bool)
    b[5:12, 4:10, 3:11] = True  # shifted 2 along k, 1 along j, and a different size
    r = evaluate(a, b, ANISO)
    hd95, assd = _brute_force_surface_metrics(a, b, ANISO)
    assert r["hd95_mm"] == pytest.approx(hd95, rel=1e-5)
    assert r["assd_mm"] == pytest.approx(assd, rel=1e-5)
    # the plain shift along k by 2 slices: the farthest surface voxels are 2 * sk = 5 mm apart
    c = np.roll(a, 2, axis=0)
    assert evaluate(a, c, ANISO)["hd95_mm"] <= 5.0 + 1e-6
    assert evaluate(a, c, ANISO)["hd95_mm"] == pytest.approx(_brute_force_surface_metrics(a, c, ANISO)[0], rel=1e-5)


def test_mask_touching_the_array_border():
    shape = (6, 8, 8)
    a = np.zeros(shape, bool)
    a[:, :, :4] = True
    b = np.zeros(shape, bool)
    b[:, :, :5] = True
    r = evaluate(a, b, ANISO)
    hd95, assd = _brute_force_surface_metrics(a, b, ANISO)
    assert r["hd95_mm"] == pytest.approx(hd95, rel=1e-5) and r["assd_mm"] == pytest.approx(assd, rel=1e-5)


def test_2d_masks():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[2, :] = True
    b[5, :] = True  # rows (j) 3 apart with sj = 2
    r = evaluate(a, b, (0.5, 2.0))
    assert r["hd95_mm"] == pytest.approx(6.0)
    assert r["volume_pred_ml"] == pytest.approx(10 * 1.0 / 1000)


def test_empty_edge_cases():
    shape = (5, 5, 5)
    empty = np.zeros(shape, np.uint8)
    cube = _cube(shape, 1, 1, 1, 2)
    both = evaluate(empty, empty, ANISO)
    assert both["dice"] == 1 and both["iou"] == 1 and both["hd95_mm"] == 0 and both["assd_mm"] == 0
    assert both["empty"] == "both" and both["voxels_pred"] == 0
    for pred, ref, which in ((empty, cube, "pred"), (cube, empty, "ref")):
        r = evaluate(pred, ref, ANISO)
        assert r["dice"] == 0 and r["iou"] == 0 and r["precision"] == 0 and r["recall"] == 0
        assert math.isinf(r["hd95_mm"]) and math.isinf(r["assd_mm"])
        assert r["empty"] == which and "empty" in r["note"]
        safe = json_safe(r)
        assert safe["hd95_mm"] is None and safe["assd_mm"] is None and safe["dice"] == 0
        text = json.dumps(safe, allow_nan=False)
        assert '"hd95_mm": null' in text


def test_invalid_inputs():
    with pytest.raises(InputError):
        evaluate(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)), ANISO)
    with pytest.raises(InputError):
        evaluate(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1.0, 1.0))
    with pytest.raises(InputError):
        evaluate(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1.0, 0.0, 1.0))


def test_on_the_phantom():
    from samliverseg.demo.phantom import make_phantom

    p = make_phantom((32, 80, 80), (3.0, 3.0, 4.0), seed=2)
    liver = p.labels > 0
    r = evaluate(liver, liver, p.spacing)
    assert r["dice"] == pytest.approx(1) and r["volume_ref_ml"] == pytest.approx(p.liver_volume_ml())
    grown = ndimage.binary_dilation(liver, iterations=1)  # one voxel: 3 mm in-plane, 4 mm along k
    r = evaluate(grown, liver, p.spacing)
    assert 0.8 < r["dice"] < 1 and r["recall"] == pytest.approx(1)
    assert 3.0 <= r["hd95_mm"] <= 4.0 + 1e-6 and 3.0 <= r["assd_mm"] <= 4.0


# -- files -----------------------------------------------------------------------------------------

def _write(path, arr, spacing=(1.5, 1.0, 2.5), origin=(0.0, 0.0, 0.0), direction=None):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return str(path)


def test_evaluate_files_matches_evaluate_and_selects_labels(tmp_path):
    shape = (10, 11, 12)
    ref = np.zeros(shape, np.uint8)
    ref[2:7, 2:8, 2:9] = 1
    ref[3:5, 3:5, 3:5] = 2          # "tumour"
    pred = np.zeros(shape, np.uint8)
    pred[2:7, 3:8, 2:9] = 1
    pred[3:5, 3:5, 4:6] = 2
    rp = _write(tmp_path / "ref.nii.gz", ref)
    pp = _write(tmp_path / "pred.nrrd", pred)
    r = evaluate_files(pp, rp)  # any non-zero vs any non-zero
    expected = evaluate(pred > 0, ref > 0, (1.5, 1.0, 2.5))
    for key in METRIC_KEYS:
        assert r[key] == pytest.approx(expected[key])
    t = evaluate_files(pp, rp, label=2, ref_label=2)
    assert t["voxels_pred"] == 8 and t["voxels_ref"] == 8 and t["dice"] == pytest.approx(0.5)
    mixed = evaluate_files(pp, rp, label=2)  # ref_label defaults to any non-zero
    assert mixed["voxels_ref"] == int((ref > 0).sum())
    listed = evaluate_files(pp, rp, label=[1, 2], ref_label=1)
    assert listed["voxels_pred"] == int((pred > 0).sum()) and listed["voxels_ref"] == int((ref == 1).sum())


@pytest.mark.parametrize("change, word", [
    (dict(spacing=(1.5, 1.0, 3.0)), "spacing"),
    (dict(origin=(0.0, 5.0, 0.0)), "origin"),
    (dict(direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)), "direction"),
])
def test_evaluate_files_grid_mismatch(tmp_path, change, word):
    arr = np.ones((4, 5, 6), np.uint8)
    rp = _write(tmp_path / "ref.nii.gz", arr)
    pp = _write(tmp_path / "pred.nii.gz", arr, **change)
    with pytest.raises(InputError, match=word):
        evaluate_files(pp, rp)


def test_evaluate_files_size_mismatch_missing_and_vector(tmp_path):
    rp = _write(tmp_path / "ref.nii.gz", np.ones((4, 5, 6), np.uint8))
    pp = _write(tmp_path / "pred.nii.gz", np.ones((4, 5, 7), np.uint8))
    with pytest.raises(InputError, match="size"):
        evaluate_files(pp, rp)
    with pytest.raises(InputError, match="not found"):
        evaluate_files(tmp_path / "nope.nii.gz", rp)
    vec = sitk.GetImageFromArray(np.ones((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="components"):
        evaluate_files(tmp_path / "rgb.nrrd", rp)
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read"):
        evaluate_files(tmp_path / "junk.nii.gz", rp)
    # a tiny origin difference (float noise in a header) is tolerated
    a = _write(tmp_path / "a.nii.gz", np.ones((4, 5, 6), np.uint8), origin=(0.0, 0.0, 1e-5))
    assert evaluate_files(a, rp)["dice"] == pytest.approx(1)


def test_dice_is_the_metrics_dice_and_handles_empty_masks():
    a = np.zeros((4, 5), bool)
    b = np.zeros((4, 5), bool)
    assert dice(a, b) == 1.0
    a[0, :] = True
    assert dice(a, b) == 0.0 and dice(b, a) == 0.0
    b[0, :2] = True
    b[3, 4] = True
    assert dice(a, b) == pytest.approx(2 * 2 / 8)
    rng = np.random.default_rng(0)
    p, r = rng.random((6, 7, 8)) > 0.6, rng.random((6, 7, 8)) > 0.5
    assert dice(p, r) == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()))
    assert dice(p, r) == evaluate(p, r, ANISO)["dice"]
    assert dice(p.astype(np.uint8) * 2, r) == dice(p, r)  # non-zero is foreground
    with pytest.raises(InputError):
        dice(p, r[:, :, :7])
