"""Prompt-free segmentation with a trained slicing-SAM3D student (``model.pth`` of kind
``student``, written by ``samliverseg train`` with ``kind: student``, or ``semi``: the same
architecture trained semi-supervised by ``semi_trainer.py``).

``segment_volume(model_path, volume)``:

1. read the model (:func:`~samliverseg.modeling.slicing_student.load_student`; a file of another
   kind is a :class:`~samliverseg.core.errors.CheckpointError` naming the expected kinds);
2. window the HU array with the model's training window (``metadata["window"]``, else
   ``metadata["window_hu"]``) to grey levels 0…255 (``windowing.apply_window``, as
   ``samliverseg prepare`` did for the training cache);
3. when the training cache was resampled (``metadata["spacing"]`` = (si, sj, sk) mm), resample
   the windowed image to that spacing on a grid with the **same origin and direction** (linear,
   SimpleITK; as ``prepare`` did); otherwise use the input grid as is;
4. Algorithm 1 (:func:`~samliverseg.modeling.slicing_student.predict_volume`): slabs of
   ``D_s`` consecutive slices along the array's k axis (``array[k]`` = the volume's own third
   axis, as in the training cache, which keeps the source orientation), probabilities σ(logits);
5. when resampled, map the probabilities back onto the input grid (linear interpolation in
   physical LPS space with SimpleITK, the input volume's origin/spacing/direction; 0 outside);
6. threshold ``> 0.5`` → uint8 0/1 mask ``[k, j, i]`` on the input grid.

Nothing here depends on a prompt. ``device``: ``"auto"`` (CUDA > MPS > CPU), ``"cpu"``, ...
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Tuple, Union

import numpy as np

from samliverseg.core.devices import resolve_device
from samliverseg.core.errors import InputError
from samliverseg.core.geometry import resample
from samliverseg.modeling.slicing_student import STUDENT_KIND, THRESHOLD, load_student, predict_volume

#: The model.pth kinds this module segments with: both are a SlicingStudent.
STUDENT_KINDS = (STUDENT_KIND, "semi")
from samliverseg.io.volume import Volume
from samliverseg.core.windowing import apply_window, get_window


def model_window(metadata: dict):
    """The CT window a student was trained with (its cache's window)."""
    spec = metadata.get("window")
    if spec:
        return get_window(spec)
    hu = metadata.get("window_hu")
    if hu:
        return get_window(tuple(hu))
    raise InputError("the model's metadata names no CT window (window / window_hu)")


def predict_probabilities(student, metadata: dict, volume: Volume, batch_slices: int = 4,
                          progress: Optional[Callable[[int, int], None]] = None,
                          cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
    """Steps 2–5 of the module docstring: float32 probabilities ``[k, j, i]`` on the input grid."""
    grey = apply_window(volume.array, model_window(metadata)).astype(np.float32)
    spacing = metadata.get("spacing")
    same = spacing is None or np.allclose(np.asarray(spacing, float), np.asarray(volume.spacing, float), rtol=0,
                                          atol=1e-6)
    if same:
        return predict_volume(student, grey, batch_slices=batch_slices, progress=progress, cancel=cancel)
    # to the model's spacing (same origin and direction, round(n s / t) voxels) and back: linear, 0 outside
    img, grid = resample(grey, volume.grid, spacing, interpolator="linear", default_value=0.0, extent="round")
    prob = predict_volume(student, img, batch_slices=batch_slices, progress=progress, cancel=cancel)
    return resample(prob.astype(np.float32, copy=False), grid, volume.grid, interpolator="linear",
                    default_value=0.0).array


def segment_volume(model_path: Union[str, os.PathLike], volume: Volume, device="auto", batch_slices: int = 4,
                   progress: Optional[Callable[[int, int], None]] = None,
                   cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
    """A student's prompt-free mask: uint8 0/1 ``[k, j, i]`` on ``volume``'s grid."""
    student, meta = load_student(model_path, device=resolve_device(device), kinds=STUDENT_KINDS)
    prob = predict_probabilities(student, meta, volume, batch_slices=batch_slices, progress=progress, cancel=cancel)
    return (prob > THRESHOLD).astype(np.uint8)


def segment_volume_with_probabilities(model_path, volume: Volume, device="auto", batch_slices: int = 4
                                      ) -> Tuple[np.ndarray, np.ndarray, dict]:
    """(mask, probabilities, metadata): for callers that also want σ(logits) on the input grid."""
    student, meta = load_student(model_path, device=resolve_device(device), kinds=STUDENT_KINDS)
    prob = predict_probabilities(student, meta, volume, batch_slices=batch_slices)
    return (prob > THRESHOLD).astype(np.uint8), prob, meta


__all__ = ["STUDENT_KINDS", "model_window", "predict_probabilities", "segment_volume",
           "segment_volume_with_probabilities"]
