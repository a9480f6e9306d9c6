"""The synthetic CT phantom: geometry, HU per tissue, truth labels, determinism."""

import numpy as np
import pytest
from scipy import ndimage

from samliverseg.demo.phantom import HU_TABLES, ORGAN_CODES, make_phantom


@pytest.fixture(scope="module")
def ph():
    return make_phantom()  # (64, 160, 160), spacing (1.5, 1.5, 2.5), seed 0, 3 tumours


def _interior(mask, iterations=2):
    """The mask eroded in-plane (away from partial-volume borders)."""
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_erosion(mask, structure=st, iterations=iterations)


def _organ(ph, name):
    return ph.organs == ORGAN_CODES[name]


def test_arrays_and_geometry(ph):
    assert ph.hu.shape == ph.labels.shape == ph.organs.shape == (64, 160, 160)
    assert ph.hu.dtype == np.float32 and ph.labels.dtype == np.uint8
    assert set(np.unique(ph.labels)) == {0, 1, 2}
    assert ph.spacing == (1.5, 1.5, 2.5)
    np.testing.assert_array_equal(ph.direction, np.eye(3))
    # the grid centre is the LPS origin (0, 0, 0)
    centre = np.asarray(ph.origin) + np.asarray(ph.spacing) * (np.array([160, 160, 64]) - 1) / 2
    np.testing.assert_allclose(centre, 0, atol=1e-9)
    assert np.isfinite(ph.hu).all() and ph.hu.min() >= -1024 and ph.hu.max() <= 3071
    assert 0.5 < ph.scale < 0.9  # the small default grid shrinks the adult anatomy


@pytest.mark.parametrize("name, lo, hi", [
    ("air", -1010, -990), ("fat", -115, -85), ("mesenteric_fat", -105, -75), ("muscle", 35, 60),
    ("liver", 100, 120), ("spleen", 105, 135), ("kidney", 135, 165), ("aorta", 180, 220),
    ("bone_cancellous", 150, 250), ("gas", -1010, -900), ("lung", -900, -800),
    ("stomach_content", 0, 40), ("gallbladder", -5, 25),
])
def test_median_hu_inside_each_tissue(ph, name, lo, hi):
    inner = _interior(_organ(ph, name))
    assert inner.sum() > 20, name
    assert lo <= float(np.median(ph.hu[inner])) <= hi


def test_bone_is_bright(ph):
    cortical = ph.hu[_organ(ph, "bone_cortical")]
    assert np.percentile(cortical, 90) > 600  # the vertebral shell and arch (thin: partial volume)
    assert np.median(ph.hu[_organ(ph, "rib")]) > 300


def test_noise_level(ph):
    # the liver away from vessels, tumours and borders is flat: its sd is the noise
    sd = float(ph.hu[_interior(_organ(ph, "liver"), 3)].std())
    assert 10.0 <= sd <= 20.0
    quiet = make_phantom((24, 64, 64), (3.0, 3.0, 4.0), noise_sd=0)
    liver = _interior(_organ(quiet, "liver"), 2)
    assert float(quiet.hu[liver].std()) < 2.0


def test_tumours_are_hypodense_and_inside_the_liver(ph):
    liver_all = ph.labels > 0
    lab, n = ndimage.label(ph.labels == 2)
    assert n == len(ph.tumors) == 3
    liver_hu = float(np.median(ph.hu[_interior(_organ(ph, "liver"), 3)]))
    for t in ph.tumors:
        i, j, k = t.center_ijk
        assert ph.labels[k, j, i] == 2
        one = lab == lab[k, j, i]
        assert one.sum() == t.label_voxels > 0
        # entirely inside the liver: even its one-voxel dilation is liver or tumour
        assert liver_all[ndimage.binary_dilation(one)].all()
        assert 30.0 <= t.delta_hu <= 50.0
        core = ph.hu[ndimage.binary_erosion(one)] if t.radius_mm >= 6 else ph.hu[k, j, i:i + 1]
        assert liver_hu - 60 < float(np.median(core)) < liver_hu - 20
    diameters = sorted(t.diameter_mm for t in ph.tumors)
    assert diameters[0] <= 10.0 and diameters[-1] >= 20.0  # one small, one large (>= 1 cm)


