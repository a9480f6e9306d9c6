"""The prompt-ensemble uncertainty map with the real LiteMedSAM weights on a synthetic phantom:
the variance formula, where it is zero, that it sits on the boundary rather than inside, that a
wrong segment is more uncertain than a right one, and the bad-input messages."""

import numpy as np
import pytest
from scipy import ndimage

from samliverseg.interactive.engine import PromptEngine
from samliverseg.core.errors import InputError
from samliverseg.core.maskutil import bbox_2d, middle_slice
from samliverseg.demo.phantom import make_phantom
from samliverseg.interactive.predictor import SlicePredictor
from samliverseg.core.prompts import Prompts, SliceBox
from samliverseg.interactive.uncertainty import ensemble_uncertainty


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((20, 128, 128), (2.5, 2.5, 4.0), seed=3, n_tumors=1, tumor_radii_mm=(14.0,))


@pytest.fixture(scope="module")
def engine(phantom):
    eng = PromptEngine("lite_medsam", device="cpu")
    eng.set_volume(phantom.to_volume())
    return eng


@pytest.fixture(scope="module")
def tumour_result(engine, phantom):
    t = phantom.tumor_label_mask(0)
    k = middle_slice(t)
    i0, j0, i1, j1 = bbox_2d(t[k])
    seg = engine.segment(Prompts(box=SliceBox.axial(i0 - 1, j0 - 1, i1 + 1, j1 + 1, k))).mask
    return seg, ensemble_uncertainty(engine, seg, members=5, seed=0)


def test_variance_formula_and_support(tumour_result):
    seg, u = tumour_result
    assert u.members == 5  # 4 boxes + the mask prompt (LiteMedSAM is box-only: no point member)
    assert u.variance.dtype == np.float32 and u.variance.shape == seg.shape
    # binary votes: the population variance is mean * (1 - mean), in [0, 0.25]
    np.testing.assert_allclose(u.variance, u.mean * (1 - u.mean), atol=1e-6)
    assert u.variance.min() >= 0 and u.variance.max() <= 0.25 + 1e-6
    ks = np.flatnonzero(seg.any(axis=(1, 2)))
    assert u.slices == list(range(ks[0] - 1, ks[-1] + 2))  # one margin slice at each end
    outside = np.ones(seg.shape[0], bool)
    outside[u.slices] = False
    assert not u.variance[outside].any() and not u.mean[outside].any()
    # the members mostly agree with the segment
    assert u.mean[seg > 0].mean() > 0.8


def test_uncertainty_sits_on_the_boundary(tumour_result):
    seg, u = tumour_result
    m = seg > 0
    inner = ndimage.binary_erosion(m, np.ones((1, 5, 5)))
    ring = ndimage.binary_dilation(m, np.ones((1, 3, 3))) & ~ndimage.binary_erosion(m, np.ones((1, 3, 3)))
    assert inner.any() and ring.any()
    assert u.variance[ring].mean() > 3 * u.variance[inner].mean() + 1e-3, (u.variance[ring].mean(), u.variance[inner].mean())
    assert 0.0 < u.uncertain_fraction(0.05) < 1.0


def test_a_bad_segment_is_more_uncertain(engine, phantom, tumour_result):
    seg, u = tumour_result
    # a "segment" that is the tumour's box grown by 6 pixels: the model disagrees with its mask prompt
    # and its jittered boxes see different content
    bad = np.zeros_like(seg)
    for k in np.flatnonzero(seg.any(axis=(1, 2))):
        i0, j0, i1, j1 = bbox_2d(seg[k])
        bad[k, max(0, j0 - 6):j1 + 7, max(0, i0 - 6):i1 + 7] = 1
    ub = ensemble_uncertainty(engine, bad, members=5, seed=0)
    assert ub.variance.sum() > 1.5 * u.variance.sum()


def test_mask_to_low_res_inverts_postprocess(engine, phantom, tumour_result):
    seg, _ = tumour_result
    k = int(np.flatnonzero(seg.any(axis=(1, 2)))[len(np.flatnonzero(seg.any(axis=(1, 2)))) // 2])
    emb = engine.embedding("k", k)
    pred: SlicePredictor = engine.predictor
    low = pred.mask_to_low_res(seg[k], emb)
    assert low.shape == (1, 4 * emb.features.shape[-1], 4 * emb.features.shape[-1])
    back = pred.postprocess(low[None], emb)[0].numpy() > 0
    inter = (back & (seg[k] > 0)).sum()
    assert 2 * inter / (back.sum() + seg[k].sum()) > 0.9


def test_bad_input(engine, phantom):
    with pytest.raises(InputError, match="empty"):
        ensemble_uncertainty(engine, np.zeros(phantom.hu.shape, np.uint8))
    with pytest.raises(InputError, match="shape"):
        ensemble_uncertainty(engine, np.ones((2, 2, 2), np.uint8))
    with pytest.raises(InputError, match="2 members"):
        ensemble_uncertainty(engine, phantom.labels > 0, members=1)
