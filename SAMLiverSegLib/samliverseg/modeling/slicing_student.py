"""The slicing-SAM3D student (design digest, section 3): a frozen 2D SAM image encoder applied
slice by slice + a trainable 3D CNN decoder over a slab of ``D_s`` consecutive slices.

Frames and shapes
-----------------
A volume is an array ``[k, j, i]`` (``K`` slices along k, ``J`` rows, ``I`` columns), already
windowed to grey levels 0…255 ("window units", ``windowing.apply_window``), as float. A *slab*
is ``D_s`` consecutive axial slices ``[z, z + D_s)``: a tensor ``(B, 1, D, H, W)`` with D along
k, H along j, W along i.

Per slice (:meth:`SlicingStudent.embed`), exactly as the base model's ``ModelSpec`` says to feed
its encoder, except for the resize:

1. resize the ``H × W`` slice to the encoder's square input ``S × S`` (bilinear, antialiased
   when shrinking). The student always uses this *square* resize (no aspect-preserving resize +
   padding as the prompt engine does for LiteMedSAM): the decoder is trained on these
   embeddings and its output is resized back to ``H × W`` the same way, so the mapping is a
   pure per-axis scale and no padding has to be cropped;
2. repeat the grey channel to 3 channels;
3. normalise: ``"sam_pixel"``: ``(x − pixel_mean) / pixel_std`` per channel on 0…255;
   ``"minmax01"`` (LiteMedSAM, MedSAM): ``(x − min) / max(max − min, 1e-8)`` over the slice
   (as ``predictor.SlicePredictor.preprocess``);
4. the frozen encoder: ``(N, 3, S, S) → (N, C, h, w)`` (TinyViT: 256 → 256×64×64; SAM ViT-B:
   1024 → 256×64×64).

The per-slice embeddings are stacked along depth into ``(B, C, D, h, w)`` and decoded by the 3D
CNN (:class:`SlabDecoder`):

* stem: 1×1×1 conv ``C → hidden`` + norm + PReLU (MONAI ``Convolution``, no conv bias: the
  norm's affine shift replaces it);
* a 3×3×3 residual block at ``(D, h, w)`` (two convs): this is where neighbouring slices
  exchange information;
* two in-plane ×2 up-samplings (transposed conv, kernel = stride = (1, 2, 2)), the first
  followed by a 3×3×3 conv, channels ``hidden → hidden/2 → hidden/4``;
* a 1×1×1 conv to one logit channel.

The norm (``decoder_norm``) is by default ``"channel"``: a LayerNorm over the channels of each
voxel (SAM's ``LayerNorm2d`` in 3D). ``"instance"`` (affine instance norm over the slab) is kept
as an option; it standardises every channel over the slab, which throws away how much of a
channel a slab holds, so that in a slab without liver the most liver-like tissue is
standardised into looking like liver. Measured on 3D-IRCADb-01 patient 1 (lite_medsam encoder,
the same 48 training steps on slices 0–85, Dice at the native 256×256 on the cached embeddings):
instance 0.70 on the trained slices / 0.87 on the held-out slices 86–128, with liver marked on
every slice of the liver-free slabs; channel 0.94 / 0.94, about 500 false voxels in all on
the liver-free slices.

The native output is ``(B, 1, D, 4h, 4w)`` (256×256 for both LiteMedSAM and SAM ViT-B, like
SAM's low-res masks); :meth:`decode` resizes it in-plane to ``out_hw`` (bilinear on the
logits) when asked. The depth axis is never resampled, so slice ``d`` of the output belongs to
slice ``d`` of the input. The coarse mask is ``σ(logits) > 0.5`` (digest: ``M_coarse``).

Algorithm 1 (``automatic.student.predict_volume``)
------------------------------------
``for z = 0, D_s, 2 D_s, …``: take the slab ``[z, z + D_s)``, (optionally) augment it,
predict, write the probabilities of the slab back at ``z``. The last slab of a volume whose
depth ``K`` is not a multiple of ``D_s`` is **overlapped**: it is taken as ``[K − D_s, K)`` (a
full slab, as in training) and only its slices ``[z, K)`` (the ones no earlier slab wrote) are
written back, so every slice is written exactly once (:func:`slab_plan`). A volume thinner than
``D_s`` is padded at the end by repeating its last slice; the padding is dropped. Each slice is
embedded once even where slabs overlap.

Weights
-------
Only ``decoder.*`` is trained (:meth:`SlicingStudent.trainable_state`); the encoder's parameters
have ``requires_grad = False`` and the encoder stays in eval mode even after ``.train()``.
A finished model (``model.pth``, kind ``"student"``) holds the whole state dict
(``encoder.*`` + ``decoder.*``, so that it does not depend on where the base weights were) and
the metadata needed to rebuild it (:func:`student_metadata`).

This module holds the modules and pure functions only: building a student from a registered
model's weights (``build_slicing_student``), reading a ``model.pth`` (``load_student``) and
Algorithm 1 (``predict_volume``) are in ``samliverseg.automatic.student``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The model.pth metadata "kind" of a finished student.
STUDENT_KIND = "student"
#: M_coarse = σ(logits) > THRESHOLD.
THRESHOLD = 0.5

AugmentFn = Callable[[Tensor], Union[Tensor, Tuple[Tensor, Callable[[Tensor], Tensor]]]]


class ChannelNorm3d(nn.Module):
    """LayerNorm over the channel axis of each voxel of a (B, C, D, H, W) tensor (SAM's
    ``LayerNorm2d`` in 3D). Unlike instance/group norm it pools nothing over space, so a slab
    without liver is not re-standardised into looking like one that has some."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).square().mean(dim=1, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)


