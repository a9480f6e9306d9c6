"""A synthetic abdominal CT phantom with known truth (liver and hypodense liver tumours).

The phantom is a portal-venous-phase contrast CT by default (``phase="portal"``); ``phase="plain"``
gives an unenhanced scan. Mean HU of each tissue (before noise and partial-volume blur):

=====================  ============  ===========
tissue                 portal        plain
=====================  ============  ===========
air outside / gas      -1000         -1000
lung base              -850          -850
subcutaneous fat       -100          -100
mesenteric fat         -90           -90
muscle                 50            50
bowel loops            40            35
liver parenchyma       110           60
liver vessels          170           40
liver tumours          liver - 35…50 liver - 35…50
gallbladder (bile)     10            10
spleen                 120           50
kidneys                150           35
renal sinus fat        -60           -60
pancreas               100           45
stomach wall/contents  60 / 20       40 / 20
aorta                  200           45
inferior vena cava     150           45
heart (blood pool)     140           40
vertebral cortex/ribs  700 / 450     700 / 450
cancellous bone        200           200
intervertebral disc    90            90
spinal canal (CSF)     15            15
=====================  ============  ===========

Gaussian noise (``noise_sd``, default 15 HU, slightly correlated within a slice like real CT noise)
is added after a Gaussian blur that models the partial-volume effect (a voxel box profile plus a
0.6 mm point spread), and the result is clipped to [-1024, 3071].

Geometry
--------
The grid has an identity LPS direction: ``i`` increases towards the patient's **left** (+x, L),
``j`` towards **posterior** (+y, P), ``k`` towards **superior** (+z, S). The grid centre is the
LPS origin (0, 0, 0). The liver therefore lies at **small i** (patient right, negative x), the
spleen and stomach at large i, the spine at large j (posterior), the anterior abdominal wall at
small j and the liver dome at large k.

The anatomy is drawn in millimetres on a nominal adult (body 330 mm wide, 230 mm deep; liver
about 1500 ml; the drawn block spans 207 mm cranio-caudally from the lung bases to below the
kidneys) and scaled isotropically by ``scale`` to fit the field of view. ``scale=None`` (the
default) picks ``min(1, fit)``: a real-scale grid, e.g. ``shape_kji=(84, 240, 240)`` with
``spacing=(1.5, 1.5, 2.5)``, gets the full adult size (liver ≈ 1500 ml); the small default grid
(240 x 240 x 160 mm) gets scale ≈ 0.70 (liver ≈ 500 ml). Tumour radii are in true millimetres,
not scaled. Everything is deterministic given ``seed`` and the grid; different seeds move and
resize the organs slightly, deform the liver differently and place the tumours elsewhere.

Labels: ``0`` background, ``1`` liver (parenchyma and its vessels), ``2`` tumour; the liver with
its tumours is ``labels > 0``. The liver is one connected component and every tumour lies
entirely inside it (at least ``2 mm`` from the liver surface). ``Phantom.organs`` holds a finer
tissue map (codes in :data:`ORGAN_CODES`) for tests and benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["ORGAN_CODES", "HU_TABLES", "Tumor", "Phantom", "make_island_lobe_phantom", "make_phantom"]

#: Codes of the tissue map ``Phantom.organs``.
ORGAN_CODES: Dict[str, int] = {
    "air": 0, "fat": 1, "muscle": 2, "bone_cortical": 3, "bone_cancellous": 4, "disc": 5,
    "csf": 6, "mesenteric_fat": 7, "bowel": 8, "gas": 9, "lung": 10, "heart": 11,
    "liver": 12, "liver_vessel": 13, "tumor": 14, "gallbladder": 15, "spleen": 16, "kidney": 17,
    "renal_sinus": 18, "aorta": 19, "ivc": 20, "pancreas": 21, "stomach_wall": 22,
    "stomach_content": 23, "rib": 24,
}
_C = ORGAN_CODES

#: Mean HU per tissue for each phase ("tumor" is the liver value; each tumour is darker by its delta).
HU_TABLES: Dict[str, Dict[str, float]] = {
    "portal": {
        "air": -1000, "fat": -100, "muscle": 50, "bone_cortical": 700, "bone_cancellous": 200,
        "disc": 90, "csf": 15, "mesenteric_fat": -90, "bowel": 40, "gas": -1000, "lung": -850,
        "heart": 140, "liver": 110, "liver_vessel": 170, "tumor": 110, "gallbladder": 10,
        "spleen": 120, "kidney": 150, "renal_sinus": -60, "aorta": 200, "ivc": 150,
        "pancreas": 100, "stomach_wall": 60, "stomach_content": 20, "rib": 450,
    },
    "plain": {
        "air": -1000, "fat": -100, "muscle": 50, "bone_cortical": 700, "bone_cancellous": 200,
        "disc": 90, "csf": 15, "mesenteric_fat": -90, "bowel": 35, "gas": -1000, "lung": -850,
        "heart": 40, "liver": 60, "liver_vessel": 40, "tumor": 60, "gallbladder": 10,
        "spleen": 50, "kidney": 35, "renal_sinus": -60, "aorta": 45, "ivc": 45,
        "pancreas": 45, "stomach_wall": 40, "stomach_content": 20, "rib": 450,
    },
}

# Nominal (scale 1) extent of the drawn anatomy, mm: body half-width, anterior and posterior
# half-depth, and the cranio-caudal block.
_BODY_A, _BODY_B_ANT, _BODY_B_POST = 165.0, 125.0, 105.0
_Z_LO, _Z_HI = -112.0, 95.0
_DEFAULT_TUMOR_RADII_MM = (14.0, 9.0, 4.0)


@dataclass(frozen=True)
class Tumor:
    """One tumour: centre voxel (i, j, k), radius in mm, and how much darker than liver (HU)."""

    center_ijk: Tuple[int, int, int]
    radius_mm: float
    delta_hu: float
    label_voxels: int = 0

    @property
    def diameter_mm(self) -> float:
        return 2.0 * self.radius_mm


@dataclass
class Phantom:
    """A phantom CT and its truth; arrays are ``[k, j, i]``, spacing is ``(si, sj, sk)`` mm."""

    hu: np.ndarray
    labels: np.ndarray
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: np.ndarray
    tumors: List[Tumor]
    organs: np.ndarray
    scale: float
    seed: int
    phase: str
    hu_table: Dict[str, float] = field(default_factory=dict)

    @property
    def shape_kji(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def liver_mask(self) -> np.ndarray:
        """Liver including its tumours (``labels > 0``), uint8."""
        return (self.labels > 0).astype(np.uint8)

    @property
    def tumor_mask(self) -> np.ndarray:
        """All tumours (``labels == 2``), uint8."""
        return (self.labels == 2).astype(np.uint8)

    def tumor_label_mask(self, index: int) -> np.ndarray:
        """The voxels of tumour ``index`` only (its connected component of ``labels == 2``)."""
        t = self.tumors[index]
        lab, _ = ndimage.label(self.labels == 2)
        i, j, k = t.center_ijk
        return (lab == lab[k, j, i]).astype(np.uint8)

    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def liver_volume_ml(self) -> float:
        return float(np.count_nonzero(self.labels)) * self.voxel_volume_ml()

    def to_volume(self):
        """A :class:`samliverseg.io.volume.Volume` of the HU image (imported lazily)."""
        from samliverseg.io.volume import Volume

        return Volume(array=self.hu, spacing=tuple(self.spacing), origin=tuple(self.origin),
                      direction=np.array(self.direction, dtype=np.float64), modality="CT",
                      metadata={"series_description": f"samliverseg phantom seed {self.seed} ({self.phase})"})

    def to_sitk(self, which: str = "hu"):
        """A SimpleITK image of ``"hu"`` (float32), ``"labels"`` or ``"organs"`` (uint8) on the phantom grid."""
        import SimpleITK as sitk

        arrays = {"hu": self.hu, "labels": self.labels, "organs": self.organs}
        if which not in arrays:
            raise ValueError(f"which must be one of {sorted(arrays)}, got {which!r}")
        img = sitk.GetImageFromArray(arrays[which])
        img.SetSpacing(tuple(float(s) for s in self.spacing))
        img.SetOrigin(tuple(float(o) for o in self.origin))
        img.SetDirection(tuple(float(v) for v in np.asarray(self.direction, dtype=float).ravel()))
        return img


# --------------------------------------------------------------------------------------------
# Drawing helpers. Coordinates are nominal millimetres: (x: +left, y: +posterior, z: +superior).
# --------------------------------------------------------------------------------------------

def _rot(yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """Rotation about z (yaw), then y (pitch), then x (roll); columns are the body axes."""
    a, b, c = (math.radians(v) for v in (yaw_deg, pitch_deg, roll_deg))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return rz @ ry @ rx


class _Canvas:
    """The voxel grid in nominal mm, with bounding-box-restricted evaluation of shapes."""

    def __init__(self, shape_kji, spacing, scale, z_center):
        self.shape = tuple(int(s) for s in shape_kji)
        nk, nj, ni = self.shape
        si, sj, sk = spacing
        # physical LPS (grid centre at 0) -> nominal mm
        self.x = (np.arange(ni) - (ni - 1) / 2.0) * si / scale
        self.y = (np.arange(nj) - (nj - 1) / 2.0) * sj / scale
        self.z = (np.arange(nk) - (nk - 1) / 2.0) * sk / scale + z_center
        self.step = (si / scale, sj / scale, sk / scale)

    def box(self, lo, hi):
        """Array slices (k, j, i) covering the nominal box lo..hi (x, y, z), or None if outside."""
        out = []
        for axis_vals, l, h in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            a = int(np.searchsorted(axis_vals, l, side="left"))
            b = int(np.searchsorted(axis_vals, h, side="right"))
            if b <= a:
                return None
            out.append(slice(a, b))
        return tuple(out)

    def coords(self, sl):
        """Broadcastable nominal coordinates (x, y, z) over the slices ``sl``."""
        return (self.x[sl[2]][None, None, :], self.y[sl[1]][None, :, None], self.z[sl[0]][:, None, None])

    def full(self):
        return (slice(0, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))


def _ellipsoid_extent(semi, rot):
    semi = np.asarray(semi, dtype=float)
    return np.sqrt(((np.asarray(rot) * semi[None, :]) ** 2).sum(axis=1))


def _norm_radius(coords, center, semi, rot=None):
    """Normalised ellipsoid radius (1 on the surface) at broadcast coordinates."""
    x, y, z = coords
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    if rot is None:
        return np.sqrt((dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2)
    r = np.asarray(rot)
    # body-frame coordinates q = R^T d
    q0 = r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz
    q1 = r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz
    q2 = r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz
    return np.sqrt((q0 / semi[0]) ** 2 + (q1 / semi[1]) ** 2 + (q2 / semi[2]) ** 2)


def _ellipsoid(canvas, center, semi, rot=None, margin=1.0):
    """(slices, bool mask over the slices) of a (rotated) ellipsoid; None if off the grid."""
    ext = _ellipsoid_extent(semi, rot if rot is not None else np.eye(3)) * margin
    sl = canvas.box(np.asarray(center) - ext, np.asarray(center) + ext)
    if sl is None:
        return None, None
    return sl, _norm_radius(canvas.coords(sl), center, semi, rot) <= 1.0


def _capsule(canvas, a, b, radius):
    """(slices, mask) of a cylinder with round ends from point a to point b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    sl = canvas.box(np.minimum(a, b) - radius, np.maximum(a, b) + radius)
    if sl is None:
        return None, None
    x, y, z = canvas.coords(sl)
    ab = b - a
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    d2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
    return sl, d2 <= radius * radius


