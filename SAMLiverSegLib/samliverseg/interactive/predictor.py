"""Embed a 2D slice once, prompt it many times (segment-anything's predictor, for CT slices).

A slice arrives as a windowed ``uint8`` image with its pixel spacing (rows, columns). It is
resized so that its *physical* aspect ratio is kept (coronal and sagittal slices of an
anisotropic CT have non-square pixels) and fills the model's input, or, given a ``field_mm`` (the
engine gives the model's ``crop_field_mm`` for a volume cropped inside the body), a slice narrower
than that field is padded to it, not magnified (a crop keeps the organ's scale). Three channels
are made from the one grey channel, the
model's normalisation is applied and the image is padded to the model's square input. The
:class:`SliceEmbedding` remembers the transform so that prompts given in slice pixel coordinates
(x = column, y = row) are mapped into the model frame, and masks are mapped back. The engine
embeds each slice as the model should see it (``slice_view``: upright, in the radiological
orientation, whatever the file's voxel order); the embedding keeps that :class:`SliceView`, and
prompts and masks cross it here, so callers keep the slice's own coordinates.

Embeddings are kept in an :class:`EmbeddingCache`, an LRU bounded in bytes.

The encoder and the decoder run on a backend (``backends/``: torch, ONNX Runtime, OpenVINO); the
prompt encoder and the pre/post-processing stay in torch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from samliverseg.interactive.backends import TORCH_PRECISIONS, Backend, check_slice, open_backend
from samliverseg.interactive.slice_view import SliceView


@dataclass
class SliceEmbedding:
    """The image embedding of one slice and the geometry of its model input."""

    features: torch.Tensor  # (1, C, E, E) on the model's device
    original_hw: Tuple[int, int]  # rows, cols of the image embedded (the slice's view)
    input_hw: Tuple[int, int]  # size of the resized image inside the padded model input
    image_size: int  # side of the square model input
    view: SliceView = SliceView()  # how the slice was turned into the image embedded

    @property
    def scale_xy(self) -> Tuple[float, float]:
        """Model-frame pixels per slice pixel along x (columns) and y (rows)."""
        return self.input_hw[1] / self.original_hw[1], self.input_hw[0] / self.original_hw[0]

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


@dataclass
class Prediction:
    """Masks on the slice grid, their predicted IoU, and the low-res logits (for refinement)."""

    masks: np.ndarray  # (C, rows, cols) bool
    scores: np.ndarray  # (C,)
    low_res_logits: torch.Tensor  # (C, 4E, 4E)

    def best(self) -> Tuple[np.ndarray, float, torch.Tensor]:
        b = int(np.argmax(self.scores))
        return self.masks[b], float(self.scores[b]), self.low_res_logits[b : b + 1]


class EmbeddingCache:
    """A thread-safe LRU of slice embeddings, bounded by the bytes of the stored tensors."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[Hashable, SliceEmbedding]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Optional[SliceEmbedding]:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, item: SliceEmbedding) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = item
            self._bytes += item.nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


