"""Automatic (prompt-free) 3D U-Net segmentation: the network and its inference pipeline.

The network is MONAI's ``UNet`` (``spatial_dims=3``, one input channel, one output logit channel,
instance norm, dropout, ReLU by default; residual units when ``num_res_units > 0``), initialised
Kaiming-normal by the trainer (``training/unet_trainer.py``), which writes ``model.pth``::

    {"model": UNetModel.state_dict(),          # "fine.*" (+ "coarse.*" in two-stage mode)
     "metadata": {"kind": "unet", "network": {channels, strides, num_res_units, dropout, act,
                  kernel_size}, "two_stage": bool, "patch_size": [k, j, i], "coarse_size": [k, j, i],
                  "roi_margin_mm": float, "sw_batch_size": int, "overlap": float,
                  "largest_component": bool, "window": <spec>, "window_hu": [lo, hi],
                  "spacing": [si, sj, sk] | None, "target": "liver" | "tumor", ...}}

Pipeline (:func:`segment_volume`), identical to what the trainer validates on the cache grid:

1. **Grid.** When the training cache was resampled (``metadata["spacing"]``), the HU volume is
   resampled like ``samliverseg prepare`` does (SimpleITK, linear, same origin and direction,
   ``round(size * spacing / new spacing)`` voxels, outside voxels = the volume minimum).
2. **Intensity.** ``windowing.apply_window`` with the cache's window (uint8), then ``g / 255``:
   the trainer reads the cache's uint8 image and scales it to [0, 1] the same way.
3. **Coarse stage** (two-stage models only). The [0, 1] image ``[k, j, i]`` is resized to
   ``coarse_size`` (MONAI ``Resize``, trilinear, as in training); the coarse net's logits > 0
   (sigmoid > 0.5) give a mask whose largest connected component's bounding box, mapped back to
   the full grid (coarse voxel ``c`` covers full voxels ``[c f, (c + 1) f)``, ``f = full /
   coarse`` per axis) and grown by ``roi_margin_mm`` (``ceil(margin / spacing)`` voxels per
   axis, clipped to the volume) is the liver ROI. An empty coarse mask means the whole volume.
4. **Fine stage.** MONAI ``sliding_window_inference`` over the ROI (windows of ``patch_size``,
   ``overlap``, Gaussian blending); ``sigmoid(logit) > 0.5`` (i.e. logit > 0) is the mask, pasted
   into a zero volume; optionally its largest connected component (default: on for the liver
   target, off for tumours, which are several).
5. **Back to the input grid.** The mask is resampled with nearest neighbour onto the input
   volume's exact grid (size, spacing, origin, direction), so the output is ``uint8 [k, j, i]``
   0/1 on the input grid whatever its orientation.

Frames: arrays are ``[k, j, i]`` (numpy order of SimpleITK arrays) and the MONAI/torch spatial
axes are the same (tensor ``(N, C, K, J, I)``); ``patch_size`` and ``coarse_size`` are given in
that order. Spacings are ``(si, sj, sk)`` in mm (ITK order), hence reversed when applied to
array axes. Physical positions (only used by SimpleITK's resampling) are LPS.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from samliverseg.core.devices import resolve_device
from samliverseg.core.errors import CheckpointError, InputError
from samliverseg.core.windowing import apply_window, get_window
from samliverseg.io.volume import Volume
from samliverseg.models.exports import read_model_file

MODEL_KIND = "unet"
#: The network options stored in ``metadata["network"]`` (and compared on resume).
NETWORK_KEYS = ("channels", "strides", "num_res_units", "dropout", "act", "kernel_size")
ACTIVATIONS = {"relu": "RELU", "prelu": "PRELU", "leakyrelu": "LEAKYRELU"}


# ---------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------
def make_unet(channels: Sequence[int], strides: Sequence[int], num_res_units: int = 2, dropout: float = 0.0,
              act: str = "relu", kernel_size: int = 3) -> nn.Module:
    """MONAI ``UNet(spatial_dims=3, in_channels=1, out_channels=1, ..., norm=INSTANCE)``."""
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(int(c) for c in channels),
                strides=tuple(int(s) for s in strides), kernel_size=int(kernel_size), up_kernel_size=int(kernel_size),
                num_res_units=int(num_res_units), act=ACTIVATIONS[str(act).lower()], norm="INSTANCE",
                dropout=float(dropout))


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal weights (fan-in, ReLU gain) for every (transposed) 3D convolution, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class UNetModel(nn.Module):
    """The fine U-Net and, in two-stage mode, the coarse (ROI-finding) one, as one module.

    ``forward(x, coarse_x=None) -> (fine_logits, coarse_logits | None)``: one call runs both, so
    that DistributedDataParallel sees one forward per backward.
    """

    def __init__(self, network: Mapping[str, Any], two_stage: bool = False):
        super().__init__()
        self.network = {k: network[k] for k in NETWORK_KEYS if k in network}
        self.fine = make_unet(**self.network)
        self.coarse = make_unet(**self.network) if two_stage else None

    @property
    def two_stage(self) -> bool:
        return self.coarse is not None

    def forward(self, x: torch.Tensor, coarse_x: Optional[torch.Tensor] = None):
        fine = self.fine(x)
        coarse = self.coarse(coarse_x) if (coarse_x is not None and self.coarse is not None) else None
        return fine, coarse


# ---------------------------------------------------------------------------------------------
# ROI helpers (shared with the trainer)
# ---------------------------------------------------------------------------------------------
def margin_voxels(spacing_ijk: Sequence[float], margin_mm: float) -> Tuple[int, int, int]:
    """The ROI margin in voxels along (k, j, i): ``ceil(margin_mm / spacing)`` per axis."""
    si, sj, sk = (float(s) for s in spacing_ijk)
    return tuple(int(math.ceil(float(margin_mm) / s - 1e-9)) for s in (sk, sj, si))  # type: ignore[return-value]


def grow_box(lo: Sequence[int], hi: Sequence[int], shape_kji: Sequence[int], spacing_ijk: Sequence[float],
             margin_mm: float) -> Tuple[slice, slice, slice]:
    """``[lo, hi)`` (k, j, i; hi exclusive) grown by the margin and clipped to the array: slices."""
    m = margin_voxels(spacing_ijk, margin_mm)
    return tuple(slice(max(0, int(a) - mm), min(int(n), int(b) + mm))
                 for a, b, n, mm in zip(lo, hi, shape_kji, m))  # type: ignore[return-value]


def roi_slices(mask: np.ndarray, spacing_ijk: Sequence[float], margin_mm: float) -> Optional[Tuple[slice, slice, slice]]:
    """The bounding box of ``mask`` ([k, j, i], non-zero) grown by ``margin_mm``; None if empty."""
    m = np.asarray(mask) != 0
    if not m.any():
        return None
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(m.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    return grow_box(lo, hi, m.shape, spacing_ijk, margin_mm)


def coarse_box_to_full(lo: Sequence[int], hi: Sequence[int], coarse_shape: Sequence[int],
                       full_shape: Sequence[int]) -> Tuple[list, list]:
    """Map a coarse-grid box ``[lo, hi)`` to the full grid it was resized from (covering voxels)."""
    flo, fhi = [], []
    for a, b, c, n in zip(lo, hi, coarse_shape, full_shape):
        f = float(n) / float(c)
        flo.append(max(0, int(math.floor(a * f))))
        fhi.append(min(int(n), int(math.ceil(b * f))))
    return flo, fhi


# ---------------------------------------------------------------------------------------------
# prediction on a [0, 1] image on the model's grid
# ---------------------------------------------------------------------------------------------
def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.float16, enabled=bool(amp and device.type == "cuda"))


@torch.no_grad()
def coarse_roi(coarse: nn.Module, image01: torch.Tensor, coarse_size: Sequence[int], spacing_ijk: Sequence[float],
               margin_mm: float, amp: bool = False) -> Optional[Tuple[slice, slice, slice]]:
    """The liver ROI found by the coarse net on ``image01`` (a (K, J, I) tensor on its device)."""
    from monai.transforms import Resize
    from samliverseg.core.postprocess import largest_connected_component
    device = image01.device
    small = Resize(tuple(int(s) for s in coarse_size), mode="trilinear")(image01[None])  # (1, *coarse_size)
    small = torch.as_tensor(small).as_subclass(torch.Tensor).to(device=device, dtype=torch.float32)[None]
    with _autocast(device, amp):
        logits = coarse(small)
    mask = (logits.float()[0, 0] > 0).cpu().numpy()
    if not mask.any():
        return None
    mask = largest_connected_component(mask)
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    flo, fhi = coarse_box_to_full(lo, hi, mask.shape, image01.shape)
    return grow_box(flo, fhi, image01.shape, spacing_ijk, margin_mm)


@torch.no_grad()
def predict_mask(model: UNetModel, image01: Union[np.ndarray, torch.Tensor], spacing_ijk: Sequence[float],
                 settings: Mapping[str, Any], device: Union[str, torch.device] = "cpu", amp: bool = False,
                 largest_component: Optional[bool] = None) -> np.ndarray:
    """uint8 0/1 mask ``[k, j, i]`` of ``image01`` (float [0, 1], ``[k, j, i]``) on the same grid.

    ``settings``: ``patch_size``, ``sw_batch_size``, ``overlap``, ``coarse_size``, ``roi_margin_mm``
    and ``largest_component`` (the model.pth metadata or the trainer's options). Steps 3-4 of the
    module docstring. The model is used as it is (call ``model.eval()`` first).
    """
    from monai.inferers import sliding_window_inference
    from samliverseg.core.postprocess import largest_connected_component
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(image01, dtype=np.float32) if isinstance(image01, np.ndarray) else image01,
                        dtype=torch.float32).to(device)
    shape = tuple(int(s) for s in x.shape)
    roi = None
    if model.coarse is not None:
        roi = coarse_roi(model.coarse, x, settings["coarse_size"], spacing_ijk, float(settings["roi_margin_mm"]), amp)
    if roi is None:
        roi = tuple(slice(0, n) for n in shape)
    crop = x[roi][None, None]
    with _autocast(device, amp):
        logits = sliding_window_inference(crop, roi_size=tuple(int(s) for s in settings["patch_size"]),
                                          sw_batch_size=int(settings.get("sw_batch_size", 4)), predictor=model.fine,
                                          overlap=float(settings.get("overlap", 0.25)), mode="gaussian")
    fine = (torch.as_tensor(logits).float()[0, 0] > 0).cpu().numpy().astype(np.uint8)
    out = np.zeros(shape, dtype=np.uint8)
    out[roi] = fine
    lcc = settings.get("largest_component", False) if largest_component is None else largest_component
    if lcc and out.any():
        out = largest_connected_component(out)
    return out


# ---------------------------------------------------------------------------------------------
# model.pth
# ---------------------------------------------------------------------------------------------
_REQUIRED_META = ("network", "patch_size", "window")


def read_unet_checkpoint(model_path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``(state_dict, metadata)`` of a unet ``model.pth``; CheckpointError when it is not one."""
    obj = read_model_file(model_path, kinds=(MODEL_KIND,))
    meta = obj["metadata"]
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{Path(model_path).expanduser()}: the unet metadata lacks {', '.join(missing)} "
                              f"(damaged or foreign model file)")
    return obj["model"], meta


