"""Where is a segment uncertain? The variance of a prompt ensemble, voxel by voxel.

This is the inference-time counterpart of the Semi-SAM+ pseudo-label filter (design digest,
section 3, Algorithm 2): the same model is asked several times, with differently perturbed
prompts derived from the current mask, and the per-voxel variance of the answers shows where the
model is unsure, i.e. where a clinician's click is worth most.

For every slice (along ``slice_axis``) that the mask touches, plus ``margin_slices`` beyond each
end (prompted with the nearest masked slice's box), the ensemble is:

* member 0: the mask's 2D bounding box on that slice (x0, y0, x1, y1 in slice pixels);
* members 1..n-1: that box with each side moved by a random amount, uniform in
  ``[-jitter, +jitter]`` × the box's width (x sides) or height (y sides), seeded;
* one more member: the exact box plus the mask itself as the dense mask prompt
  (``SlicePredictor.mask_to_low_res``); for models that accept points (not ``box_only``), one
  more: a positive point at the mask's innermost pixel (maximum of the distance transform).

Each member gives a binary mask M_i on the slice. Per voxel v:

    mean(v) = (1/N) Σ_i M_i(v)                 (the fraction of members voting foreground)
    Var(v)  = (1/N) Σ_i (M_i(v) − mean(v))²     = mean(v)·(1 − mean(v))  ∈ [0, 0.25]

(the population variance, as in Algorithm 2). Voxels of slices outside the processed range have
Var 0 and mean 0. ``confident(u_th)`` is M_conf = [Var < u_th].

The slices' image embeddings come from the engine's cache (after a propagation they are
usually there); missing ones are computed, so the cost is at most one embedding plus N decodes
per slice (about 45 ms per decode on a laptop CPU for LiteMedSAM).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
from samliverseg.interactive.engine import IJK_INDEX, PromptEngine, slice_count, slice_of
from samliverseg.core.errors import CancelledError, InputError
from samliverseg.core.maskutil import bbox_2d, interior_point


@dataclass
class UncertaintyMap:
    variance: np.ndarray  # float32 [k, j, i], in [0, 0.25]
    mean: np.ndarray  # float32 [k, j, i], in [0, 1]
    members: int
    slice_axis: str
    slices: List[int] = field(default_factory=list)

    def confident(self, u_th: float = 0.05) -> np.ndarray:
        return self.variance < float(u_th)

    def uncertain_fraction(self, u_th: float = 0.05) -> float:
        """The share of the voxels that any member called foreground with Var >= u_th."""
        region = self.mean > 0
        n = int(region.sum())
        return float((region & ~self.confident(u_th)).sum()) / n if n else 0.0


def _jittered(box, rng: np.random.Generator, jitter: float, shape) -> Tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    w, h = max(1.0, x1 - x0 + 1), max(1.0, y1 - y0 + 1)
    d = rng.uniform(-jitter, jitter, size=4) * np.array([w, h, w, h])
    bx0, by0, bx1, by1 = x0 + d[0], y0 + d[1], x1 + d[2], y1 + d[3]
    rows, cols = shape
    bx0, bx1 = sorted((float(np.clip(bx0, 0, cols - 1)), float(np.clip(bx1, 0, cols - 1))))
    by0, by1 = sorted((float(np.clip(by0, 0, rows - 1)), float(np.clip(by1, 0, rows - 1))))
    return bx0, by0, bx1, by1


def ensemble_uncertainty(
    engine: PromptEngine,
    mask3d: np.ndarray,
    slice_axis: str = "k",
    members: int = 6,
    jitter: float = 0.1,
    margin_slices: int = 1,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
    cancel: Optional[threading.Event] = None,
) -> UncertaintyMap:
    """The prompt-ensemble variance of ``mask3d`` (uint8/bool [k, j, i]) on the engine's volume."""
    vol = engine._require_volume()
    mask3d = np.asarray(mask3d) > 0
    if mask3d.shape != vol.array.shape:
        raise InputError(f"the mask's shape {mask3d.shape} is not the volume's {vol.array.shape}")
    if members < 2:
        raise InputError("an uncertainty ensemble needs at least 2 members")
    if not mask3d.any():
        raise InputError("the segment is empty: there is nothing to estimate the uncertainty of")
    c = IJK_INDEX[slice_axis]
    n = slice_count(vol.array.shape, slice_axis)
    other = tuple(a for a in range(3) if a != 2 - c)
    present = np.nonzero(mask3d.any(axis=other))[0]
    lo, hi = int(present.min()), int(present.max())
    todo = list(range(max(0, lo - margin_slices), min(n - 1, hi + margin_slices) + 1))
    variance = np.zeros(vol.array.shape, np.float32)
    mean = np.zeros(vol.array.shape, np.float32)
    rng = np.random.default_rng(seed)
    box_only = bool(getattr(engine.spec, "box_only", False))
    n_members = 0
    for done, s in enumerate(todo):
        if cancel is not None and cancel.is_set():
            raise CancelledError(f"uncertainty cancelled after {done} of {len(todo)} slices")
        ref = int(present[np.argmin(np.abs(present - s))])  # the nearest slice with mask (s itself if any)
        m2 = slice_of(mask3d, slice_axis, ref)
        box = tuple(float(v) for v in bbox_2d(m2))  # (x0, y0, x1, y1) slice pixels
        emb = engine.embedding(slice_axis, s)
        votes = []
        for i in range(members - 1):
            b = box if i == 0 else _jittered(box, rng, jitter, m2.shape)
            votes.append(engine.predictor.predict(emb, box=b, multimask_output=False).best()[0])
        votes.append(engine.predictor.predict(emb, box=box, mask_input=engine.predictor.mask_to_low_res(m2, emb),
                                              multimask_output=False).best()[0])
        if not box_only:
            col, r = interior_point(m2)
            votes.append(engine.predictor.predict(emb, point_coords=np.array([[col, r]], np.float32),
                                                  point_labels=np.array([1]), multimask_output=False).best()[0])
        stack = np.stack(votes).astype(np.float32)
        n_members = len(votes)
        mu = stack.mean(axis=0)
        slice_of(mean, slice_axis, s)[...] = mu
        slice_of(variance, slice_axis, s)[...] = stack.var(axis=0)
        if progress is not None:
            progress(done + 1, len(todo))
    return UncertaintyMap(variance=variance, mean=mean, members=n_members, slice_axis=slice_axis, slices=todo)
