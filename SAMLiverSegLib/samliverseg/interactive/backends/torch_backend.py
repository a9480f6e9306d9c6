"""The torch backend: the model's own modules, eager (CPU, CUDA, MPS), as before backends existed.

:class:`Backend` is what the slice predictor talks to: ``encode`` (a normalised, padded model
input (1, 3, S, S) -> the image embedding (1, C, E, E), float32) and ``decode`` (embedding + the
prompt encoder's outputs -> low-res mask logits and IoU predictions, as ``MaskDecoder.forward``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

#: Encoder precisions of torch: full float32, or autocast to bfloat16 / float16 (the decoder and
#: the embeddings stay float32).
TORCH_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Backend:
    """What runs the image encoder and the mask decoder of one model (see the module docstring)."""

    name = "torch"

    def __init__(self, precision: str, version: str, decoder: str, notes: Optional[List[str]] = None,
                 decoder_precision: str = "fp32"):
        self.precision = precision
        self.decoder_precision = decoder_precision
        self.version = version
        self.decoder_backend = decoder
        self.notes: List[str] = list(notes or [])
        self.startup_s: Optional[float] = None  # open_backend: time to have it ready (conversion included)
        self.conversion_s: Optional[float] = None  # time spent converting, when it had to (else None)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
               dense: torch.Tensor, multimask_output: bool) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> Dict[str, object]:
        """JSON-friendly: what runs, in which precision, and what it cost to get there."""
        return {
            "name": self.name,
            "version": self.version,
            "precision": self.precision,
            "decoder": self.decoder_backend,
            "decoder_precision": self.decoder_precision,
            "startup_s": None if self.startup_s is None else round(self.startup_s, 3),
            "conversion_s": None if self.conversion_s is None else round(self.conversion_s, 3),
            "notes": list(self.notes),
        }


class TorchBackend(Backend):
    """Eager torch on ``device``; ``precision`` autocasts the encoder (bf16/fp16); the decoder is fp32."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str = "fp32",
                 notes: Optional[List[str]] = None):
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(TORCH_PRECISIONS)}, got {precision!r}")
        super().__init__(precision, torch.__version__, "torch", notes)
        self.model = model
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        dtype = TORCH_PRECISIONS[self.precision]
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self.model.image_encoder(x.to(self.device)).float()

    @torch.no_grad()
    def decode(self, image_embeddings, image_pe, sparse, dense, multimask_output):
        return self.model.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
