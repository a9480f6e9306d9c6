"""The prompt engine with the real LiteMedSAM weights on a synthetic abdominal phantom:
accuracy from one box / one point, propagation that stops where the object ends, and the
identical mask whether a prompt comes in IJK or through a markups file in RAS or LPS, on
identity, flipped, oblique and anisotropic geometries."""

import numpy as np
import pytest

from samliverseg.interactive.engine import PromptEngine
from samliverseg.core.evaluation import evaluate
from samliverseg.core.maskutil import bbox_2d, interior_point, middle_slice
from samliverseg.io.markups import markups_to_prompts, point_list, roi_from_ijk, write_markups
from samliverseg.demo.phantom import make_phantom
from samliverseg.core.prompts import Prompts, Roi3D, SliceBox
from samliverseg.interactive.seeded_region import box_from_points
from samliverseg.io.volume import Volume


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((36, 160, 160), (2.0, 2.0, 4.0), seed=1, n_tumors=2, tumor_radii_mm=(16.0, 10.0))


@pytest.fixture(scope="module")
def engine(phantom):
    eng = PromptEngine("lite_medsam", device="cpu")
    eng.set_volume(phantom.to_volume())
    return eng


def extent(mask):
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    return int(ks[0]), int(ks[-1])


def test_liver_from_one_box(engine, phantom):
    liver = phantom.liver_mask
    k = middle_slice(liver)
    i0, j0, i1, j1 = bbox_2d(liver[k])
    res = engine.segment(Prompts(box=SliceBox.axial(i0 - 3, j0 - 3, i1 + 3, j1 + 3, k)))
    m = evaluate(res.mask, liver, phantom.spacing)
    assert m["dice"] >= 0.85, (m, res.report["stop_reasons"])
    lo, hi = extent(liver)
    plo, phi = extent(res.mask)
    # it stops where the liver ends: no leak of more than two slices into the neighbours
    assert lo - 2 <= plo and phi <= hi + 2, (plo, phi, lo, hi, res.report["stop_reasons"])


def test_tumour_from_one_box(engine, phantom):
    tumour = phantom.tumor_label_mask(0)
    k = middle_slice(tumour)
    i0, j0, i1, j1 = bbox_2d(tumour[k])
    res = engine.segment(Prompts(box=SliceBox.axial(i0 - 1, j0 - 1, i1 + 1, j1 + 1, k)))
    m = evaluate(res.mask, tumour, phantom.spacing)
    assert m["dice"] >= 0.7, (m, res.report["stop_reasons"])
    # the tumour does not grow into the surrounding liver
    assert m["volume_pred_ml"] < 2.0 * m["volume_ref_ml"]


def test_liver_from_one_point(engine, phantom):
    liver = phantom.liver_mask
    k = middle_slice(liver)
    x, y = interior_point(phantom.labels[k] == 1)  # a click on liver parenchyma, not in a tumour
    res = engine.segment(Prompts(positive=[(float(x), float(y), float(k))]))
    m = evaluate(res.mask, liver, phantom.spacing)
    assert m["dice"] >= 0.8, (m, res.report["stop_reasons"])


def test_clicks_become_a_box_around_the_clicked_object(phantom):
    tumour = phantom.tumor_label_mask(0)
    k = middle_slice(tumour)
    x, y = interior_point(tumour[k])
    box = box_from_points(phantom.hu[k], [(x, y)], pixel_spacing=(2.0, 2.0))
    i0, j0, i1, j1 = bbox_2d(tumour[k])
    assert box is not None
    assert abs(box[0] - i0) <= 3 and abs(box[1] - j0) <= 3 and abs(box[2] - i1) <= 3 and abs(box[3] - j1) <= 3
    # a click in air grows nothing useful: no box larger than the body
    air = box_from_points(phantom.hu[k], [(1.0, 1.0)], pixel_spacing=(2.0, 2.0))
    assert air is None or (air[2] - air[0]) * (air[3] - air[1]) > 0


def _rotation(a_deg, b_deg):
    a, b = np.radians(a_deg), np.radians(b_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


GEOMETRIES = {
    "identity": dict(spacing=(2.0, 2.0, 4.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3)),
    "flipped": dict(spacing=(2.0, 2.0, 4.0), origin=(150.0, 120.0, -30.0), direction=np.diag([-1.0, -1.0, 1.0])),
    "oblique": dict(spacing=(2.0, 2.0, 4.0), origin=(-20.0, 35.0, 80.0), direction=_rotation(25, 15)),
    "anisotropic_oblique_flipped": dict(spacing=(0.7, 1.3, 5.0), origin=(10.0, -5.0, 3.0),
                                        direction=_rotation(-30, 20) @ np.diag([1.0, -1.0, -1.0])),
}


@pytest.fixture(scope="module")
def small():
    return make_phantom((14, 96, 96), (3.0, 3.0, 6.0), seed=2, n_tumors=1)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_ijk_and_markups_prompts_give_the_identical_mask(small, name, tmp_path):
    g = GEOMETRIES[name]
    vol = Volume(array=small.hu, spacing=g["spacing"], origin=g["origin"], direction=g["direction"])
    eng = PromptEngine("lite_medsam", device="cpu")
    eng.set_volume(vol)
    liver = small.liver_mask
    k = middle_slice(liver)
    x, y = interior_point(liver[k])
    ijk_points = [(float(x), float(y), float(k))]
    i0, j0, i1, j1 = bbox_2d(liver[k])
    roi = Roi3D(i0 - 2, j0 - 2, max(k - 3, 0), i1 + 2, j1 + 2, min(k + 3, liver.shape[0] - 1))

    by_ijk = eng.segment(Prompts(positive=ijk_points)).mask
    by_roi_ijk = eng.segment(Prompts(roi=roi)).mask
    for system in ("RAS", "LPS"):
        f_pts = tmp_path / f"points_{system}.mrk.json"
        write_markups(f_pts, point_list("liver", vol.ijk_to_lps(np.array(ijk_points))), coordinate_system=system)
        p = markups_to_prompts(f_pts, vol)
        assert np.allclose(p.positive, ijk_points, atol=1e-6)
        assert np.array_equal(eng.segment(p).mask, by_ijk)
        f_roi = tmp_path / f"roi_{system}.mrk.json"
        write_markups(f_roi, roi_from_ijk(roi, vol), coordinate_system=system)
        p = markups_to_prompts(f_roi, vol)
        assert (p.roi.i0, p.roi.j0, p.roi.k0, p.roi.i1, p.roi.j1, p.roi.k1) == (
            roi.i0, roi.j0, roi.k0, roi.i1, roi.j1, roi.k1)
        assert np.array_equal(eng.segment(p).mask, by_roi_ijk)
    assert by_ijk.sum() > 0 and by_roi_ijk.sum() > 0
