"""Interactive 3D corrections: a current 3D mask, its prompts, and one correction at a time.

A :class:`CorrectionSession` starts from :meth:`PromptEngine.segment` (boxes on one or more
slices, points on any slice) and then takes corrections on any slice (points and boxes in IJK of
the array ``[k, j, i]``, see ``core.prompts``). Its walks go across :attr:`~CorrectionSession.axis`
(:func:`walk_axis`): the axis of the result's last propagation, which is the prompts' own, or axial
where the engine handed coronal or sagittal prompts to axial slices (``axial_handoff``). A point
is a voxel, so a click in any view corrects the slice through it across that axis; a box lies on a
slice across the prompts' axis:

* **a box** (after a hand-off: the 3D mask is made again from all the prompts, ``engine.segment``)
  re-segments its slice with that slice's prompts and re-propagates from it up and down, replacing
  what was there, until the new result agrees with the previous one (Dice at
  least ``agree_dice``), the object ends (the slices beyond lose what they had, up to the next
  prompted slice), the walk cannot follow it (the model's answer jumps away, ``JUMPED_AWAY``: the
  slices beyond keep what they had, ``PropagationSettings.box_walk_keeps_on_jump``) or another
  prompted slice is reached;
* **a positive point outside the mask** adds to its slice: within ``NEAR_MM`` of the slice's mask
  the model is prompted with the box around that mask and the click (the object is larger there),
  farther away with the click alone (an island; for a box-only model such as LiteMedSAM through
  ``seeded_region``); the part of the model's mask the click lies in (or the nearest, within
  ``NEAR_MM``, where it covers half of the slice's mask: the object reaching toward the click) is
  kept (a click the model's mask leaves out otherwise is refused: it would add only what the click
  says nothing about), and grown further where it reaches beyond that box (``PromptEngine.widen``,
  propagation's growth rule); of what that adds to the slice, only the connected part the click
  lies in is added (the model's answer may also differ from the mask elsewhere along its edge: a
  neighbour it takes in). It is refused where it would exceed ``ADD_AREA_FACTOR`` times the
  object's largest slice, and (``PropagationSettings.island_beside_end_limit``, on by default), on a
  slice without mask next to one with mask (past where the object ended), that many times the mask
  there (a click beside a tumour's last slice took the liver there), and
  (``PropagationSettings.enclosing_answer_limit``, on by default) where the model's answer covers the
  slice's mask and adds more than it of another tissue (the liver around a tumour). The click
  says its tissue is the object: the session's HU range grows to that part's (a darker tumour
  inside the liver) where the click lies in the part's range (not where the part is mostly another
  tissue, as the model's answer to a click on a missed rim can be the fat beside it), and only
  pixels in that range are added (holes filled, so vessels do not
  split the part). The slice's new mask is then followed up and down, adding what is new,
  until it is already inside the mask (it has joined what was there), the object ends, a slice
  would grow past ``ADD_AREA_FACTOR`` times the object's largest slice, or another prompted slice
  is reached;
* **a negative point inside the mask** removes the wrong region it lies in, in 3D
  (``mask_edits.negative_region``: its slice's region grown from the click, or all of the slice's
  mask where it holds no object, and its HU-connected continuation on the next slices), never
  changing another prompted slice. Where HU cannot carry the cut beyond its slice (the wrong
  tissue has the object's HU, or, in a scan without contrast, its HU band holds the object's
  darker part: ``mask_edits.MAX_BAND_SHARE``), the model does (``_cut_walk``): each next slice is segmented from
  the corrected one before it, and what the mask held beyond that answer, connected to the
  previous slice's cut, goes. Where the click's region is almost all of its slice's mask
  (``END_FRAC``), all of it goes: the object is not on that slice (a tumour's mask running on
  past its end into liver of its HU), and what lay beyond it goes with it (below);
* :meth:`~CorrectionSession.undo` takes the last correction back (the slices it changed, the
  prompts and the HU range as they were), up to ``UNDO_DEPTH`` corrections.

After a negative click only the 3D components that touch a prompted slice's mask are kept (inside
the mask's bounding box). Every slice across the walks' axis with a user prompt keeps the user's
result: later propagation stops there (a coronal box's slice, after a hand-off, is none: the axial
walks cross it). With the embeddings cached a correction decodes only the slices it walks
through, which is what makes it fast (``benchmarks/bench_simulated_user.py`` measures it).

Propagation from a correction follows the engine's rule (``PropagationSettings``): the model is
prompted with the previous slice's bounding box plus a margin, may grow at most one slice spacing
(at most ``max_growth_mm``) beyond the previous mask, pixels outside the HU range of the prompted
slices are dropped, and only what touches the previous slice's mask is kept. Growth beyond that
limit, which propagation from a box accepts where the model is sure of a wider box, is accepted
in a box's walk (``PropagationSettings.box_walk_growth``) and not in a click's (``walk_growth``,
``PromptEngine.follow_slice``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
from scipy import ndimage

from samliverseg.core.errors import PromptError
from samliverseg.core.evaluation import dice
from samliverseg.core.maskutil import axis_index, bbox_2d, bbox_3d
from samliverseg.core.postprocess import keep_components_touching
from samliverseg.core.prompts import IJK_INDEX, Point, Prompts, SliceBox, validate_prompts
from samliverseg.interactive.engine import (JUMPED_AWAY, PromptEngine, SegmentationResult, hu_gate_range, pixel_spacing,
                                           point_to_xy, slice_count, slice_of, slices_with_mask)
from samliverseg.interactive.mask_edits import MIN_CONTRAST_HU, negative_region


#: A positive click at most this far (mm) from its slice's mask extends the object there (a box
#: around the mask and the click); farther, it segments the object under it (an island).
NEAR_MM = 10.0
#: Corrections that :meth:`CorrectionSession.undo` can take back (the slices each changed are kept).
UNDO_DEPTH = 20
#: What a positive click adds is refused on its slice, and its walk stops, where a slice's mask would
#: exceed this many times the object's largest slice before the click (a click must not add an organ).
ADD_AREA_FACTOR = 3.0
#: A positive click's answer that covers at least this fraction of its slice's mask, adds at least
#: as much again and adds another tissue by HU is the organ around the object: the click is refused
#: (``PropagationSettings.enclosing_answer_limit``; ``CorrectionSession._encloses_with_other_tissue``).
ENCLOSE_COVER = 0.9
#: A cut the model follows (where HU cannot carry it beyond its slice) stops where the next slice's
#: cut would be more than this many times the previous one's (+16 px) ...
CUT_GROWTH = 2.0
#: ... or more than this fraction of that slice's mask (the object itself, not a leak); nor is a cut
#: followed that took more than this of its own slice's mask.
CUT_MAX_FRAC = 0.5
#: A negative click whose region takes at least this fraction of its slice's mask takes all of it
#: (unless an earlier prompt lies on that slice): the object is not on that slice, and what lay
#: beyond it (connected to the prompted slices only through it) goes too.
END_FRAC = 0.9


def walk_axis(prompts: Prompts, report: dict) -> str:
    """The axis whose slices :class:`CorrectionSession` walks across: that of the result's last
    propagation (axial where the engine handed coronal or sagittal prompts to axial slices,
    ``report["axial_handoff"]``; else the prompts' own)."""
    handoff = report.get("axial_handoff")
    return "k" if handoff and "kept" not in handoff else prompts.slice_axis


@dataclass
class Correction:
    """What one correction did."""

    kind: str  # "box", "positive" or "negative"
    slice_index: int
    slice_axis: str = ""  # across which slice_index counts: the session's axis (a remade box: the prompts')
    changed_slices: List[int] = field(default_factory=list)  # slices whose mask changed
    decoded_slices: List[int] = field(default_factory=list)  # slices the model was run on
    stops: Dict[str, str] = field(default_factory=dict)  # why the walk ended, up and down
    seconds: float = 0.0


class CorrectionSession:
    """The current 3D mask of one object and its prompts; :meth:`add_point` / :meth:`add_box` correct it."""

    def __init__(self, engine: PromptEngine, prompts: Prompts, agree_dice: float = 0.98,
                 result: Optional[SegmentationResult] = None, axis: Optional[str] = None):
        """Segment ``prompts`` (``engine.segment``), or take ``result``: what ``engine.segment`` made
        of exactly these prompts on the engine's volume (the worker keeps its last propagation so).

        ``axis``: the slices corrections walk across; by default those the result was propagated
        across last (:func:`walk_axis`: axial after the engine's hand-off of coronal or sagittal
        prompts, else the prompts' own axis)."""
        vol = engine.volume
        if vol is None:
            raise PromptError("no volume: call set_volume() on the engine first")
        if prompts.roi is not None:
            raise PromptError("a correction session starts from boxes or points on slices, not from a 3D ROI")
        if axis is not None and axis not in IJK_INDEX:
            raise PromptError(f"axis must be 'i', 'j' or 'k', got {axis!r}")
        self.engine = engine
        self.agree_dice = float(agree_dice)
        res = engine.segment(prompts) if result is None else result
        if res.mask.shape != vol.array.shape:
            raise PromptError(f"the result has shape {list(res.mask.shape)}, the volume {list(vol.array.shape)}")
        self.axis = axis or walk_axis(prompts, res.report)
        self.report = res.report
        self.mask = res.mask.astype(np.uint8)
        self.prompts = validate_prompts(prompts, vol.array.shape)
        self.history: List[Correction] = []
        # per correction: the slices it changed as they were, the prompts, the HU range and the
        # report (a remade box's hand-off) before it
        self._undo: List[Tuple[Dict[int, np.ndarray], Prompts, Optional[Tuple[float, float]], dict]] = []
        self._hu_range = self._prompted_range()

    # -- state ------------------------------------------------------------------------------
    def anchors(self) -> List[int]:
        """The slices across :attr:`axis` that carry user prompts (they keep the user's result).
        Boxes on slices across another axis (the prompts' own, before a hand-off) are none of them."""
        return self._walk_prompts().slice_indices()

    def _walk_prompts(self) -> Prompts:
        """The prompts as seen across :attr:`axis`: all of them, or only the points (they are voxels
        and lie on one slice of every axis) where the prompts' boxes lie across another axis."""
        if self.prompts.slice_axis == self.axis:
            return self.prompts
        return Prompts(positive=list(self.prompts.positive), negative=list(self.prompts.negative), slice_axis=self.axis)

    def _prompted_range(self) -> Optional[Tuple[float, float]]:
        """The HU range of the mask on the slices of the user's prompts (across their own axis)."""
        return self._range_on(self.mask, self.prompts.slice_indices(), self.prompts.slice_axis)

    def _slice(self, index: int) -> np.ndarray:
        return slice_of(self.mask, self.axis, index)

    def _n(self) -> int:
        return slice_count(self.mask.shape, self.axis)

    def _index_of(self, p: Sequence[float]) -> int:
        return int(round(p[IJK_INDEX[self.axis]]))

    def _validated_point(self, p: Sequence[float]) -> Point:
        shape = self.mask.shape
        checked = validate_prompts(Prompts(positive=[tuple(float(v) for v in p)], slice_axis=self.axis), shape)
        return checked.positive[0]

    # -- corrections ------------------------------------------------------------------------
    def add_point(self, point_ijk: Sequence[float], positive: bool = True,
                  first: Optional[Callable[[Correction], None]] = None) -> Correction:
        """A positive or negative click (IJK) on any slice; returns what it changed. ``first`` is
        called once the clicked slice holds its result, before the walk through the others (a
        progressive answer: that slice can be shown at once). A cut calls it only where the model
        follows it beyond its slice (``_cut_walk``, about 65 ms a slice on a 2-core CPU); a cut that
        HU carries decodes nothing and comes whole."""
        t0 = time.perf_counter()
        before = self._state()
        p = self._validated_point(point_ijk)
        s = self._index_of(p)
        x, y = point_to_xy(p, self.axis)
        inside = bool(self._slice(s)[int(round(y)), int(round(x))])
        corr = Correction("positive" if positive else "negative", s)
        if positive:
            if not inside:
                self._add_region(s, p, corr, first)  # raises (and changes nothing) where nothing is under the click
            self.prompts.positive.append(p)
        else:
            prompted = s in self.anchors()  # by the user's earlier prompts
            self.prompts.negative.append(p)
            if inside:
                vol = self.engine.volume
                wrong = negative_region(self.mask, vol.array, self.axis, s, (x, y), pixel_spacing(vol, self.axis),
                                        frozen=[a for a in self.anchors() if a != s],
                                        slice_mm=float(vol.spacing[IJK_INDEX[self.axis]]))
                here, removed = self._slice(s) > 0, slice_of(wrong, self.axis, s)
                if not prompted and removed.sum() >= END_FRAC * here.sum():
                    # (Almost) all of the slice's mask is wrong: the object is not on this slice (a
                    # leak past its end of the object's HU); what lies beyond goes with it (below).
                    # Not on a slice of the user's earlier prompts: the object is there.
                    removed |= here
                self.mask[wrong] = 0
                corr.changed_slices = [int(v) for v in np.flatnonzero(wrong.any(axis=self._other_axes()))]
                if corr.changed_slices == [s]:
                    self._cut_walk(s, slice_of(wrong, self.axis, s), corr, first)
        return self._finish(corr, t0, before)

    def add_box(self, box: SliceBox, first: Optional[Callable[[Correction], None]] = None) -> Correction:
        """A box on any slice (it replaces a box the user gave there before); returns what it changed.
        ``first``: as for :meth:`add_point`, called once the box's slice holds its result."""
        t0 = time.perf_counter()
        before = self._state()
        checked = validate_prompts(Prompts(box=box, slice_axis=self.prompts.slice_axis), self.mask.shape).box
        s = self.prompts.box_slice(checked)
        kept = [b for b in self.prompts.all_boxes() if self.prompts.box_slice(b) != s]
        if self.prompts.slice_axis != self.axis:
            corr = Correction("box", s, slice_axis=self.prompts.slice_axis)  # comes whole: no ``first``
            return self._remake(kept + [checked], s, corr, t0, before)
        here = self.prompts.on_slice(s)
        here.box, here.boxes = checked, []
        corr = Correction("box", s)
        new = self.engine.segment_slice(here).mask.astype(np.uint8)  # raises before anything changes
        corr.decoded_slices.append(s)
        if not new.any():
            raise PromptError(f"the box gave an empty mask on slice {self.axis}={s}: draw it around the object")
        self.prompts.box, self.prompts.boxes = None, []
        for b in kept + [checked]:
            self.prompts.add_box(b)
        if not np.array_equal(new, self._slice(s)):
            corr.changed_slices.append(s)
        self._slice(s)[...] = new
        if first is not None:
            first(corr)
        self._hu_range = self._prompted_range()
        seed_area = int(new.sum())
        for direction in (+1, -1):
            corr.stops["up" if direction > 0 else "down"] = self._walk(s, new.astype(bool), direction, seed_area,
                                                                       self._hu_range, corr, replace=True)
        return self._finish(corr, t0, before)

    def _remake(self, boxes: List[SliceBox], s: int, corr: Correction, t0: float, before) -> Correction:
        """A box across the prompts' axis where corrections walk across another (after the engine's
        hand-off to axial slices): the 3D mask is made again from all the prompts with ``boxes``
        (``engine.segment``: the boxes' slices, their propagation and the hand-off); the points
        stay prompts. It comes whole (``first`` is not called)."""
        prompts = copy.deepcopy(self.prompts)
        prompts.box, prompts.boxes = None, []
        for b in boxes:
            prompts.add_box(b)
        res = self.engine.segment(prompts)  # raises before anything changes
        if not res.mask.any():
            raise PromptError(f"the box gave an empty mask on slice {prompts.slice_axis}={s}: draw it around the object")
        self.prompts, self.report = prompts, res.report
        self.mask[...] = res.mask > 0
        corr.stops = {"remade": "from all the prompts (the box lies across the prompts' axis, "
                                f"corrections walk across {self.axis})"}
        corr.decoded_slices = slices_with_mask(self.mask, self.axis)
        self._hu_range = self._prompted_range()
        return self._finish(corr, t0, before)

    # -- the walks ---------------------------------------------------------------------------
    def _add_region(self, s: int, p: Point, corr: Correction, first: Optional[Callable[[Correction], None]]) -> None:
        eng, axis = self.engine, self.axis
        here = self._walk_prompts().on_slice(s)
        x, y = (int(round(v)) for v in point_to_xy(p, axis))
        sl = self._slice(s).astype(bool)
        rs, cs = pixel_spacing(eng.volume, axis)
        near = sl.any() and ndimage.distance_transform_edt(~sl, sampling=(rs, cs))[y, x] <= NEAR_MM
        if near:
            # Beside the slice's mask: the object there is larger than found. Prompt the model with
            # the box of the mask and the click (and the clicks, for models that take points).
            x0, y0, x1, y1 = bbox_2d(sl)
            rows, cols = sl.shape
            m = self.engine.settings.box_margin_px
            box = (max(0.0, min(x0, x) - m), max(0.0, min(y0, y) - m),
                   min(cols - 1.0, max(x1, x) + m), min(rows - 1.0, max(y1, y) + m))
            pts = None if getattr(eng.spec, "box_only", False) else here.positive + [p] + here.negative
            pred = eng.predictor.predict(
                eng.embedding(axis, s),
                point_coords=None if pts is None else np.asarray([point_to_xy(q, axis) for q in pts], np.float32),
                point_labels=None if pts is None else np.asarray([1] * (len(here.positive) + 1) + [0] * len(here.negative)),
                box=box, multimask_output=False)
            region = pred.best()[0]
            # The model, boxed around the mask, may leave the clicked tissue out (a darker tumour at
            # the liver's surface): then the click means that tissue, as an island.
            near = bool(region[y, x])
        if not near:
            # Away from it (an island the propagation never reached): the object under the click.
            region = eng.segment_slice(Prompts(positive=[p], negative=here.negative, slice_axis=axis)).mask
        corr.decoded_slices.append(s)
        lab, n = ndimage.label(region)
        at = (y, x)
        if not lab[y, x]:
            # The model's mask may pass beside the click: its part nearest the click, within NEAR_MM,
            # where that part is the object the slice's mask holds (it covers half of it or more)
            # reaching toward the click; not another organ beside it.
            dist, (iy, ix) = ndimage.distance_transform_edt(lab == 0, sampling=(rs, cs), return_indices=True)
            at = (int(iy[y, x]), int(ix[y, x]))
            if n == 0 or dist[y, x] > NEAR_MM or (sl & (lab == lab[at])).sum() < 0.5 * sl.sum():
                raise PromptError(f"the model's mask on slice {axis}={s} leaves the click out: click in the middle "
                                  "of the missed part, or draw a box around it")
        region = lab == lab[at]
        if eng.settings.enclosing_answer_limit and self._encloses_with_other_tissue(region, sl, s):
            raise PromptError(f"the model's answer to the click on slice {axis}={s} is mostly another tissue around the "
                              "object: click in the middle of the missed part, or draw a box "
                              "around it")
        hu_range = self._hu_range
        if hu_range is not None and region[y, x]:
            # The click says that its tissue is the object: the HU range (of what the first prompts
            # found) grows to the range of the part it lies in (a tumour inside the liver), where
            # the click lies in that part's range: the part is the click's tissue. (A click on a
            # missed rim of the object, whose smoothed HU mixes it with what borders it, may get an
            # answer that is mostly that neighbour, fat: its range is not the object's.) Only
            # tissue of the range is added; vessels inside stay (the holes are filled).
            hu = ndimage.gaussian_filter(slice_of(eng.volume.array, axis, s).astype(np.float32), 1.0)
            part = self._range_of(hu[region])
            if part is not None and part[0] <= hu[y, x] <= part[1]:
                hu_range = (min(hu_range[0], part[0]), max(hu_range[1], part[1]))
            region = ndimage.binary_fill_holes(region & (hu >= hu_range[0]) & (hu <= hu_range[1]))
        if (region & ~sl).any():
            # The part may reach beyond the box the model was given: grow it as propagation does.
            region = region | (eng.widen(axis, s, region | sl if near else region, hu_range) & ~sl)
        whole, region = region, self._part_at(region & ~sl, x, y, (rs, cs))
        if not region.any():
            raise PromptError(f"found nothing to add under the click on slice {axis}={s}: click inside the object")
        max_area = self._max_added_area()
        if region.sum() > max_area:
            raise PromptError(f"the click on slice {axis}={s} would add {int(region.sum())} pixels, more than "
                              f"{ADD_AREA_FACTOR:g} times the object's largest slice: draw a box there instead")
        beside = self._beside_area(s) if not sl.any() and eng.settings.island_beside_end_limit else 0
        if beside and region.sum() > ADD_AREA_FACTOR * beside:
            raise PromptError(f"the click on slice {axis}={s} would add {int(region.sum())} pixels, more than "
                              f"{ADD_AREA_FACTOR:g} times the object on the slice next to it: draw a box there instead")
        self._hu_range = hu_range  # only now: a refused click changes nothing
        self._slice(s)[region] = 1
        corr.changed_slices.append(s)
        if first is not None:
            first(corr)
        # The walk follows the slice's new mask, or (an island) the model's part the click lies in.
        prev = self._slice(s).astype(bool) if near else whole
        seed_area = int(prev.sum())
        for direction in (+1, -1):
            corr.stops["up" if direction > 0 else "down"] = self._walk(s, prev, direction, seed_area, self._hu_range,
                                                                       corr, replace=False, max_area=max_area)

    @staticmethod
    def _part_at(added: np.ndarray, x: int, y: int, spacing: Tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
        """The connected part (8-connected) of ``added`` that holds pixel (x, y), or the nearest one
        in mm (``spacing``: row, column; a coronal or sagittal slice's pixels are longer along the
        slices' axis): what a click adds. The model's answer may also differ from the slice's mask
        elsewhere along its edge (a neighbour it takes in there), which the click says nothing
        about."""
        lab, n = ndimage.label(added, structure=np.ones((3, 3), dtype=bool))
        if n <= 1:
            return added
        if not lab[y, x]:
            yy, xx = np.nonzero(lab)
            nearest = int(np.argmin(((yy - y) * spacing[0]) ** 2 + ((xx - x) * spacing[1]) ** 2))
            y, x = int(yy[nearest]), int(xx[nearest])
        return lab == lab[y, x]

    def _encloses_with_other_tissue(self, part: np.ndarray, sl: np.ndarray, s: int) -> bool:
        """Whether ``part`` (the model's answer to a positive click on slice ``s``) is the organ
        around the object rather than more of it: it covers the slice's mask ``sl`` (at least
        ``ENCLOSE_COVER`` of it), adds at least as many pixels as that mask holds, and what it adds
        is another tissue (median smoothed HU ``MIN_CONTRAST_HU`` or more from the mask's): the
        liver around a tumour, or the fat around the liver (the answer to a click on a few missed
        pixels at its edge). A missed lobe of the organ, a darker tumour at the liver's surface
        (the answer is the tumour, not the liver mask) and a rim of the object's own HU that its
        mask missed are accepted; a tumour mask much too small inside a tumour rim of another HU
        is refused (a box there says it)."""
        if sl.sum() < 10 or (part & sl).sum() < ENCLOSE_COVER * sl.sum():
            return False
        added = part & ~sl
        if added.sum() < sl.sum():
            return False
        hu = ndimage.gaussian_filter(slice_of(self.engine.volume.array, self.axis, s).astype(np.float32), 1.0)
        return abs(float(np.median(hu[added])) - float(np.median(hu[sl]))) >= MIN_CONTRAST_HU

    def _beside_area(self, s: int) -> int:
        """The larger mask (pixels) of the slices next to slice ``s`` (0: neither holds one)."""
        return max((int(self._slice(t).sum()) for t in (s - 1, s + 1) if 0 <= t < self._n()), default=0)

    def _max_added_area(self) -> float:
        """What one positive click may make of a slice: ``ADD_AREA_FACTOR`` times the largest slice."""
        areas = self.mask.sum(axis=self._other_axes())
        return ADD_AREA_FACTOR * float(max(int(areas.max()) if areas.size else 0, self.engine.settings.min_area_px))

    def _walk(self, start: int, prev: np.ndarray, direction: int, seed_area: int,
              hu_range: Optional[Tuple[float, float]], corr: Correction, replace: bool,
              max_area: Optional[float] = None) -> str:
        """Propagate ``prev`` from slice ``start`` in ``direction``: replace (a box) or add (a click,
        stopping where a slice would exceed ``max_area``)."""
        anchors = set(self.anchors())
        t = start + direction
        while 0 <= t < self._n():
            if t in anchors:
                return f"reached the prompted slice {t}"
            old = self._slice(t).astype(bool)
            new, reason = self._follow(t, prev, seed_area, hu_range,
                                       widen=self.engine.settings.box_walk_growth if replace else None)
            corr.decoded_slices.append(t)
            if new is None:
                keep = reason.startswith(JUMPED_AWAY) and self.engine.settings.box_walk_keeps_on_jump
                if replace and not keep:  # the object ends here: what the mask held beyond goes
                    self._clear_until_anchor(t, direction, anchors, corr)
                return reason
            if replace:
                if old.any() and dice(new, old) >= self.agree_dice:
                    return f"agrees with the previous result at slice {t}"
                self._slice(t)[...] = new
            else:
                if max_area is not None and (new | old).sum() > max_area:
                    return f"would grow beyond {ADD_AREA_FACTOR:g} times the object's largest slice at slice {t}"
                fresh = new & ~old
                if fresh.sum() <= max(self.engine.settings.min_area_px, 0.02 * new.sum()):
                    return f"joined the previous result at slice {t}"
                self._slice(t)[new] = 1
            corr.changed_slices.append(t)
            prev = new
            t += direction
        return "reached the end of the volume"

    def _cut_walk(self, s: int, removed: np.ndarray, corr: Correction,
                  first: Optional[Callable[[Correction], None]] = None) -> None:
        """Follow with the model a cut (``removed``, on slice ``s``) that HU could not carry beyond its
        slice: the wrong tissue looks like the object (a pancreas or duodenum beside a portal-phase
        liver). Each next slice is segmented from the corrected slice before it (propagation's step:
        its box, growth limit and HU gate); what the mask held there beyond that answer, connected to
        the previous slice's cut, goes. The walk ends where nothing goes, where the cut would grow
        past ``CUT_GROWTH`` times the previous one or take more than ``CUT_MAX_FRAC`` of the slice's
        mask, where the object ends, or at a prompted slice. A cut that took more than
        ``CUT_MAX_FRAC`` of its own slice's mask is not followed: a click whose region grew into
        the object (a tumour's rim of the liver's HU) must not carry that on. ``first`` is called
        before the walk (the clicked slice holds its cut)."""
        anchors = set(self.anchors())
        seed_area = int(self._slice(s).sum())
        if (seed_area == 0 or removed.sum() < self.engine.settings.min_area_px
                or removed.sum() > CUT_MAX_FRAC * (seed_area + removed.sum())):
            return  # too little to follow, or most of the slice (the object itself, not a leak)
        if first is not None:
            first(corr)
        grow = np.ones((3, 3), dtype=bool)
        for direction in (+1, -1):
            prev_mask, prev_cut = self._slice(s).astype(bool), removed
            t = s + direction
            while 0 <= t < self._n() and t not in anchors:
                old = self._slice(t).astype(bool)
                if not old.any():
                    break
                new, _ = self._follow(t, prev_mask, seed_area, self._hu_range)
                corr.decoded_slices.append(t)
                if new is None:
                    break
                cut = keep_components_touching(old & ~new, ndimage.binary_dilation(prev_cut, structure=grow)) > 0
                if not cut.any() or cut.sum() > CUT_GROWTH * prev_cut.sum() + 16 or cut.sum() > CUT_MAX_FRAC * old.sum():
                    break
                self._slice(t)[cut] = 0
                corr.changed_slices.append(t)
                prev_mask, prev_cut = old & ~cut, cut
                t += direction

    def _clear_until_anchor(self, t: int, direction: int, anchors: Set[int], corr: Correction) -> None:
        while 0 <= t < self._n() and t not in anchors and self._slice(t).any():
            self._slice(t)[...] = 0
            corr.changed_slices.append(t)
            t += direction

    def _follow(self, t: int, prev: np.ndarray, seed_area: int, hu_range: Optional[Tuple[float, float]],
                widen: Optional[bool] = None) -> Tuple[Optional[np.ndarray], str]:
        """Slice ``t`` segmented from the previous slice's mask ``prev`` by the engine's propagation
        step (``widen``: growth beyond the limit, ``PromptEngine.follow_slice``; a box's walk by
        ``PropagationSettings.box_walk_growth``, a click's by ``walk_growth``); (mask, "") or (None,
        why it ended)."""
        kept, reason = self.engine.follow_slice(self.axis, t, prev, seed_area, hu_range, widen=widen)
        return kept, reason or ""

    # -- helpers ------------------------------------------------------------------------------
    def _other_axes(self) -> Tuple[int, int]:
        a = axis_index(self.axis)
        return tuple(b for b in range(3) if b != a)  # type: ignore[return-value]

    def _range_on(self, mask3d: np.ndarray, slices: Sequence[int], axis: Optional[str] = None
                  ) -> Optional[Tuple[float, float]]:
        """The HU gate range (``engine.hu_gate_range``) of the smoothed HU under the mask on ``slices``
        (across ``axis``, by default :attr:`axis`)."""
        axis = axis or self.axis
        vals = []
        for s in slices:
            m = slice_of(mask3d, axis, s) > 0
            if m.any():
                hu = ndimage.gaussian_filter(slice_of(self.engine.volume.array, axis, s).astype(np.float32), 1.0)
                vals.append(hu[m])
        return self._range_of(np.concatenate(vals) if vals else np.zeros(0))

    def _range_of(self, v: np.ndarray) -> Optional[Tuple[float, float]]:
        return hu_gate_range(v, self.engine.settings)

    def undo(self) -> Correction:
        """Take back the last correction: its slices, the prompts, the HU range and the report as
        they were before it (at most ``UNDO_DEPTH`` corrections back); PromptError when none is left."""
        if not self._undo:
            raise PromptError("no correction to undo")
        t0 = time.perf_counter()
        slices, prompts, hu_range, self.report = self._undo.pop()
        for s, old in slices.items():
            self._slice(s)[...] = old
        self.prompts, self._hu_range = prompts, hu_range
        last = self.history.pop()
        corr = Correction("undo", last.slice_index, last.slice_axis, changed_slices=sorted(slices))
        corr.seconds = time.perf_counter() - t0
        return corr

    def can_undo(self) -> int:
        """How many corrections :meth:`undo` can take back."""
        return len(self._undo)

    def _state(self) -> Tuple[np.ndarray, Prompts, Optional[Tuple[float, float]], dict]:
        return self.mask.copy(), copy.deepcopy(self.prompts), self._hu_range, self.report

    def _seed_slices(self) -> List[Tuple[str, List[int]]]:
        """(axis, slices) whose mask a cut keeps connected to: the anchors across the walks' axis
        and, where the prompts lie across another (after a hand-off), the hand-off's axial slice
        (through the middle of the user's prompted slice's mask), not the prompted slice itself: it
        spans the object's whole extent across the walks, and would keep a leak past the object's
        end that a cut has just cut off."""
        out = [(self.axis, self.anchors())]
        if self.prompts.slice_axis != self.axis:
            k = (self.report.get("axial_handoff") or {}).get("slice_k")
            out.append(("k", [int(k)]) if k is not None and self.axis == "k"
                       else (self.prompts.slice_axis, self.prompts.slice_indices()))
        return out

    def _finish(self, corr: Correction, t0: float, before) -> Correction:
        """After a cut, keep the 3D components that touch a prompted slice's mask (inside the mask's
        box); what a box or a positive click adds grows from its own slice and stays connected."""
        box = bbox_3d(self.mask) if corr.kind == "negative" and corr.changed_slices else None
        if box is not None:
            i0, j0, k0, i1, j1, k1 = box
            crop = self.mask[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1]
            seeds = np.zeros_like(crop)
            for axis, slices in self._seed_slices():
                a = axis_index(axis)
                lo = (k0, j0, i0)[a]
                for s in slices:
                    if 0 <= s - lo < crop.shape[a]:
                        slice_of(seeds, axis, s - lo)[...] = slice_of(crop, axis, s - lo)
            kept = keep_components_touching(crop, seeds, connectivity=3, fallback_largest=True).astype(np.uint8)
            dropped = np.flatnonzero((crop.astype(bool) & ~kept.astype(bool)).any(axis=self._other_axes()))
            first = (k0, j0, i0)[axis_index(self.axis)]  # the crop's first slice across the walks' axis
            corr.changed_slices += [int(d) + first for d in dropped]
            crop[...] = kept
        corr.slice_axis = corr.slice_axis or self.axis
        corr.changed_slices = sorted(set(corr.changed_slices))
        corr.decoded_slices = sorted(set(corr.decoded_slices))
        old, prompts, hu_range, report = before
        changed = np.flatnonzero((old != self.mask).any(axis=self._other_axes()))
        self._undo.append(({int(c): slice_of(old, self.axis, int(c)).copy() for c in changed}, prompts, hu_range,
                           report))
        del self._undo[:-UNDO_DEPTH]
        corr.seconds = time.perf_counter() - t0
        self.history.append(corr)
        return corr
