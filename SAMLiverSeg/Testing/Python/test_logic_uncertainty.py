"""The effect's "Show uncertainty": the prompt-ensemble variance of a segment, computed with the
real LiteMedSAM in the session, shown as a volume on the source volume's grid in a real MRML scene
(an oblique geometry), and removed again; bad input is a message."""

import numpy as np
import pytest

import slicer
from slicer_test_helpers import GEOMETRIES, add_ct, blob_ct

from SAMLiverSegLogic import effect_logic, geometry, volume_nodes

SHAPE = (10, 64, 64)


@pytest.fixture(scope="module")
def cpu_engine():
    from samliverseg.interactive.engine import PromptEngine

    return PromptEngine(model="lite_medsam", device="cpu")


def organ_mask(shape=SHAPE):
    return (blob_ct(shape) > 60).astype(np.uint8)  # the brighter organ of blob_ct (110 HU)


def test_uncertainty_of_a_segment_is_shown_on_the_source_grid(scene, cpu_engine):
    vol = add_ct(scene, GEOMETRIES["oblique"], SHAPE)
    session = effect_logic.SegmentAnythingSession(engine_factory=lambda s: cpu_engine)
    assert session.set_volume_node(vol).ok
    truth = organ_mask()
    truth[:4] = 0  # the segment covers part of the organ only (and few slices: ~1 s per embedding)
    truth[6:] = 0
    job = session.uncertainty_job(segment_mask=truth)
    assert callable(job)
    progress = []
    out = job(lambda d, t: progress.append((d, t)), None)
    assert out.ok, out.message
    umap = out.data
    assert progress[-1][0] == progress[-1][1] == len(umap.slices)
    assert "uncertain" in out.message and 0 < out.voxels < truth.size
    np.testing.assert_allclose(umap.variance, umap.mean * (1 - umap.mean), atol=1e-6)

    display = effect_logic.PreviewDisplay(scene)
    node = display.show_uncertainty(vol, umap.variance)
    assert node.GetName() == effect_logic.UNCERTAINTY_NODE_NAME
    np.testing.assert_allclose(volume_nodes.array_from_volume_node(node), umap.variance)
    np.testing.assert_allclose(geometry.ijk_to_ras(node), geometry.ijk_to_ras(vol))
    d = node.GetDisplayNode()
    assert d.GetApplyThreshold() and d.GetLowerThreshold() > 0
    assert d.GetColorNode().GetName() == effect_logic.UNCERTAINTY_COLOR_NAME
    # showing again updates the same node
    again = display.show_uncertainty(vol, np.zeros(SHAPE, np.float32))
    assert again is node and not volume_nodes.array_from_volume_node(node).any()
    display.hide_uncertainty()
    assert not scene.IsNodePresent(node) and display.uncertainty_node is None


def test_the_preview_is_analysed_before_the_segment(scene, cpu_engine):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    session = effect_logic.SegmentAnythingSession(engine_factory=lambda s: cpu_engine)
    session.set_volume_node(vol)
    preview = np.zeros(SHAPE, np.uint8)
    preview[5, 20:40, 18:34] = organ_mask()[5, 20:40, 18:34]
    session.preview, session.preview_is_3d = preview, False
    out = session.uncertainty_job(segment_mask=organ_mask())()
    assert out.ok, out.message
    assert out.data.slices == [4, 5, 6]  # the preview's one slice and a margin slice on each side


def test_nothing_to_analyse_is_a_message(scene):
    vol = add_ct(scene, GEOMETRIES["identity"], SHAPE)
    session = effect_logic.SegmentAnythingSession(engine_factory=lambda s: pytest.fail("no model needed"))
    out = session.uncertainty_job()
    assert isinstance(out, effect_logic.Outcome) and not out.ok and "source volume" in out.message
    session.set_volume_node(vol)
    out = session.uncertainty_job(segment_mask=np.zeros(SHAPE, np.uint8))
    assert not out.ok and "nothing to analyse" in out.message
    out = session.uncertainty_job(segment_mask=np.ones((2, 2, 2), np.uint8))
    assert not out.ok and "grid" in out.message
