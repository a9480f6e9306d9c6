"""Teachers of the Semi-SAM+ trainer: frozen SAM-style models that answer prompts derived from the
student's coarse mask (Algorithm 2 of the design digest, section 3).

Interface
---------
A :class:`Teacher` gets one augmented view ``T_j(x)`` of a slab (:class:`TeacherView`) and the
student's coarse mask mapped into that view, ``M_c^(j) = T_j(M_c)`` (bool ``(D, L, L)``), and
returns a :class:`TeacherAnswer`: two probability maps ``(D, L, L)`` in the same view frame, one
decoded from the **mask prompt** and one from a **point prompt** ``p_j`` sampled from
``M_c^(j)``, and ``valid`` (D,) telling which slices were actually prompted. The caller maps both
back with ``T_j⁻¹`` and collects them (``semi_trainer``).

The frame ``(D, L, L)`` is the student's native output frame: each slice resized to the square
``S × S`` encoder input (``SlicingStudent.preprocess``) and seen at the low-res ``L = 4E``
(256 × 256 for LiteMedSAM, the size of SAM's low-res masks). Teachers that work elsewhere map in
and out of it themselves.

``Sam2DTeacher`` (``lite_medsam``, or any registered 2D SAM: ``medsam``, ``sam_vit_b``, ...)
-----------------------------------------------------------------------------------------
Stands where the manual names Tiny-SAM-Med3D: a 2D SAM applied slice by slice. Its image
embeddings ``E ← encode(img_j)`` are *the cached embeddings of the view* (``view.embeddings``,
``(D, C, E, E)``): the student embeds each slice exactly as the SAM encoder is fed (square
resize to S, the model's normalisation), and when the teacher is the student's base model both
use the very same encoder, so one cached embedding serves both. (For LiteMedSAM, whose engine
uses an aspect-preserving resize + padding, the square resize is identical for square slices,
i.e. CT axial slices, and a mild squash otherwise.) On every slice ``d`` where ``M_c^(j)[d]`` is
not empty:

* mask decode: the dense mask prompt ``±mask_logit`` (``+`` inside ``M_c^(j)[d]``), the low-res
  logits SAM expects from an earlier prediction;
* point decode: one positive point drawn uniformly from ``M_c^(j)[d]``
  (``semi_math.sample_points_per_slice``; pixel centre mapped to the S frame:
  ``x_S = (x + 0.5)·S/L − 0.5``);
* for models trained with boxes only (``ModelSpec.box_only``, LiteMedSAM; option ``box``:
  ``"auto"``), both decodes also get the bounding box of ``M_c^(j)[d]`` enlarged by
  ``box_margin`` × its size (at least 2 px) on each side: LiteMedSAM returns an almost empty mask
  for a lone point or a lone mask prompt (measured: Dice 0.0 on phantom slices where the box gives
  0.9), so without the box the ensemble would only measure that failure.

``multimask_output=False``; probabilities are ``σ(low-res logits)`` at ``L × L`` (no resize).
Slices without a prompt return 0 and ``valid = False``: the trainer never counts them as
confident.

``Sam3DTeacher`` (``sam_med3d`` / ``sam_med3d_turbo``; optional, needs its checkpoint)
-------------------------------------------------------------------------------------
A native 3D SAM (``build_sam3d.py``, imported lazily). It decodes from the view's image, not from
the cached 2D embeddings: ``view.image()`` (window units, ``(D, H, W)``, the view frame) is turned
back into approximate HU (``lo + u/255·(hi − lo)`` of the cache's window; values outside the
window stay clipped) and resampled (trilinear) to the model's isotropic spacing (1.5 mm) with the
view's voxel spacing; the coarse mask ``M_c^(j)`` is resampled to the same grid, and the point
``p_j`` is one voxel drawn from it (``semi_math.sample_point_3d``). Then as ``engine3d`` does
(its functions are used): the cube of side S (128) centred on ``p_j`` (``patch_around``,
``crop_patch``, zero-padded outside), SAM-Med3D's normalisation (``zscore_patch``: clip to
[−1000, 1000] HU, z-score over the voxels > 0), layout ``"kji"`` (the cube axes are the view's
array axes, as the SAM-Med3D authors' inference helpers feed arrays; the augmentation rotates and
flips them, which is part of what the variance filter measures). Mask decode: the dense prompt
``±mask_logit`` from ``M_c^(j)`` at the low-res cube ``4G``; point decode: ``p_j`` with a zero
mask prompt (SAM-Med3D's "no previous mask"). The low-res answers are upsampled to the cube,
pasted back (0 outside the cube) and resampled to ``(D, L, L)``; ``valid`` marks the slices the
cube covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from samliverseg.core.errors import InputError
from samliverseg.training.semi.math import sample_point_3d, sample_points_per_slice

BOX_MODES = ("auto", "always", "never")


@dataclass
class TeacherView:
    """One augmented view ``T_j(x)`` of a slab, as the teachers see it (all in the view frame)."""

    embeddings: Optional[Tensor]  # (D, C, E, E) float32: the cached per-slice embeddings, or None
    image: Optional[Callable[[], np.ndarray]] = None  # lazily: (D, H, W) window units, float32
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)  # (si, sj, sk) mm of the view's voxels
    window_hu: Tuple[float, float] = (-160.0, 240.0)  # the cache's window (window units -> HU)


class TeacherAnswer(NamedTuple):
    mask_prob: Tensor  # (D, L, L) float32 in [0, 1], decoded with the mask prompt
    point_prob: Tensor  # (D, L, L) float32 in [0, 1], decoded with the point prompt
    valid: Tensor  # (D,) bool: the slices the teacher was prompted on


class Teacher:
    """Base class: ``predict(view, coarse (D, L, L) bool, generator) -> TeacherAnswer``."""

    name: str = "teacher"
    #: the key of the embedding cache this teacher reads (None: it does not use embeddings)
    embedding_key: Optional[str] = None

    def predict(self, view: TeacherView, coarse: Tensor, generator: torch.Generator) -> TeacherAnswer:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def _box_from_mask(mask2d: Tensor, margin_frac: float) -> Tuple[float, float, float, float]:
    ys, xs = torch.nonzero(mask2d, as_tuple=True)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    mx = max(2.0, margin_frac * (x1 - x0 + 1))
    my = max(2.0, margin_frac * (y1 - y0 + 1))
    return x0 - mx, y0 - my, x1 + mx, y1 + my


class Sam2DTeacher(Teacher):
    """A 2D SAM (``SamModel``) decoding slice by slice from the cached view embeddings."""

    def __init__(self, sam, name: Optional[str] = None, box: str = "auto", mask_logit: float = 8.0,
                 box_margin: float = 0.1, batch: int = 16, embedding_key: Optional[str] = None):
        if box not in BOX_MODES:
            raise InputError(f"config key 'semi.teacher_box' must be one of {', '.join(BOX_MODES)}, got {box!r}")
        self.sam = sam.eval()
        for p in self.sam.parameters():
            p.requires_grad_(False)
        spec = getattr(sam, "spec", None)
        self.name = name or (spec.name if spec is not None else "sam2d")
        self.use_box = box == "always" or (box == "auto" and bool(getattr(spec, "box_only", False)))
        self.mask_logit = float(mask_logit)
        self.box_margin = float(box_margin)
        self.batch = max(1, int(batch))
        self.embedding_key = embedding_key

    def describe(self) -> str:
        return f"{self.name} (2D, mask + point prompts{' + box' if self.use_box else ''})"

    @property
    def low_res(self) -> int:
        return 4 * int(self.sam.embedding_size)

    @torch.no_grad()
    def predict(self, view: TeacherView, coarse: Tensor, generator: torch.Generator) -> TeacherAnswer:
        if view.embeddings is None:
            raise ValueError(f"teacher {self.name} needs the view's embeddings")
        emb = view.embeddings
        d, L = int(coarse.shape[0]), int(coarse.shape[-1])
        if L != self.low_res or tuple(coarse.shape[-2:]) != (L, L):
            raise ValueError(f"teacher {self.name}: coarse mask of shape {tuple(coarse.shape)}, expected (D, "
                             f"{self.low_res}, {self.low_res})")
        pts, valid = sample_points_per_slice(coarse, generator)
        mask_prob = torch.zeros(d, L, L)
        point_prob = torch.zeros(d, L, L)
        idx = torch.nonzero(valid).flatten()
        if idx.numel() == 0:
            return TeacherAnswer(mask_prob, point_prob, valid)
        dev = self.sam.device
        S = float(self.sam.image_size)
        r = S / L
        cm = coarse.bool().cpu()
        for a in range(0, idx.numel(), self.batch):
            sel = idx[a:a + self.batch]
            e = emb[sel].to(dev, torch.float32)
            m = cm[sel]
            dense = torch.where(m, self.mask_logit, -self.mask_logit).float()[:, None].to(dev)
            boxes = None
            if self.use_box:
                bx = [_box_from_mask(m[i], self.box_margin) for i in range(m.shape[0])]
                boxes = torch.tensor([[(x0 + 0.5) * r - 0.5, (y0 + 0.5) * r - 0.5, (x1 + 0.5) * r - 0.5,
                                       (y1 + 0.5) * r - 0.5] for x0, y0, x1, y1 in bx], dtype=torch.float32)
                boxes = boxes.clamp(0, S - 1).to(dev)
            p = ((pts[sel] + 0.5) * r - 0.5)[:, None].to(dev)
            lab = torch.ones(p.shape[:2], dtype=torch.int64, device=dev)
            low_m, _ = self.sam.decode(e, points=None, boxes=boxes, masks=dense, multimask_output=False)
            low_p, _ = self.sam.decode(e, points=(p, lab), boxes=boxes, masks=None, multimask_output=False)
            mask_prob[sel] = torch.sigmoid(low_m[:, 0].float()).cpu()
            point_prob[sel] = torch.sigmoid(low_p[:, 0].float()).cpu()
        return TeacherAnswer(mask_prob, point_prob, valid)


# ------------------------------------------------------------------------------------ 3D teacher
def _resample_3d(x: Tensor, size: Sequence[int], mode: str) -> Tensor:
    """(D, H, W) -> size, trilinear (float) or nearest."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape) == size:
        return x.float()
    y = x.float()[None, None]
    if mode == "nearest":
        return F.interpolate(y, size=size, mode="nearest")[0, 0]
    return F.interpolate(y, size=size, mode="trilinear", align_corners=False)[0, 0]


