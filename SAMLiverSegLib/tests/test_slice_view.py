"""The model sees each slice upright whatever the voxel order of the file (``slice_view``)."""

import numpy as np
import pytest

from samliverseg.core.evaluation import dice
from samliverseg.core.maskutil import bbox_2d
from samliverseg.core.prompts import Prompts, SliceBox
from samliverseg.interactive.engine import PromptEngine, slice_of
from samliverseg.interactive.slice_view import SliceView, view_for
from samliverseg.io.volume import Volume
from samliverseg.demo.phantom import make_phantom

ALL_VIEWS = [SliceView(t, fy, fx) for t in (False, True) for fy in (False, True) for fx in (False, True)]


def test_views_of_common_storage_orders():
    lps, ras = np.eye(3), np.diag([-1.0, -1.0, 1.0])
    assert view_for(lps, "k").identity  # DICOM's usual order: x to the left, y to the back
    assert view_for(ras, "k") == SliceView(flip_y=True, flip_x=True)  # NIfTI's RAS: turned half round
    assert view_for(lps, "j") == SliceView(flip_y=True)  # coronal: the head at the top
    assert view_for(lps, "i") == SliceView(flip_y=True)  # sagittal: x to the back, the head at the top
    swapped = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # i runs back, j left
    assert view_for(swapped, "k") == SliceView(transpose=True)
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    tilted = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ ras  # RAS, 20 degrees about S
    assert view_for(tilted, "k") == SliceView(flip_y=True, flip_x=True)
    # a volume stored sagittally (k runs left): its k slices are sagittal
    sag = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i back, j down, k left
    assert view_for(sag, "k").identity


@pytest.mark.parametrize("view", ALL_VIEWS, ids=lambda v: f"t{int(v.transpose)}y{int(v.flip_y)}x{int(v.flip_x)}")
def test_a_view_maps_pixels_points_and_boxes_alike_and_back(view):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, size=(7, 11)).astype(np.uint8)
    v = view.image(a)
    assert v.shape == ((11, 7) if view.transpose else (7, 11))
    assert np.array_equal(view.unview(v), a)
    import torch

    assert np.array_equal(view.unview(torch.from_numpy(np.ascontiguousarray(v))).numpy(), a)
    xy = np.array([[0, 0], [10, 6], [3, 5]], dtype=np.float32)
    for (x, y), (vx, vy) in zip(xy, view.points(xy, v.shape)):
        assert a[int(y), int(x)] == v[int(vy), int(vx)]
    m = np.zeros_like(a, dtype=bool)
    m[2:5, 3:9] = True
    i0, j0, i1, j1 = bbox_2d(m)
    assert view.box((i0, j0, i1, j1), v.shape) == tuple(float(t) for t in bbox_2d(view.image(m)))
    assert view.spacing((0.5, 2.0)) == ((2.0, 0.5) if view.transpose else (0.5, 2.0))


@pytest.fixture(scope="module")
def small():
    return make_phantom((14, 96, 96), (3.0, 3.0, 6.0), seed=2, n_tumors=1)


def stored(p, order: str):
    """The phantom (identity direction) stored in another voxel order, the same patient in LPS; and
    the map of an array on that grid back to the phantom's."""
    hu, (si, sj, sk) = p.hu, p.spacing
    nk, nj, ni = hu.shape
    if order == "ras":  # i and j run the other way (a NIfTI file in RAS)
        vol = Volume(hu[:, ::-1, ::-1].copy(), (si, sj, sk), ((ni - 1) * si, (nj - 1) * sj, 0.0),
                     np.diag([-1.0, -1.0, 1.0]))
        return vol, lambda a: a[:, ::-1, ::-1]
    if order == "transposed":  # i runs back, j to the left
        vol = Volume(hu.transpose(0, 2, 1).copy(), (sj, si, sk), (0.0, 0.0, 0.0),
                     np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
        return vol, lambda a: a.transpose(0, 2, 1)
    if order == "flip_k":  # the slices run from the head down
        vol = Volume(hu[::-1].copy(), (si, sj, sk), (0.0, 0.0, (nk - 1) * sk), np.diag([1.0, 1.0, -1.0]))
        return vol, lambda a: a[::-1]
    raise ValueError(order)


def ijk_in(order: str, p, ijk):
    """A point (i, j, k) of the phantom's grid on the grid of ``stored(p, order)``."""
    nk, nj, ni = p.hu.shape
    i, j, k = ijk
    return {"ras": (ni - 1 - i, nj - 1 - j, k), "transposed": (j, i, k), "flip_k": (i, j, nk - 1 - k)}[order]


@pytest.mark.parametrize("order,axis", [("ras", "k"), ("transposed", "k"), ("flip_k", "j")])
def test_the_voxel_order_of_the_file_does_not_change_the_mask(small, order, axis):
    """One box on the same physical slice, on the phantom and on the phantom stored in another voxel
    order: the model sees the same upright image, and the masks are the same voxels (real LiteMedSAM).
    On j (coronal) slices, flipping k would otherwise show the model the slice upside down."""
    liver = small.liver_mask > 0
    base = Volume(small.hu, small.spacing, (0.0, 0.0, 0.0), np.eye(3))
    vol, back = stored(small, order)
    eng = PromptEngine("lite_medsam", device="cpu", backend="auto")
    if axis == "k":
        k = int(np.argmax(liver.sum(axis=(1, 2))))
        i0, j0, i1, j1 = bbox_2d(liver[k])
        lo, hi = (i0 - 3, j0 - 3, k), (i1 + 3, j1 + 3, k)
    else:
        j = int(np.argmax(liver.sum(axis=(0, 2))))
        i0, k0, i1, k1 = bbox_2d(liver[:, j, :])
        lo, hi = (i0 - 3, j, max(0, k0 - 1)), (i1 + 3, j, min(liver.shape[0] - 1, k1 + 1))
    masks, views = [], []
    for v, to_base, corners in ((base, lambda a: a, (lo, hi)), (vol, back, (ijk_in(order, small, lo), ijk_in(order, small, hi)))):
        eng.set_volume(v)
        box = SliceBox(tuple(float(c) for c in corners[0]), tuple(float(c) for c in corners[1]))
        masks.append(to_base(eng.segment(Prompts(box=box, slice_axis=axis)).mask > 0))
        views.append(eng.view(axis))
    assert views[0] != views[1]  # the two files show the model their slices turned differently
    assert dice(masks[0], liver) > 0.7  # (0.79 from the coronal box)
    assert np.array_equal(masks[0], masks[1]), dice(masks[0], masks[1])
    # the prompted slice itself is the model's answer: the same pixels in both orders
    s = lo[2] if axis == "k" else lo[1]
    assert np.array_equal(slice_of(masks[0], axis, s), slice_of(masks[1], axis, s))
