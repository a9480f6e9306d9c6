"""The engine side of the worker: the model, the volume, prompts from requests, and the work itself.

Everything here runs on the worker's main thread (the one thread that touches the engine);
``server.py`` owns the loop, the reader thread, cancel and the framing.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from samliverseg.core.errors import InputError
from samliverseg.core.prompts import IJK_INDEX, Prompts, Roi3D, SliceBox
from samliverseg.io.volume import LPS_TO_RAS, Volume
from samliverseg.service.protocol import ORIENTATION_NORMALS, ProtocolError, read_array, write_array

ProgressFn = Callable[[int, int], None]

#: IJK coordinates computed from RAS are rounded to this many decimals (1e-6 voxel), so that a
#: prompt given in RAS lands exactly where the same prompt given in IJK does.
IJK_DECIMALS = 6


@dataclass
class EngineOptions:
    """How the worker builds its engine: the CLI's model options."""

    model: str = "lite_medsam"
    checkpoint: Optional[str] = None
    device: str = "auto"
    window: Optional[str] = None
    precision: str = "fp32"
    decoder_precision: str = "fp32"  # fp32 | bf16 (2D models: interactive.backends)
    cache_mb: float = 768.0
    backend: str = "torch"  # torch | auto | openvino | onnxruntime (interactive.backends)


def open_engine(options: EngineOptions):
    """The engine for ``options``, opened like every other entry point (``api.open_model``): a 2D
    prompt model (built-in or a trained decoder/adapter: a ``PromptEngine``) or a native 3D model
    (SAM-Med3D: a ``Sam3DEngine``, which takes no window, precision, cache or backend: the
    backend option is ignored for it). Automatic models are refused (no prompts)."""
    from samliverseg.api import open_model
    from samliverseg.models.registry import find_model
    from samliverseg.models.specs import SAM3D

    entry = find_model(options.model, usable=True)
    if entry.family == SAM3D:
        return open_model(options.model, options.checkpoint, options.device, options.window,
                          precision=options.precision, decoder_precision=options.decoder_precision)
    if not entry.interactive:
        raise InputError(f"{options.model!r} is an automatic model (no prompts): the worker serves prompt models "
                         f"(e.g. lite_medsam, a trained decoder/adapter, or a SAM-Med3D model)")
    return open_model(options.model, options.checkpoint, options.device, options.window,
                      precision=options.precision, cache_mb=options.cache_mb, backend=options.backend,
                      decoder_precision=options.decoder_precision)


def is_3d_engine(engine) -> bool:
    """True for a native 3D engine (clicks anywhere in the volume give a 3D mask)."""
    return not hasattr(engine, "segment_slice")


# -- geometry -------------------------------------------------------------------------------------

def _floats(value: Any) -> Optional[np.ndarray]:
    """``value`` (nested lists of numbers) as a float array; None for anything else (ragged, text)."""
    if not isinstance(value, list):
        return None
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None


def matrix_4x4(value: Any, what: str = "ijk_to_ras") -> np.ndarray:
    m = _floats(value)
    if m is None or m.shape != (4, 4) or not np.isfinite(m).all():
        raise ProtocolError(f"{what} must be a 4x4 matrix (a list of 4 rows of 4 numbers)")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise InputError(f"{what} is singular")
    return m


def volume_from_ijk_to_ras(array: np.ndarray, ijk_to_ras: np.ndarray) -> Volume:
    """A :class:`Volume` (HU float32, LPS geometry) from an array [k, j, i] and Slicer's IJKToRAS."""
    lin = ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction_lps = LPS_TO_RAS @ (lin / spacing)
    origin_lps = LPS_TO_RAS @ ijk_to_ras[:3, 3]
    return Volume(array=array, spacing=tuple(spacing), origin=tuple(origin_lps), direction=direction_lps)