class SlicePredictor:
    """Runs a :class:`~samliverseg.modeling.sam.SamModel` on slices, as its spec says to feed it."""

    #: Encoder precisions of the torch backend (``auto`` is resolved by the backend).
    PRECISIONS = TORCH_PRECISIONS

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str = "fp32",
                 backend: str = "torch", notify=None, decoder_precision: str = "fp32"):
        self.model = model
        self.spec = model.spec
        self.device = torch.device(device)
        self.image_size = int(self.spec.image_size)
        if precision not in self.PRECISIONS and precision != "auto":
            raise ValueError(f"precision must be one of {sorted(self.PRECISIONS)} or auto, got {precision!r}")
        self.requested = (backend, precision, decoder_precision)
        self._notify = notify
        self._backend: Optional[Backend] = None
        # The decoder's constant inputs (see _constants), made once.
        self._dense_pe: Optional[torch.Tensor] = None
        self._no_mask_dense: Optional[torch.Tensor] = None
        # Inference from a GUI thread and a prefetch thread must not interleave on one model.
        self.lock = threading.RLock()

    @property
    def backend(self) -> Backend:
        """What runs the encoder and decoder; opened (converted, on first use per machine) when first needed."""
        with self.lock:
            if self._backend is None:
                backend, precision, decoder_precision = self.requested
                check = None if backend == "torch" else self.preprocess(check_slice(self.image_size))[0]
                self._backend = open_backend(self.model, self.device, backend, precision, check, self._notify,
                                             decoder_precision)
            return self._backend

    @property
    def precision(self) -> str:
        return self.backend.precision

    # -- image side -----------------------------------------------------------------------
    def input_size(self, rows: int, cols: int, pixel_spacing: Sequence[float] = (1.0, 1.0),
                   field_mm: Optional[float] = None) -> Tuple[int, int]:
        """(h, w) of the resized slice inside the square model input: the longest side fills it,
        unless the slice is narrower than ``field_mm`` (then it is scaled as that field would be)."""
        s = self.image_size
        if self.spec.resize == "square":
            return s, s
        h_mm, w_mm = rows * float(pixel_spacing[0]), cols * float(pixel_spacing[1])
        scale = s / max(h_mm, w_mm, float(field_mm or 0.0))
        return max(1, min(s, int(round(h_mm * scale)))), max(1, min(s, int(round(w_mm * scale))))

    def preprocess(self, image: np.ndarray, pixel_spacing: Sequence[float] = (1.0, 1.0),
                   field_mm: Optional[float] = None) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """uint8 (rows, cols) slice -> (1, 3, S, S) normalised, padded model input."""
        if image.ndim != 2:
            raise ValueError(f"expected a 2D slice, got shape {image.shape}")
        rows, cols = image.shape
        h, w = self.input_size(rows, cols, pixel_spacing, field_mm)
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        if (h, w) != (rows, cols):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=h < rows or w < cols)
        x = x.expand(1, 3, h, w)
        if self.spec.normalization == "sam_pixel":
            mean = torch.tensor(self.spec.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(self.spec.pixel_std, dtype=torch.float32).view(1, 3, 1, 1)
            x = (x - mean) / std
        elif self.spec.normalization == "minmax01":
            lo, hi = x.min(), x.max()
            x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
        else:  # pragma: no cover - a registry error
            raise ValueError(f"unknown normalization {self.spec.normalization!r}")
        s = self.image_size
        x = F.pad(x, (0, s - w, 0, s - h))
        return x.contiguous(), (h, w)

    @torch.no_grad()
    def embed(self, image: np.ndarray, pixel_spacing: Sequence[float] = (1.0, 1.0),
              field_mm: Optional[float] = None) -> SliceEmbedding:
        x, (h, w) = self.preprocess(image, pixel_spacing, field_mm)
        with self.lock:
            features = self.backend.encode(x)
        return SliceEmbedding(features=features, original_hw=tuple(image.shape), input_hw=(h, w), image_size=self.image_size)

    # -- prompt side ----------------------------------------------------------------------
    @torch.no_grad()
    def predict(
        self,
        embedding: SliceEmbedding,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[Sequence[float]] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
    ) -> Prediction:
        """Prompts in slice pixel coordinates: points (N, 2) as (x=col, y=row), labels 1/0,
        box (x0, y0, x1, y1) inclusive; ``mask_input`` (1, 4E, 4E) low-res logits from an
        earlier prediction on the same model frame. Masks come back on the slice's grid."""
        sx, sy = embedding.scale_xy
        view, hw = embedding.view, embedding.original_hw
        dev = self.device
        points = None
        if point_coords is not None and len(point_coords):
            c = torch.as_tensor(view.points(point_coords, hw) * np.array([sx, sy], dtype=np.float32))
            lab = torch.as_tensor(np.asarray(point_labels, dtype=np.int64))
            points = (c[None].to(dev), lab[None].to(dev))
        boxes = None
        if box is not None:
            b = np.asarray(view.box(box, hw), dtype=np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32)
            boxes = torch.as_tensor(b)[None].to(dev)
        masks = mask_input[None].to(dev) if mask_input is not None else None
        with self.lock:
            dense_pe, no_mask_dense = self._constants()
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=masks)
            if masks is None:
                dense = no_mask_dense
            low_res, iou = self.backend.decode(embedding.features, dense_pe, sparse, dense, multimask_output)
        full = self.postprocess(low_res, embedding)
        return Prediction(masks=(full > 0.0).cpu().numpy(), scores=iou[0].float().cpu().numpy(), low_res_logits=low_res[0].detach())

    @torch.no_grad()
    def _constants(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The decoder inputs that do not depend on the slice or the prompt, made once and
        contiguous (a backend then reads them without a copy): the positional encoding of the
        embedding grid and the dense embedding of "no mask". The prompt encoder is frozen at
        inference (the exported backends compile the model once anyway)."""
        if self._dense_pe is None:
            pe = self.model.prompt_encoder
            self._dense_pe = pe.get_dense_pe().contiguous()
            self._no_mask_dense = pe(points=None, boxes=None, masks=None)[1].contiguous()
        return self._dense_pe, self._no_mask_dense

    @torch.no_grad()
    def mask_to_low_res(self, mask: np.ndarray, embedding: SliceEmbedding, logit: float = 8.0) -> torch.Tensor:
        """A slice mask (rows, cols) -> a (1, 4E, 4E) dense mask prompt: the inverse of
        :meth:`postprocess` (into the view, resize to the model-input size, pad to S, resize to
        4E), given as logits of +-``logit`` so that it reads like an earlier prediction's low-res output."""
        s = embedding.image_size
        h, w = embedding.input_hw
        low = 4 * int(embedding.features.shape[-1])
        m = torch.from_numpy(np.ascontiguousarray(embedding.view.image(mask), dtype=np.float32))[None, None]
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        m = F.pad(m, (0, s - w, 0, s - h))
        m = F.interpolate(m, size=(low, low), mode="bilinear", align_corners=False)
        return torch.where(m[0] > 0.5, float(logit), -float(logit))

    def postprocess(self, low_res: torch.Tensor, embedding: SliceEmbedding) -> torch.Tensor:
        """(1, C, 4E, 4E) logits -> (C, rows, cols) logits on the slice grid (out of the view)."""
        s = embedding.image_size
        h, w = embedding.input_hw
        x = F.interpolate(low_res.float(), size=(s, s), mode="bilinear", align_corners=False)[..., :h, :w]
        x = F.interpolate(x, size=embedding.original_hw, mode="bilinear", align_corners=False)
        return embedding.view.unview(x[0])
