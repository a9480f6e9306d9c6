"""A volume cropped to the liver (issue 13: "ircadb-1.1 cropped"): its sides cut through the body,
so LiteMedSAM's slices are padded to the field of a whole slice (``ModelSpec.crop_field_mm``,
366 mm) instead of being magnified, and one box gives on the crop what it gives on the whole
volume. Real LiteMedSAM, the demo's phantom."""

import dataclasses

import numpy as np
import pytest

from samliverseg.core.evaluation import dice
from samliverseg.core.maskutil import bbox_2d
from samliverseg.core.prompts import Prompts, SliceBox
from samliverseg.demo.phantom import make_phantom
from samliverseg.interactive.engine import PromptEngine
from samliverseg.io.volume import Volume

pytestmark = pytest.mark.slow


def crop(volume: Volume, truth: np.ndarray, margin_mm: float):
    """The truth's bounding box plus ``margin_mm``, geometry kept (the origin moves)."""
    ks, js, is_ = (np.flatnonzero(truth.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    m = [int(np.ceil(margin_mm / s)) for s in volume.spacing]  # i, j, k
    lo = [max(0, int(is_[0]) - m[0]), max(0, int(js[0]) - m[1]), max(0, int(ks[0]) - m[2])]
    hi = [min(n - 1, int(v[-1]) + mm) for n, v, mm in zip(volume.shape_ijk, (is_, js, ks), m)]
    grid = volume.grid.sub_grid(lo, [h - l + 1 for l, h in zip(lo, hi)])
    sl = (slice(lo[2], hi[2] + 1), slice(lo[1], hi[1] + 1), slice(lo[0], hi[0] + 1))
    return Volume(volume.array[sl].copy(), grid.spacing, grid.origin, grid.direction_matrix), truth[sl].copy()


def box_dice(engine: PromptEngine, volume: Volume, truth: np.ndarray, fraction: float) -> float:
    ks = np.flatnonzero(truth.any(axis=(1, 2)))
    k = int(ks[0] + round(fraction * (ks[-1] - ks[0])))
    i0, j0, i1, j1 = bbox_2d(truth[k])
    engine.set_volume(volume)
    return float(dice(engine.segment(Prompts(box=SliceBox.axial(i0 - 3, j0 - 3, i1 + 3, j1 + 3, k))).mask, truth))


def test_a_crop_to_the_liver_segments_like_the_whole_volume():
    ph = make_phantom((80, 224, 224), (1.5, 1.5, 2.5), seed=0, n_tumors=3)  # the demo's: 336 mm wide
    whole, liver = ph.to_volume(), (ph.labels > 0).astype(np.uint8)
    tight, tight_liver = crop(whole, liver, 5.0)  # 200 x 163 mm
    engine = PromptEngine("lite_medsam", device="cpu", backend="auto")
    assert engine.spec.crop_field_mm == 366.0
    fractions = (0.2, 0.8)
    ref = [box_dice(engine, whole, liver, f) for f in fractions]
    assert engine.field_mm is None  # a whole slice (air around the body) fills the input
    padded = [box_dice(engine, tight, tight_liver, f) for f in fractions]
    assert engine.field_mm == 366.0
    # the rule of before: the crop fills the model's input (magnified 1.5x)
    engine.spec = engine.predictor.spec = dataclasses.replace(engine.spec, crop_field_mm=None)
    magnified = [box_dice(engine, tight, tight_liver, f) for f in fractions]
    assert min(padded) >= 0.95 and all(p >= r - 0.025 for p, r in zip(padded, ref)), (ref, padded)
    assert np.mean(padded) >= np.mean(magnified) + 0.01, (padded, magnified)
