"""Clicks in a slice view -> IJK prompts of the source volume.

A slice view reports mouse positions in XY (pixels, origin bottom-left). The slice node's
``XYToRAS`` matrix maps them to world RAS; the volume's (world) RASToIJK maps RAS to continuous
IJK. The 2D prompts of SAM lie on one slice *of the volume*: the slice axis is the IJK axis most
parallel to the view's normal (so an axial view of an axial CT prompts across ``k``, a coronal view
across ``j``, a sagittal view across ``i``; a rotated/oblique volume still gets its nearest axis),
and the slice coordinate is snapped to the nearest voxel centre.

Bad clicks are refused with a :class:`samliverseg.core.errors.PromptError` whose message is shown to
the user: a click outside the volume, or on a slice that holds only air / padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from samliverseg.core.errors import PromptError
from samliverseg.core.prompts import IJK_INDEX, Prompts, SliceBox, validate_prompts

from . import geometry

#: A slice whose voxels are all below this (HU) holds only air.
AIR_HU = -500.0
#: Warn when the view is this far (degrees) from the nearest volume axis.
OBLIQUE_WARNING_DEG = 20.0


def xy_to_ras(slice_node, xy: Sequence[float]) -> np.ndarray:
    """Slice-view XY (pixels) -> world RAS, through the slice node's XYToRAS matrix."""
    m = geometry.array_from_vtk_matrix(slice_node.GetXYToRAS())
    return (m @ np.array([float(xy[0]), float(xy[1]), 0.0, 1.0]))[:3]


def ras_to_xy(slice_node, ras: Sequence[float]) -> np.ndarray:
    """World RAS -> slice-view XYZ (z is the distance from the slice plane, in pixels' units)."""
    m = np.linalg.inv(geometry.array_from_vtk_matrix(slice_node.GetXYToRAS()))
    return (m @ np.array([ras[0], ras[1], ras[2], 1.0]))[:3]


def view_normal(slice_node) -> np.ndarray:
    m = geometry.array_from_vtk_matrix(slice_node.GetSliceToRAS())
    n = m[:3, 2]
    return n / np.linalg.norm(n)


def slice_axis_for_view(slice_node, volume_node) -> Tuple[str, float]:
    """The volume's IJK axis nearest the view normal, and the angle between them in degrees."""
    axis, cos = geometry.ijk_axis_nearest_to(volume_node, view_normal(slice_node))
    return axis, math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def _shape_ijk(shape_kji: Sequence[int]) -> Tuple[int, int, int]:
    nk, nj, ni = (int(s) for s in shape_kji)
    return ni, nj, nk


def format_ijk(p: Sequence[float]) -> str:
    """An IJK point for messages: ``i=12.0, j=3.5, k=7.0``."""
    return f"i={p[0]:.1f}, j={p[1]:.1f}, k={p[2]:.1f}"


@dataclass
class ClickTarget:
    """Where a click landed in the volume."""

    ijk: Tuple[float, float, float]  # continuous IJK, slice coordinate snapped to a voxel centre
    slice_axis: str
    slice_index: int
    ras: Tuple[float, float, float]
    view_angle_deg: float = 0.0  # between the view normal and the slice axis

    def note(self) -> str:
        if self.view_angle_deg > OBLIQUE_WARNING_DEG:
            return (f"the view is {self.view_angle_deg:.0f} degrees oblique to the volume: prompts go on the "
                    f"nearest volume slice ({self.slice_axis}={self.slice_index}); use 'Rotate to volume plane'")
        return ""


def map_click(slice_node, volume_node, xy: Sequence[float], shape_kji: Optional[Sequence[int]] = None,
              slice_axis: Optional[str] = None) -> ClickTarget:
    """XY in the view of ``slice_node`` -> a :class:`ClickTarget` in ``volume_node``.

    ``slice_axis`` forces the axis (used for the second corner of a drag, which must share the
    first corner's slice). Raises :class:`PromptError` when the click is outside the volume.
    """
    if shape_kji is None:
        d = volume_node.GetImageData().GetDimensions()
        shape_kji = (d[2], d[1], d[0])
    ras = xy_to_ras(slice_node, xy)
    ijk = geometry.ras_to_ijk_point(volume_node, ras)
    axis, angle = slice_axis_for_view(slice_node, volume_node)
    if slice_axis is not None:
        axis = slice_axis
    sizes = _shape_ijk(shape_kji)
    c = IJK_INDEX[axis]
    if not all(-0.5 <= v <= n - 0.5 for v, n in zip(ijk, sizes)):
        raise PromptError(
            f"the click at RAS ({ras[0]:.1f}, {ras[1]:.1f}, {ras[2]:.1f}) is outside the volume "
            f"({format_ijk(ijk)}; valid i 0..{sizes[0] - 1}, j 0..{sizes[1] - 1}, k 0..{sizes[2] - 1})"
        )
    index = int(np.clip(np.round(ijk[c]), 0, sizes[c] - 1))
    snapped = [float(v) for v in ijk]
    snapped[c] = float(index)
    return ClickTarget(tuple(snapped), axis, index, tuple(float(v) for v in ras), angle)


