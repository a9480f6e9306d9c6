"""The effect's "Show uncertainty": the prompt-ensemble variance of a segment, computed by the real
LiteMedSAM in the inference worker (equal to the in-process ensemble), shown as a volume on the
source volume's grid in a real MRML scene (an oblique geometry), and removed again; progress and
cancel arrive through the worker; bad input is a message."""

import numpy as np
import pytest

from slicer_test_helpers import GEOMETRIES, add_ct, blob_ct, pump

from SAMLiverSegLogic import effect_logic, geometry, volume_nodes

SHAPE = (10, 64, 64)


def organ_mask(shape=SHAPE):
    return (blob_ct(shape) > 60).astype(np.uint8)  # the brighter organ of blob_ct (110 HU)


def session_on(scene, client, name):
    vol = add_ct(scene, GEOMETRIES[name], SHAPE)
    session = effect_logic.SegmentAnythingSession(effect_logic.EngineSettings(device="cpu", backend="torch"),
                                                  scene, client_factory=lambda s: client)
    assert session.set_volume_node(vol).ok
    return vol, session


def answer(session):
    outs = pump(session, lambda outs: any(o.kind == "uncertainty" for o in outs), timeout=600)
    return [o for o in outs if o.kind == "uncertainty"][-1]


def test_uncertainty_of_a_segment_is_shown_on_the_source_grid(scene, client):
    from samliverseg.interactive.engine import PromptEngine
    from samliverseg.interactive.uncertainty import ensemble_uncertainty

    vol, session = session_on(scene, client, "oblique")
    truth = organ_mask()
    truth[:4] = 0  # the segment covers part of the organ only (and few slices: ~1 s per embedding)
    truth[6:] = 0
    assert session.start_uncertainty(segment_mask=truth).ok
    progress = []

    def done(outs):  # progress events arrive while it computes
        progress.append(session.progress())
        return any(o.kind == "uncertainty" for o in outs)

    out = [o for o in pump(session, done, timeout=600) if o.kind == "uncertainty"][-1]
    assert out.ok, out.message
    assert "uncertain" in out.message and 0 < out.voxels < truth.size
    variance, node = out.data["variance"], out.data["node"]
    engine = PromptEngine("lite_medsam", device="cpu")
    engine.set_volume(volume_nodes.volume_from_node(vol))
    ref = ensemble_uncertainty(engine, truth, slice_axis="k")
    np.testing.assert_allclose(variance, ref.variance, atol=1e-6)
    assert out.data["slices"] == ref.slices
    assert max(d for d, _ in progress) >= 1

    assert node.GetName() == effect_logic.UNCERTAINTY_NODE_NAME
    np.testing.assert_allclose(volume_nodes.array_from_volume_node(node), variance)
    np.testing.assert_allclose(geometry.ijk_to_ras(node), geometry.ijk_to_ras(vol))
    d = node.GetDisplayNode()
    assert d.GetApplyThreshold() and d.GetLowerThreshold() > 0
    assert d.GetColorNode().GetName() == effect_logic.UNCERTAINTY_COLOR_NAME
    # showing again updates the same node
    again = session.display.show_uncertainty(vol, np.zeros(SHAPE, np.float32))
    assert again is node and not volume_nodes.array_from_volume_node(node).any()
    session.display.hide_uncertainty()
    assert not scene.IsNodePresent(node) and session.display.uncertainty_node is None


def test_the_preview_is_analysed_before_the_segment_and_cancel_says_so(scene, client):
    vol, session = session_on(scene, client, "identity")
    preview = np.zeros(SHAPE, np.uint8)
    preview[5, 20:40, 18:34] = organ_mask()[5, 20:40, 18:34]
    session.preview, session.preview_is_3d = preview, False
    assert session.start_uncertainty(segment_mask=organ_mask()).ok
    out = answer(session)
    assert out.ok, out.message
    assert out.data["slices"] == [4, 5, 6]  # the preview's one slice and a margin slice on each side
    # the whole organ (10 slices), cancelled at once: a message, no overlay
    session.preview = None
    session.display.hide_uncertainty()
    assert session.start_uncertainty(segment_mask=organ_mask()).ok
    session.cancel()
    out = answer(session)
    assert not out.ok and out.message == "uncertainty cancelled"
    assert session.display.uncertainty_node is None


def test_nothing_to_analyse_is_a_message(scene):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    session = effect_logic.SegmentAnythingSession(client_factory=lambda s: pytest.fail("no worker needed"))
    out = session.start_uncertainty()
    assert isinstance(out, effect_logic.Outcome) and not out.ok and "source volume" in out.message
    session.set_volume_node(vol)
    out = session.start_uncertainty(segment_mask=np.zeros(SHAPE, np.uint8))
    assert not out.ok and "nothing to analyse" in out.message
    out = session.start_uncertainty(segment_mask=np.ones((2, 2, 2), np.uint8))
    assert not out.ok and "grid" in out.message
