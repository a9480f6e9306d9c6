"""The effect with a native 3D model (SAM-Med3D), through the inference worker: a click in any
view prompts the whole volume (``prompt3d``), further clicks (other views too) refine it, Apply
writes the 3D result with undo, and boxes, propagation and the uncertainty map say what to do
instead. Real tiny SAM-Med3D networks in a real worker process (a decoder made to answer
"everything" so that the result is known, or random weights compared with the in-process
engine), a real MRML scene, an oblique volume; driven like Slicer (select() on the pipe, poll())."""

import math
import os
import sys

import numpy as np
import pytest
import torch

from slicer_test_helpers import GEOMETRIES, REPO_ROOT, add_ct, centre_view_on, pump, slice_node_for

sys.path.insert(0, str(REPO_ROOT / "SAMLiverSegLib" / "tests"))
import libtest_helpers  # noqa: E402  (the library tests' tiny models)

from SAMLiverSegLogic import effect_logic, geometry, segment_writer, slice_clicks, volume_nodes
from SAMLiverSegLogic.worker_client import WorkerClient

SHAPE = (16, 40, 48)


def constant_tiny(logit: float):
    """A tiny SAM-Med3D whose decoder answers ``logit`` for every voxel (last upscaling conv
    zeroed with bias 1, hypernetwork output constant)."""
    from samliverseg.models.build_sam3d import build_sam_med3d_tiny

    torch.manual_seed(1)
    m = build_sam_med3d_tiny()
    up = m.mask_decoder.output_upscaling[3]
    gelu1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    with torch.no_grad():
        up.weight.zero_()
        up.bias.fill_(1.0)
        for mlp in m.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(logit / (gelu1 * up.out_channels))
    return m.eval()


def random_tiny():
    return libtest_helpers.random_tiny_sam3d()


def worker_for(tmp_path_factory, model, name):
    folder = tmp_path_factory.mktemp(name)
    ck = folder / "tiny3d.pth"
    torch.save({"model_state_dict": model.state_dict()}, ck)
    env = dict(os.environ, SAMLIVERSEG_CACHE=str(folder / "cache"))
    return WorkerClient(model="sam_med3d_tiny", checkpoint=str(ck), device="cpu", env=env), str(ck)


@pytest.fixture(scope="module")
def everything(tmp_path_factory):
    client, _ = worker_for(tmp_path_factory, constant_tiny(6.0), "everything")
    with client:
        yield client


def session_for(scene, client):
    vol = add_ct(scene, GEOMETRIES["oblique"], SHAPE)
    session = effect_logic.SegmentAnythingSession(effect_logic.EngineSettings(model="sam_med3d_tiny", device="cpu"),
                                                  scene, client_factory=lambda s: client)
    assert session.set_volume_node(vol).ok
    return vol, session


def click_at(scene, vol, orientation, ijk):
    sn = slice_node_for(scene, orientation, vol)
    ras = geometry.ijk_to_ras_point(vol, ijk)
    centre_view_on(sn, ras)
    return sn, slice_clicks.ras_to_xy(sn, ras)[:2]


def answer(session, kind="click3d"):
    outs = pump(session, lambda outs: any(o.kind == kind for o in outs), timeout=600)
    return [o for o in outs if o.kind == kind][-1]


def test_clicks_in_several_views_segment_and_refine_in_3d(scene, everything):
    vol, session = session_for(scene, everything)
    assert session.is_3d_model()
    sn, xy = click_at(scene, vol, "Axial", (20, 18, 8))
    assert session.click(sn, xy).ok
    out = answer(session)
    assert out.ok, out.message
    assert session.preview_is_3d and session.preview.shape == SHAPE
    # "everything" inside the 64^3 patch at 1.5 mm covers this small volume
    assert out.voxels == int(np.prod(SHAPE))
    assert session.sent3d == 1
    sn2, xy2 = click_at(scene, vol, "Coronal", (30, 20, 5))  # another view: no "start over"
    assert session.click(sn2, xy2, positive=False).ok
    out2 = answer(session)
    assert out2.ok, out2.message
    assert session.sent3d == 2 and len(session.clicks3d) == 2
    assert len(session.builder.positive) == 1 and len(session.builder.negative) == 1
    display = session.display
    assert display.positive_node.GetNumberOfControlPoints() == 1
    assert display.negative_node.GetNumberOfControlPoints() == 1
    np.testing.assert_array_equal(display.preview_mask(vol), session.preview)

    # Apply writes the 3D result into the segment, and undo takes it back
    seg = volume_nodes.add_segmentation_node(scene, vol)
    sid = volume_nodes.add_segment(seg, "Liver")
    editor = segment_writer.create_editor(scene, seg, vol)
    applied = session.apply(editor.target, seg, sid)
    assert applied.ok, applied.message
    assert volume_nodes.segment_mask(seg, sid, vol).all()  # the model said "everything"
    editor.target.undo()
    assert not volume_nodes.segment_mask(seg, sid, vol).any()
    assert session.preview is None and session.clicks3d == []  # apply clears the prompts


def test_random_weights_equal_the_in_process_engine_on_the_input_grid(scene, tmp_path_factory):
    from samliverseg.api import open_model

    client, ck = worker_for(tmp_path_factory, random_tiny(), "random")
    with client:
        vol, session = session_for(scene, client)
        sn, xy = click_at(scene, vol, "Sagittal", (24, 20, 8))
        assert session.click(sn, xy).ok
        out = answer(session)
        assert out.ok, out.message
    assert session.preview.shape == SHAPE and session.preview.dtype == np.uint8
    ref = open_model("sam_med3d_tiny", ck, "cpu").segment(volume_nodes.volume_from_node(vol),
                                                          [session.clicks3d[0][0]], [1])
    np.testing.assert_array_equal(session.preview, np.asarray(ref.mask, np.uint8))


def test_boxes_propagation_and_uncertainty_say_what_to_do(scene, everything):
    vol, session = session_for(scene, everything)
    sn, xy = click_at(scene, vol, "Axial", (20, 18, 8))
    out = session.drag_box(sn, xy, (xy[0] + 20, xy[1] + 20))
    assert not out.ok and "points, not boxes" in out.message
    assert not session.start_propagate().ok and "3D at every click" in session.start_propagate().message
    out = session.start_uncertainty(segment_mask=np.ones(SHAPE, np.uint8))
    assert not out.ok and "2D model" in out.message
    # a negative click first: the model's message, and the click is dropped
    assert session.click(sn, xy, positive=False).ok
    out = answer(session)
    assert not out.ok and session.clicks3d == [] and session.builder.negative == []
    # a click outside the volume
    far = slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, (200, 18, 8)))[:2]
    out = session.click(sn, far)
    assert not out.ok and "outside the volume" in out.message
