"""Segmentation metrics (MONAI): Dice, IoU, precision, recall, HD95 and ASSD in mm, volumes in ml.

:func:`evaluate` compares two binary masks on one grid; :func:`evaluate_files` reads two label
images with SimpleITK, checks that they share a grid and evaluates a label of each.

Spacing: the library gives spacing in IJK order ``(si, sj, sk)``; arrays are ``[k, j, i]``, so
the spacing handed to MONAI is reversed to ``(sk, sj, si)`` to match the array axes (the tests
check this with planes a known distance apart along ``k``). Surface distances use MONAI's
surface voxels (mask minus its erosion; a mask touching the array border has a surface there)
and the Euclidean distance in mm. ``hd95_mm`` is the symmetric 95th-percentile Hausdorff
distance (the larger of the two directed 95th percentiles), ``assd_mm`` the average symmetric
surface distance (the mean over the surface voxels of both masks).

Edge cases (by definition, MONAI is not called for them):

* both masks empty: dice = iou = precision = recall = 1, hd95 = assd = 0, ``empty = "both"``;
* exactly one empty: dice = iou = precision = recall = 0, hd95 = assd = ``inf``,
  ``empty = "pred"`` or ``"ref"`` and a ``note``. :func:`samliverseg.core.jsonutil.json_safe`
  turns ``inf`` into ``None`` (JSON ``null``) so that the report stays valid JSON; keep the note
  with it.

:func:`dice` is the project's one Dice (MONAI's ``compute_dice``, the same edge cases), for
callers that need only the overlap.

Otherwise precision = TP / (TP + FP) and recall = TP / (TP + FN) are always defined (both masks
are non-empty; precision is 0 when nothing predicted overlaps, as is recall).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Dict, Iterable, Optional, Sequence, Union

import numpy as np

from samliverseg.core.errors import InputError
from samliverseg.core.geometry import Grid

__all__ = ["dice", "evaluate", "evaluate_files", "METRIC_KEYS"]

METRIC_KEYS = ("dice", "iou", "precision", "recall", "hd95_mm", "assd_mm",
               "volume_pred_ml", "volume_ref_ml", "voxels_pred", "voxels_ref")

LabelSpec = Optional[Union[int, Sequence[int]]]


def _to_tensor(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float64)[None, None])


def _monai_dice(pred_t, ref_t) -> float:
    """MONAI's Dice of two (1, 1, ...) tensors: the one Dice formula of the project."""
    from monai.metrics import compute_dice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(compute_dice(pred_t, ref_t, include_background=True)[0, 0])


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two masks of one shape (non-zero = foreground): 1.0 when both are empty, 0.0 when
    exactly one is (as :func:`evaluate`), else MONAI's ``compute_dice``."""
    p = np.asarray(pred) != 0
    r = np.asarray(ref) != 0
    if p.shape != r.shape:
        raise InputError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    n_pred, n_ref = int(p.sum()), int(r.sum())
    if n_pred == 0 or n_ref == 0:
        return 1.0 if n_pred == n_ref else 0.0
    p, r = _crop_joint(p, r, margin=0)
    return _monai_dice(_to_tensor(p), _to_tensor(r))


