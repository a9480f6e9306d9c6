"""Prompt-free segmentation with a trained slicing-SAM3D student (``model.pth`` of kind
``student``, written by ``samliverseg train`` with ``kind: student``, or ``semi``: the same
architecture trained semi-supervised by ``training/semi/trainer.py``), and the student's file
and inference functions (the modules are in ``modeling/slicing_student.py``).

``StudentSegmenter.load(model_path, device)`` reads the model once; ``segment_volume(volume)``
then segments any number of volumes:

1. read the model (:func:`load_student`; a file of another kind is a
   :class:`~samliverseg.core.errors.CheckpointError` naming the expected kinds);
2. window the HU array with the model's training window (``metadata["window"]``, else
   ``metadata["window_hu"]``) to grey levels 0…255 (``windowing.apply_window``, as
   ``samliverseg prepare`` did for the training cache);
3. when the training cache was resampled (``metadata["spacing"]`` = (si, sj, sk) mm), resample
   the windowed image to that spacing on a grid with the **same origin and direction** (linear,
   SimpleITK; as ``prepare`` did); otherwise use the input grid as is;
4. Algorithm 1 (:func:`predict_volume`): slabs of ``D_s`` consecutive slices along the array's k
   axis (``array[k]`` = the volume's own third axis, as in the training cache, which keeps the
   source orientation), probabilities σ(logits);
5. when resampled, map the probabilities back onto the input grid (linear interpolation in
   physical LPS space with SimpleITK, the input volume's origin/spacing/direction; 0 outside);
6. threshold ``> 0.5`` → uint8 0/1 mask ``[k, j, i]`` on the input grid.

Nothing here depends on a prompt. ``device``: ``"auto"`` (CUDA > MPS > CPU), ``"cpu"``, ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from samliverseg.core.devices import resolve_device
from samliverseg.core.errors import CancelledError, CheckpointError, InputError
from samliverseg.core.geometry import resample
from samliverseg.core.windowing import apply_window, get_window
from samliverseg.io import torchfile
from samliverseg.io.volume import Volume
from samliverseg.modeling.slicing_student import (STUDENT_KIND, THRESHOLD, AugmentFn, SlicingStudent, slab_plan,
                                                  student_from_sam)
from samliverseg.models.build_sam import build_model, get_spec
from samliverseg.models.exports import read_model_file

#: The model.pth kinds this module segments with: both are a SlicingStudent.
STUDENT_KINDS = (STUDENT_KIND, "semi")

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- building and loading

def build_slicing_student(encoder="lite_medsam", checkpoint=None, slab_depth: int = 8, hidden: int = 64,
                          device="cpu", decoder_norm: str = "channel") -> SlicingStudent:
    """A student whose frozen encoder is the image encoder of a registered 2D model (name or
    :class:`~samliverseg.models.build_sam.ModelSpec`; ``lite_medsam``: TinyViT, ``sam_vit_b``/``medsam``:
    ViT-B) loaded from its weights (``build_model``'s lookup; WeightsMissingError when absent);
    the decoder is freshly initialised (seed torch before calling for a reproducible start)."""
    dev = resolve_device(device)
    sam = build_model(encoder, checkpoint=checkpoint, device="cpu")
    student = student_from_sam(sam, slab_depth=slab_depth, hidden=hidden, decoder_norm=decoder_norm)
    del sam
    return student.to(dev).train(False)


def load_student(path: PathLike, device="cpu", kinds: Sequence[str] = STUDENT_KINDS
                 ) -> Tuple[SlicingStudent, Dict[str, Any]]:
    """A finished student from its ``model.pth`` (eval mode) and the file's metadata.

    The encoder architecture comes from the registry entry named by ``metadata["encoder"]``
    (its weights from the file itself); CheckpointError when the file is of another kind or its
    weights do not fit, InputError when that encoder is not registered here."""
    obj = read_model_file(path, kinds=tuple(kinds))
    meta = obj["metadata"]
    name = meta.get("encoder") or meta.get("base_model")
    try:
        spec = get_spec(name)
    except InputError as exc:
        raise InputError(f"{path} needs the encoder {name!r}, which is not registered here ({exc})") from None
    try:
        encoder = spec.builder().image_encoder
        student = SlicingStudent(encoder, int(meta["embed_dim"]), int(meta["image_size"]), meta.get("pixel_mean"),
                                 meta.get("pixel_std"), slab_depth=int(meta["slab_depth"]), hidden=int(meta["hidden"]),
                                 normalization=str(meta.get("normalization", spec.normalization)),
                                 decoder_norm=str(meta.get("decoder_norm", "channel")))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete student metadata ({exc})") from None
    student.spec = spec
    torchfile.load_strict(student, obj["model"], f"a student with the {name} encoder",
                          f"the {name} encoder's and the decoder's weights", path)
    return student.to(resolve_device(device)).eval(), meta


# --------------------------------------------------------------------------- Algorithm 1

@torch.no_grad()
def predict_volume(student: SlicingStudent, image: np.ndarray, slab_depth: Optional[int] = None,
                   batch_slices: int = 4, augment: Optional[AugmentFn] = None,
                   progress: Optional[Callable[[int, int], None]] = None,
                   cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
    """Algorithm 1: ``image`` ``(K, J, I)`` in window units → probabilities ``σ(logits)``
    ``(K, J, I)`` float32 (coarse mask: ``> 0.5``).

    Slab split (:func:`slab_plan`) → ``augment`` (optional) → predict → write back. ``augment``
    gets the slab ``(1, 1, D, J, I)`` (window units, on the model's device) and returns either
    the augmented slab of the same shape (an intensity augmentation: the prediction is written
    back as is) or ``(augmented slab, inverse)`` where ``inverse`` maps the logits
    ``(1, 1, D, J, I)`` back into the slab's frame (a geometric one). Each slice is embedded
    once (``batch_slices`` per encoder call) unless ``augment`` is given, in which case every
    slab is embedded as augmented. ``progress(done_slices, K)``; ``cancel()`` polled per slab
    (raises CancelledError)."""
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(f"expected a volume (K, J, I), got shape {img.shape}")
    d_s = int(slab_depth or student.slab_depth)
    k_total = int(img.shape[0])
    dev = student.device
    was_training = student.training
    student.eval()
    vol = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    if k_total < d_s:  # pad at the end by repeating the last slice; dropped below
        vol = torch.cat([vol, vol[-1:].expand(d_s - k_total, *vol.shape[1:])], 0)
    out = np.zeros(img.shape, dtype=np.float32)
    embedded: Dict[int, Tensor] = {}
    hw = tuple(img.shape[1:])
    try:
        plan = slab_plan(k_total, d_s)
        for n, (start, w0, w1) in enumerate(plan):
            if cancel is not None and cancel():
                raise CancelledError("cancelled during the student's slab inference")
            blk = vol[start:start + d_s]
            if augment is None:
                need = [k for k in range(start, start + d_s) if k not in embedded]
                for a in range(0, len(need), max(1, batch_slices)):
                    ks = need[a:a + max(1, batch_slices)]
                    for k, e in zip(ks, student.embed(vol[ks])):
                        embedded[k] = e
                emb = torch.stack([embedded[k] for k in range(start, start + d_s)], 1)[None]  # (1, C, D, h, w)
                logits = student.decode(emb, out_hw=hw)
                keep_from = plan[n + 1][0] if n + 1 < len(plan) else k_total + d_s
                for k in [k for k in embedded if k < keep_from]:  # not in the next slab: never needed again
                    del embedded[k]
            else:
                res = augment(blk[None, None].to(dev))
                aug, inverse = res if isinstance(res, tuple) else (res, None)
                emb = student.embed(aug[0, 0], batch=batch_slices)
                logits = student.decode(emb.permute(1, 0, 2, 3)[None], out_hw=tuple(aug.shape[-2:]))
                if inverse is not None:
                    logits = inverse(logits)
                if tuple(logits.shape[-3:]) != (d_s,) + hw:
                    raise ValueError(f"augment: the (inverted) logits have shape {tuple(logits.shape)}, expected "
                                     f"(1, 1, {d_s}, {hw[0]}, {hw[1]}); return (slab, inverse) for geometric changes")
            prob = torch.sigmoid(logits[0, 0].float()).cpu().numpy()
            out[w0:w1] = prob[w0 - start:w1 - start]
            if progress is not None:
                progress(w1, k_total)
    finally:
        student.train(was_training)
    return out


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


@dataclass
class StudentSegmenter:
    """A student (kind ``student`` or ``semi``) loaded once, for any number of volumes."""

    student: SlicingStudent
    metadata: Dict[str, Any]
    path: str = ""
    batch_slices: int = 4

    @classmethod
    def load(cls, model_path: PathLike, device="auto", batch_slices: int = 4) -> "StudentSegmenter":
        student, meta = load_student(model_path, device=resolve_device(device), kinds=STUDENT_KINDS)
        return cls(student, meta, str(model_path), batch_slices)

    @property
    def kind(self) -> str:
        return str(self.metadata.get("kind", STUDENT_KIND))

    @property
    def device(self) -> torch.device:
        return self.student.device

    def to(self, device) -> "StudentSegmenter":
        self.student.to(resolve_device(device))
        return self

    def probabilities(self, volume: Volume, progress: Optional[Callable[[int, int], None]] = None,
                      cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
        """σ(logits) float32 ``[k, j, i]`` on ``volume``'s grid."""
        return predict_probabilities(self.student, self.metadata, volume, batch_slices=self.batch_slices,
                                     progress=progress, cancel=cancel)

    def segment_volume(self, volume: Volume, progress: Optional[Callable[[int, int], None]] = None,
                       cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
        """The prompt-free mask: uint8 0/1 ``[k, j, i]`` on ``volume``'s grid."""
        return (self.probabilities(volume, progress, cancel) > THRESHOLD).astype(np.uint8)


def segment_volume(model_path: PathLike, volume: Volume, device="auto", batch_slices: int = 4,
                   progress: Optional[Callable[[int, int], None]] = None,
                   cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
    """A student's prompt-free mask: uint8 0/1 ``[k, j, i]`` on ``volume``'s grid (loads the file;
    use :class:`StudentSegmenter` to segment several volumes)."""
    return StudentSegmenter.load(model_path, device, batch_slices).segment_volume(volume, progress, cancel)


__all__ = ["STUDENT_KINDS", "StudentSegmenter", "build_slicing_student", "load_student", "model_window",
           "predict_probabilities", "predict_volume", "segment_volume"]