def slice_axis_for_normal(ijk_to_ras: np.ndarray, normal_ras: Sequence[float]) -> str:
    """The IJK axis ('i', 'j' or 'k') most parallel to a RAS direction (a slice view's normal)."""
    lin = np.asarray(ijk_to_ras, dtype=float)[:3, :3]
    axes = lin / np.linalg.norm(lin, axis=0)
    n = np.asarray(normal_ras, dtype=float)
    if n.shape != (3,) or not np.isfinite(n).all() or np.linalg.norm(n) == 0:
        raise ProtocolError("normal must be a non-zero RAS vector [x, y, z]")
    return "ijk"[int(np.argmax(np.abs(axes.T @ (n / np.linalg.norm(n)))))]


def _points(value: Any, what: str) -> np.ndarray:
    p = _floats(value)
    if p is None or (p.size and (p.ndim != 2 or p.shape[1] != 3)) or not np.isfinite(p).all():
        raise ProtocolError(f"{what} must be a list of [x, y, z] points")
    return p.reshape(-1, 3)


def _labels(req: Dict[str, Any], n: int) -> List[int]:
    labels = req.get("labels", [1] * n)
    if not isinstance(labels, list) or len(labels) != n or any(v not in (0, 1) or isinstance(v, bool) for v in labels):
        raise ProtocolError("labels must be a list of 1 (positive) / 0 (negative), one per point")
    return [int(v) for v in labels]


def _frame(req: Dict[str, Any]) -> str:
    frame = req.get("frame", "ras")
    if frame not in ("ras", "ijk"):
        raise ProtocolError(f"frame must be 'ras' or 'ijk', got {frame!r}")
    return frame


def clicks_from_request(req: Dict[str, Any], volume: Volume) -> List[Tuple[Tuple[float, float, float], int]]:
    """The IJK clicks ``[(ijk, label)]`` of a ``prompt3d`` request: points in RAS (default) or IJK,
    anywhere in the volume (no slice: they are not moved), IJK rounded to 1e-6 voxel."""
    frame = _frame(req)
    points = _points(req.get("points", []), "points")
    labels = _labels(req, len(points))
    ijk = np.round(volume.ras_to_ijk(points), IJK_DECIMALS) if frame == "ras" and len(points) else points
    return [(tuple(float(v) for v in p), lab) for p, lab in zip(ijk, labels)]