def evaluate(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> Dict[str, object]:
    """Metrics of ``pred`` against ``ref`` (non-zero = foreground) on one grid.

    ``pred`` and ``ref`` are ``[k, j, i]`` (or 2D ``[j, i]``) arrays of one shape; ``spacing``
    is in IJK order ``(si, sj, sk)`` (``(si, sj)`` in 2D), in mm. Returns a dict with the keys of
    :data:`METRIC_KEYS` (floats; voxel counts as int), plus ``empty`` (``"none"``, ``"both"``,
    ``"pred"`` or ``"ref"``) and, for an empty mask, a ``note``. See the module notes for the
    edge cases.
    """
    p = np.asarray(pred) != 0
    r = np.asarray(ref) != 0
    if p.shape != r.shape:
        raise InputError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    if p.ndim not in (2, 3):
        raise InputError(f"masks must be 2D or 3D, got {p.ndim}D")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != p.ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"spacing must be {p.ndim} positive numbers in IJK order, got {spacing}")
    spacing_array_order = tuple(reversed(spacing))  # (sk, sj, si) for array[k, j, i]

    n_pred, n_ref = int(p.sum()), int(r.sum())
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out: Dict[str, object] = {
        "volume_pred_ml": n_pred * voxel_ml, "volume_ref_ml": n_ref * voxel_ml,
        "voxels_pred": n_pred, "voxels_ref": n_ref,
    }
    if n_pred == 0 and n_ref == 0:
        out.update(dice=1.0, iou=1.0, precision=1.0, recall=1.0, hd95_mm=0.0, assd_mm=0.0, empty="both")
        return _ordered(out)
    if n_pred == 0 or n_ref == 0:
        which = "pred" if n_pred == 0 else "ref"
        what = "prediction" if which == "pred" else "reference"
        out.update(dice=0.0, iou=0.0, precision=0.0, recall=0.0, hd95_mm=math.inf, assd_mm=math.inf, empty=which,
                   note=f"the {what} is empty: overlap metrics are 0 and surface distances are undefined "
                        "(inf; null in JSON)")
        return _ordered(out)

    from monai.metrics import (compute_average_surface_distance, compute_confusion_matrix_metric,
                               compute_hausdorff_distance, compute_iou, get_confusion_matrix)

    # crop both masks to their joint bounding box plus a margin: same metrics, far less work
    p, r = _crop_joint(p, r, margin=2)
    tp_, tr_ = _to_tensor(p), _to_tensor(r)
    dice_value = _monai_dice(tp_, tr_)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        iou = float(compute_iou(tp_, tr_, include_background=True)[0, 0])
        cm = get_confusion_matrix(tp_, tr_, include_background=True)
        precision = float(compute_confusion_matrix_metric("precision", cm)[0, 0])
        recall = float(compute_confusion_matrix_metric("sensitivity", cm)[0, 0])
        hd95 = float(compute_hausdorff_distance(tp_, tr_, include_background=True, percentile=95,
                                                spacing=spacing_array_order)[0, 0])
        assd = float(compute_average_surface_distance(tp_, tr_, include_background=True, symmetric=True,
                                                      spacing=spacing_array_order)[0, 0])
    out.update(dice=dice_value, iou=iou, precision=_nan_to(precision, 0.0), recall=_nan_to(recall, 0.0),
               hd95_mm=hd95, assd_mm=assd, empty="none")
    return _ordered(out)


def _nan_to(v: float, default: float) -> float:
    return default if math.isnan(v) else v


def _crop_joint(p: np.ndarray, r: np.ndarray, margin: int):
    both = p | r
    sl = []
    for ax in range(both.ndim):
        idx = np.flatnonzero(both.any(axis=tuple(x for x in range(both.ndim) if x != ax)))
        sl.append(slice(max(0, idx[0] - margin), min(both.shape[ax], idx[-1] + margin + 1)))
    # a mask that touched the array border keeps touching the crop border: surfaces are unchanged
    return p[tuple(sl)], r[tuple(sl)]


def _ordered(d: Dict[str, object]) -> Dict[str, object]:
    keys = list(METRIC_KEYS) + [k for k in d if k not in METRIC_KEYS]
    return {k: d[k] for k in keys if k in d}


# -- files ---------------------------------------------------------------------------------------

def _read(path: Union[str, os.PathLike], what: str):
    import SimpleITK as sitk

    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputError(f"{what} file not found: {p}")
    try:
        img = sitk.ReadImage(p)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise InputError(f"cannot read the {what} {p}: {first[-1] if first else 'unknown format'}") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the {what} {p} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "a label image has one")
    if img.GetDimension() != 3:
        raise InputError(f"the {what} {p} is {img.GetDimension()}D; a 3D label image is needed")
    return img


def _select(arr: np.ndarray, label: LabelSpec) -> np.ndarray:
    if label is None:
        return arr > 0
    if isinstance(label, Iterable) and not isinstance(label, (str, bytes)):
        return np.isin(arr, [int(v) for v in label])
    return arr == int(label)


def evaluate_files(pred_path: Union[str, os.PathLike], ref_path: Union[str, os.PathLike],
                   label: LabelSpec = None, ref_label: LabelSpec = None) -> Dict[str, object]:
    """Read two label images (NIfTI, NRRD, MHA, ...) and :func:`evaluate` them.

    ``label`` selects the prediction's foreground: ``N`` (or a list of values) means voxels equal
    to it, ``None`` (default) means all voxels ``> 0``. ``ref_label`` does the same for the
    reference, independently (default ``> 0``): to compare tumour with tumour in two LiTS-style
    label maps pass ``label=2, ref_label=2``. The two images must share their grid
    (:meth:`samliverseg.core.geometry.Grid.mismatch`: size, spacing and origin within 1e-3 mm,
    direction within 1e-3 mm at the far corner), else :class:`InputError` says what differs. The distances use the reference image's spacing.
    """
    import SimpleITK as sitk

    pred_img = _read(pred_path, "prediction")
    ref_img = _read(ref_path, "reference")
    why = Grid.of_sitk(ref_img).mismatch(Grid.of_sitk(pred_img), mine="the reference's")
    if why:
        raise InputError(f"prediction and reference are on different grids: the prediction's {why} "
                         "(resample the prediction onto the reference grid)")
    pred = _select(sitk.GetArrayViewFromImage(pred_img), label)
    ref = _select(sitk.GetArrayViewFromImage(ref_img), ref_label)
    return evaluate(pred, ref, ref_img.GetSpacing())
