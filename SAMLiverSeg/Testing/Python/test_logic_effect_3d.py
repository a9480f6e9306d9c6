"""The effect with a native 3D model (SAM-Med3D): a click in any view prompts the whole volume,
further clicks (other views too) refine it, Apply writes the 3D result with undo, and boxes,
propagation and the uncertainty map say what to do instead. Real tiny SAM-Med3D networks
(random weights, or a decoder made to answer "everything" so that the result is known), a real
MRML scene, an oblique volume."""

import math

import numpy as np
import pytest
import torch

from slicer_test_helpers import GEOMETRIES, add_ct, centre_view_on, slice_node_for

from SAMLiverSegLogic import effect_logic, geometry, segment_writer, slice_clicks, volume_nodes

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


def session_for(scene, model):
    from samliverseg.interactive.engine3d import Sam3DEngine

    vol = add_ct(scene, GEOMETRIES["oblique"], SHAPE)
    engine = Sam3DEngine(model=model, device="cpu")
    session = effect_logic.SegmentAnythingSession(effect_logic.EngineSettings(model="sam_med3d_tiny", device="cpu"),
                                                  engine_factory=lambda s: engine)
    assert session.set_volume_node(vol).ok
    return vol, session


def click_at(scene, vol, orientation, ijk):
    sn = slice_node_for(scene, orientation, vol)
    ras = geometry.ijk_to_ras_point(vol, ijk)
    centre_view_on(sn, ras)
    return sn, slice_clicks.ras_to_xy(sn, ras)[:2]


def test_clicks_in_several_views_segment_and_refine_in_3d(scene):
    vol, session = session_for(scene, constant_tiny(6.0))
    assert session.is_3d_model()
    sn, xy = click_at(scene, vol, "Axial", (20, 18, 8))
    out = session.click(sn, xy)
    assert out.ok, out.message
    assert session.preview_is_3d and session.preview.shape == SHAPE
    # "everything" inside the 64^3 patch at 1.5 mm covers this small volume
    assert out.voxels == int(np.prod(SHAPE))
    assert session.sent3d == 1 and len(session.result3d.report["clicks"]) == 1
    sn2, xy2 = click_at(scene, vol, "Coronal", (30, 20, 5))  # another view: no "start over"
    out2 = session.click(sn2, xy2, positive=False)
    assert out2.ok, out2.message
    assert session.sent3d == 2 and len(session.result3d.report["clicks"]) == 2
    assert len(session.builder.positive) == 1 and len(session.builder.negative) == 1
    display = effect_logic.PreviewDisplay(scene)
    display.show_prompts(vol, session.builder)
    assert display.positive_node.GetNumberOfControlPoints() == 1
    assert display.negative_node.GetNumberOfControlPoints() == 1

    # Apply writes the 3D result into the segment, and undo takes it back
    seg = volume_nodes.add_segmentation_node(scene, vol)
    sid = volume_nodes.add_segment(seg, "Liver")
    editor = segment_writer.create_editor(scene, seg, vol)
    applied = session.apply(editor.target, seg, sid)
    assert applied.ok, applied.message
    assert volume_nodes.segment_mask(seg, sid, vol).all()  # the model said "everything"
    editor.target.undo()
    assert not volume_nodes.segment_mask(seg, sid, vol).any()
    assert session.result3d is None and session.clicks3d == []  # apply clears the prompts


def test_random_weights_run_end_to_end_on_the_input_grid(scene):
    from samliverseg.models.build_sam3d import build_sam_med3d_tiny

    torch.manual_seed(0)
    vol, session = session_for(scene, build_sam_med3d_tiny().eval())
    sn, xy = click_at(scene, vol, "Sagittal", (24, 20, 8))
    out = session.click(sn, xy)
    assert out.ok, out.message
    assert session.preview.shape == SHAPE and session.preview.dtype == np.uint8


def test_boxes_propagation_and_uncertainty_say_what_to_do(scene):
    vol, session = session_for(scene, constant_tiny(6.0))
    sn, xy = click_at(scene, vol, "Axial", (20, 18, 8))
    out = session.drag_box(sn, xy, (xy[0] + 20, xy[1] + 20))
    assert not out.ok and "points, not boxes" in out.message
    assert not session.propagate().ok and "3D at every click" in session.propagate().message
    job = session.uncertainty_job(segment_mask=np.ones(SHAPE, np.uint8))
    assert not job.ok and "2D model" in job.message
    # a negative click first: the model's message, and the click is dropped
    out = session.click(sn, xy, positive=False)
    assert not out.ok and session.clicks3d == [] and session.builder.negative == []
    # a click outside the volume
    far = slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, (200, 18, 8)))[:2]
    out = session.click(sn, far)
    assert not out.ok and "outside the volume" in out.message