def prompts_from_request(req: Dict[str, Any], volume: Volume) -> Prompts:
    """The IJK :class:`Prompts` of a ``prompt``/``propagate`` request (see WORKER_PROTOCOL.md).

    ``frame`` "ras" (default): points, box corners and ROI corners are world RAS; the slice axis
    is the volume's IJK axis nearest the view normal (``orientation`` axial/coronal/sagittal, or
    ``normal``); each point is moved onto its nearest slice along that axis, the second box corner
    onto the first's slice. ``frame`` "ijk": coordinates are IJK and ``slice_axis`` says the axis.
    """
    frame = _frame(req)
    points = _points(req.get("points", []), "points")
    labels = _labels(req, len(points))
    boxes = [_points(req["box"], "box")] if "box" in req else []
    if not isinstance(req.get("boxes", []), list):
        raise ProtocolError("boxes must be a list of boxes [[[x, y, z], [x, y, z]], ...]")
    boxes += [_points(b, "each of boxes") for b in req.get("boxes", [])]
    if any(b.shape != (2, 3) for b in boxes):
        raise ProtocolError("a box must be two opposite corners [[x, y, z], [x, y, z]]")
    roi = req.get("roi")
    if frame == "ijk":
        if "orientation" in req or "normal" in req:
            raise ProtocolError("frame 'ijk' takes slice_axis, not orientation or normal")
        axis = req.get("slice_axis", "k")
        if axis not in IJK_INDEX:
            raise ProtocolError(f"slice_axis must be 'i', 'j' or 'k', got {axis!r}")
        ijk, boxes_ijk = points, boxes
        if roi is not None:
            r = _floats(roi)
            if r is None or r.shape != (6,) or not np.isfinite(r).all():
                raise ProtocolError("roi (frame ijk) must be [i0, j0, k0, i1, j1, k1]")
            roi = Roi3D(*(float(v) for v in r))
    else:
        if "slice_axis" in req:
            raise ProtocolError("frame 'ras' takes orientation or normal, not slice_axis (use frame 'ijk')")
        m = volume.ijk_to_ras_matrix()
        if "normal" in req:
            normal = req["normal"]
        else:
            name = req.get("orientation", "axial")
            if name not in ORIENTATION_NORMALS:
                raise ProtocolError(f"orientation must be one of {', '.join(ORIENTATION_NORMALS)}, got {name!r}")
            normal = ORIENTATION_NORMALS[name]
        axis = slice_axis_for_normal(m, normal)
        c = IJK_INDEX[axis]
        ijk = np.round(volume.ras_to_ijk(points), IJK_DECIMALS) if len(points) else points
        if len(ijk):
            ijk[:, c] = np.round(ijk[:, c])
        boxes_ijk = []
        for box in boxes:
            box_ijk = np.round(volume.ras_to_ijk(box), IJK_DECIMALS)
            box_ijk[:, c] = round(float(box_ijk[0, c]))
            boxes_ijk.append(box_ijk)
        if roi is not None:
            corners = _points(roi, "roi")
            if corners.shape != (2, 3):
                raise ProtocolError("roi (frame ras) must be two opposite corners [[x, y, z], [x, y, z]]")
            r = np.round(volume.ras_to_ijk(corners), IJK_DECIMALS)
            roi = Roi3D(*r.min(axis=0), *r.max(axis=0))
    prompts = Prompts(slice_axis=axis, roi=roi)
    for p, label in zip(ijk, labels):
        (prompts.positive if label == 1 else prompts.negative).append(tuple(float(v) for v in p))
    for box_ijk in boxes_ijk:  # the first is ``box``, the others ``boxes`` (one box per slice)
        prompts.add_box(SliceBox(tuple(float(v) for v in box_ijk[0]), tuple(float(v) for v in box_ijk[1])))
    return prompts


# -- the engine state -------------------------------------------------------------------------------