DECODER_NORMS = ("channel", "instance")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "channel":
        return ChannelNorm3d(channels)
    return nn.InstanceNorm3d(channels, affine=True)


class _ConvNormAct(nn.Sequential):
    """MONAI ``Convolution`` (conv only, no bias: the norm's affine shift replaces it) + norm + PReLU."""

    def __init__(self, cin: int, cout: int, kernel, norm: str, act: bool = True, transposed: bool = False):
        from monai.networks.blocks import Convolution

        if transposed:  # in-plane x2: kernel = stride = (1, 2, 2)
            conv = Convolution(3, cin, cout, strides=(1, 2, 2), kernel_size=(1, 2, 2), padding=0, output_padding=0,
                               is_transposed=True, conv_only=True, bias=False)
        else:
            conv = Convolution(3, cin, cout, kernel_size=kernel, conv_only=True, bias=False)
        layers = [conv, _norm(norm, cout)] + ([nn.PReLU()] if act else [])
        super().__init__(*layers)


class _Residual(nn.Module):
    """x → act(x + norm(conv(act(norm(conv(x)))))), 3×3×3 convs."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(_ConvNormAct(channels, channels, 3, norm), _ConvNormAct(channels, channels, 3, norm,
                                                                                          act=False))
        self.act = nn.PReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


class SlabDecoder(nn.Module):
    """The trainable 3D CNN: ``(B, C, D, h, w)`` embeddings → ``(B, 1, D, 4h, 4w)`` logits."""

    def __init__(self, embed_dim: int, hidden: int = 64, norm: str = "channel"):
        super().__init__()
        if hidden < 4 or hidden % 4:
            raise ValueError(f"hidden must be a multiple of 4 (>= 4), got {hidden}")
        if norm not in DECODER_NORMS:
            raise ValueError(f"norm must be one of {DECODER_NORMS}, got {norm!r}")
        h2, h4 = hidden // 2, hidden // 4
        self.stem = _ConvNormAct(embed_dim, hidden, 1, norm)
        self.context = _Residual(hidden, norm)
        self.up1 = _ConvNormAct(hidden, h2, None, norm, transposed=True)
        self.refine1 = _ConvNormAct(h2, h2, 3, norm)
        self.up2 = _ConvNormAct(h2, h4, None, norm, transposed=True)
        self.head = nn.Conv3d(h4, 1, kernel_size=1)

    def forward(self, emb: Tensor) -> Tensor:
        x = self.context(self.stem(emb))
        x = self.refine1(self.up1(x))
        return self.head(self.up2(x))


class SlicingStudent(nn.Module):
    """Frozen 2D SAM encoder per slice + trainable 3D decoder over a slab (module docstring)."""

    def __init__(self, encoder: nn.Module, embed_dim: int, image_size: int, pixel_mean=None, pixel_std=None,
                 slab_depth: int = 8, hidden: int = 64, normalization: str = "sam_pixel",
                 decoder_norm: str = "channel"):
        super().__init__()
        if normalization not in ("sam_pixel", "minmax01"):
            raise ValueError(f"normalization must be 'sam_pixel' or 'minmax01', got {normalization!r}")
        if slab_depth < 1:
            raise ValueError(f"slab_depth must be at least 1, got {slab_depth}")
        self.encoder = encoder
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()
        self.embed_dim = int(embed_dim)
        self.image_size = int(image_size)
        self.slab_depth = int(slab_depth)
        self.hidden = int(hidden)
        self.normalization = normalization
        mean = pixel_mean if pixel_mean is not None else (0.0, 0.0, 0.0)
        std = pixel_std if pixel_std is not None else (1.0, 1.0, 1.0)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.decoder_norm = decoder_norm
        self.decoder = SlabDecoder(self.embed_dim, self.hidden, norm=decoder_norm)
        self.spec = None  # the base model's ModelSpec (set by build_slicing_student / load_student)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "SlicingStudent":
        super().train(mode)
        self.encoder.eval()  # frozen: dropout/normalisation statistics never in training mode
        return self

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    # ------------------------------------------------------------------ encoder side
    def preprocess(self, slices: Tensor) -> Tensor:
        """``(N, H, W)`` window units → ``(N, 3, S, S)`` normalised encoder input."""
        if slices.ndim != 3:
            raise ValueError(f"expected slices (N, H, W), got shape {tuple(slices.shape)}")
        x = slices.float()[:, None]
        n, _, h, w = x.shape
        s = self.image_size
        if (h, w) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=h > s or w > s)
        x = x.expand(n, 3, s, s)
        if self.normalization == "sam_pixel":
            return ((x - self.pixel_mean.to(x.device)) / self.pixel_std.to(x.device)).contiguous()
        flat = x.reshape(n, -1)
        lo = flat.min(dim=1).values.view(n, 1, 1, 1)
        hi = flat.max(dim=1).values.view(n, 1, 1, 1)
        return ((x - lo) / torch.clamp(hi - lo, min=1e-8)).contiguous()

    @torch.no_grad()
    def embed(self, slices: Tensor, batch: Optional[int] = None) -> Tensor:
        """``(D, H, W)`` window units (0…255) → frozen embeddings ``(D, C, h, w)`` (float32,
        on the model's device); ``batch`` slices per encoder call (all at once by default)."""
        dev = next(self.encoder.parameters()).device
        d = int(slices.shape[0])
        step = max(1, int(batch or d or 1))
        out = []
        for a in range(0, d, step):
            x = self.preprocess(slices[a:a + step].to(dev))
            out.append(self.encoder(x).float())
        if not out:
            raise ValueError("embed: no slices given")
        return torch.cat(out, 0)

    # ------------------------------------------------------------------ decoder side
    def decode(self, emb: Tensor, out_hw: Optional[Sequence[int]] = None) -> Tensor:
        """``(B, C, D, h, w)`` embeddings → logits ``(B, 1, D, H', W')``: the native ``4h × 4w``
        or, with ``out_hw``, resized in-plane (bilinear) to ``out_hw``."""
        if emb.ndim != 5 or emb.shape[1] != self.embed_dim:
            raise ValueError(f"expected embeddings (B, {self.embed_dim}, D, h, w), got {tuple(emb.shape)}")
        logits = self.decoder(emb.to(self.device, dtype=next(self.decoder.parameters()).dtype))
        if out_hw is not None and tuple(logits.shape[-2:]) != tuple(int(v) for v in out_hw):
            b, c, d, h, w = logits.shape
            flat = logits.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
            flat = F.interpolate(flat, size=tuple(int(v) for v in out_hw), mode="bilinear", align_corners=False)
            logits = flat.reshape(b, d, c, *flat.shape[-2:]).permute(0, 2, 1, 3, 4)
        return logits

    def forward(self, slab: Tensor) -> Tensor:
        """``(B, 1, D, H, W)`` window units → logits ``(B, 1, D, H, W)`` (gradients reach the
        decoder only)."""
        if slab.ndim != 5 or slab.shape[1] != 1:
            raise ValueError(f"expected a slab (B, 1, D, H, W), got shape {tuple(slab.shape)}")
        b, _, d, h, w = slab.shape
        emb = self.embed(slab.reshape(b * d, h, w))  # (B*D, C, e, e)
        emb = emb.reshape(b, d, *emb.shape[1:]).permute(0, 2, 1, 3, 4)
        return self.decode(emb, out_hw=(h, w))

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> Dict[str, Tensor]:
        """The decoder's weights (keys ``decoder.*``), detached CPU copies."""
        return {f"decoder.{k}": v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()}

    def load_trainable_state(self, state: Mapping[str, Tensor]) -> None:
        """Load ``decoder.*`` weights strictly (other keys are ignored)."""
        sub = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
        self.decoder.load_state_dict(sub, strict=True)

    def parameter_counts(self) -> Dict[str, int]:
        return {"encoder_frozen": sum(p.numel() for p in self.encoder.parameters()),
                "decoder_trainable": sum(p.numel() for p in self.decoder.parameters())}


# --------------------------------------------------------------------------- building / loading

def _embed_dim(sam) -> int:
    pe = getattr(sam, "prompt_encoder", None)
    if pe is not None and hasattr(pe, "embed_dim"):
        return int(pe.embed_dim)
    s = int(sam.spec.image_size)
    with torch.no_grad():
        return int(sam.image_encoder(torch.zeros(1, 3, s, s)).shape[1])


def student_from_sam(sam, slab_depth: int = 8, hidden: int = 64, decoder_norm: str = "channel") -> SlicingStudent:
    """A student around the image encoder of a built :class:`~samliverseg.modeling.SamModel`
    (with its ``.spec`` attached)."""
    spec = sam.spec
    student = SlicingStudent(sam.image_encoder, _embed_dim(sam), int(spec.image_size), tuple(spec.pixel_mean),
                             tuple(spec.pixel_std), slab_depth=slab_depth, hidden=hidden,
                             normalization=spec.normalization, decoder_norm=decoder_norm)
    student.spec = spec
    return student


def student_metadata(student: SlicingStudent) -> Dict[str, Any]:
    """The architecture part of a student's model.pth metadata (what :func:`load_student` needs)."""
    spec = student.spec
    return {"kind": STUDENT_KIND, "base_model": spec.name if spec is not None else None,
            "encoder": spec.name if spec is not None else None,
            "architecture": f"slicing-SAM3D student ({getattr(spec, 'architecture', '') or 'SAM'} encoder, frozen; "
                            f"3D CNN decoder)",
            "image_size": student.image_size, "embed_dim": student.embed_dim, "normalization": student.normalization,
            "pixel_mean": [float(v) for v in student.pixel_mean.flatten()],
            "pixel_std": [float(v) for v in student.pixel_std.flatten()],
            "slab_depth": student.slab_depth, "hidden": student.hidden, "decoder_norm": student.decoder_norm,
            "resize": "square",
            "threshold": THRESHOLD}


# --------------------------------------------------------------------------- Algorithm 1

def slab_plan(depth: int, slab_depth: int) -> List[Tuple[int, int, int]]:
    """The slabs of Algorithm 1 for a volume of ``depth`` slices: a list of
    ``(start, write_from, write_to)``: the slab is slices ``[start, start + slab_depth)`` (of the
    volume padded to ``slab_depth`` when it is thinner), and its slices ``[write_from, write_to)``
    are written back. The write ranges tile ``[0, depth)`` exactly once; the last slab overlaps
    its predecessor instead of running past the end."""
    if depth < 1 or slab_depth < 1:
        raise ValueError(f"depth and slab_depth must be positive, got {depth}, {slab_depth}")
    plan = []
    for z in range(0, depth, slab_depth):
        start = min(z, max(0, depth - slab_depth))
        plan.append((start, z, min(z + slab_depth, depth)))
    return plan


__all__ = ["DECODER_NORMS", "STUDENT_KIND", "THRESHOLD", "AugmentFn", "ChannelNorm3d", "SlabDecoder", "SlicingStudent",
           "slab_plan", "student_from_sam", "student_metadata"]