def load_unet_model(model_path: Union[str, Path], device: Union[str, torch.device] = "cpu"
                    ) -> Tuple[UNetModel, Dict[str, Any]]:
    """The network of a unet ``model.pth`` in eval mode on ``device``, and its metadata."""
    state, meta = read_unet_checkpoint(model_path)
    try:
        model = UNetModel(meta["network"], two_stage=bool(meta.get("two_stage", False)))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{model_path}: the weights do not fit the network in its metadata ({first})") from None
    return model.to(device).eval(), meta


def _resample_to_spacing(volume: Volume, spacing_ijk: Sequence[float]):
    """The HU volume resampled like ``samliverseg prepare --spacing``: (float32 array, grid)."""
    from samliverseg.core.geometry import resample
    return resample(volume.array.astype(np.float32, copy=False), volume.grid, spacing_ijk, interpolator="linear",
                    default_value=float(np.min(volume.array)), extent="round")


def _to_input_grid(mask: np.ndarray, grid, volume: Volume) -> np.ndarray:
    """Nearest-neighbour resampling of ``mask`` (on ``grid``, a core.geometry.Grid) onto ``volume``."""
    from samliverseg.core.geometry import resample
    return resample(mask.astype(np.uint8), grid, volume.grid, interpolator="nearest", default_value=0).array