def slice_array(array_kji: np.ndarray, axis: str, index: int) -> np.ndarray:
    if axis == "k":
        return array_kji[index]
    if axis == "j":
        return array_kji[:, index, :]
    return array_kji[:, :, index]


def check_slice_not_empty(array_kji: np.ndarray, axis: str, index: int, air_hu: float = AIR_HU) -> None:
    """Raise :class:`PromptError` if the slice holds only air or a constant padding value."""
    sl = slice_array(array_kji, axis, index)
    hi, lo = float(np.max(sl)), float(np.min(sl))
    if hi < air_hu:
        raise PromptError(
            f"slice {axis}={index} holds only air (at most {hi:.0f} HU): click on a slice through the body"
        )
    if hi - lo < 1e-6:
        raise PromptError(f"slice {axis}={index} is empty (every voxel is {hi:g}): click on a slice through the body")


@dataclass
class PromptBuilder:
    """Collects the clicks and drags of one object into IJK :class:`Prompts`.

    All prompts share one slice axis (the first click's); a click in a view of another
    orientation starts over. Points and boxes may lie on several slices (3D propagation uses them
    all; a box replaces the one on its own slice); the 2D preview uses the ones on the slice last
    clicked (:meth:`prompts_on_slice`). ``box`` is the box drawn last, ``boxes`` those on other slices.
    """

    shape_kji: Tuple[int, int, int]
    array_kji: Optional[np.ndarray] = None  # for the empty-slice check
    positive: List[Tuple[float, float, float]] = field(default_factory=list)
    negative: List[Tuple[float, float, float]] = field(default_factory=list)
    box: Optional[SliceBox] = None
    slice_axis: Optional[str] = None
    current_slice: Optional[int] = None
    boxes: List[SliceBox] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.positive and not self.negative and self.box is None and not self.boxes

    def clear(self) -> None:
        self.positive, self.negative, self.box, self.boxes = [], [], None, []
        self.slice_axis, self.current_slice = None, None

    def box_slice(self, box: SliceBox) -> int:
        """The index of the slice ``box`` lies on (across the prompts' axis)."""
        return Prompts(slice_axis=self.slice_axis or "k").box_slice(box)

    def _accept_axis(self, target: ClickTarget) -> str:
        note = ""
        if self.slice_axis is not None and target.slice_axis != self.slice_axis and not self.is_empty():
            note = (f"prompts started over: they were on {self.slice_axis} slices, "
                    f"this view cuts the volume across {target.slice_axis}")
            self.clear()
        if self.array_kji is not None:
            check_slice_not_empty(self.array_kji, target.slice_axis, target.slice_index)
        return note

    def add_point(self, target: ClickTarget, positive: bool = True) -> str:
        """Add a point (raises PromptError for an empty slice); returns a note for the user or ''."""
        note = self._accept_axis(target)
        self.slice_axis = target.slice_axis
        self.current_slice = target.slice_index
        (self.positive if positive else self.negative).append(tuple(target.ijk))
        return note or target.note()

    def add_correction_point(self, target: ClickTarget, positive: bool = True) -> str:
        """Add a point clicked in any view to prompts across another axis, which stays theirs (a
        correction of their 3D result: a point is a voxel, on one slice of every axis); returns the
        view's note or ''. Raises PromptError for an empty slice."""
        if self.slice_axis is None or self.is_empty():
            return self.add_point(target, positive)
        if self.array_kji is not None:
            check_slice_not_empty(self.array_kji, target.slice_axis, target.slice_index)
        (self.positive if positive else self.negative).append(tuple(target.ijk))
        return target.note()

    def set_box(self, corner_a: ClickTarget, corner_b: ClickTarget) -> str:
        """Set the box from the two corners of a drag (the second is moved onto the first's slice)."""
        if corner_b.slice_axis != corner_a.slice_axis:
            raise PromptError("the two corners of the box are in different views")
        axis = corner_a.slice_axis
        c = IJK_INDEX[axis]
        a = list(corner_a.ijk)
        b = list(corner_b.ijk)
        b[c] = a[c]
        in_plane = [n for n in range(3) if n != c]
        if any(abs(a[n] - b[n]) < 1.0 for n in in_plane):
            raise PromptError("the box is too small: drag over at least two voxels in each direction")
        note = self._accept_axis(corner_a)
        self.slice_axis = axis
        self.current_slice = corner_a.slice_index
        kept = self.boxes + ([self.box] if self.box is not None else [])
        self.boxes = [q for q in kept if self.box_slice(q) != corner_a.slice_index]
        self.box = SliceBox(tuple(a), tuple(b))
        return note or corner_a.note()

    def prompts(self) -> Prompts:
        """All prompts, validated against the volume (PromptError if there are none)."""
        p = Prompts(positive=list(self.positive), negative=list(self.negative), box=self.box,
                    boxes=list(self.boxes), slice_axis=self.slice_axis or "k")
        return validate_prompts(p, self.shape_kji)

    def prompts_on_slice(self, index: Optional[int] = None) -> Prompts:
        """The prompts that lie on one slice (default: the one last clicked), validated."""
        if index is None:
            index = self.current_slice
        axis = self.slice_axis or "k"
        c = IJK_INDEX[axis]
        on = lambda p: int(round(p[c])) == index  # noqa: E731
        box = next((b for b in [self.box] + self.boxes if b is not None and on(b.corner_a)), None)
        p = Prompts(positive=[q for q in self.positive if on(q)], negative=[q for q in self.negative if on(q)],
                    box=box, slice_axis=axis)
        if not p.positive and box is None:
            raise PromptError(f"no positive point or box on slice {axis}={index}: left-click on the object or drag a box")
        return validate_prompts(p, self.shape_kji)


