"""Prompt engine mechanics with a small random-weight SAM: caching, slice axes, prompt handling,
prefetch with progress and cancel, and the errors a user meets. (Accuracy with the real
LiteMedSAM weights is in test_engine_litemedsam.py.)"""

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from libtest_helpers import build_tiny_sam, tiny_sam_spec
from samliverseg.interactive.engine import PromptEngine, PropagationSettings, hu_gate_range, pixel_spacing, point_to_xy, slice_of
from samliverseg.core.errors import CancelledError, InputError, PromptError
from samliverseg.interactive.predictor import EmbeddingCache, SliceEmbedding, SlicePredictor
from samliverseg.core.prompts import Prompts, Roi3D, SliceBox
from samliverseg.io.volume import Volume


def tiny_sam(resize="longest_side", normalization="sam_pixel", crop_field_mm=None):
    torch.manual_seed(0)
    model = build_tiny_sam()
    model.spec = tiny_sam_spec("tiny_test", description="tiny random SAM", builder=lambda: model,
                               checkpoint_filename="none.pth", window="wide", resize=resize,
                               normalization=normalization, crop_field_mm=crop_field_mm)
    return model


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    arr = rng.normal(40, 15, size=(12, 40, 50)).astype(np.float32)  # [k, j, i]
    arr[:, 10:30, 12:35] += 80  # a bright block
    arr[0] = -1000.0  # an all-air slice
    return Volume(array=arr, spacing=(0.8, 0.8, 2.5))


@pytest.fixture()
def engine(volume):
    eng = PromptEngine(model=tiny_sam(), device="cpu", window="abdomen")
    eng.set_volume(volume)
    return eng


def test_slice_views_and_coordinates(volume):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # k=2, j=3, i=4
    assert slice_of(arr, "k", 1).shape == (3, 4)
    assert slice_of(arr, "j", 2).shape == (2, 4)
    assert slice_of(arr, "i", 3).shape == (2, 3)
    p = (3.0, 2.0, 1.0)  # i, j, k
    for axis in "kji":
        x, y = point_to_xy(p, axis)
        sl = slice_of(arr, axis, int(p["ijk".index(axis)]))
        assert sl[int(y), int(x)] == arr[1, 2, 3]
    assert pixel_spacing(volume, "k") == (0.8, 0.8)
    assert pixel_spacing(volume, "j") == (2.5, 0.8)
    assert pixel_spacing(volume, "i") == (2.5, 0.8)


def test_predictor_keeps_physical_aspect_and_maps_back():
    model = tiny_sam()
    pred = SlicePredictor(model, torch.device("cpu"))
    # a coronal slice: 12 rows of 2.5 mm, 50 columns of 0.8 mm -> 30 mm x 40 mm
    assert pred.input_size(12, 50, (2.5, 0.8)) == (48, 64)
    img = np.random.default_rng(1).integers(0, 255, size=(12, 50), dtype=np.uint8)
    emb = pred.embed(img, (2.5, 0.8))
    assert emb.input_hw == (48, 64) and emb.original_hw == (12, 50)
    out = pred.predict(emb, point_coords=np.array([[25.0, 6.0]]), point_labels=np.array([1]))
    assert out.masks.shape == (3, 12, 50) and out.scores.shape == (3,)
    assert out.low_res_logits.shape == (3, 16, 16)
    single = pred.predict(emb, box=(5, 2, 40, 10), multimask_output=False)
    assert single.masks.shape == (1, 12, 50)


