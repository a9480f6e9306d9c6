"""Augmentations of the Semi-SAM+ trainer: invertible geometric transforms T_j and MONAI intensity
augmentations, organised as a finite, seeded pool of *views* per volume so that the frozen
encoder's per-slice embeddings can be computed once and cached.

Frames
------
A volume or slab is ``(..., D, H, W)`` = ``[k, j, i]``: depth along k (axial slices), rows
along j, columns along i. A transform acts on the last three axes of a numpy array or torch
tensor; leading (batch, channel) axes pass through.

Geometric transforms (:class:`GeomTransform`)
---------------------------------------------
``T = F_k^{flip_k} ∘ F_i^{flip_i} ∘ R^{rot90}``: first ``rot90`` quarter turns in the (j, i)
plane (``torch.rot90(x, rot90, dims=(-2, -1))``: from the j axis towards the i axis; an odd
number of turns swaps H and W and the in-plane spacings), then an optional flip along i, then an
optional flip along k (depth). Together the in-plane part is the dihedral group of the square
(8 elements) and with the depth flip there are 16 transforms, all exact permutations of voxels,
so ``T⁻¹(T(m)) == m`` bit for bit for masks, images and logits::

    T⁻¹ = R^{−rot90} ∘ F_i^{flip_i} ∘ F_k^{flip_k}

Why a pool of views, and what is cached
---------------------------------------
The student (``modeling/slicing_student.py``) and the 2D SAM teacher share one frozen 2D image
encoder applied slice by slice: ``E(x)[d] = enc(x[d])``. Hence

* a depth flip or a crop of slices [z, z + D_s) permutes / selects the embeddings of the slices
  and nothing else: ``E(F_k(x)) = F_k(E(x))`` and ``E(x[z:z+D_s]) = E(x)[z:z+D_s]`` exactly;
* in-plane flips / rotations and intensity changes alter what the encoder sees, so their
  embeddings must be computed once per distinct input.

A :class:`View` is therefore an in-plane element (rot90, flip_i) plus an intensity
augmentation (none / weak / strong, with its own seed); its image is the whole cached block of a
case, augmented, and its embedding is computed once and cached (``semi_trainer``). At each
iteration a transform T_j is *drawn* from a view and a random depth flip, and a slab start:
the embedding of ``T_j(x[z:z+D_s])`` is ``F_k(E_view[z:z+D_s])``, identical to encoding the
transformed slab on the fly. The one difference from an unbounded on-the-fly pipeline is that
the in-plane/intensity part comes from a finite pool of ``P`` draws per volume (a "cached
dataloader", the manual's I/O risk control), not a fresh draw each time.

Intensity augmentation (MONAI, on window units 0…255, channel-first ``(1, D, H, W)``)
------------------------------------------------------------------------------------
* weak: ``RandScaleIntensity(factors=0.1)``, ``RandShiftIntensity(offsets=8)``,
  ``RandGaussianNoise(std=2, p=0.5)``;
* strong: ``RandAdjustContrast(gamma=(0.6, 1.6))``, ``RandScaleIntensity(0.2)``,
  ``RandShiftIntensity(20)``, ``RandGaussianSmooth`` (p=0.3, in-plane σ 0.5–1.2 px, depth σ ≤ 0.3),
  ``RandGaussianNoise(std=8, p=0.8)``, ``RandHistogramShift(p=0.3)``;

each followed by clipping to [0, 255]. A view's transform is seeded
(``Compose.set_random_state(seed)``), so its image is a pure function of the volume and the view.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, List, Sequence, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]
INTENSITIES = ("none", "weak", "strong")


def _rot90(x: ArrayLike, k: int) -> ArrayLike:
    if k % 4 == 0:
        return x
    if isinstance(x, torch.Tensor):
        return torch.rot90(x, k, dims=(-2, -1))
    return np.rot90(x, k, axes=(-2, -1))


def _flip(x: ArrayLike, axis: int) -> ArrayLike:
    if isinstance(x, torch.Tensor):
        return torch.flip(x, dims=(axis,))
    return np.flip(x, axis=axis)


@dataclass(frozen=True)
class GeomTransform:
    """An exact, invertible voxel permutation of ``(..., D, H, W)`` (module docstring)."""

    rot90: int = 0
    flip_i: bool = False
    flip_k: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rot90", int(self.rot90) % 4)

    @property
    def is_identity(self) -> bool:
        return self.rot90 == 0 and not self.flip_i and not self.flip_k

    def apply(self, x: ArrayLike) -> ArrayLike:
        """T(x) for a volume/mask/logits with the spatial axes last."""
        if x.ndim < 3:
            raise ValueError(f"expected (..., D, H, W), got shape {tuple(x.shape)}")
        y = _rot90(x, self.rot90)
        if self.flip_i:
            y = _flip(y, -1)
        if self.flip_k:
            y = _flip(y, -3)
        return y

    def invert(self, y: ArrayLike) -> ArrayLike:
        """T⁻¹(y)."""
        if y.ndim < 3:
            raise ValueError(f"expected (..., D, H, W), got shape {tuple(y.shape)}")
        x = _flip(y, -3) if self.flip_k else y
        if self.flip_i:
            x = _flip(x, -1)
        return _rot90(x, -self.rot90)

    def out_hw(self, hw: Sequence[int]) -> Tuple[int, int]:
        """In-plane size (H, W) after T."""
        h, w = int(hw[0]), int(hw[1])
        return (w, h) if self.rot90 % 2 else (h, w)

    def spacing(self, spacing_ijk: Sequence[float]) -> Tuple[float, float, float]:
        """Voxel spacing (si, sj, sk) of T(x): an odd number of quarter turns swaps si and sj."""
        si, sj, sk = (float(s) for s in spacing_ijk)
        return (sj, si, sk) if self.rot90 % 2 else (si, sj, sk)

    def with_depth_flip(self, flip_k: bool) -> "GeomTransform":
        return GeomTransform(self.rot90, self.flip_i, bool(flip_k))

    def key(self) -> str:
        return f"r{self.rot90}{'f' if self.flip_i else ''}{'k' if self.flip_k else ''}"


def all_transforms(depth_flips: bool = True) -> List[GeomTransform]:
    """The 8 in-plane (× 2 depth flips) transforms."""
    ks = (False, True) if depth_flips else (False,)
    return [GeomTransform(r, f, k) for r in range(4) for f in (False, True) for k in ks]


def intensity_transform(strength: str, seed: int):
    """The seeded MONAI intensity augmentation (``"weak"``/``"strong"``), or None for ``"none"``."""
    if strength == "none":
        return None
    from monai.transforms import (Compose, RandAdjustContrast, RandGaussianNoise, RandGaussianSmooth,
                                  RandHistogramShift, RandScaleIntensity, RandShiftIntensity)

    if strength == "weak":
        t = Compose([RandScaleIntensity(factors=0.1, prob=1.0), RandShiftIntensity(offsets=8.0, prob=1.0),
                     RandGaussianNoise(prob=0.5, mean=0.0, std=2.0)])
    elif strength == "strong":
        t = Compose([RandAdjustContrast(prob=1.0, gamma=(0.6, 1.6)), RandScaleIntensity(factors=0.2, prob=1.0),
                     RandShiftIntensity(offsets=20.0, prob=1.0),
                     RandGaussianSmooth(sigma_x=(0.0, 0.3), sigma_y=(0.5, 1.2), sigma_z=(0.5, 1.2), prob=0.3),
                     RandGaussianNoise(prob=0.8, mean=0.0, std=8.0),
                     RandHistogramShift(num_control_points=8, prob=0.3)])
    else:
        raise ValueError(f"intensity must be one of {', '.join(INTENSITIES)}, got {strength!r}")
    t.set_random_state(seed=int(seed) % (2**32))
    return t


@dataclass(frozen=True)
class View:
    """One cached augmented version of a case's block: in-plane geometry + intensity (+ seed)."""

    rot90: int = 0
    flip_i: bool = False
    intensity: str = "none"
    seed: int = 0
    role: str = "weak"  # "weak": teacher queue / EMA input; "strong": the student's input

    @property
    def geom(self) -> GeomTransform:
        return GeomTransform(self.rot90, self.flip_i, False)

    def key(self) -> str:
        return f"{self.geom.key()}-{self.intensity}{self.seed if self.intensity != 'none' else ''}"

    def image(self, volume: ArrayLike) -> np.ndarray:
        """The view's image: float32 window units in [0, 255], ``(D, H', W')``."""
        x = np.ascontiguousarray(self.geom.apply(np.asarray(volume, dtype=np.float32)))
        t = intensity_transform(self.intensity, self.seed)
        if t is not None:
            y = t(torch.from_numpy(x)[None])
            y = y.as_tensor() if hasattr(y, "as_tensor") else y
            x = np.asarray(torch.as_tensor(y)[0], dtype=np.float32)
        return np.clip(x, 0.0, 255.0).astype(np.float32)

    def as_dict(self) -> dict:
        return {"rot90": self.rot90, "flip_i": self.flip_i, "intensity": self.intensity, "seed": self.seed,
                "role": self.role}