class UNetSegmenter:
    """A unet ``model.pth`` loaded once (network on its device, metadata, window), for any number
    of volumes: ``UNetSegmenter.load(path, device).segment_volume(volume)``."""

    def __init__(self, net: UNetModel, metadata: Dict[str, Any], path: str = "",
                 largest_component: Optional[bool] = None) -> None:
        self.net, self.metadata, self.path, self.largest_component = net.eval(), metadata, path, largest_component
        try:
            self.window = get_window(metadata["window"])
        except InputError:
            lo, hi = metadata.get("window_hu") or (None, None)
            if lo is None:
                raise CheckpointError(f"{path}: unknown window {metadata['window']!r} in the metadata") from None
            self.window = get_window((lo, hi))

    @classmethod
    def load(cls, model_path: Union[str, Path], device: Union[str, torch.device] = "auto",
             largest_component: Optional[bool] = None) -> "UNetSegmenter":
        net, meta = load_unet_model(model_path, resolve_device(device))
        return cls(net, meta, str(model_path), largest_component)

    kind = MODEL_KIND

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "UNetSegmenter":
        self.net.to(resolve_device(device))
        return self

    def segment_volume(self, volume: Volume) -> np.ndarray:
        """uint8 0/1 mask ``[k, j, i]`` of ``volume`` on its grid (steps 1-5 of the module docstring)."""
        if not isinstance(volume, Volume):
            raise InputError(f"segment_volume needs a Volume, got {type(volume).__name__}")
        spacing = self.metadata.get("spacing")
        if spacing:
            hu, grid = _resample_to_spacing(volume, spacing)
            grid_spacing = grid.spacing
        else:
            grid, hu, grid_spacing = None, volume.array, volume.spacing
        image01 = apply_window(hu, self.window).astype(np.float32) / np.float32(255.0)
        mask = predict_mask(self.net, image01, grid_spacing, self.metadata, device=self.device,
                            largest_component=self.largest_component)
        if grid is not None:
            mask = _to_input_grid(mask, grid, volume)
        return mask


def segment_volume(model_path: Union[str, Path], volume: Volume, device: Union[str, torch.device] = "auto",
                   largest_component: Optional[bool] = None) -> np.ndarray:
    """Segment ``volume`` with the unet ``model.pth``: uint8 0/1 mask ``[k, j, i]`` on the input grid
    (loads the file; use :class:`UNetSegmenter` to segment several volumes).

    ``device``: auto (CUDA > MPS > CPU), cpu, cuda, ... ``largest_component``: keep only the
    largest connected component (default: the model's setting: on for liver, off for tumour).
    Raises CheckpointError for a file that is not a unet model, InputError for a volume that is
    not a 3D image.
    """
    return UNetSegmenter.load(model_path, device, largest_component).segment_volume(volume)