class _Field:
    """A smooth random field (unit variance): a sum of random plane waves, grid-independent."""

    def __init__(self, rng, n_waves, wavelength_mm):
        dirs = rng.normal(size=(n_waves, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lam = rng.uniform(wavelength_mm[0], wavelength_mm[1], size=n_waves)
        self.w = dirs * (2 * np.pi / lam)[:, None]
        self.phase = rng.uniform(0, 2 * np.pi, size=n_waves)
        self.norm = math.sqrt(2.0 / n_waves)

    def __call__(self, coords):
        x, y, z = coords
        out = 0.0
        for w, p in zip(self.w, self.phase):
            out = out + np.cos(w[0] * x + w[1] * y + w[2] * z + p)
        return out * self.norm


def _paint(organs, sl, mask, code, where=None):
    if sl is None:
        return
    sub = organs[sl]
    m = mask if where is None else (mask & np.isin(sub, where))
    sub[m] = code


# --------------------------------------------------------------------------------------------

def _auto_scale(shape_kji, spacing):
    nk, nj, ni = shape_kji
    si, sj, sk = spacing
    half_x, half_y = ni * si / 2.0, nj * sj / 2.0
    fit = min(0.96 * half_x / _BODY_A, 0.96 * half_y / _BODY_B_ANT, nk * sk / (_Z_HI - _Z_LO))
    return float(min(1.0, fit))


def make_phantom(
    shape_kji: Sequence[int] = (64, 160, 160),
    spacing: Sequence[float] = (1.5, 1.5, 2.5),
    seed: int = 0,
    n_tumors: int = 3,
    *,
    tumor_radii_mm: Optional[Sequence[float]] = None,
    tumor_delta_hu: Tuple[float, float] = (35.0, 50.0),
    phase: str = "portal",
    noise_sd: float = 15.0,
    psf_mm: Optional[float] = 0.6,
    scale: Optional[float] = None,
) -> Phantom:
    """Build a phantom CT (float32 HU, ``[k, j, i]``) with liver/tumour truth labels.

    ``spacing`` is ``(si, sj, sk)`` in mm. ``tumor_radii_mm`` defaults to 14, 9 and 4 mm for the
    first three tumours (2.8 cm, 1.8 cm and a small 8 mm lesion) and 5–12 mm (seeded) for more.
    A tumour that does not fit is shrunk (by 15 % steps, to no less than half its radius and
    2 mm; ``Phantom.tumors`` has the radius used), else a ``ValueError`` is raised. Tumours lie
    at least 2 mm inside the liver surface and 3 mm apart. ``Phantom.tumors`` keeps the order of
    ``tumor_radii_mm`` (largest first by default).

    ``noise_sd=0`` and ``psf_mm=0`` give a noise-free image (only the voxel partial-volume blur
    remains); ``psf_mm=None`` skips blurring altogether (hard edges). ``scale`` overrides the
    automatic anatomy scale (1.0 = adult size; parts outside the grid are cut off).
    """
    shape_kji = tuple(int(s) for s in shape_kji)
    if len(shape_kji) != 3 or min(shape_kji) < 8:
        raise ValueError(f"shape_kji must be three sizes of at least 8, got {shape_kji}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (si, sj, sk), got {spacing}")
    if phase not in HU_TABLES:
        raise ValueError(f"phase must be one of {sorted(HU_TABLES)}, got {phase!r}")
    if n_tumors < 0:
        raise ValueError("n_tumors must be >= 0")
    scale = _auto_scale(shape_kji, spacing) if scale is None else float(scale)
    if scale <= 0:
        raise ValueError("scale must be positive")

    rng = np.random.default_rng(seed)
    table = HU_TABLES[phase]
    cv = _Canvas(shape_kji, spacing, scale, z_center=(_Z_LO + _Z_HI) / 2.0)
    organs = np.zeros(shape_kji, dtype=np.uint8)

    def jit(v, rel=0.0, ab=0.0):
        """Seeded jitter of a nominal value: relative (sizes) or absolute mm (positions)."""
        v = np.asarray(v, dtype=float)
        return v * (1 + rng.uniform(-rel, rel, size=v.shape)) + rng.uniform(-ab, ab, size=v.shape)

    full = cv.full()
    X, Y, Z = cv.coords(full)

    # ---- body wall: skin/subcutaneous fat, muscle ring, cavity ---------------------------------
    body_a = _BODY_A * (1 + rng.uniform(-0.03, 0.03))

    def ellipse_r(a, b_ant, b_post, x0=0.0, y0=0.0):
        b = np.where(Y < y0, b_ant, b_post)
        return np.sqrt(((X - x0) / a) ** 2 + ((Y - y0) / b) ** 2)

    zmod = 1.0 + 0.015 * np.sin((Z - _Z_LO) / 60.0)  # the waist changes a little along z
    r_body = ellipse_r(body_a, _BODY_B_ANT, _BODY_B_POST) / zmod
    body = r_body <= 1.0
    organs[np.broadcast_to(body, shape_kji)] = _C["fat"]
    r_musc = ellipse_r(body_a - 18, _BODY_B_ANT - 20, _BODY_B_POST - 14) / zmod
    r_cav = ellipse_r(body_a - 28, _BODY_B_ANT - 30, _BODY_B_POST - 24) / zmod
    wall = (r_musc <= 1.0) & (r_cav > 1.0)
    organs[np.broadcast_to(wall, shape_kji)] = _C["muscle"]
    cavity = np.broadcast_to(r_cav <= 1.0, shape_kji)

    # diaphragm: two domes; above it (inside the cavity) lies the thorax
    dome_r = 86.0 + rng.uniform(-3, 3)
    dome_l = 78.0 + rng.uniform(-3, 3)
    z_diaph = np.maximum(dome_r - ((X + 60) ** 2 + (0.8 * Y) ** 2) / 350.0,
                         dome_l - ((X - 60) ** 2 + (0.8 * Y) ** 2) / 350.0)
    thorax = cavity & (Z > z_diaph)
    abdomen = cavity & ~thorax & (Z <= z_diaph - 4.0)  # 4 mm diaphragm muscle between

    # cavity filler: bowel loops in mesenteric fat anteriorly, retroperitoneal fat posteriorly
    bowel_field = _Field(rng, 24, (28.0, 55.0))(cv.coords(full))
    filler = np.where((bowel_field > 0.35) & (Y < 25.0), _C["bowel"], _C["mesenteric_fat"]).astype(np.uint8)
    organs[cavity] = _C["muscle"]  # the diaphragm (what is not overwritten below)
    organs[abdomen] = np.broadcast_to(filler, shape_kji)[abdomen]
    organs[thorax] = _C["lung"]
    sl, m = _ellipsoid(cv, jit((20.0, -45.0, 135.0), ab=4), (75.0, 60.0, 62.0))
    if sl is not None:
        _paint(organs, sl, m & thorax[sl], _C["heart"])

    # bowel gas pockets (anterior, below the liver)
    for _ in range(6):
        c = (rng.uniform(-90, 90), rng.uniform(-95, -30), rng.uniform(-100, 0))
        semi = rng.uniform(7, 16, size=3)
        sl, m = _ellipsoid(cv, c, semi)
        if sl is not None:
            _paint(organs, sl, m & abdomen[sl], _C["gas"], where=(_C["bowel"], _C["mesenteric_fat"]))

    # ribs: obliquely cut bone in the lateral/posterior wall above the lower costal margin
    ang = np.arctan2(X / body_a, -Y / _BODY_B_ANT)  # 0 = anterior midline, +-pi = posterior midline
    r_rib = ellipse_r(body_a - 25, _BODY_B_ANT - 27, _BODY_B_POST - 21) / zmod
    rib_band = (r_musc <= 1.0) & (r_rib > 1.0) & (np.abs(ang) > 0.5) & (np.abs(ang) < 2.6)
    rib_phase = np.mod(Z - 0.3 * Y, 24.0)
    ribs = rib_band & (rib_phase < 7.0) & (Z > -40.0 - 0.3 * Y)
    organs[np.broadcast_to(ribs, shape_kji)] = _C["rib"]

    # ---- retroperitoneum: psoas, paraspinal muscles, spine ---------------------------------------
    for side in (-1, 1):
        sl, m = _ellipsoid(cv, (side * 36.0, 86.0, 0.0), (30.0, 22.0, 400.0))
        _paint(organs, sl, m, _C["muscle"])
        # psoas grows caudally
        grow = np.clip((-10.0 - Z) / 80.0, 0.0, 1.0)
        psoas = (((X - side * 38.0) / (6.0 + 10.0 * grow)) ** 2 + ((Y - 48.0) / (6.0 + 12.0 * grow)) ** 2 <= 1.0) & (Z < -10)
        organs[np.broadcast_to(psoas, shape_kji) & cavity] = _C["muscle"]

    # vertebrae: bodies 27 mm high, discs 8 mm; cortical shell, cancellous core, posterior arch
    level = np.mod(Z - rng.uniform(0, 35), 35.0)
    is_disc = level < 8.0
    vb = ((X / 23.0) ** 2 + ((Y - 50.0) / 18.0) ** 2) <= 1.0
    vb_core = ((X / 20.5) ** 2 + ((Y - 50.0) / 15.5) ** 2) <= 1.0
    arch_lvl = (level > 10.0) & (level < 30.0)
    canal = (X ** 2 + (Y - 80.0) ** 2) <= 10.0 ** 2
    arch = (X ** 2 + (Y - 80.0) ** 2 <= 16.5 ** 2) & ~canal & arch_lvl
    spinous = ((X / 5.0) ** 2 + ((Y - 104.0) / 14.0) ** 2 <= 1.0) & (level > 14.0) & (level < 28.0)
    transverse = ((np.abs(X) - 28.0) / 16.0) ** 2 + ((Y - 76.0) / 5.0) ** 2 <= 1.0
    transverse = transverse & (level > 15.0) & (level < 24.0)
    for mask, code in ((vb & ~is_disc, _C["bone_cortical"]), (vb_core & ~is_disc, _C["bone_cancellous"]),
                       (vb & is_disc, _C["disc"]), (arch | spinous | transverse, _C["bone_cortical"]),
                       (canal, _C["csf"])):
        organs[np.broadcast_to(mask, shape_kji) & np.broadcast_to(body, shape_kji)] = code

    # ---- liver: smooth union of deformed ellipsoids in the right upper quadrant -------------------
    liver_parts = [  # centre, semi-axes, rotation (yaw, pitch, roll)
        (jit((-64.0, 2.0, 22.0), ab=4), jit((61.0, 72.0, 63.0), rel=0.05), _rot(8, 0, 0)),   # right lobe
        (jit((-78.0, -2.0, -30.0), ab=4), jit((41.0, 51.0, 39.0), rel=0.06), _rot(0, 10, 0)),  # inferior tip
        (jit((-12.0, -18.0, 34.0), ab=3), jit((39.0, 39.0, 35.0), rel=0.05), None),          # medial / caudate
        (jit((22.0, -52.0, 40.0), ab=4), jit((57.0, 29.0, 29.0), rel=0.06), _rot(-18, 0, -10)),  # left lobe
    ]
    deform = _Field(rng, 16, (70.0, 150.0))
    lo = np.min([np.asarray(c) - _ellipsoid_extent(s, r if r is not None else np.eye(3)) for c, s, r in liver_parts], axis=0)
    hi = np.max([np.asarray(c) + _ellipsoid_extent(s, r if r is not None else np.eye(3)) for c, s, r in liver_parts], axis=0)
    lsl = cv.box(lo - 15.0, hi + 15.0)
    if lsl is None:
        raise ValueError("the liver is outside the grid; use a larger shape_kji or spacing")
    lc = cv.coords(lsl)
    k_smooth = 10.0
    acc = 0.0
    for c, s, r in liver_parts:
        acc = acc + np.exp(-k_smooth * (_norm_radius(lc, c, s, r) - 1.0))
    smin = -np.log(acc + 1e-30) / k_smooth  # smooth minimum of the normalised radii, minus 1
    liver = (smin + 0.10 * deform(lc)) <= 0.0
    liver &= abdomen[lsl]
    # the IVC lies in a groove at the back of the liver: open it posteriorly
    ivc_c = jit((-24.0, 24.0), ab=2)
    liver &= ~((np.abs(lc[0] - ivc_c[0]) <= 10.0) & (lc[1] >= ivc_c[1]))
    _paint(organs, lsl, liver, _C["liver"])

    # liver vessels: portal branches from the hilum, hepatic veins to the IVC
    hilum = jit((-18.0, 8.0, 0.0), ab=3)
    vessels = [
        (hilum, hilum + (-55, -8, 12), 5.0), (hilum, hilum + (28, -38, 26), 4.0),
        (hilum + (-55, -8, 12), hilum + (-85, 10, -20), 3.0), (hilum + (-55, -8, 12), hilum + (-80, -40, 35), 3.0),
        ((ivc_c[0], ivc_c[1], 68.0), (-95.0, -15.0, 45.0), 4.0),
        ((ivc_c[0], ivc_c[1], 68.0), (-45.0, -55.0, 50.0), 3.5),
        ((ivc_c[0], ivc_c[1], 68.0), (25.0, -45.0, 55.0), 3.5),
    ]
    for a, b, rad in vessels:
        sl, m = _capsule(cv, a, b, rad)
        _paint(organs, sl, m, _C["liver_vessel"], where=(_C["liver"],))

    # gallbladder at the inferior surface of the liver, anteriorly
    sl, m = _ellipsoid(cv, jit((-32.0, -58.0, -24.0), ab=3), jit((14.0, 17.0, 34.0), rel=0.08), _rot(0, -15, 20))
    _paint(organs, sl, m & abdomen[sl] if sl is not None else m, _C["gallbladder"])

    # ---- other organs (painted over the liver where they touch it) -------------------------------
    # stomach: wall, contents, gas anteriorly (the patient lies supine: gas rises to small y)
    st_c, st_s, st_r = jit((58.0, -30.0, 42.0), ab=4), jit((42.0, 38.0, 50.0), rel=0.06), _rot(-25, 15, 0)
    sl, m = _ellipsoid(cv, st_c, st_s, st_r)
    if sl is not None:
        m &= abdomen[sl]
        _paint(organs, sl, m, _C["stomach_wall"])
        inner = _norm_radius(cv.coords(sl), st_c, st_s - 5.0, st_r) <= 1.0
        _paint(organs, sl, m & inner, _C["stomach_content"])
        gas = inner & (cv.coords(sl)[1] < st_c[1] - 0.3 * st_s[1])
        _paint(organs, sl, m & gas, _C["gas"])
    # pancreas: body anterior to the aorta, tail to the splenic hilum
    sl, m = _ellipsoid(cv, jit((26.0, 8.0, -2.0), ab=3), jit((62.0, 12.0, 14.0), rel=0.06), _rot(-22, 0, 0))
    _paint(organs, sl, m & abdomen[sl] if sl is not None else m, _C["pancreas"])
    # spleen, posterolateral left
    sl, m = _ellipsoid(cv, jit((92.0, 40.0, 38.0), ab=4), jit((24.0, 50.0, 52.0), rel=0.06), _rot(-35, 0, 0))
    _paint(organs, sl, m & abdomen[sl] if sl is not None else m, _C["spleen"])
    # kidneys with a medial renal sinus; the right one lower (under the liver)
    for side, cz in ((-1, -52.0), (1, -38.0)):
        kc = jit((side * 68.0, 56.0, cz), ab=3)
        ks = jit((24.0, 20.0, 52.0), rel=0.05)
        kr = _rot(side * -30.0, side * 12.0, 0)
        sl, m = _ellipsoid(cv, kc, ks, kr)
        if sl is None:
            continue
        m &= cavity[sl]
        _paint(organs, sl, m, _C["kidney"])
        sc = kc - np.array([side * 14.0, 4.0, 0.0])
        sl2, m2 = _ellipsoid(cv, sc, (10.0, 8.0, 22.0), kr)
        if sl2 is not None:
            _paint(organs, sl2, m2, _C["renal_sinus"], where=(_C["kidney"],))
    # great vessels
    ao_c = jit((14.0, 26.0), ab=2)
    aorta = np.broadcast_to((X - ao_c[0]) ** 2 + (Y - ao_c[1]) ** 2 <= 12.0 ** 2, shape_kji) & cavity
    organs[aorta] = _C["aorta"]
    ivc = np.broadcast_to(((X - ivc_c[0]) / 13.0) ** 2 + ((Y - ivc_c[1]) / 10.0) ** 2 <= 1.0, shape_kji) & cavity
    organs[ivc] = _C["ivc"]

    # ---- truth: the liver is one component (drop islands cut off by other organs) ---------------
    liver_all = (organs == _C["liver"]) | (organs == _C["liver_vessel"])
    lab, n = ndimage.label(liver_all)
    if n == 0:
        raise ValueError("the liver is outside the grid; use a larger shape_kji or spacing")
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        islands = liver_all & (lab != int(np.argmax(sizes)))
        organs[islands] = _C["mesenteric_fat"]
        liver_all &= ~islands

    # ---- tumours ---------------------------------------------------------------------------------
    radii = list(tumor_radii_mm) if tumor_radii_mm is not None else list(_DEFAULT_TUMOR_RADII_MM[:n_tumors])
    while len(radii) < n_tumors:
        radii.append(float(rng.uniform(5.0, 12.0)))
    radii = [float(r) for r in radii[:n_tumors]]
    order = np.argsort(radii)[::-1]  # big ones first
    si, sj, sk = spacing
    edt = ndimage.distance_transform_edt(liver_all, sampling=(sk, sj, si))
    kk, jj, ii = np.indices(shape_kji, sparse=True)
    placed: List[Tuple[np.ndarray, float]] = []
    tumor_specs: Dict[int, Tuple[Tuple[int, int, int], float, float]] = {}
    lobulation = 0.10
    for idx in order:
        r = radii[idx]
        center = None
        while r >= max(2.0, 0.5 * radii[idx]):
            ok = edt >= r * (1 + lobulation) + 2.0
            for c_mm, r_o in placed:  # no overlap with placed tumours (3 mm apart)
                d2 = ((kk * sk - c_mm[0]) ** 2 + (jj * sj - c_mm[1]) ** 2 + (ii * si - c_mm[2]) ** 2)
                ok &= d2 >= (r * (1 + lobulation) + r_o * (1 + lobulation) + 3.0) ** 2
            cand = np.flatnonzero(ok)
            if cand.size:
                flat = int(cand[rng.integers(cand.size)])
                center = np.unravel_index(flat, shape_kji)
                break
            r *= 0.85
        if center is None:
            raise ValueError(f"tumour {idx} (radius {radii[idx]:g} mm) does not fit in the liver "
                             f"({np.count_nonzero(liver_all) * si * sj * sk / 1000:.0f} ml at anatomy scale "
                             f"{scale:.2f}); use fewer or smaller tumours or a larger field of view")
        k0, j0, i0 = (int(v) for v in center)
        placed.append((np.array([k0 * sk, j0 * sj, i0 * si]), r))
        delta = float(rng.uniform(*tumor_delta_hu))
        tumor_specs[int(idx)] = ((i0, j0, k0), r, delta)

    tumor_delta = np.zeros(shape_kji, dtype=np.float32)
    tumors: List[Tumor] = []
    for idx in range(n_tumors):
        (i0, j0, k0), r, delta = tumor_specs[idx]
        ext = r * (1 + lobulation) + 1.0
        sl = (slice(max(0, int(k0 - ext / sk) - 1), int(k0 + ext / sk) + 2),
              slice(max(0, int(j0 - ext / sj) - 1), int(j0 + ext / sj) + 2),
              slice(max(0, int(i0 - ext / si) - 1), int(i0 + ext / si) + 2))
        dz = (np.arange(sl[0].start, min(sl[0].stop, shape_kji[0])) - k0)[:, None, None] * sk
        dy = (np.arange(sl[1].start, min(sl[1].stop, shape_kji[1])) - j0)[None, :, None] * sj
        dx = (np.arange(sl[2].start, min(sl[2].stop, shape_kji[2])) - i0)[None, None, :] * si
        dist = np.sqrt(dx ** 2 + dy ** 2 + dz ** 2)
        # gentle lobulation: the radius varies with direction by up to +-10 %
        v = rng.normal(size=(3, 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ph = rng.uniform(0, 2 * np.pi, size=3)
        with np.errstate(invalid="ignore", divide="ignore"):
            nx, ny, nz = dx / np.maximum(dist, 1e-6), dy / np.maximum(dist, 1e-6), dz / np.maximum(dist, 1e-6)
        lob = sum(np.cos(3.0 * (v[m, 0] * nx + v[m, 1] * ny + v[m, 2] * nz) + ph[m]) for m in range(3)) / 3.0
        inside = dist <= r * (1 + lobulation * lob)
        inside &= liver_all[sl]  # by construction already true; kept as a guard
        sub = organs[sl]
        sub[inside] = _C["tumor"]
        tumor_delta[sl][inside] = delta
        tumors.append(Tumor(center_ijk=(i0, j0, k0), radius_mm=round(r, 3), delta_hu=round(delta, 2),
                            label_voxels=int(inside.sum())))

    # ---- image ------------------------------------------------------------------------------------
    names = sorted(ORGAN_CODES, key=ORGAN_CODES.get)
    lut = np.array([table[n] for n in names], dtype=np.float32)
    hu = lut[organs] - tumor_delta
    if psf_mm is not None:
        # partial volume: a voxel box (sd = s / sqrt(12)) and the scanner's point spread
        sig = [math.sqrt((s / math.sqrt(12.0)) ** 2 + psf_mm ** 2) / s for s in (sk, sj, si)]
        hu = ndimage.gaussian_filter(hu, sigma=sig, mode="nearest")
    if noise_sd > 0:
        noise_rng = np.random.default_rng([seed, 7919])
        white = noise_rng.standard_normal(shape_kji, dtype=np.float32)
        sig_n = (0.0, 0.6, 0.6)  # correlated within a slice
        noise = ndimage.gaussian_filter(white, sigma=sig_n, mode="wrap")
        # exact gain of the filter, so that the noise sd is noise_sd
        probe = np.zeros((1, 15, 15), np.float64)
        probe[0, 7, 7] = 1.0
        gain = math.sqrt(float((ndimage.gaussian_filter(probe, sigma=sig_n) ** 2).sum()))
        hu = hu + noise * np.float32(noise_sd / gain)
    hu = np.clip(hu, -1024.0, 3071.0).astype(np.float32)

    labels = np.zeros(shape_kji, dtype=np.uint8)
    labels[liver_all] = 1
    labels[organs == _C["tumor"]] = 2

    nk, nj, ni = shape_kji
    origin = (-(ni - 1) / 2.0 * si, -(nj - 1) / 2.0 * sj, -(nk - 1) / 2.0 * sk)
    return Phantom(hu=hu, labels=labels, spacing=spacing, origin=origin, direction=np.eye(3),
                   tumors=tumors, organs=organs, scale=scale, seed=int(seed), phase=phase,
                   hu_table=dict(table))


# --------------------------------------------------------------------------------------------
# A phantom for propagation: a left lobe that appears as an island, then merges
# --------------------------------------------------------------------------------------------

def make_island_lobe_phantom(
    shape_kji: Sequence[int] = (36, 128, 128),
    spacing: Sequence[float] = (2.0, 2.0, 3.0),
    seed: int = 0,
    noise_sd: float = 12.0,
    neighbour: bool = True,
) -> Phantom:
    """A small portal-phase phantom whose liver changes topology along k (superior = +k).

    Physical millimetres, LPS with the grid centre at (0, 0, 0); identity direction (i towards
    the patient's left, j posterior, k superior). Cranio-caudally (z in mm from the centre):

    * the right lobe (an ellipsoid at x = -45 mm) spans the whole liver, z = -50..+50;
    * the left lobe (at x = +45 mm, anterior) appears caudally at z = -5 as a separate island,
      22 mm of fat away from the right lobe;
    * from z = +15 a wide bridge (the left lobe's base) joins the two: one component up to the dome.

    ``neighbour=True`` adds a right kidney of liver-like HU (125) posterior to the right lobe,
    joined to it by a thin bridge (4 mm across) over a few slices: propagation must not leak into
    it. Organ codes as :data:`ORGAN_CODES` ("kidney" for the neighbour). ``labels``: 1 liver.
    The geometry is independent of ``seed``; the noise and a smooth texture are not.
    """
    shape_kji = tuple(int(s) for s in shape_kji)
    spacing = tuple(float(s) for s in spacing)
    rng = np.random.default_rng(seed)
    canvas = _Canvas(shape_kji, spacing, 1.0, 0.0)
    organs = np.zeros(shape_kji, dtype=np.uint8)
    full = canvas.full()
    body = _norm_radius(canvas.coords(full), (0.0, 5.0, 0.0), (118.0, 100.0, 1e9)) <= 1.0
    organs[body] = _C["fat"]
    inner = _norm_radius(canvas.coords(full), (0.0, 5.0, 0.0), (104.0, 86.0, 1e9)) <= 1.0
    organs[inner] = _C["mesenteric_fat"]
    _paint(organs, *_ellipsoid(canvas, (0.0, 70.0, 0.0), (14.0, 14.0, 1e4)), _C["bone_cortical"])  # spine
    _paint(organs, *_ellipsoid(canvas, (15.0, 45.0, 0.0), (9.0, 9.0, 1e4)), _C["aorta"])
    if neighbour:
        _paint(organs, *_ellipsoid(canvas, (-55.0, 62.0, -30.0), (22.0, 16.0, 30.0)), _C["kidney"])
    # the liver: right lobe, left-lobe island, the bridge that joins them cranially
    _paint(organs, *_ellipsoid(canvas, (-45.0, 0.0, 0.0), (45.0, 42.0, 50.0)), _C["liver"])
    _paint(organs, *_ellipsoid(canvas, (45.0, -25.0, 20.0), (36.0, 30.0, 25.0)), _C["liver"])
    _paint(organs, *_ellipsoid(canvas, (0.0, -20.0, 40.0), (40.0, 30.0, 25.0)), _C["liver"])
    if neighbour:
        # thin (4 mm) bridge from the kidney's top to the right lobe's posterior surface
        _paint(organs, *_capsule(canvas, (-55.0, 52.0, -18.0), (-50.0, 32.0, -18.0), 2.5), _C["kidney"])
    table = dict(HU_TABLES["portal"], kidney=125.0)
    hu = np.full(shape_kji, -1000.0, dtype=np.float32)
    for name, code in _C.items():
        hu[organs == code] = table[name]
    texture = _Field(rng, 12, (15.0, 40.0))(canvas.coords(full))
    hu = hu + np.where(organs == _C["liver"], 6.0 * texture, 0.0).astype(np.float32)
    hu = ndimage.gaussian_filter(hu, sigma=[0.6 / s for s in spacing[::-1]])
    hu = hu + rng.normal(0.0, noise_sd, size=shape_kji).astype(np.float32)
    hu = np.clip(hu, -1024.0, 3071.0).astype(np.float32)
    labels = (organs == _C["liver"]).astype(np.uint8)
    origin = tuple(float(-(n - 1) / 2.0 * s) for n, s in zip(shape_kji[::-1], spacing))
    return Phantom(hu=hu, labels=labels, spacing=spacing, origin=origin, direction=np.eye(3), tumors=[],
                   organs=organs, scale=1.0, seed=int(seed), phase="portal", hu_table=table)
