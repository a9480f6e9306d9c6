"""Whether a CT volume is a crop inside the body (its sides cut through the patient).

A whole axial CT slice shows the patient's outline with air around it; a volume cropped to an
organ (Slicer's Crop Volume, a bounding box plus a margin) has tissue at its sides. The sides are
the faces of the array across the two IJK axes that run across the patient (left-right and
anterior-posterior): the axis most along S (LPS z, from the ``direction`` matrix, whose columns
are the i, j, k axes in LPS) runs along the patient and is left out, so a flipped, permuted or
oblique grid is read the same way. The faces at the ends along the patient (the scan's first and
last slices) always cut through the body and say nothing.

Measured (``benchmarks/variants.py``): whole slices have 0.00 (ircadb-1.1, flipped, resampled) to
0.05 (the totalseg example, whose outline touches its edge) of their side voxels in the body;
crops to the liver plus 20 mm 0.44-0.65.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: A voxel above this many HU is inside the body (fat is about -100, air -1000).
BODY_HU = -500.0
#: A volume with at least this fraction of its side voxels in the body is a crop.
CROP_BODY_FRACTION = 0.25


def longitudinal_axis(direction: Sequence[Sequence[float]]) -> int:
    """The IJK index (0 = i, 1 = j, 2 = k) of the axis most along the patient's S direction."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    return int(np.argmax(np.abs(d[2, :])))


def side_body_fraction(array_kji: np.ndarray, direction: Sequence[Sequence[float]], body_hu: float = BODY_HU) -> float:
    """The fraction of the voxels on the four sides of ``array_kji`` (HU, ``[k, j, i]``) above ``body_hu``."""
    a = np.asarray(array_kji)
    if a.ndim != 3:
        raise ValueError(f"expected a 3D [k, j, i] array, got shape {a.shape}")
    along = longitudinal_axis(direction)
    inside, total = 0, 0
    for c in range(3):
        if c == along:
            continue
        np_axis = 2 - c  # IJK index -> numpy axis of [k, j, i]
        for end in (0, a.shape[np_axis] - 1):
            face = np.take(a, end, axis=np_axis)
            inside += int(np.count_nonzero(face > body_hu))
            total += face.size
    return inside / total if total else 0.0


def is_body_crop(array_kji: np.ndarray, direction: Sequence[Sequence[float]]) -> bool:
    """Whether the volume's sides cut through the body (at least ``CROP_BODY_FRACTION`` of them)."""
    return side_body_fraction(array_kji, direction) >= CROP_BODY_FRACTION
