"""Interactive 3D segmentation with a SAM-Med3D model: clicks in IJK, a mask on the input grid.

``Sam3DEngine(model="sam_med3d_turbo", checkpoint=..., device=...)`` then
``segment(volume, points_ijk, labels, previous=None) -> Sam3DResult``.

Frames and grids
----------------
* Clicks are IJK voxel indices of the input volume (i column, j row, k slice; fractional
  allowed; a point must lie inside the volume, ``-0.5 <= i <= I - 0.5`` etc., else
  :class:`PromptError`). ``labels``: 1 positive (on the object), 0 negative.
* **Working grid G** (``Grid.resampled((t, t, t), extent="cover")``): the volume resampled to
  ``t`` = 1.5 mm isotropic (:func:`samliverseg.core.geometry.resample`, linear, the volume's
  minimum outside) with the *same origin and direction* as the input, so that a point maps by
  a per-axis scaling: ``g_ijk = ijk * spacing_ijk / t`` and ``lps = origin + D @ (t * g_ijk)``
  for both grids. G has ``floor((n - 1/2) s / t) + 1`` voxels along an axis of n voxels of
  spacing s, so it covers the input's extent. Any direction (oblique, flipped) is kept as is.
* **Patch**: a P^3 block of G (P = 128 for SAM-Med3D) whose voxel (0, 0, 0) is G's voxel
  ``start = round(centre) - P/2`` (:class:`PatchBox`); voxels outside G are padded with 0 (as
  SAM-Med3D's CropOrPad does), so a volume smaller than a patch is fine.
* **Model cube**: the patch with its axes permuted/flipped into the order the model expects
  (:class:`CubeLayout`): ``"ras"`` (default; cube axes 0, 1, 2 = the patch axes closest to
  patient R, A, S: the (x, y, z) order in which SAM-Med3D's training reads images through
  torchio, made independent of how a file happens to be stored; training flipped every axis at
  random, so only the order matters) or ``"kji"`` (the array order [k, j, i], as the authors'
  inference helpers feed SimpleITK arrays). Which one the published weights prefer could not be
  checked here (no weights offline). Point prompts are cube voxel coordinates in cube axis order.

Per patch
---------
intensities clipped to [-1000, 1000] HU, then z-scored over the patch's voxels > 0 (SAM-Med3D's
``ZNormalization(masking_method=x > 0)``): ``x' = (x - mean) / std`` (unbiased std) for every
voxel; the encoder gives the embedding (cached per patch). A click is decoded with the previous
low-res logits (4G^3 = 32^3) of that patch as the dense mask prompt (zeros before the first
prediction: the model was trained so). By default each click is given alone with the previous
logits (SAM-Med3D's training default); ``accumulate_clicks`` gives all clicks of the patch.
Logits are upsampled trilinearly to P^3 (align_corners=False), turned into probabilities
(sigmoid), mapped back from the cube to the patch and to G.

Several patches
---------------
Patches are blended on G: ``prob = sum_p w_p prob_p / sum_p w_p`` with a Gaussian weight per
patch (sigma = P/8 about its centre, floor 1e-3), 0 where no patch reaches. An object larger than
a patch (a liver, ~200 mm > 192 mm) is followed by **mask-guided patch sliding**: when the
current mask (prob > 0.5) reaches a face of a patch (``border_voxels`` thick) with at least
``min_border_voxels`` voxels, and that face is not the volume's border, a new patch is placed
``step`` (3/4 of a patch) further along that axis, centred on those voxels in the two other
axes and moved inside the volume, unless less than ``min_new_coverage`` of it is new. Its
prompts come from the current mask: its deepest point inside the new patch (Euclidean distance
transform) as a positive point, the user's clicks that fall into it, and the current mask
(binary, nearest-downsampled to 4G^3) as the dense prompt. Sliding stops when no face qualifies,
when a new patch adds fewer than ``min_new_voxels`` voxels (it is not grown from), or at
``max_patches``.

Refinement: ``segment(volume, new_points, new_labels, previous=result)`` adds clicks. Each new
click refines every patch that contains it, with that patch's previous logits as the mask
prompt; a positive click outside all patches opens a new patch centred on it; a negative click
outside all patches is ignored (the mask is empty there) and reported. Sliding then runs again.

Back to the input grid: the blended probability on G is resampled linearly onto the input grid
and thresholded at 0.5 (only over the box where it can exceed 0.5: :func:`grid_to_input_mask`);
by default only the connected components that contain a positive click
are kept (all of them when no positive click is inside the mask).
"""

from __future__ import annotations