def test_predictor_decodes_as_the_model_does_with_its_constants_made_once():
    """The predictor keeps the positional encoding and the no-mask embedding (made once, contiguous):
    box, point and dense-mask prompts decode exactly as ``SamModel.decode`` (which makes them per call)."""
    model = tiny_sam()
    with torch.no_grad():  # a no-mask embedding that is not zero, so that using it for a mask prompt would show
        model.prompt_encoder.no_mask_embed.weight.normal_()
    pred = SlicePredictor(model, torch.device("cpu"))
    img = np.random.default_rng(3).integers(0, 255, size=(64, 64), dtype=np.uint8)
    emb = pred.embed(img)
    low = torch.randn(1, 16, 16)
    cases = [dict(box=(5.0, 6.0, 40.0, 50.0)),
             dict(point_coords=np.array([[20.0, 30.0], [40.0, 10.0]]), point_labels=np.array([1, 0])),
             dict(box=(5.0, 6.0, 40.0, 50.0), mask_input=low)]
    for _ in range(2):  # the second round reads the kept constants
        for kw in cases:
            out = pred.predict(emb, multimask_output=False, **kw)
            points = None
            if "point_coords" in kw:
                points = (torch.as_tensor(kw["point_coords"], dtype=torch.float32)[None],
                          torch.as_tensor(kw["point_labels"])[None])
            boxes = torch.tensor([kw["box"]], dtype=torch.float32) if "box" in kw else None
            with torch.no_grad():
                ref, iou = model.decode(emb.features, points, boxes, low[None] if "mask_input" in kw else None)
            assert torch.equal(out.low_res_logits, ref[0]) and np.array_equal(out.scores, iou[0].numpy())
    pe, no_mask = pred._constants()
    assert pe.is_contiguous() and no_mask.is_contiguous() and pred._constants()[0] is pe


def test_a_crop_narrower_than_the_field_is_padded_not_magnified():
    pred = SlicePredictor(tiny_sam(), torch.device("cpu"))
    # 75 x 100 mm (a crop to the organ) at a 300 mm field: 64 px stand for 300 mm, so it fills 16 x 21 px
    assert pred.input_size(50, 100, (1.5, 1.0), 300.0) == (16, 21)
    # without a field (a whole slice, whatever its width) it fills the input
    assert pred.input_size(50, 100, (1.5, 1.0)) == (48, 64)
    # a slice wider than the field fills the input too
    assert pred.input_size(400, 400, (1.0, 1.0), 300.0) == (64, 64)
    img = np.random.default_rng(2).integers(0, 255, size=(50, 100), dtype=np.uint8)
    emb = pred.embed(img, (1.5, 1.0), 300.0)
    assert emb.input_hw == (16, 21) and emb.original_hw == (50, 100)
    x, _ = pred.preprocess(img, (1.5, 1.0), 300.0)
    assert float(x[..., 16:, :].abs().max()) == 0.0 and float(x[..., :, 21:].abs().max()) == 0.0  # padding
    out = pred.predict(emb, box=(10, 5, 80, 40), multimask_output=False)
    assert out.masks.shape == (1, 50, 100)
    back = pred.mask_to_low_res(out.masks[0], emb)
    assert back.shape == (1, 16, 16) and float((back[0, 4:, :] > 0).sum()) == 0.0  # the mask stays in the slice's corner


def _ct(shape_kji, body_box_kji, direction=np.eye(3)):
    """Air (-1000 HU) with a block of soft tissue (40 HU) at ``body_box_kji`` (slices)."""
    a = np.full(shape_kji, -1000.0, dtype=np.float32)
    a[body_box_kji] = 40.0
    return Volume(a, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), direction)


def test_the_engine_pads_only_a_volume_cropped_inside_the_body():
    from samliverseg.core.body import is_body_crop, side_body_fraction

    engine = PromptEngine(tiny_sam(crop_field_mm=300.0), device="cpu")
    whole = _ct((6, 60, 80), (slice(None), slice(5, 55), slice(5, 75)))  # air around the body
    engine.set_volume(whole)
    assert engine.field_mm is None and engine.embedding("k", 2).input_hw == (48, 64)
    crop = _ct((6, 60, 80), (slice(None), slice(None), slice(None)))  # tissue up to every side
    engine.set_volume(crop)
    assert engine.field_mm == 300.0 and engine.embedding("k", 2).input_hw == (13, 17)
    # The sides are those across the patient, read from the direction: a volume whose k axis runs
    # left-right (a sagittal acquisition) has its ends along the patient at j, not at k.
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # i -> P, j -> S, k -> L
    body = (slice(5, 55), slice(None), slice(5, 75))  # tissue up to the j ends (along the patient) only
    a = _ct((60, 30, 80), body, sagittal)
    assert side_body_fraction(a.array, a.direction) == 0.0 and not is_body_crop(a.array, a.direction)
    assert side_body_fraction(a.array, np.eye(3)) > 0.25  # read as axial, the j ends would count


