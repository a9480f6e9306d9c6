"""A PNG of three orthogonal CT views with a mask (and optionally a reference) outlined.

Display conventions (the array is ``[k, j, i]``; the views assume an identity LPS direction,
i.e. ``i`` increases to the patient's left, ``j`` to posterior, ``k`` to superior):

* **axial** ``hu[k]``: rows ``j`` (anterior at the top), columns ``i`` (the patient's right on
  the image's left: radiological convention);
* **coronal** ``hu[:, j, :]``: rows ``k`` flipped (superior at the top), columns ``i`` (patient
  right on the left);
* **sagittal** ``hu[:, :, i]``: rows ``k`` flipped (superior at the top), columns ``j``
  (anterior on the left).

Each view is resampled to square pixels of one common size in millimetres (so the three views
share a physical scale and anisotropic voxels keep their true aspect). Orientation letters are
drawn at the view edges, and a legend line gives the window, the slice indices and the colours.
For a volume with another direction the letters describe array axes as if it were identity.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from samliverseg.core.atomic import atomic_path

def _png_check(tmp: Path) -> None:
    """The written PNG reads back whole."""
    with Image.open(tmp) as im:
        im.load()


__all__ = ["MASK_COLOR", "REF_COLOR", "save_overlay_png", "render_overlay"]

#: Outline colours (RGB): the mask in green, the reference in magenta.
MASK_COLOR: Tuple[int, int, int] = (0, 255, 0)
REF_COLOR: Tuple[int, int, int] = (255, 0, 255)
_BG = (0, 0, 0)
_TEXT = (255, 255, 255)
_LETTER = (255, 210, 0)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _window_u8(hu2d: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        raise ValueError(f"window must be (low, high) with high > low, got {window}")
    return (np.clip((hu2d.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _center_of(mask: Optional[np.ndarray]) -> Optional[Tuple[int, int, int]]:
    """(i, j, k) of the voxel nearest the centre of mass of ``mask`` that lies in it; None if empty."""
    if mask is None or not np.any(mask):
        return None
    m = np.asarray(mask) > 0
    com = np.array(ndimage.center_of_mass(m))
    idx = np.argwhere(m)
    k, j, i = idx[np.argmin(((idx - com) ** 2).sum(axis=1))]
    return int(i), int(j), int(k)


def _outline(mask2d: np.ndarray) -> np.ndarray:
    m = mask2d.astype(bool)
    if not m.any():
        return m
    return m & ~ndimage.binary_erosion(m, border_value=0)


def _resize(arr: np.ndarray, size_wh: Tuple[int, int], nearest: bool) -> np.ndarray:
    img = Image.fromarray(arr)
    return np.asarray(img.resize(size_wh, Image.NEAREST if nearest else Image.BILINEAR))


def render_overlay(
    hu: np.ndarray,
    mask: Optional[np.ndarray],
    spacing: Sequence[float],
    window: Tuple[float, float] = (-160.0, 240.0),
    ref: Optional[np.ndarray] = None,
    center: Optional[Sequence[int]] = None,
    panel_px: int = 384,
    mask_name: str = "mask",
    ref_name: str = "reference",
    title: Optional[str] = None,
) -> Image.Image:
    """Build the overlay image (an RGB :class:`PIL.Image.Image`); see :func:`save_overlay_png`."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3D array [k, j, i], got shape {hu.shape}")
    for name, m in (("mask", mask), ("ref", ref)):
        if m is not None and np.shape(m) != hu.shape:
            raise ValueError(f"{name} shape {np.shape(m)} differs from the image shape {hu.shape}")
    si, sj, sk = (float(s) for s in spacing)
    nk, nj, ni = hu.shape
    if center is None:
        center = _center_of(mask) or _center_of(ref) or (ni // 2, nj // 2, nk // 2)
    ci, cj, ck = (int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(center, (ni, nj, nk)))

    # one millimetre-per-pixel for all three panels: the largest physical extent fits panel_px
    mm_per_px = max(ni * si, nj * sj, nk * sk) / float(panel_px)

    def view(a3d, axis):
        if a3d is None:
            return None
        a3d = np.asarray(a3d)
        if axis == "axial":
            return a3d[ck]                     # rows j (anterior top), cols i (patient right left)
        if axis == "coronal":
            return a3d[::-1, cj, :]            # rows k flipped (superior top), cols i
        return a3d[::-1, :, ci]                # sagittal: rows k flipped, cols j (anterior left)

    # physical pixel size (col, row) of each view
    pix = {"axial": (si, sj), "coronal": (si, sk), "sagittal": (sj, sk)}
    letters = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
    labels = {"axial": f"axial k={ck}", "coronal": f"coronal j={cj}", "sagittal": f"sagittal i={ci}"}
    panels = []
    for axis in ("axial", "coronal", "sagittal"):
        ct = view(hu, axis)
        h, w = ct.shape
        cw, rh = pix[axis]
        size = (max(1, int(round(w * cw / mm_per_px))), max(1, int(round(h * rh / mm_per_px))))
        rgb = np.repeat(_resize(_window_u8(ct, window), size, nearest=False)[..., None], 3, axis=2).copy()
        for m3, colour in ((ref, REF_COLOR), (mask, MASK_COLOR)):  # the mask is drawn on top
            if m3 is None:
                continue
            m2 = (view(m3, axis) > 0).astype(np.uint8) * 255
            edge = _outline(_resize(m2, size, nearest=True) > 0)
            rgb[edge] = colour
        panels.append((axis, Image.fromarray(rgb)))

    font = _font(13)
    small = _font(12)
    gap, top, legend_h = 8, 22, 40 if title is None else 58
    width = sum(p.width for _, p in panels) + gap * (len(panels) + 1)
    height = top + max(p.height for _, p in panels) + legend_h
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    x = gap
    for axis, p in panels:
        canvas.paste(p, (x, top))
        draw.text((x, 4), labels[axis], fill=_TEXT, font=font)
        t, b, l, r = letters[axis]
        draw.text((x + p.width // 2 - 4, top + 2), t, fill=_LETTER, font=small)
        draw.text((x + p.width // 2 - 4, top + p.height - 16), b, fill=_LETTER, font=small)
        draw.text((x + 3, top + p.height // 2 - 7), l, fill=_LETTER, font=small)
        draw.text((x + p.width - 12, top + p.height // 2 - 7), r, fill=_LETTER, font=small)
        x += p.width + gap
    y = top + max(p.height for _, p in panels) + 6
    if title:
        draw.text((gap, y), title, fill=_TEXT, font=font)
        y += 18
    lx = gap
    draw.text((lx, y), f"window {window[0]:g}..{window[1]:g} HU   spacing {si:g} x {sj:g} x {sk:g} mm   ",
              fill=_TEXT, font=small)
    lx += int(draw.textlength(f"window {window[0]:g}..{window[1]:g} HU   spacing {si:g} x {sj:g} x {sk:g} mm   ",
                              font=small))
    for present, colour, name in ((mask is not None, MASK_COLOR, mask_name), (ref is not None, REF_COLOR, ref_name)):
        if not present:
            continue
        draw.rectangle((lx, y + 3, lx + 10, y + 13), fill=colour)
        draw.text((lx + 14, y), name, fill=_TEXT, font=small)
        lx += 14 + int(draw.textlength(name, font=small)) + 16
    return canvas


def to_lps_view(volume, *arrays: Optional[np.ndarray]):
    """Arrays on ``volume``'s grid, reoriented to the axis-aligned orientation closest to LPS.

    The views of :func:`save_overlay_png` assume i → patient left, j → posterior, k → superior;
    a real image stored in another orientation (flipped, permuted, oblique) is resampled-free
    reoriented first (axes permuted and flipped with SimpleITK's DICOMOrient), so the R/L/A/P/S/I
    letters are true. Returns ``(spacing, array, ...)``; None arrays stay None.
    """
    import SimpleITK as sitk

    out = []
    spacing = tuple(float(s) for s in volume.spacing)
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        img = volume.to_sitk(np.asarray(a))
        img = sitk.DICOMOrient(img, "LPS")
        spacing = tuple(float(s) for s in img.GetSpacing())
        out.append(sitk.GetArrayFromImage(img))
    return (spacing, *out)


def save_overlay_png(
    hu: np.ndarray,
    mask: Optional[np.ndarray],
    path: Union[str, os.PathLike],
    spacing: Sequence[float],
    window: Tuple[float, float] = (-160.0, 240.0),
    ref: Optional[np.ndarray] = None,
    center: Optional[Sequence[int]] = None,
    panel_px: int = 384,
    mask_name: str = "mask",
    ref_name: str = "reference",
    title: Optional[str] = None,
) -> Path:
    """Write a PNG with axial, coronal and sagittal views through ``center`` and return its path.

    ``hu``: float HU array ``[k, j, i]``; ``mask`` / ``ref``: arrays of the same shape (non-zero
    is foreground; either may be None); ``spacing``: ``(si, sj, sk)`` mm; ``window``: (low, high)
    HU mapped to black..white (default W400/L40); ``center``: IJK ``(i, j, k)`` of the three
    planes, default the mask voxel nearest the mask's centre of mass (then the reference's, then
    the volume centre). The mask outline is :data:`MASK_COLOR`, the reference :data:`REF_COLOR`.
    The largest physical extent is drawn ``panel_px`` pixels long. Written atomically.
    """
    img = render_overlay(hu, mask, spacing, window=window, ref=ref, center=center, panel_px=panel_px,
                         mask_name=mask_name, ref_name=ref_name, title=title)
    target = Path(path)
    with atomic_path(target, check=_png_check) as tmp:
        img.save(tmp, format="PNG")
    return target