class Sam3DTeacher(Teacher):
    """A SAM-Med3D model decoding from the view's image around one 3D point (module docstring)."""

    def __init__(self, model, name: Optional[str] = None, mask_logit: float = 8.0):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        spec = getattr(model, "spec", None)
        self.name = name or (spec.name if spec is not None else "sam_med3d")
        self.spacing_mm = float(getattr(spec, "target_spacing_mm", 1.5))
        self.clip_hu = getattr(spec, "clip_hu", (-1000.0, 1000.0))
        self.mask_logit = float(mask_logit)
        self.embedding_key = None

    def describe(self) -> str:
        s = self.model.image_size
        return f"{self.name} (3D, mask + point prompts, {s}^3 cube at {self.spacing_mm:g} mm)"

    @torch.no_grad()
    def predict(self, view: TeacherView, coarse: Tensor, generator: torch.Generator) -> TeacherAnswer:
        from samliverseg.interactive.engine3d import crop_patch, cube_to_patch, layout_for, patch_around, patch_to_cube, zscore_patch

        if view.image is None:
            raise ValueError(f"teacher {self.name} needs the view's image")
        d, L = int(coarse.shape[0]), int(coarse.shape[-1])
        img = torch.from_numpy(np.ascontiguousarray(view.image(), dtype=np.float32))  # (D, H, W)
        D, H, W = img.shape
        si, sj, sk = (float(s) for s in view.spacing)
        iso = (max(1, round(D * sk / self.spacing_mm)), max(1, round(H * sj / self.spacing_mm)),
               max(1, round(W * si / self.spacing_mm)))
        m_iso = _resample_3d(coarse.float(), iso, "linear") > 0.5
        point = sample_point_3d(m_iso, generator)
        if point is None:
            zeros = torch.zeros(d, L, L)
            return TeacherAnswer(zeros, zeros.clone(), torch.zeros(d, dtype=torch.bool))
        lo, hi = (float(v) for v in view.window_hu)
        hu_iso = _resample_3d(lo + img / 255.0 * (hi - lo), iso, "linear").numpy()
        S = int(self.model.image_size)
        box = patch_around(point, S)
        # layout "kji": the cube axes are the view's array axes (engine3d.layout_for)
        layout = layout_for(np.eye(3), "kji")
        cube = zscore_patch(patch_to_cube(crop_patch(hu_iso, box, 0.0), layout), self.clip_hu)
        mcube = torch.from_numpy(np.ascontiguousarray(
            patch_to_cube(crop_patch(m_iso.numpy().astype(np.float32), box, 0.0), layout)))
        dev = self.model.device
        emb = self.model.encode(torch.from_numpy(np.ascontiguousarray(cube))[None, None].to(dev))
        G4 = self.model.low_res_size
        dense = torch.where(_resample_3d(mcube, (G4,) * 3, "linear") > 0.5, self.mask_logit, -self.mask_logit)
        local = [float(p - s) for p, s in zip(point, box.start_kji)]
        pc = torch.tensor([[local]], dtype=torch.float32, device=dev)
        lab = torch.ones(1, 1, dtype=torch.int64, device=dev)
        low_m, _ = self.model.decode(emb, points=None, masks=dense[None, None].to(dev), multimask_output=False)
        low_p, _ = self.model.decode(emb, points=(pc, lab), masks=torch.zeros(1, 1, G4, G4, G4, device=dev),
                                     multimask_output=False)
        ov = box.overlap(iso)
        out = []
        for low in (low_m, low_p):
            prob = torch.sigmoid(F.interpolate(low.float().cpu(), size=(S, S, S), mode="trilinear",
                                               align_corners=False))[0, 0].numpy()
            prob = torch.from_numpy(np.ascontiguousarray(cube_to_patch(prob, layout)))
            full = torch.zeros(iso)
            if ov is not None:
                full[ov[0]] = prob[ov[1]]
            out.append(_resample_3d(full, (d, L, L), "linear").clamp(0, 1))
        # the view's slices the cube covers: only there does this teacher have a say
        valid = torch.zeros(d, dtype=torch.bool)
        if ov is not None:
            z0, z1 = ov[0][0].start * d / iso[0], ov[0][0].stop * d / iso[0]
            centres = torch.arange(d).float() + 0.5
            valid = (centres >= z0) & (centres <= z1)
        return TeacherAnswer(out[0], out[1], valid)