def test_tumour_volume_matches_radius(ph):
    vox = float(np.prod(ph.spacing))
    for t in ph.tumors:
        nominal = 4.0 / 3.0 * np.pi * t.radius_mm ** 3
        assert 0.6 * nominal < t.label_voxels * vox < 1.5 * nominal


def test_liver_on_the_patients_right(ph):
    # identity LPS direction: i increases towards the patient's left (+x), so the liver is at small i
    k, j, i = np.nonzero(ph.labels > 0)
    assert i.mean() < 160 / 2 - 15
    x_lps = ph.origin[0] + ph.spacing[0] * i.mean()
    assert x_lps < -20.0
    sk, sj, si = np.nonzero(_organ(ph, "spleen"))
    assert si.mean() > 160 / 2 + 15  # spleen on the left
    bk, bj, bi = np.nonzero(_organ(ph, "bone_cancellous"))
    assert bj.mean() > j.mean() and abs(bi.mean() - 79.5) < 3  # spine: posterior, midline
    kk, kj, ki = np.nonzero(_organ(ph, "kidney"))
    assert k.mean() > kk.mean()  # the liver is above the kidneys (k increases superior)
    # the stomach's gas is anterior to its contents (supine patient: gas rises to small j)
    g = _organ(ph, "gas") & ndimage.binary_dilation(_organ(ph, "stomach_content"), iterations=2)
    assert np.nonzero(g)[1].mean() < np.nonzero(_organ(ph, "stomach_content"))[1].mean()


def test_liver_is_one_irregular_component(ph):
    liver = ph.labels > 0
    assert ndimage.label(liver)[1] == 1
    # not an ellipsoid: compare with the ellipsoid of the same second moments
    idx = np.argwhere(liver) * np.array([ph.spacing[2], ph.spacing[1], ph.spacing[0]])
    mean = idx.mean(axis=0)
    cov = np.cov((idx - mean).T)
    grid = np.indices(liver.shape).reshape(3, -1).T * np.array([ph.spacing[2], ph.spacing[1], ph.spacing[0]])
    d = grid - mean
    ell = (np.einsum("ni,ij,nj->n", d, np.linalg.inv(5.0 * cov), d) <= 1.0).reshape(liver.shape)
    overlap = 2 * (ell & liver).sum() / (ell.sum() + liver.sum())
    assert overlap < 0.9


def test_real_scale_liver_volume():
    p = make_phantom((56, 120, 120), (3.0, 3.0, 4.0), seed=1)
    assert p.scale == 1.0
    assert 1300.0 <= p.liver_volume_ml() <= 1700.0


def test_deterministic_by_seed():
    a = make_phantom((24, 64, 64), (3.0, 3.0, 4.0), seed=5)
    b = make_phantom((24, 64, 64), (3.0, 3.0, 4.0), seed=5)
    c = make_phantom((24, 64, 64), (3.0, 3.0, 4.0), seed=6)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.tumors == b.tumors
    assert not np.array_equal(a.labels, c.labels)


def test_options():
    plain = make_phantom((24, 64, 64), (3.0, 3.0, 4.0), phase="plain", n_tumors=0, noise_sd=0)
    assert 2 not in plain.labels and plain.tumors == []
    liver = _interior(_organ(plain, "liver"), 2)
    assert abs(float(np.median(plain.hu[liver])) - HU_TABLES["plain"]["liver"]) < 5
    many = make_phantom((40, 96, 96), (2.5, 2.5, 4.0), n_tumors=5, seed=3)
    assert ndimage.label(many.labels == 2)[1] == 5
    with pytest.raises(ValueError):
        make_phantom((24, 64, 64), phase="arterial")
    with pytest.raises(ValueError):
        make_phantom((24, 64, 64), (3.0, 3.0, 4.0), n_tumors=1, tumor_radii_mm=[200.0])


def test_to_sitk_and_volume(ph):
    import SimpleITK as sitk

    img = ph.to_sitk("labels")
    assert img.GetSize() == (160, 160, 64)
    assert img.GetSpacing() == pytest.approx(ph.spacing)
    assert img.GetOrigin() == pytest.approx(ph.origin)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img), ph.labels)
    pytest.importorskip("samliverseg.io.volume")
    vol = ph.to_volume()
    assert vol.array.shape == ph.hu.shape
    assert tuple(vol.spacing) == pytest.approx(ph.spacing)
    lps = vol.ijk_to_lps(np.array([[0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(np.ravel(lps), ph.origin)