import copy
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from samliverseg.models.build_sam3d import LAYOUTS, Model3DSpec, build_model3d, get_spec3d
from samliverseg.core.devices import resolve_device
from samliverseg.core.errors import CancelledError, InputError, PromptError
from samliverseg.modeling3d import Sam3DModel
from samliverseg.core.postprocess import label_components
from samliverseg.core.geometry import LPS_TO_RAS, Grid, resample
from samliverseg.io.volume import Volume

Int3 = Tuple[int, int, int]
Float3 = Tuple[float, float, float]

# ============================================================================ geometry (pure)


def input_ijk_to_grid_ijk(ijk: Any, input_grid: Grid, work_grid: Grid) -> np.ndarray:
    """IJK of the input grid -> continuous IJK of the working grid (same origin and direction)."""
    return np.asarray(ijk, dtype=float) * np.asarray(input_grid.spacing) / np.asarray(work_grid.spacing)


def grid_to_input_mask(prob: np.ndarray, work_grid: Grid, input_grid: Grid, threshold: float = 0.5) -> np.ndarray:
    """``prob`` resampled linearly (0 outside) onto the input grid, ``> threshold``, as uint8 [k, j, i],
    computed only over the input voxels
    that can exceed the threshold: those within one working voxel of a working voxel above it
    (linear interpolation cannot exceed its neighbours)."""
    out = np.zeros(input_grid.shape_kji, dtype=np.uint8)
    above = prob > threshold
    if not above.any():
        return out
    idx = np.argwhere(above)
    shape = np.asarray(prob.shape)
    lo = np.maximum(idx.min(axis=0) - 1, 0)[::-1]  # IJK order from here on
    hi = np.minimum(idx.max(axis=0) + 1, shape - 1)[::-1]
    ratio = np.asarray(work_grid.spacing) / np.asarray(input_grid.spacing)  # working index -> input index
    n_in = np.asarray(input_grid.shape_kji)[::-1]
    x_lo = np.clip(np.floor(lo * ratio - 1e-6).astype(int), 0, n_in - 1)
    x_hi = np.clip(np.ceil(hi * ratio + 1e-6).astype(int), 0, n_in - 1)
    size = x_hi - x_lo + 1
    sub = input_grid.sub_grid(x_lo, size)
    part = resample(np.asarray(prob, dtype=np.float32), work_grid, sub, interpolator="linear", default_value=0.0).array > threshold
    out[x_lo[2]:x_hi[2] + 1, x_lo[1]:x_hi[1] + 1, x_lo[0]:x_hi[0] + 1] = part
    return out


