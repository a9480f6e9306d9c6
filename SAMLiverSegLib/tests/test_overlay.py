"""The three-view overlay PNG: size, colours, orientation, physical aspect, atomic write."""

import numpy as np
import pytest
from PIL import Image

from samliverseg.io.overlay import MASK_COLOR, REF_COLOR, render_overlay, save_overlay_png

GAP, TOP = 8, 22  # layout of render_overlay: gap between panels, title band above them


def _panels(img, legend_h=40):
    """The image without its legend band (the legend shows the colours as swatches)."""
    a = np.asarray(img.convert("RGB"))
    return a[: a.shape[0] - legend_h]


def _has(img, colour, legend_h=40):
    return bool(np.all(_panels(img, legend_h) == np.array(colour, np.uint8), axis=-1).any())


def _colour_xy(img, colour):
    ys, xs = np.nonzero(np.all(_panels(img) == np.array(colour, np.uint8), axis=-1))
    return xs, ys


def test_png_written_with_expected_size_and_colours(tmp_path):
    from samliverseg.demo.phantom import make_phantom

    p = make_phantom((24, 64, 64), (3.0, 3.0, 4.0), seed=1)
    out = save_overlay_png(p.hu, p.labels > 0, tmp_path / "sub" / "ov.png", p.spacing, ref=p.labels == 2)
    assert out.exists()
    assert [f.name for f in out.parent.iterdir()] == ["ov.png"]  # no temporary file left behind
    img = Image.open(out)
    assert img.format == "PNG" and img.mode == "RGB"
    # largest extent 192 mm -> 384 px: axial 384x384, coronal/sagittal 384x(96 mm -> 192 px)
    assert img.size == (3 * 384 + 4 * GAP, TOP + 384 + 40)
    assert _has(img, MASK_COLOR) and _has(img, REF_COLOR)
    # greyscale CT inside the axial panel: many distinct grey levels
    axial = np.asarray(img)[TOP:TOP + 384, GAP:GAP + 384]
    grey = axial[(axial[..., 0] == axial[..., 1]) & (axial[..., 1] == axial[..., 2])][:, 0]
    assert len(np.unique(grey)) > 100


def test_no_mask_no_colour_and_validation(tmp_path):
    hu = np.full((6, 10, 10), 40.0, np.float32)
    img = render_overlay(hu, None, (1.0, 1.0, 1.0))
    assert not _has(img, MASK_COLOR) and not _has(img, REF_COLOR)
    assert not np.all(np.asarray(img) == np.array(MASK_COLOR, np.uint8), axis=-1).any()  # nor in a legend
    empty = render_overlay(hu, np.zeros(hu.shape, np.uint8), (1.0, 1.0, 1.0))
    assert not _has(empty, MASK_COLOR)
    with pytest.raises(ValueError):
        render_overlay(hu, np.zeros((6, 10, 11)), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        render_overlay(hu[0], None, (1.0, 1.0))
    with pytest.raises(ValueError):
        render_overlay(hu, None, (1.0, 1.0, 1.0), window=(100, 0))


def test_radiological_orientation():
    """A blob at small i (patient right), small j (anterior), large k (superior)."""
    shape = (20, 40, 40)
    hu = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[14:18, 4:12, 4:12] = 1
    img = render_overlay(hu, mask, (1.0, 1.0, 1.0), panel_px=200)  # 40 mm -> 200 px
    w = 200
    x_ax, x_cor, x_sag = GAP, 2 * GAP + w, 3 * GAP + 2 * w
    xs, ys = _colour_xy(img, MASK_COLOR)
    ax = xs < x_cor
    cor = (xs >= x_cor) & (xs < x_sag)
    sag = xs >= x_sag
    assert ax.any() and cor.any() and sag.any()
    # axial: patient right (small i) on the image left, anterior (small j) at the top
    assert xs[ax].max() - x_ax < w / 2 and ys[ax].max() - TOP < w / 2
    # coronal (20 mm high -> 100 px): superior (large k) at the top, patient right on the left
    assert ys[cor].max() - TOP < 50 and xs[cor].max() - x_cor < w / 2
    # sagittal: superior at the top, anterior (small j) on the left
    assert ys[sag].max() - TOP < 50 and xs[sag].max() - x_sag < w / 2


def test_physical_aspect_ratio():
    # 10 slices of 4 mm = 40 mm, 40 x 40 voxels of 1 mm: every panel is a square
    hu = np.zeros((10, 40, 40), np.float32)
    img = render_overlay(hu, None, (1.0, 1.0, 4.0), panel_px=200)
    assert img.size == (3 * 200 + 4 * GAP, TOP + 200 + 40)
    a = np.asarray(img)
    # the CT (0 HU is mid-grey in W400/L40) covers the full 200 px height in the coronal panel
    col = a[:, 2 * GAP + 200 + 100, 0]
    grey_rows = np.flatnonzero(col == col[TOP + 100])
    assert grey_rows.min() == TOP and grey_rows.max() == TOP + 199


def test_center_and_title(tmp_path):
    hu = np.random.default_rng(0).normal(0, 20, (8, 16, 16)).astype(np.float32)
    mask = np.zeros(hu.shape, np.uint8)
    mask[2:6, 4:10, 4:10] = 1
    img = render_overlay(hu, mask, (1.0, 1.0, 2.0), center=(0, 0, 0), title="case 1")
    assert not _has(img, MASK_COLOR, legend_h=58)  # the planes through voxel (0, 0, 0) miss the mask
    assert img.size[1] == TOP + 384 + 58


def test_to_lps_view_undoes_a_flipped_storage_order():
    from samliverseg.io.overlay import to_lps_view
    from samliverseg.io.volume import Volume

    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 6, 7)).astype(np.float32)
    lps = Volume(array=a, spacing=(1.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    # the same physical image stored RAS-like: i and j run the other way
    ras_stored = Volume(array=a[:, ::-1, ::-1].copy(), spacing=(1.0, 2.0, 3.0), origin=(6.0, 10.0, 0.0),
                        direction=np.diag([-1.0, -1.0, 1.0]))
    sp1, v1 = to_lps_view(lps, lps.array)
    sp2, v2 = to_lps_view(ras_stored, ras_stored.array)
    assert sp1 == sp2 == (1.0, 2.0, 3.0)
    assert np.array_equal(v1, v2) and np.array_equal(v1, a)
    sp3, v3, none = to_lps_view(ras_stored, ras_stored.array, None)
    assert none is None