@dataclass
class ViewPool:
    """The views of one case: ``weak[0]`` is always the identity without intensity change."""

    weak: List[View] = field(default_factory=list)
    strong: List[View] = field(default_factory=list)

    @property
    def all(self) -> List[View]:
        return list(self.weak) + list(self.strong)


def make_pool(seed: int, n_weak: int, n_strong: int = 0) -> ViewPool:
    """A seeded pool: the identity, ``n_weak − 1`` distinct in-plane elements with weak intensity,
    ``n_strong`` in-plane elements (any) with strong intensity."""
    if n_weak < 1:
        raise ValueError("a pool needs at least the identity view (n_weak >= 1)")
    rng = random.Random(int(seed))
    planar = [(r, f) for r in range(4) for f in (False, True) if (r, f) != (0, False)]
    rng.shuffle(planar)
    weak = [View(0, False, "none", 0, "weak")]
    for n in range(n_weak - 1):
        r, f = planar[n % len(planar)]
        weak.append(View(r, f, "weak", rng.randrange(2**31), "weak"))
    strong = []
    for _ in range(n_strong):
        r, f = rng.choice([(0, False)] + planar)
        strong.append(View(r, f, "strong", rng.randrange(2**31), "strong"))
    return ViewPool(weak, strong)


def resize_hw(x: torch.Tensor, hw: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resize the last two axes of ``(..., H, W)`` to ``hw`` (float; antialiased when shrinking)."""
    hw = (int(hw[0]), int(hw[1]))
    if tuple(x.shape[-2:]) == hw:
        return x
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:]).float()
    shrink = hw[0] < x.shape[-2] or hw[1] < x.shape[-1]
    if mode == "nearest":
        out = torch.nn.functional.interpolate(flat, size=hw, mode="nearest")
    else:
        out = torch.nn.functional.interpolate(flat, size=hw, mode="bilinear", align_corners=False,
                                              antialias=shrink)
    return out.reshape(*lead, *hw)


def resize_mask(mask: ArrayLike, hw: Sequence[int]) -> torch.Tensor:
    """A binary mask ``(..., H, W)`` on another in-plane grid: area-weighted (antialiased
    bilinear) fraction ≥ 0.5, as float 0/1."""
    t = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
    return (resize_hw(t, hw) >= 0.5).float()


def working_hw(hw: Sequence[int], grid_size: int) -> Tuple[int, int]:
    """The loss grid: the slice grid shrunk so that its longer side is at most ``grid_size``."""
    h, w = int(hw[0]), int(hw[1])
    s = min(1.0, float(grid_size) / max(h, w))
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


__all__: List[Any] = ["GeomTransform", "View", "ViewPool", "all_transforms", "intensity_transform", "make_pool",
                      "resize_hw", "resize_mask", "working_hw"]