def test_square_resize_and_minmax_normalisation():
    pred = SlicePredictor(tiny_sam(resize="square", normalization="minmax01"), torch.device("cpu"))
    x, hw = pred.preprocess(np.full((10, 30), 7, dtype=np.uint8) + np.eye(10, 30, dtype=np.uint8))
    assert hw == (64, 64) and x.shape == (1, 3, 64, 64)
    assert float(x.min()) == 0.0 and float(x.max()) == pytest.approx(1.0)


def test_embedding_cache_is_an_lru_bounded_in_bytes():
    def emb():
        return SliceEmbedding(features=torch.zeros(1, 4, 8, 8), original_hw=(8, 8), input_hw=(8, 8), image_size=8)

    one = emb().nbytes
    cache = EmbeddingCache(max_bytes=3 * one)
    for key in "abc":
        cache.put(key, emb())
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", emb())  # evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache and "d" in cache
    assert cache.nbytes == 3 * one and len(cache) == 3


def test_slice_is_embedded_once_and_prompted_many_times(engine):
    box = SliceBox.axial(10, 8, 36, 32, 5)
    engine.segment_slice(Prompts(box=box))
    n = len(engine.embed_times)
    engine.segment_slice(Prompts(positive=[(20.0, 20.0, 5.0)], negative=[(45.0, 35.0, 5.0)]))
    engine.segment_slice(Prompts(box=box, positive=[(20.0, 20.0, 5.0)]))
    assert len(engine.embed_times) == n == 1
    assert engine.cache.hits >= 2


@pytest.mark.parametrize("axis,index,shape", [("k", 5, (40, 50)), ("j", 20, (12, 50)), ("i", 25, (12, 40))])
def test_segment_slice_on_each_axis(engine, axis, index, shape):
    p = [20.0, 20.0, 6.0]
    p["ijk".index(axis)] = index
    res = engine.segment_slice(Prompts(positive=[tuple(p)], slice_axis=axis))
    assert res.mask.shape == shape and res.mask.dtype == bool
    assert res.slice_axis == axis and res.slice_index == index


def test_3d_result_is_on_the_volume_grid_and_reports(engine, volume):
    res = engine.segment(Prompts(box=SliceBox.axial(10, 8, 36, 32, 5)), propagate=True)
    assert res.mask.shape == volume.array.shape and res.mask.dtype == np.uint8
    rep = res.report
    assert rep["seed_slices"] == [5] and set(rep["stop_reasons"]) == {"up", "down"}
    assert rep["voxels"] == int(res.mask.sum())
    assert rep["timings"]["decodes"] >= 1
    no_prop = engine.segment(Prompts(box=SliceBox.axial(10, 8, 36, 32, 5)), propagate=False)
    assert set(np.flatnonzero(no_prop.mask.any(axis=(1, 2)))) <= {5}


def test_roi_result_stays_inside_the_roi(engine):
    try:
        res = engine.segment(Prompts(roi=Roi3D(12, 10, 3, 34, 30, 8)))
    except PromptError as exc:  # a random model may find nothing: then the message must say so
        assert "empty" in str(exc)
        return
    ks, js, is_ = np.nonzero(res.mask)
    assert ks.min() >= 3 and ks.max() <= 8
    assert js.min() >= 10 and js.max() <= 30 and is_.min() >= 12 and is_.max() <= 34


@pytest.mark.parametrize("prompts,words", [
    (Prompts(positive=[(60.0, 5.0, 5.0)]), "outside the volume"),
    (Prompts(positive=[(5.0, 5.0, 12.0)]), "outside the volume"),
    (Prompts(positive=[(5.0, -3.0, 2.0)]), "outside the volume"),
    (Prompts(box=SliceBox.axial(10, 10, 10, 30, 4)), "empty"),
    (Prompts(box=SliceBox.axial(60, 45, 80, 60, 4)), "outside"),
    (Prompts(box=SliceBox((1, 1, 2), (20, 20, 3))), "same k slice"),
    (Prompts(), "no prompt"),
    (Prompts(negative=[(5.0, 5.0, 5.0)]), "positive point or a box"),
    (Prompts(positive=[(20.0, 20.0, 0.0)]), "empty"),  # the all-air slice
    (Prompts(positive=[(float("nan"), 1.0, 1.0)]), "outside"),
])
def test_bad_prompts_give_a_message(engine, prompts, words):
    with pytest.raises(PromptError) as err:
        engine.segment(prompts)
    assert words in str(err.value)