class EngineState:
    """The model (built on first need), the volume, and the work each request does.

    A 3D model also keeps its last result and the clicks that made it (``prompt3d`` refines it); a
    2D model keeps its last 3D result as a :class:`~samliverseg.interactive.session3d.CorrectionSession`
    under a ``result_id`` (``correct`` corrects it).
    """

    def __init__(self, options: EngineOptions, session_dir: str):
        self.options = options
        self.session_dir = session_dir
        self.engine = None
        self.volume: Optional[Volume] = None
        self.result3d = None
        self.clicks3d: List[Tuple[Tuple[float, float, float], int]] = []
        self.corrections = None  # CorrectionSession of the last 3D result of a 2D model
        self.result_id: Optional[str] = None  # its id (a new one after every change)

    def require_engine(self):
        if self.engine is None:
            self.engine = open_engine(self.options)
        return self.engine

    def require_volume(self) -> Volume:
        if self.volume is None:
            raise InputError("no volume: send load_volume first")
        return self.volume

    def require_2d(self, rtype: str) -> Volume:
        volume = self.require_volume()
        if is_3d_engine(self.engine):
            raise InputError(f"{self.options.model} is a 3D model: send prompt3d with the clicks (it has no "
                             f"slice prompts, propagation, prefetch or prompt-ensemble uncertainty; {rtype} refused)")
        return volume

    def describe_volume(self) -> Optional[Dict[str, Any]]:
        v = self.volume
        if v is None:
            return None
        return {"shape_kji": list(v.shape), "spacing": list(v.spacing), "ijk_to_ras": v.ijk_to_ras_matrix(),
                "source": v.source_path}

    # -- requests ---------------------------------------------------------------------------------
    def load_volume(self, req: Dict[str, Any]) -> Dict[str, Any]:
        if ("path" in req) == ("array" in req):
            raise ProtocolError("load_volume takes either path or array (with ijk_to_ras)")
        if "path" in req:
            if "ijk_to_ras" in req:
                raise ProtocolError("load_volume: a file brings its own geometry; drop ijk_to_ras")
            from samliverseg.io.volume import read_volume

            volume = read_volume(req["path"])
        else:
            if "ijk_to_ras" not in req:
                raise ProtocolError("load_volume: an array needs its ijk_to_ras matrix")
            m = matrix_4x4(req["ijk_to_ras"])
            mm = read_array(req["array"], "array", copy=False)
            if mm.ndim != 3:
                raise InputError(f"the volume must be 3D [k, j, i]; got shape {list(mm.shape)}")
            # float32 voxels stay memory-mapped (read-only; the client keeps the file while the
            # volume is in use); other types are converted to float32 HU once
            array = mm if mm.dtype == np.float32 else np.asarray(mm, dtype=np.float32)
            volume = volume_from_ijk_to_ras(array, m)
        engine = self.require_engine()
        self.volume, self.result3d, self.clicks3d = None, None, []
        self.corrections, self.result_id = None, None
        if is_3d_engine(engine):
            engine.prepare(volume)  # the working grid now, so that the first click only encodes
        else:
            engine.set_volume(volume)
        self.volume = volume
        out = self.describe_volume()
        out.update({"model": engine.spec.name, "device": str(engine.device), "kind": self.kind(),
                    "window": None if is_3d_engine(engine) else engine.window.spec()})
        return out

    def kind(self) -> Optional[str]:
        """``"2d"`` or ``"3d"`` once the model is built, else None."""
        if self.engine is None:
            return None
        return "3d" if is_3d_engine(self.engine) else "2d"

    def prompt(self, req: Dict[str, Any]) -> Dict[str, Any]:
        volume = self.require_2d("prompt")
        prompts = prompts_from_request(req, volume)
        n_embedded = len(self.engine.embed_times)
        res = self.engine.segment_slice(prompts)
        return {"mask": write_array(self.session_dir, "w-mask2d", res.mask), "slice_axis": res.slice_axis,
                "slice_index": int(res.slice_index), "score": float(res.score), "prompts": prompts.describe(),
                "ijk_to_ras": volume.ijk_to_ras_matrix(),
                "embedded": len(self.engine.embed_times) > n_embedded}  # the slice was not cached

    def propagate(self, req: Dict[str, Any], progress: ProgressFn, cancel: threading.Event) -> Dict[str, Any]:
        volume = self.require_2d("propagate")
        prompts = prompts_from_request(req, volume)
        propagate = req.get("propagate", True)
        res = self.engine.segment(prompts, propagate=propagate, progress=progress, cancel=cancel)
        self._keep(prompts, res if propagate and prompts.roi is None else None)
        return {"mask": write_array(self.session_dir, "w-mask3d", res.mask), "report": res.report,
                "result_id": self.result_id, "ijk_to_ras": volume.ijk_to_ras_matrix()}

    def _keep(self, prompts: Prompts, res) -> None:
        """Keep ``res`` (what ``engine.segment`` made of ``prompts``; None: nothing) for ``correct``."""
        from samliverseg.interactive.session3d import CorrectionSession

        self.corrections = None if res is None else CorrectionSession(self.engine, prompts, result=res)
        self.result_id = None if res is None else uuid.uuid4().hex

    def correct(self, req: Dict[str, Any], progress: ProgressFn, cancel: threading.Event,
                partial: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
        """One correction (a point or a box on any slice, or undo: the last one taken back) of the 3D
        result ``base``: only the slices it walks through are decoded (``CorrectionSession``). When
        the worker no longer holds that result (another result since, a new volume, a restarted
        worker) or, for undo, no correction of it to take back, the 3D mask is made again from all
        the prompts, as ``propagate`` does. A refused correction changes nothing. ``partial``
        gets the corrected slice itself (``slice_axis``, ``slice_index``, ``mask``) as soon as it is
        made, before the walk through the others (the ``partial`` event)."""
        volume = self.require_2d("correct")
        prompts = prompts_from_request(req, volume)
        c = req["correction"]
        frame = {k: req[k] for k in ("frame", "orientation", "normal", "slice_axis") if k in req}
        undo = c == {"undo": True}
        if not undo and (set(c) - {"point", "label", "box"} or ("point" in c) == ("box" in c)
                         or ("label" in c and "box" in c)):
            raise ProtocolError("correction must be {\"point\": [x, y, z], \"label\": 1 or 0}, "
                                "{\"box\": [corner, corner]} or {\"undo\": true}")
        if undo:  # the prompts are those left without the correction taken back
            new = Prompts(slice_axis=prompts.slice_axis)
        elif "point" in c:
            new = prompts_from_request(dict(frame, points=[c["point"]], labels=[c.get("label", 1)]), volume)
        else:
            new = prompts_from_request(dict(frame, box=c["box"]), volume)
        session = self.corrections
        incremental = (session is not None and req.get("base") is not None and req.get("base") == self.result_id
                       and session.prompts.slice_axis == new.slice_axis and (not undo or session.can_undo() > 0))
        summary = None
        if incremental:
            from samliverseg.interactive.engine import slice_of

            def first(corr) -> None:
                if partial is not None:
                    s = corr.slice_index
                    partial({"slice_axis": session.axis, "slice_index": s,
                             "mask": write_array(self.session_dir, "w-mask2d", slice_of(session.mask, session.axis, s))})

            if undo:
                corr = session.undo()
            elif new.box is not None:
                corr = session.add_box(new.box, first=first)
            else:
                positive = bool(new.positive)
                corr = session.add_point((new.positive or new.negative)[0], positive=positive, first=first)
            self.result_id = uuid.uuid4().hex
            mask, report = session.mask, {"model": self.engine.spec.name, "voxels": int(session.mask.sum())}
            summary = {"kind": corr.kind, "slice_axis": corr.slice_axis, "slice_index": corr.slice_index,
                       "walk_axis": session.axis, "changed_slices": corr.changed_slices,
                       "decoded_slices": corr.decoded_slices, "stops": corr.stops, "seconds": round(corr.seconds, 3)}
        else:
            res = self.engine.segment(prompts, propagate=True, progress=progress, cancel=cancel)
            self._keep(prompts, res)  # (correct takes no ROI)
            mask, report = res.mask, res.report
        return {"mask": write_array(self.session_dir, "w-mask3d", mask), "report": report,
                "result_id": self.result_id, "incremental": incremental, "correction": summary,
                "ijk_to_ras": volume.ijk_to_ras_matrix()}

    def prompt3d(self, req: Dict[str, Any], progress: ProgressFn, cancel: threading.Event) -> Dict[str, Any]:
        """A 3D model's mask from all the clicks so far. When they continue the clicks of the last
        result (same volume), only the new ones are decoded, refining that result, as the effect
        does in process; otherwise (first click, cleared, another object, a restarted worker) the
        result starts again from all of them. A failed request leaves the last result as it was."""
        volume = self.require_volume()
        if not is_3d_engine(self.engine):
            raise InputError(f"{self.options.model} is a 2D model: send prompt (one slice) or propagate")
        clicks = clicks_from_request(req, volume)
        n_old = len(self.clicks3d)
        previous = None
        if self.result3d is not None and n_old <= len(clicks) and clicks[:n_old] == self.clicks3d:
            previous, new = self.result3d, clicks[n_old:]
        else:
            new = clicks
        if previous is not None and not new:
            res = previous  # the same clicks again: the same result
        else:
            res = self.engine.segment(volume, [p for p, _ in new], [lab for _, lab in new], previous=previous,
                                      progress=progress, cancel=cancel)
        self.result3d, self.clicks3d = res, clicks
        return {"mask": write_array(self.session_dir, "w-mask3d", res.mask), "report": res.report,
                "clicks_reused": len(clicks) - len(new), "ijk_to_ras": volume.ijk_to_ras_matrix()}

    def uncertainty(self, req: Dict[str, Any], progress: ProgressFn, cancel: threading.Event) -> Dict[str, Any]:
        from samliverseg.interactive.uncertainty import ensemble_uncertainty

        volume = self.require_2d("uncertainty")
        mask = read_array(req["mask"], "mask")
        axis = req.get("slice_axis", "k")
        if axis not in IJK_INDEX:
            raise ProtocolError(f"slice_axis must be 'i', 'j' or 'k', got {axis!r}")
        u = ensemble_uncertainty(self.engine, mask, slice_axis=axis, members=req.get("members", 6),
                                 seed=req.get("seed", 0), progress=progress, cancel=cancel)
        return {"variance": write_array(self.session_dir, "w-variance", u.variance), "members": u.members,
                "slice_axis": u.slice_axis, "slices": u.slices, "uncertain_fraction": u.uncertain_fraction(),
                "ijk_to_ras": volume.ijk_to_ras_matrix()}

    def prefetch_plan(self, req: Dict[str, Any]) -> Tuple[str, List[int]]:
        """The slices a ``prefetch`` request asks for, nearest ``around`` first, not yet cached."""
        volume = self.require_2d("prefetch")
        axis = req.get("slice_axis", "k")
        if axis not in IJK_INDEX:
            raise ProtocolError(f"slice_axis must be 'i', 'j' or 'k', got {axis!r}")
        n = volume.shape[{"k": 0, "j": 1, "i": 2}[axis]]
        if ("slices" in req) == ("range" in req):
            raise ProtocolError("prefetch takes either slices or range")
        if "range" in req:
            r = req["range"]
            if len(r) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
                raise ProtocolError("range must be [first, last] slice indices (inclusive)")
            wanted = list(range(max(0, min(r)), min(n - 1, max(r)) + 1))
        else:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in req["slices"]):
                raise ProtocolError("slices must be a list of slice indices")
            wanted = [s for s in dict.fromkeys(req["slices"]) if 0 <= s < n]
        if "around" in req:
            c = float(req["around"])
            wanted.sort(key=lambda s: (abs(s - c), s))
        return axis, [s for s in wanted if not self.engine.is_cached(axis, s)]

    def embed(self, axis: str, index: int) -> None:
        if not self.engine.is_cached(axis, index):
            self.engine.embedding(axis, index)

    def forget_embeddings(self) -> None:
        """After an out-of-memory failure: drop the cached embeddings (and CUDA's cached blocks)."""
        if self.engine is not None:
            if is_3d_engine(self.engine):
                self.engine.clear_cache()
            else:
                self.engine.cache.clear()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def status(self) -> Dict[str, Any]:
        e = self.engine
        out: Dict[str, Any] = {"model": self.options.model, "model_loaded": e is not None, "kind": self.kind(),
                               "volume": self.describe_volume()}
        if e is not None and is_3d_engine(e):
            out.update({"device": str(e.device), "window": None, "patches_encoded": len(e.encode_times),
                        "clicks": len(self.clicks3d)})
        elif e is not None:
            out.update({"device": str(e.device), "window": e.window.spec(), "slices_embedded": len(e.embed_times),
                        "cache_hits": e.cache.hits, "cache_misses": e.cache.misses})
            if e.embed_times:  # the backend is open (it opens at the first embedding)
                out["embed_ms_mean"] = round(1000 * float(np.mean(e.embed_times)), 1)
                out["backend"] = e.backend.describe()
        return out