# ------------------------------------------------------------------------------------ factory
def teacher_names(spec: str) -> List[str]:
    """``"lite_medsam, sam_med3d"`` -> ``["lite_medsam", "sam_med3d"]`` (order kept, duplicates dropped)."""
    out: List[str] = []
    for n in str(spec).split(","):
        n = n.strip()
        if n and n not in out:
            out.append(n)
    return out


def is_3d_teacher(name: str) -> bool:
    try:
        from samliverseg.models.build_sam3d import is_model3d  # lazily: the 3D registry
    except ImportError:
        return name.startswith("sam_med3d")
    return bool(is_model3d(name))


def build_3d_teacher(name: str, checkpoint: Optional[str], device) -> Sam3DTeacher:
    try:
        from samliverseg.models.build_sam3d import build_model3d
    except ImportError:  # pragma: no cover - the 3D models are part of this package
        raise InputError(f"teacher {name!r} needs the 3D models (samliverseg.models.build_sam3d), which this "
                         f"installation lacks") from None
    return Sam3DTeacher(build_model3d(name, checkpoint=checkpoint, device=device), name=name)


__all__ = ["BOX_MODES", "Sam2DTeacher", "Sam3DTeacher", "Teacher", "TeacherAnswer", "TeacherView",
           "build_3d_teacher", "is_3d_teacher", "teacher_names"]