@dataclass(frozen=True)
class PatchBox:
    """A cube of ``size`` voxels of a grid whose voxel (0, 0, 0) is grid voxel ``start_kji``."""

    start_kji: Int3
    size: int

    @property
    def centre_kji(self) -> Int3:
        return tuple(s + self.size // 2 for s in self.start_kji)  # type: ignore[return-value]

    def contains(self, point_kji: Sequence[float]) -> bool:
        return all(s - 0.5 <= p <= s + self.size - 0.5 for s, p in zip(self.start_kji, point_kji))

    def overlap(self, shape_kji: Sequence[int]) -> Optional[Tuple[Tuple[slice, ...], Tuple[slice, ...]]]:
        """(grid slices, patch slices) of the part of the patch inside a grid; None if disjoint."""
        g, p = [], []
        for s, n in zip(self.start_kji, shape_kji):
            lo, hi = max(s, 0), min(s + self.size, int(n))
            if hi <= lo:
                return None
            g.append(slice(lo, hi))
            p.append(slice(lo - s, hi - s))
        return tuple(g), tuple(p)


def patch_around(centre_kji: Sequence[float], size: int) -> PatchBox:
    """The patch whose voxel (size/2, size/2, size/2) is the grid voxel nearest ``centre_kji``."""
    return PatchBox(tuple(int(round(c)) - size // 2 for c in centre_kji), int(size))  # type: ignore[arg-type]


def crop_patch(array_kji: np.ndarray, box: PatchBox, pad_value: float = 0.0) -> np.ndarray:
    """The patch of a grid array, padded with ``pad_value`` outside the grid."""
    out = np.full((box.size,) * 3, pad_value, dtype=array_kji.dtype)
    ov = box.overlap(array_kji.shape)
    if ov is not None:
        out[ov[1]] = array_kji[ov[0]]
    return out


@dataclass(frozen=True)
class CubeLayout:
    """How a patch [k, j, i] becomes the model's cube: cube axis m is IJK axis ``axes[m]``
    (0 = i, 1 = j, 2 = k), reversed when ``flips[m]``."""

    axes: Int3
    flips: Tuple[bool, bool, bool]

    def describe(self) -> str:
        return ",".join(("-" if f else "+") + "ijk"[a] for a, f in zip(self.axes, self.flips))


def layout_for(direction: Any, kind: str = "ras") -> CubeLayout:
    """``"kji"``: the array order. ``"ras"``: cube axes = the IJK axes closest to patient R, A, S
    (nearest orthant, flipped where they point the other way), like nibabel's closest canonical."""
    if kind == "kji":
        return CubeLayout((2, 1, 0), (False, False, False))
    if kind != "ras":
        raise InputError(f"unknown layout {kind!r}: use one of {', '.join(LAYOUTS)}")
    ras = LPS_TO_RAS @ np.asarray(direction, dtype=float)  # rows R, A, S; columns i, j, k
    score = np.abs(ras).copy()
    axes = [-1, -1, -1]
    for _ in range(3):
        m, a = np.unravel_index(int(np.argmax(score)), score.shape)
        axes[m] = int(a)
        score[m, :] = -1.0
        score[:, a] = -1.0
    flips = tuple(bool(ras[m, axes[m]] < 0) for m in range(3))
    return CubeLayout(tuple(axes), flips)  # type: ignore[arg-type]


def patch_to_cube(patch_kji: np.ndarray, layout: CubeLayout) -> np.ndarray:
    """A patch [k, j, i] -> the model cube [c0, c1, c2] (a view where possible)."""
    out = np.transpose(patch_kji, [2 - a for a in layout.axes])
    for m, f in enumerate(layout.flips):
        if f:
            out = np.flip(out, axis=m)
    return out


def cube_to_patch(cube: np.ndarray, layout: CubeLayout) -> np.ndarray:
    """Inverse of :func:`patch_to_cube`."""
    out = cube
    for m, f in enumerate(layout.flips):
        if f:
            out = np.flip(out, axis=m)
    perm = [2 - a for a in layout.axes]  # cube axis m holds array axis perm[m]
    return np.transpose(out, np.argsort(perm))


def patch_point_to_cube(point_kji: Sequence[float], box: PatchBox, layout: CubeLayout) -> np.ndarray:
    """A grid point (k, j, i) -> continuous cube coordinates (c0, c1, c2)."""
    local_kji = np.asarray(point_kji, dtype=float) - np.asarray(box.start_kji, dtype=float)
    local_ijk = local_kji[::-1]
    out = np.empty(3)
    for m, (a, f) in enumerate(zip(layout.axes, layout.flips)):
        out[m] = (box.size - 1) - local_ijk[a] if f else local_ijk[a]
    return out


def cube_index_to_grid_kji(cube_index: Sequence[float], box: PatchBox, layout: CubeLayout) -> np.ndarray:
    """Cube coordinates (c0, c1, c2) -> grid point (k, j, i) (inverse of patch_point_to_cube)."""
    local_ijk = np.empty(3)
    for m, (a, f) in enumerate(zip(layout.axes, layout.flips)):
        c = float(cube_index[m])
        local_ijk[a] = (box.size - 1) - c if f else c
    return local_ijk[::-1] + np.asarray(box.start_kji, dtype=float)


def gaussian_weight(size: int, sigma_frac: float = 0.125, floor: float = 1e-3) -> np.ndarray:
    """Separable Gaussian importance of a patch's voxels (peak 1 at the centre)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-0.5 * (x / (sigma_frac * size)) ** 2)
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    return np.maximum(w, floor).astype(np.float32)


def blend_patches(shape_kji: Sequence[int], patches: Sequence[Tuple[PatchBox, np.ndarray]],
                  weight: Optional[np.ndarray] = None) -> np.ndarray:
    """Weighted mean of per-patch values (each [k, j, i] of its box) on a grid; 0 where none."""
    num = np.zeros(tuple(shape_kji), dtype=np.float32)
    den = np.zeros(tuple(shape_kji), dtype=np.float32)
    for box, values in patches:
        ov = box.overlap(shape_kji)
        if ov is None:
            continue
        w = weight if weight is not None and weight.shape == values.shape else np.ones(values.shape, np.float32)
        num[ov[0]] += (w * values)[ov[1]]
        den[ov[0]] += w[ov[1]]
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def sliding_candidates(boxes: Sequence[PatchBox], mask_g: np.ndarray, border_voxels: int = 2,
                       min_border_voxels: int = 32, step_fraction: float = 0.75, skip: Sequence[bool] = (),
                       min_new_coverage: float = 0.1) -> List[Tuple[int, Int3]]:
    """Where to put the next patches so that a mask that leaves its patches is followed.

    For every face of every patch (``skip[n]`` True: patch n is not grown from) that is not at or
    beyond the grid's border, count the mask voxels in the face's outer ``border_voxels`` layers;
    with at least ``min_border_voxels`` of them, propose a patch ``round(step_fraction * size)``
    voxels further along that axis, centred on those voxels in the two other axes; the proposal
    is moved to lie inside the grid (centred on an axis shorter than a patch). Proposals whose
    in-grid part is less than ``min_new_coverage`` new (not covered by any patch) are dropped.
    Returns [(count, centre_kji)], the largest count first.
    """
    shape = tuple(int(n) for n in mask_g.shape)
    covered = np.zeros(shape, dtype=bool)
    for box in boxes:
        ov = box.overlap(shape)
        if ov is not None:
            covered[ov[0]] = True
    out: List[Tuple[int, Int3]] = []
    b = max(1, int(border_voxels))
    for n_box, box in enumerate(boxes):
        if n_box < len(skip) and skip[n_box]:
            continue
        size, start = box.size, box.start_kji
        step = max(1, int(round(step_fraction * size)))
        for ax in range(3):
            for side in (-1, 1):
                if (side < 0 and start[ax] <= 0) or (side > 0 and start[ax] + size >= shape[ax]):
                    continue  # this face is at or beyond the volume's border
                face_lo = start[ax] if side < 0 else start[ax] + size - b
                sl = []
                for a in range(3):
                    lo, hi = (face_lo, face_lo + b) if a == ax else (start[a], start[a] + size)
                    sl.append(slice(max(lo, 0), max(min(hi, shape[a]), 0)))
                face = mask_g[tuple(sl)]
                count = int(np.count_nonzero(face))
                if count < min_border_voxels:
                    continue
                idx = np.argwhere(face)
                centre = [float(idx[:, a].mean()) + sl[a].start for a in range(3)]
                centre[ax] = float(box.centre_kji[ax] + side * step)
                c = []
                for a in range(3):
                    v = int(round(centre[a]))
                    v = min(max(v, size // 2), shape[a] - size + size // 2) if shape[a] >= size else shape[a] // 2
                    c.append(v)
                cand = patch_around(c, size)
                ov = cand.overlap(shape)
                if ov is None or tuple(c) in [o[1] for o in out]:
                    continue
                region = covered[ov[0]]
                if np.count_nonzero(~region) < min_new_coverage * region.size:
                    continue
                out.append((count, tuple(c)))  # type: ignore[arg-type]
    out.sort(key=lambda t: -t[0])
    return out


def zscore_patch(patch: np.ndarray, clip_hu: Optional[Tuple[float, float]] = (-1000.0, 1000.0)) -> np.ndarray:
    """SAM-Med3D's intensity normalisation: clip, then z-score with the mean and (unbiased) std of
    the voxels > 0, applied to every voxel (all voxels when fewer than 2 are > 0)."""
    x = patch.astype(np.float32, copy=True)
    if clip_hu is not None:
        np.clip(x, clip_hu[0], clip_hu[1], out=x)
    sel = x[x > 0]
    if sel.size < 2:
        sel = x.ravel()
    mean = float(sel.mean(dtype=np.float64))
    std = float(sel.std(dtype=np.float64, ddof=1)) if sel.size > 1 else 0.0
    if not np.isfinite(std) or std < 1e-6:
        std = 1.0
    x -= mean
    x /= std
    return x


# ============================================================================ results and state


@dataclass
class PatchState:
    """One patch of a session: where it is, its latest low-res logits (cube layout), how it came."""

    box: PatchBox
    logits: torch.Tensor  # (1, 1, L, L, L) float32 on the CPU
    origin: str  # "click" | "grow"
    iou: float = float("nan")
    grow_exhausted: bool = False


@dataclass
class Sam3DState:
    """What a later call needs to refine a result (keep it; pass the result as ``previous``)."""

    volume_key: str
    model_name: str
    layout: CubeLayout
    work_grid: Grid
    clicks_ijk: List[Float3] = field(default_factory=list)
    labels: List[int] = field(default_factory=list)
    patches: List[PatchState] = field(default_factory=list)


@dataclass
class Sam3DResult:
    """mask: uint8 [k, j, i] on the input grid (1 inside); report: JSON-friendly; state: for refinement."""

    mask: np.ndarray
    report: dict
    state: Sam3DState


@dataclass
class Sam3DSettings:
    """Knobs of :class:`Sam3DEngine` (None: the model spec's value)."""

    target_spacing_mm: Optional[float] = None
    layout: Optional[str] = None
    clip_hu: Optional[Tuple[float, float]] = None
    grow: bool = True
    max_patches: int = 8
    border_voxels: int = 2
    min_border_voxels: int = 32
    min_new_voxels: int = 64
    step_fraction: float = 0.75
    min_new_coverage: float = 0.1
    threshold: float = 0.5
    accumulate_clicks: bool = False
    keep_clicked_components: bool = True
    cache_size: int = 16


@dataclass
class _Prepared:
    key: str
    input_grid: Grid
    work_grid: Grid
    array: np.ndarray  # HU on the working grid [k, j, i]


def volume_key(volume: Volume) -> str:
    """A fingerprint of a volume's geometry and (subsampled) voxels, to recognise it again."""
    arr = np.ascontiguousarray(volume.array[::3, ::3, ::3])
    h = zlib.crc32(arr.tobytes())
    h = zlib.crc32(np.asarray([*volume.array.shape, *volume.spacing, *volume.origin, *np.ravel(volume.direction)],
                              dtype=np.float64).tobytes(), h)
    return f"{h:08x}"


def validate_clicks(shape_kji: Sequence[int], points_ijk, labels, first_call: bool = True) -> Tuple[List[Float3], List[int]]:
    """Check clicks against a volume of numpy shape (K, J, I); return them as (points, labels).

    PromptError for: no click, a label count that differs, a label other than 1/0, a point
    outside the volume (``-0.5 <= i <= I - 0.5`` etc.), and on a first call no positive click.
    On a first call the first positive click is moved to the front (it opens the first patch).
    """
    try:
        pts = np.asarray(points_ijk, dtype=float).reshape(-1, 3) if len(points_ijk) else np.zeros((0, 3))
    except (TypeError, ValueError):
        raise PromptError("clicks must be a list of (i, j, k) points") from None
    labs = list(labels)
    if len(pts) == 0:
        raise PromptError("no click given: give at least one point on the object")
    if len(labs) != len(pts):
        raise PromptError(f"{len(pts)} clicks but {len(labs)} labels: give one label (1 positive, 0 negative) per click")
    out_labels = []
    for lab in labs:
        if isinstance(lab, (bool, np.bool_)) or (isinstance(lab, (int, np.integer)) and int(lab) in (0, 1)):
            out_labels.append(int(lab))
        else:
            raise PromptError(f"click label {lab!r} is not 1 (positive) or 0 (negative)")
    nk, nj, ni = (int(n) for n in shape_kji)
    for p in pts:
        if not (np.isfinite(p).all() and all(-0.5 <= v <= n - 0.5 for v, n in zip(p, (ni, nj, nk)))):
            raise PromptError(f"point ({', '.join(f'{v:g}' for v in p)}) is outside the volume "
                              f"(valid i 0..{ni - 1}, j 0..{nj - 1}, k 0..{nk - 1})")
    clicks = [tuple(float(v) for v in p) for p in pts]
    if first_call:
        if 1 not in out_labels:
            raise PromptError("the first click must be positive (on the object); negative clicks refine a result")
        first = out_labels.index(1)
        order = [first] + [i for i in range(len(clicks)) if i != first]
        clicks, out_labels = [clicks[i] for i in order], [out_labels[i] for i in order]
    return clicks, out_labels  # type: ignore[return-value]


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


# ============================================================================ engine


class Sam3DEngine:
    """A SAM-Med3D model and the pipeline around it (see the module docstring).

    model: a registered 3D model name (``sam_med3d``, ``sam_med3d_turbo``, ``sam_med3d_tiny``), a
    :class:`Model3DSpec`, or an already built :class:`Sam3DModel` (its ``spec`` is used, or
    SAM-Med3D's preprocessing when it has none).
    """

    def __init__(self, model: Union[str, Model3DSpec, Sam3DModel] = "sam_med3d_turbo", checkpoint=None,
                 device: Union[str, torch.device, None] = "auto", settings: Optional[Sam3DSettings] = None) -> None:
        self.device = resolve_device(device)
        if isinstance(model, Sam3DModel):
            self.model = model.to(self.device).eval()
            spec = model.spec
            if spec is None:
                spec = Model3DSpec(name="custom", description="a SAM-Med3D-style model given as an object",
                                   builder=lambda: model, checkpoint_filename="", architecture="SAM-Med3D-style",
                                   image_size=model.image_size)
            self.spec: Model3DSpec = spec
        else:
            self.spec = get_spec3d(model)
            self.model = build_model3d(self.spec, checkpoint=checkpoint, device=self.device)
        self.settings = settings or Sam3DSettings()
        self._lock = threading.RLock()
        self._prepared: Optional[_Prepared] = None
        self._embeddings: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.encode_times: List[float] = []
        self.decode_times: List[float] = []

    # -- configuration -------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return int(self.model.image_size)

    @property
    def target_spacing(self) -> float:
        return float(self.settings.target_spacing_mm or self.spec.target_spacing_mm)

    @property
    def layout_kind(self) -> str:
        return self.settings.layout or self.spec.layout

    @property
    def clip_hu(self) -> Optional[Tuple[float, float]]:
        return self.settings.clip_hu if self.settings.clip_hu is not None else self.spec.clip_hu

    def clear_cache(self) -> None:
        """Forget the prepared volume and the cached patch embeddings."""
        with self._lock:
            self._prepared = None
            self._embeddings.clear()

    # -- preparation ---------------------------------------------------------------------------
    def prepare(self, volume: Volume) -> _Prepared:
        """Resample the volume to the working grid (cached for the last volume seen)."""
        key = f"{volume_key(volume)}@{self.target_spacing:g}"
        with self._lock:
            if self._prepared is not None and self._prepared.key == key:
                return self._prepared
            input_grid = volume.grid
            t = self.target_spacing
            work = input_grid.resampled((t, t, t), extent="cover")
            arr = resample(volume.array.astype(np.float32, copy=False), input_grid, work, interpolator="linear",
                           default_value=float(np.min(volume.array))).array
            self._prepared = _Prepared(key, input_grid, work, arr)
            self._embeddings.clear()
            return self._prepared

    def _embedding(self, prep: _Prepared, box: PatchBox, layout: CubeLayout) -> torch.Tensor:
        key = (prep.key, box.start_kji, layout)
        emb = self._embeddings.get(key)
        if emb is not None:
            self._embeddings.move_to_end(key)
            return emb
        cube = patch_to_cube(crop_patch(prep.array, box, 0.0), layout)
        x = torch.from_numpy(np.ascontiguousarray(zscore_patch(cube, self.clip_hu)))[None, None].to(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            emb = self.model.encode(x)
        self.encode_times.append(time.perf_counter() - t0)
        self._embeddings[key] = emb
        while len(self._embeddings) > max(1, int(self.settings.cache_size)):
            self._embeddings.popitem(last=False)
        return emb

    def _decode(self, emb: torch.Tensor, points_cube: np.ndarray, labels: Sequence[int],
                mask_logits: torch.Tensor) -> Tuple[torch.Tensor, float]:
        coords = torch.as_tensor(np.asarray(points_cube, dtype=np.float32).reshape(1, -1, 3), device=self.device)
        labs = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(1, -1), device=self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            low, iou = self.model.decode(emb, points=(coords, labs), masks=mask_logits.to(self.device))
        self.decode_times.append(time.perf_counter() - t0)
        return low.float().cpu(), float(iou.flatten()[0])

    def _zero_logits(self) -> torch.Tensor:
        n = self.model.low_res_size
        return torch.zeros(1, 1, n, n, n)

    def patch_probability(self, state: PatchState, layout: CubeLayout) -> np.ndarray:
        """A patch's probabilities [k, j, i] of its box (logits upsampled trilinearly, sigmoid)."""
        p = self.patch_size
        with torch.inference_mode():
            up = F.interpolate(state.logits, size=(p, p, p), mode="trilinear", align_corners=False)
            prob = torch.sigmoid(up)[0, 0].numpy()
        return np.ascontiguousarray(cube_to_patch(prob, layout))

    def _compose(self, prep: _Prepared, st: Sam3DState) -> np.ndarray:
        weight = gaussian_weight(self.patch_size)
        return blend_patches(prep.work_grid.shape_kji,
                             [(p.box, self.patch_probability(p, st.layout)) for p in st.patches], weight)

    # -- the API -------------------------------------------------------------------------------
    def segment(self, volume: Volume, points_ijk: Sequence[Sequence[float]], labels: Sequence[int],
                previous: Optional[Sam3DResult] = None, progress: Optional[Callable[[int, int], None]] = None,
                cancel: Any = None) -> Sam3DResult:
        """Segment the object under the clicks; see the module docstring.

        points_ijk: IJK clicks of this call (N x 3); labels: 1 positive / 0 negative, one per click.
        previous: a result of an earlier call on the same volume: these clicks are added to its
        clicks and refine it. progress(done, max): after each patch; cancel: a callable or an
        Event, polled between patches (raises CancelledError).
        """
        t_start = time.perf_counter()
        clicks, labs = validate_clicks(volume.array.shape, points_ijk, labels, first_call=previous is None)
        with self._lock:
            n_enc0, n_dec0 = len(self.encode_times), len(self.decode_times)
            t0 = time.perf_counter()
            prep = self.prepare(volume)
            t_prep = time.perf_counter() - t0
            if previous is not None:
                st = previous.state
                if st.volume_key != prep.key or st.model_name != self.spec.name:
                    raise InputError("the previous result was made on another volume or with another model; "
                                     "start again without it")
                st = Sam3DState(st.volume_key, st.model_name, st.layout, st.work_grid, list(st.clicks_ijk),
                                list(st.labels), [copy.copy(p) for p in st.patches])
            else:
                st = Sam3DState(prep.key, self.spec.name, layout_for(prep.work_grid.direction_matrix, self.layout_kind),
                                prep.work_grid)
            ignored: List[Float3] = []
            total = max(1, int(self.settings.max_patches))
            for click, lab in zip(clicks, labs):
                self._check_cancel(cancel)
                if not self._apply_click(prep, st, click, lab):
                    ignored.append(click)
                if progress is not None:
                    progress(min(len(st.patches), total), total)
            prob = self._compose(prep, st)
            if self.settings.grow:
                prob = self._grow(prep, st, prob, progress, cancel)
            t1 = time.perf_counter()
            mask = grid_to_input_mask(prob, prep.work_grid, prep.input_grid, float(self.settings.threshold))
            if self.settings.keep_clicked_components:
                mask = keep_clicked_components(mask, [c for c, l in zip(st.clicks_ijk, st.labels) if l == 1])
            t_back = time.perf_counter() - t1
        report = self._report(volume, st, mask, ignored, prep, t_prep, t_back, time.perf_counter() - t_start,
                              n_enc0, n_dec0)
        return Sam3DResult(mask=mask, report=report, state=st)

    # -- steps ---------------------------------------------------------------------------------
    @staticmethod
    def _check_cancel(cancel) -> None:
        if _is_cancelled(cancel):
            raise CancelledError("3D segmentation cancelled")

    def _to_grid_kji(self, prep: _Prepared, click_ijk: Float3) -> np.ndarray:
        return input_ijk_to_grid_ijk(click_ijk, prep.input_grid, prep.work_grid)[::-1]

    def _points_in(self, prep: _Prepared, st: Sam3DState, box: PatchBox) -> Tuple[List[np.ndarray], List[int]]:
        pts, labs = [], []
        for c, lab in zip(st.clicks_ijk, st.labels):
            g = self._to_grid_kji(prep, c)
            if box.contains(g):
                pts.append(patch_point_to_cube(g, box, st.layout))
                labs.append(lab)
        return pts, labs

    def _apply_click(self, prep: _Prepared, st: Sam3DState, click: Float3, label: int) -> bool:
        """Refine the patches containing the click, or open one for a positive click; False if ignored."""
        g = self._to_grid_kji(prep, click)
        st.clicks_ijk.append(click)
        st.labels.append(label)
        targets = [p for p in st.patches if p.box.contains(g)]
        if not targets:
            if label != 1:
                return False
            targets = [PatchState(patch_around(g, self.patch_size), self._zero_logits(), "click")]
            st.patches.append(targets[0])
        for p in targets:
            emb = self._embedding(prep, p.box, st.layout)
            if self.settings.accumulate_clicks:
                pts, labs = self._points_in(prep, st, p.box)
            else:
                pts, labs = [patch_point_to_cube(g, p.box, st.layout)], [label]
            p.logits, p.iou = self._decode(emb, np.stack(pts), labs, p.logits)
            p.grow_exhausted = False
        return True

    def _grow(self, prep: _Prepared, st: Sam3DState, prob: np.ndarray, progress, cancel) -> np.ndarray:
        s = self.settings
        thr = float(s.threshold)
        total = max(1, int(s.max_patches))
        while len(st.patches) < total:
            self._check_cancel(cancel)
            mask_g = prob > thr
            cands = sliding_candidates([p.box for p in st.patches], mask_g, s.border_voxels, s.min_border_voxels,
                                       s.step_fraction, [p.grow_exhausted for p in st.patches], s.min_new_coverage)
            added = False
            for _, centre in cands:
                box = patch_around(centre, self.patch_size)
                region = crop_patch(mask_g, box, False)
                b = max(1, int(s.border_voxels))
                inner = np.zeros_like(region)
                inner[b:-b, b:-b, b:-b] = region[b:-b, b:-b, b:-b]
                if not inner.any():
                    continue
                dist = ndimage.distance_transform_edt(inner)
                seed_local = np.unravel_index(int(np.argmax(dist)), dist.shape)
                seed_g = np.asarray(seed_local, dtype=float) + np.asarray(box.start_kji, dtype=float)
                pts = [patch_point_to_cube(seed_g, box, st.layout)]
                labs = [1]
                extra_pts, extra_labs = self._points_in(prep, st, box)
                pts += extra_pts
                labs += extra_labs
                prior = torch.from_numpy(np.ascontiguousarray(patch_to_cube(region.astype(np.float32), st.layout)))
                n = self.model.low_res_size
                prior = F.interpolate(prior[None, None], size=(n, n, n), mode="nearest")
                emb = self._embedding(prep, box, st.layout)
                logits, iou = self._decode(emb, np.stack(pts), labs, prior)
                patch = PatchState(box, logits, "grow", iou)
                st.patches.append(patch)
                new_prob = self._compose(prep, st)
                gained = int(np.count_nonzero((new_prob > thr) & ~mask_g))
                if gained < s.min_new_voxels:
                    patch.grow_exhausted = True
                prob = new_prob
                added = True
                if progress is not None:
                    progress(min(len(st.patches), total), total)
                break
            if not added:
                break
        return prob

    def _report(self, volume: Volume, st: Sam3DState, mask: np.ndarray, ignored, prep: _Prepared, t_prep: float,
                t_back: float, t_total: float, n_enc0: int, n_dec0: int) -> dict:
        enc = self.encode_times[n_enc0:]
        dec = self.decode_times[n_dec0:]
        ks = np.flatnonzero(mask.any(axis=(1, 2)))
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        scale = np.asarray(prep.work_grid.spacing) / np.asarray(prep.input_grid.spacing)
        return {
            "model": self.spec.name,
            "device": str(self.device),
            "layout": self.layout_kind,
            "cube_axes": st.layout.describe(),
            "target_spacing_mm": self.target_spacing,
            "patch_size": self.patch_size,
            "work_grid_shape_kji": list(prep.work_grid.shape_kji),
            "clicks": [{"ijk": [round(v, 3) for v in c], "label": int(l)} for c, l in zip(st.clicks_ijk, st.labels)],
            "ignored_clicks_ijk": [[round(v, 3) for v in c] for c in ignored],
            "patches": [{"centre_ijk": [round(float(v), 2) for v in np.asarray(p.box.centre_kji[::-1]) * scale],
                         "origin": p.origin, "iou_pred": None if not np.isfinite(p.iou) else round(p.iou, 4)}
                        for p in st.patches],
            "voxels": int(mask.sum()),
            "volume_ml": round(int(mask.sum()) * voxel_ml, 3),
            "slices_with_mask": [int(ks[0]), int(ks[-1])] if ks.size else [],
            "timings": {
                "patches_encoded": len(enc),
                "encode_s_per_patch": round(float(np.mean(enc)), 3) if enc else None,
                "decodes": len(dec),
                "decode_ms": round(1000 * float(np.mean(dec)), 2) if dec else None,
                "resample_s": round(t_prep, 3),
                "back_to_input_s": round(t_back, 3),
                "total_s": round(t_total, 3),
            },
        }


def keep_clicked_components(mask: np.ndarray, positive_ijk: Sequence[Float3]) -> np.ndarray:
    """Keep the connected components of ``mask`` [k, j, i] that contain a positive click; all of
    them when none does (the model missed the click: the user sees it and clicks again)."""
    lab, n = label_components(mask)
    if n == 0:
        return mask
    nk, nj, ni = mask.shape
    keep = set()
    for i, j, k in positive_ijk:
        kk, jj, ii = (min(max(int(round(v)), 0), m - 1) for v, m in ((k, nk), (j, nj), (i, ni)))
        if lab[kk, jj, ii]:
            keep.add(int(lab[kk, jj, ii]))
    if not keep:
        return mask
    return np.isin(lab, sorted(keep)).astype(np.uint8)


__all__ = [
    "CubeLayout", "PatchBox", "PatchState", "Sam3DEngine", "Sam3DResult", "Sam3DSettings", "Sam3DState",
    "blend_patches", "crop_patch", "cube_index_to_grid_kji", "cube_to_patch", "gaussian_weight",
    "grid_to_input_mask", "input_ijk_to_grid_ijk", "keep_clicked_components", "layout_for",
    "patch_around", "patch_point_to_cube", "patch_to_cube", "sliding_candidates", "validate_clicks", "volume_key",
    "zscore_patch",
]