def test_bad_volumes_are_refused(engine):
    bad = np.zeros((4, 10, 10), dtype=np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        engine.set_volume(Volume(array=bad))
    with pytest.raises(InputError, match="3D"):
        engine.set_volume(Volume(array=np.zeros((10, 10), dtype=np.float32)))


def test_prefetch_reports_progress_and_cancels(engine):
    seen = []
    n = engine.prefetch(range(1, 5), "k", progress=lambda d, t: seen.append((d, t)))
    assert n == 4 and seen[-1] == (4, 4)
    assert engine.prefetch(range(1, 5), "k") == 0  # all cached now
    cancel = threading.Event()

    def progress(done, total):
        if done == 2:
            cancel.set()

    with pytest.raises(CancelledError):
        engine.prefetch(range(5, 12), "k", progress=progress, cancel=cancel)
    assert engine.is_cached("k", 5) and engine.is_cached("k", 6) and not engine.is_cached("k", 8)


def test_background_prefetch_job(engine):
    job = engine.start_prefetch(range(0, 12), "j")
    job.join(timeout=120)
    assert not job.is_alive() and job.error is None and job.done_count == 12
    job2 = engine.start_prefetch(range(0, 50), "i")
    job2.cancel()
    job2.join(timeout=120)
    assert job2.cancelled or job2.done_count == 50


def test_new_volume_clears_the_cache(engine, volume):
    engine.prefetch([3], "k")
    assert engine.is_cached("k", 3)
    engine.set_volume(volume)
    assert not engine.is_cached("k", 3) and len(engine.cache) == 0


def test_explicit_missing_device_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(InputError, match="cuda"):
        PromptEngine(model=tiny_sam(), device="cuda")


def test_reduced_precision_encoder_keeps_float32_embeddings(volume):
    eng = PromptEngine(model=tiny_sam(), device="cpu", window="abdomen", precision="bf16")
    eng.set_volume(volume)
    emb = eng.embedding("k", 5)
    assert emb.features.dtype == torch.float32
    ref = PromptEngine(model=tiny_sam(), device="cpu", window="abdomen")
    ref.set_volume(volume)
    full = ref.embedding("k", 5).features
    rel = float((emb.features - full).norm() / full.norm())
    assert 0 < rel < 0.1  # it did run in bf16, and stayed close
    with pytest.raises(InputError, match="precision"):
        PromptEngine(model=tiny_sam(), device="cpu", precision="int4")


def test_the_growth_limit_is_the_same_distance_in_mm_along_both_axes_of_a_slice(engine, volume):
    """A slice's mask may grow one slice spacing beyond its neighbour's (at least two pixels):
    on a coronal or sagittal slice of a volume with thick slices (here 0.8 x 0.8 x 2.5 mm) the
    rows are 2.5 mm apart and the columns 0.8 mm, so that distance is 2 rows and 6 columns, not 6
    of each (15 mm along the slices' axis, where a leak walked in)."""
    assert volume.spacing == (0.8, 0.8, 2.5)
    assert engine._growth_px("k") == (3, 3)  # axial: 2.5 mm across, 0.8 mm pixels
    for axis in ("j", "i"):
        rows, cols = engine._growth_px(axis)
        rs, cs = pixel_spacing(volume, axis)
        assert (rs, cs) == (2.5, 0.8)
        assert (rows, cols) == (2, 6)  # 5 mm (two 2.5 mm pixels, the coarse axis' floor) both ways
        assert abs(rows * rs - cols * cs) <= max(rs, cs) / 2


def test_the_hu_gate_range_is_the_seed_tissues_not_a_neighbours_it_also_covers():
    """A seed mask that also covers gas and fat next to the liver (the model's box mask on a slice
    where the colon touches the liver) gives the liver's range, not one wide enough to let the
    colon through; on a clean seed the range is that of before (all values) within 1 HU."""
    rng = np.random.default_rng(0)
    liver = rng.normal(44.0, 9.0, 4000)
    leak = np.concatenate([rng.normal(-800.0, 100.0, 1500), rng.normal(-90.0, 15.0, 800), rng.normal(15.0, 8.0, 200)])
    st = PropagationSettings()
    before = replace(st, hu_range_trim=None)
    clean = hu_gate_range(liver, st)
    assert np.allclose(clean, hu_gate_range(liver, before), atol=1.0)
    assert clean[0] == pytest.approx(np.percentile(liver, 5) - st.hu_gate_margin, abs=1.0)
    lo, hi = hu_gate_range(np.concatenate([liver, leak]), st)
    assert clean[0] - 12.0 < lo <= clean[0] and hi == pytest.approx(clean[1], abs=3.0)
    assert hu_gate_range(np.concatenate([liver, leak]), before)[0] < -800.0  # the rule of before took the gas in
    # a seed that is mostly bright (contrast-filled vessels) keeps its own range: the trim follows the median
    vessel = rng.normal(220.0, 12.0, 3000)
    assert hu_gate_range(vessel, st)[0] == pytest.approx(np.percentile(vessel, 5) - st.hu_gate_margin, abs=1.0)
    assert hu_gate_range(liver[:9], st) is None


def _liver_and_gallbladder(rng):
    """[k, j, i] HU: fat; a "liver" of 50 HU over k=8..29 (a tip on k=8..15, wide from k=16); a
    "gallbladder" of 10 HU beside the tip, a little smaller than it, over k=0..15 (running 8
    slices, 24 mm, past the liver's end). Returns the volume, the liver, and the mask a walk that followed the
    gallbladder on would leave (liver | gallbladder)."""
    shape = (30, 64, 64)
    liver = np.zeros(shape, dtype=bool)
    liver[8:16, 27:41, 27:41] = True
    liver[16:30, 10:41, 10:41] = True
    gall = np.zeros(shape, dtype=bool)
    gall[0:16, 42:53, 24:40] = True
    arr = rng.normal(-100.0, 6.0, shape)
    arr[liver] = rng.normal(50.0, 6.0, int(liver.sum()))
    arr[gall] = rng.normal(10.0, 6.0, int(gall.sum()))
    return Volume(array=arr.astype(np.float32), spacing=(1.0, 1.0, 3.0)), liver, liver | gall


def test_the_ends_of_the_object_drop_a_neighbour_of_another_tissue(engine):
    """A walk that reached the liver's caudal tip beside the gallbladder (about 40 HU darker)
    followed the gallbladder past the liver's end. Against the whole object's median HU, that tail
    (8 slices of the gallbladder's median HU) goes, and so does the gallbladder on the slices
    behind it where it is at least ``end_foreign_frac`` of the mask; the tip stays, the prompted
    slice and the slices inside it are untouched. A tail shorter than ``end_tail_min_mm`` (the
    darker last slices of an organ's tip, by partial volume) is no tail."""
    rng = np.random.default_rng(1)
    volume, liver, walked = _liver_and_gallbladder(rng)
    engine.set_volume(volume)
    st = PropagationSettings()
    assert st.end_tissue_hu is not None and PropagationSettings.legacy().end_tissue_hu is None
    engine.settings = st
    mask = walked.astype(np.uint8)
    assert engine._trim_foreign_ends(mask, "k", [20]) == 16  # k=0..15
    assert np.array_equal(mask > 0, liver)
    # a prompt inside the mixed slices: that slice and those inside it stay as they were
    mask = walked.astype(np.uint8)
    assert engine._trim_foreign_ends(mask, "k", [12]) == 12  # k=0..11
    assert np.array_equal(mask[12:] > 0, walked[12:]) and np.array_equal(mask[:12] > 0, liver[:12])
    # the same along another axis: the volume and the masks transposed, slices across 'i'
    engine.set_volume(Volume(array=np.ascontiguousarray(volume.array.transpose(2, 1, 0)), spacing=(3.0, 1.0, 1.0)))
    mask = np.ascontiguousarray(walked.transpose(2, 1, 0)).astype(np.uint8)
    assert engine._trim_foreign_ends(mask, "i", [20]) == 16
    assert np.array_equal(mask > 0, liver.transpose(2, 1, 0))
    # an object of one tissue is left alone; so is everything with the rule off
    engine.set_volume(volume)
    mask = liver.astype(np.uint8)
    assert engine._trim_foreign_ends(mask, "k", [20]) == 0 and np.array_equal(mask > 0, liver)
    engine.settings = replace(st, end_tissue_hu=None)
    mask = walked.astype(np.uint8)
    assert engine._trim_foreign_ends(mask, "k", [20]) == 0 and np.array_equal(mask > 0, walked)
    # behind the tail, slices where the other tissue is under end_foreign_frac of the mask are left
    engine.settings = replace(st, end_foreign_frac=0.9)
    mask = walked.astype(np.uint8)
    assert engine._trim_foreign_ends(mask, "k", [20]) == 8 and np.array_equal(mask[8:] > 0, walked[8:])
    assert not mask[:8].any()
    # the gallbladder running 3 slices (9 mm) past the tip is a tail (end_tail_min_mm 8: on these
    # 3 mm slices, 3; under the 10 mm of before it was not); 2 slices (6 mm) are not
    engine.settings = st
    for past, changed in ((3, 11), (2, 0)):
        mask = walked.astype(np.uint8)
        mask[: 8 - past] = 0
        assert engine._trim_foreign_ends(mask, "k", [20]) == changed, past
        assert np.array_equal(mask > 0, liver if changed else walked & (np.arange(30) >= 8 - past)[:, None, None]), past
    # a tail of 24 mm is no tail where end_tail_min_mm asks for more
    engine.settings = replace(st, end_tail_min_mm=25.0)
    mask = walked.astype(np.uint8)
    assert engine._trim_foreign_ends(mask, "k", [20]) == 0 and np.array_equal(mask > 0, walked)


def test_a_coronal_box_is_propagated_again_across_axial_slices_and_keeps_its_own_slice(engine, volume):
    """Prompts on coronal (or sagittal) slices only are handed to axial slices
    (``PropagationSettings.axial_handoff``): the report says on which axial slice and with which
    prompt, the prompted slice keeps the result of the pass across coronal slices, and one
    progress bar runs over both passes."""
    box = Prompts(box=SliceBox((12, 20, 3), (34, 20, 9)), slice_axis="j")
    seen = []
    engine.settings = PropagationSettings(axial_handoff=False)
    try:
        native = engine.segment(box)
    except PromptError as exc:  # a random model may find nothing: then the message must say so
        assert "empty" in str(exc)
        return
    engine.settings = PropagationSettings()
    res = engine.segment(box, progress=lambda d, t: seen.append((d, t)))
    assert "axial_handoff" not in native.report
    hand = res.report["axial_handoff"]
    assert 0 <= hand["slice_k"] < volume.array.shape[0] and hand["prompt"].startswith(("box", "point"))
    assert np.array_equal(res.mask[:, 20, :], native.mask[:, 20, :])
    assert res.report["voxels"] == int(res.mask.sum()) and res.report["slice_axis"] == "j"
    n = volume.array.shape[1] + volume.array.shape[0]
    assert seen and {t for _, t in seen} == {n}, seen
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_the_axial_answer_must_stay_within_the_users_boxes_where_it_crosses_their_slices(engine):
    """``_within_user_boxes``: an axial mask crosses a coronal box's slice along a row (a sagittal
    box's along a column); there it may reach at most ``box_margin_px`` (3) beyond the box, and
    it may not cross the box's slice at all on an axial slice the box does not span."""
    coronal = Prompts(box=SliceBox((12, 20, 6), (34, 20, 9)), slice_axis="j")
    m = np.zeros((40, 50), dtype=bool)
    m[15:25, 10:33] = True  # row 20: i = 10..32, 2 px beyond i0 = 12
    assert engine._within_user_boxes(m, 5, coronal, "j")
    assert not engine._within_user_boxes(m, 2, coronal, "j")  # k = 2: the box spans k = 6..9 (3 more each way)
    m[20, 4:10] = True  # now 8 px beyond
    assert not engine._within_user_boxes(m, 5, coronal, "j")
    m[:] = False
    m[30:35, 0:50] = True  # does not reach row 20
    assert engine._within_user_boxes(m, 2, coronal, "j")
    sagittal = Prompts(box=SliceBox((25, 10, 3), (25, 30, 9)), slice_axis="i")
    m[:] = False
    m[8:31, 20:30] = True  # column 25: j = 8..30
    assert engine._within_user_boxes(m, 5, sagittal, "i")
    m[2:8, 25] = True
    assert not engine._within_user_boxes(m, 5, sagittal, "i")
