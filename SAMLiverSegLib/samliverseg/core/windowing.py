"""CT windowing: HU (float) -> uint8 grey levels for the models. The only place this happens.

Presets:

* ``wide``: [−500, 1000] HU, and voxels whose value was **exactly 0 HU** are set back to 0
  afterwards. This is literally the preprocessing rule of the design (thesis, section 1 of the
  design digest; it comes from MedSAM's ``pre_CT_MR.py``, where 0 marks padding). Note that
  0 HU is also water, so a few voxels inside the body (bile, cysts) may turn black.
* ``liver``: [−300, 300] HU (the U-Net report's ``ScaleIntensityRanged`` range).
* ``abdomen``: W400/L40, i.e. [−160, 240] HU.
* custom: ``"low,high"`` in HU, e.g. ``"-100,200"``.

``apply_window`` clips to ``[low, high]`` and rescales **the window bounds** (not the image's
own min/max) linearly to 0…255, then truncates to uint8 (``floor``, as ``np.uint8(x)`` does in
the MedSAM preprocessing the models were trained with): ``g = floor((clip(x) − low) · 255 /
(high − low))``. Using the window bounds keeps the mapping independent of the image: a given
HU value gets the same grey in every volume, slice and crop, whereas a per-image min/max would
stretch a volume whose intensities do not span the window (a crop inside the liver, a
phantom) and make the model's input depend on what else is in the field of view. For a normal
CT that contains air (< low) and bone (> high) the two agree exactly, since the clipped image's
min and max are then the window bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple, Union

import numpy as np

from samliverseg.core.errors import InputError


@dataclass(frozen=True)
class Window:
    """A CT window: HU range [low, high] mapped to 0…255."""

    low: float
    high: float
    keep_zero: bool = False
    name: str = "custom"

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def level(self) -> float:
        return (self.high + self.low) / 2.0

    def spec(self) -> str:
        """A string that :func:`get_window` maps back to this window."""
        return self.name if self.name in PRESETS and PRESETS[self.name] == self else f"{self.low:g},{self.high:g}"


PRESETS: Dict[str, Window] = {
    "wide": Window(-500.0, 1000.0, keep_zero=True, name="wide"),
    "liver": Window(-300.0, 300.0, keep_zero=False, name="liver"),
    "abdomen": Window(-160.0, 240.0, keep_zero=False, name="abdomen"),  # W400 / L40
}


def get_window(spec: Union[str, Window, Tuple[float, float]]) -> Window:
    """A preset name (``wide``, ``liver``, ``abdomen``), ``"low,high"`` in HU, a (low, high)
    pair or a :class:`Window`. Raises :class:`InputError` for an unknown name, a malformed
    range or ``low >= high``."""
    if isinstance(spec, Window):
        return _checked(spec)
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise InputError(f"a window range needs two values (low, high), got {spec!r}")
        return _checked(Window(float(spec[0]), float(spec[1])))
    if not isinstance(spec, str):
        raise InputError(f"unknown window {spec!r}")
    text = spec.strip()
    key = text.lower()
    if key in PRESETS:
        return PRESETS[key]
    if "," in text:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2:
            raise InputError(f"custom window {spec!r} must be two numbers 'low,high' in HU, e.g. '-100,200'")
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError:
            raise InputError(f"custom window {spec!r} must be two numbers 'low,high' in HU, e.g. '-100,200'") from None
        return _checked(Window(low, high, name=f"{low:g},{high:g}"))
    raise InputError(f"unknown window {spec!r}: use one of {', '.join(PRESETS)} or 'low,high' in HU")


def _checked(w: Window) -> Window:
    if not (np.isfinite(w.low) and np.isfinite(w.high)):
        raise InputError(f"window bounds must be finite numbers, got {w.low:g},{w.high:g}")
    if w.low >= w.high:
        raise InputError(f"window low ({w.low:g}) must be below high ({w.high:g})")
    return w


def apply_window(hu: np.ndarray, window: Union[str, Window, Tuple[float, float]]) -> np.ndarray:
    """HU array (any shape) -> uint8 of the same shape; see the module docstring."""
    w = get_window(window)
    hu = np.asarray(hu)
    out = hu.astype(np.float32, copy=True)
    np.clip(out, np.float32(w.low), np.float32(w.high), out=out)
    out -= np.float32(w.low)
    # Multiply then divide: exact at both ends of the window for integer HU bounds.
    out *= np.float32(255.0)
    out /= np.float32(w.high - w.low)
    np.clip(out, 0.0, 255.0, out=out)
    g = out.astype(np.uint8)  # truncation == floor for non-negative values
    if w.keep_zero:
        g[hu == 0] = 0
    return g