# -- mouse events in a slice view -> prompts (the effect's interaction mapping, Qt-free) -----------

#: A press and release closer than this (pixels, each direction) is a click; farther is a drag.
CLICK_MAX_PIXELS = 4
PRESS_EVENTS = ("LeftButtonPressEvent", "LeftButtonDoubleClickEvent")


@dataclass
class MouseAction:
    """What one interaction event means to the effect.

    ``consume``: the effect takes the event (Slicer's own widgets do not see it). ``kind``: ``""``
    (nothing), ``"rubber_band"`` (show the box being dragged, ``start``..``end``), ``"click"``
    (a point at ``start``; ``positive``), or ``"box"`` (``start``..``end``).
    """

    consume: bool
    kind: str = ""
    start: Optional[Tuple[float, float]] = None
    end: Optional[Tuple[float, float]] = None
    positive: bool = True


class ClickTracker:
    """Turns a slice view's left-button events into clicks and boxes, taking only what the effect uses.

    * No modifier: press (also ``LeftButtonDoubleClickEvent``, which a quick second click arrives
      as; Slicer would maximize or restore the view on it) starts a positive click or a box drag;
      the press, the moves while dragging and the release are consumed.
    * Ctrl: a negative click. Nothing is consumed: the press and release also reach Slicer, whose
      Ctrl+left drag is the foreground/label blend (a click without motion changes nothing there),
      and a Ctrl drag is left to it entirely.
    * Shift (pan drag; Shift+move sets the crosshair), Alt, and any other combination: untouched.
    """

    def __init__(self, max_pixels: int = CLICK_MAX_PIXELS):
        self.max_pixels = int(max_pixels)
        self.reset()

    def reset(self) -> None:
        self.start: Optional[Tuple[float, float]] = None
        self.view = None
        self.positive = True
        self.moved = False

    def pressed(self) -> bool:
        return self.start is not None

    def _near(self, xy: Sequence[float]) -> bool:
        return abs(xy[0] - self.start[0]) <= self.max_pixels and abs(xy[1] - self.start[1]) <= self.max_pixels

    def event(self, name: str, xy: Sequence[float], view=None, shift: bool = False, ctrl: bool = False,
              alt: bool = False) -> MouseAction:
        """The meaning of one VTK event (its name, e.g. ``vtkCommand.GetStringFromEventId(id)``) at
        XY (pixels) in ``view``, with the modifier keys held."""
        xy = (float(xy[0]), float(xy[1]))
        if name in PRESS_EVENTS:
            self.reset()
            if not (shift or ctrl or alt):
                self.start, self.view, self.positive = xy, view, True
                return MouseAction(True)
            if ctrl and not (shift or alt):
                self.start, self.view, self.positive = xy, view, False
            return MouseAction(False)
        if self.start is None or view is not self.view:
            return MouseAction(False)
        if name == "MouseMoveEvent":
            if not self._near(xy):
                self.moved = True
            if self.positive:
                return MouseAction(True, "rubber_band", self.start, xy)
            return MouseAction(False)
        if name == "LeftButtonReleaseEvent":
            start, positive, moved = self.start, self.positive, self.moved or not self._near(xy)
            self.reset()
            if not positive:  # Ctrl: a negative click unless it was a drag (Slicer's blend)
                return MouseAction(False, "" if moved else "click", start, xy, False)
            if moved:
                return MouseAction(True, "box", start, xy)
            return MouseAction(True, "click", start, xy, True)
        return MouseAction(False)
