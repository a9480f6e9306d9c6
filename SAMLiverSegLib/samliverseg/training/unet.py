"""3D U-Net liver/tumour segmentation from scratch (trainer kind ``unet``; design digest section 5).

Config (the ``unet:`` section, :class:`UNetOptions`; common keys in ``training/config.py``)::

    kind: unet
    cache: cache/            # `samliverseg prepare` output (e.g. --window liver --spacing 1.5 1.5 2)
    output: runs/unet1
    target: liver            # liver: label > 0; tumor: label == 2
    epochs: 50
    grad_accum: 1
    weight_decay: 0.0
    seed: 0
    device: auto
    amp: true                # CUDA only
    unet:
      patch_size: [128, 128, 128]       # [k, j, i] voxels of a training patch / inference window
      num_samples: 4                    # RandCropByPosNegLabeld crops per case and step
      batch_cases: 1                    # cases per micro-batch (a micro-batch has batch_cases x num_samples patches)
      channels: [16, 32, 64, 128, 256]
      strides: [2, 2, 2, 2]
      num_res_units: 2                  # 0 = plain conv blocks, > 0 = residual units
      dropout: 0.1
      lr: 0.008                         # Novograd learning rate
      scheduler: warm_restarts          # warm_restarts | cosine | constant
      T_0: 5                            # CosineAnnealingWarmRestarts, in epochs
      T_mult: 3
      eta_min: 0.0                      # the schedule's lowest rate
      pos: 1.0                          # RandCropByPosNegLabeld: target : background crop centres
      neg: 1.0
      val_interval: 1                   # validate every N epochs (and after the last)
      sw_batch_size: 4                  # sliding-window inference: windows per forward pass
      overlap: 0.25
      largest_component: null          # keep the largest component (null: yes for liver, no for tumour)
      two_stage: false                  # coarse ROI model + fine model
      coarse_size: [128, 128, 128]      # [k, j, i] the coarse model's input (whole volume resized)
      roi_margin_mm: 20.0               # margin around the liver box (training crops and inference ROI)
      cache_rate: 1.0                   # CacheDataset: fraction of the training cases cached in RAM
      num_workers: 0                    # DataLoader worker processes (and CacheDataset threads)

The common keys ``lr``, ``batch_size`` and ``scheduler`` belong to the decoder trainer and are
**not used** here (a warning is logged when they differ from their defaults): the U-Net's rate is
``unet.lr`` (default 0.008, the report's Novograd rate), its batch is ``batch_cases`` ×
``num_samples`` patches and its schedule ``unet.scheduler``. ``base_model``, ``box_jitter_px``,
``points_per_slice``, ``max_slices_per_case`` and ``train_prompt_encoder`` do not apply.
``checkpoint`` (optional) is a unet ``model.pth`` to start from (same network options), e.g. the
report's second phase at a lower rate.

Data (MONAI)
------------
Cases: the labelled cases of the cache's ``train`` split (all of them, so that tumour-free cases
give negative patches for ``target: tumor``); at least one must contain the target, else
:class:`~samliverseg.core.errors.InputError`. Validation: the labelled ``val`` cases, read one at a
time (a plain loop, as the report's plain ``Dataset``).

Training pipeline, a MONAI ``Compose`` in a ``CacheDataset`` (``cache_rate``): the deterministic
part is cached, uint8 to keep memory low:

* ``load_case`` (a MONAI ``Lambda``): the case's ``.npz``: ``image`` (the cache's uint8 windowed image) and ``label`` =
  the target mask (liver: ``label > 0``, tumour: ``label == 2``), channel-first ``(1, K, J, I)``;
  in two-stage mode cropped to the liver's bounding box (``label > 0``) grown by
  ``roi_margin_mm`` (the fine model learns inside the liver ROI);
* ``SpatialPadd`` to ``patch_size``;

and per step: ``RandCropByPosNegLabeld`` (``num_samples`` patches, ``pos``:``neg`` centres on
target/background voxels, background centres restricted to ``image > 0``), then
``ScaleIntensityRanged`` 0…255 → 0…1 and the label cast to float. Two-stage mode adds a second
fully cached ``CacheDataset`` for the coarse model: ``load_case`` (target ``label > 0``: the coarse
model finds the liver ROI whatever the target), ``ScaleIntensityRanged`` and ``Resized`` to
``coarse_size`` (trilinear for the image, nearest for the label).

Network, loss, optimiser: :class:`~samliverseg.automatic.unet.UNetModel` (MONAI ``UNet``,
instance norm, Kaiming-normal initialisation); two-stage: a coarse and a fine U-Net in one module,
trained together (loss = fine Dice loss + coarse Dice loss; their parameters are disjoint and
Novograd normalises per tensor, so this equals two separate trainings). Loss: MONAI
``DiceLoss(sigmoid=True, batch=True)`` (the Dice over the whole micro-batch, which is stable when
a negative patch holds no target). Optimiser: MONAI ``Novograd(lr, weight_decay)``. Schedule:
``CosineAnnealingWarmRestarts(T_0, T_mult)`` stepped after each optimiser step with the
fractional epoch ``epoch + batches_done / batches_per_epoch`` (``cosine``: one cosine over all
epochs, ``constant``: none). ``grad_accum`` micro-batches per optimiser step; AMP (float16
autocast + GradScaler) on CUDA when ``amp: true``.

Validation (every ``val_interval`` epochs and after the last): the inference pipeline of
:func:`~samliverseg.automatic.unet.predict_mask` on each val case's cache grid (coarse ROI in
two-stage mode, ``sliding_window_inference`` with ``patch_size`` windows, sigmoid > 0.5, largest
component for the liver); the Dice per case against the target (the base class's one rule: a
case whose target is empty is skipped), averaged over the cases. ``best.pt``
keeps the best mean val Dice (every epoch when there is no val case), ``last.pt`` the latest
state, and ``model.pth`` (from ``best.pt``) the network with its metadata (see
``unet_inference``), which ``segment_volume`` loads.

Reproducibility and resume: the network is initialised from ``seed``; the case order of epoch
``e`` is a permutation drawn from ``(seed, e)``; the random crops of the case at position ``p`` of
epoch ``e`` come from ``set_random_state(SeedSequence([seed, e, p]))`` on the training
``Compose`` right before that case is transformed (inside the DataLoader worker when
``num_workers > 0``), so they depend neither on what ran before nor on the worker. The
checkpoint holds the model, optimiser, scheduler, scaler, epoch / batch-in-epoch / step, the
loss accumulators and the torch/numpy/python RNG states (dropout), so a resumed run reaches the
same weights as an uninterrupted one (exactly on CPU; on CUDA up to cuDNN nondeterminism).

Distributed (torchrun): the model is wrapped in DDP; each epoch's order, padded by repeating its
first cases to a multiple of the world size, is sharded per rank; validation cases are sharded
and their Dice averaged with ``mean_across_ranks`` (weighted by the cases each rank scored); only
rank 0 writes checkpoints, ``model.pth`` and progress; cancellation is agreed on after each step
(any rank's ``cancel()`` stops all ranks after the same step). DDP averages the ranks'
gradients, so W processes train like one with ``batch_cases`` × W cases per micro-batch (up to the
Dice loss being computed per rank rather than over the whole global batch); an epoch's padded
cases are seen twice in that epoch, as with PyTorch's ``DistributedSampler``. Every rank caches
all training cases (the order is reshuffled across ranks each epoch).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from samliverseg.automatic.unet import (ACTIVATIONS, MODEL_KIND, UNetModel, kaiming_init, predict_mask,
                                        read_unet_checkpoint, roi_slices)
from samliverseg.core.errors import CheckpointError, InputError
from samliverseg.training import distributed
from samliverseg.training.base import Trainer, target_mask
from samliverseg.training.config import TrainConfig
from samliverseg.training.progress import ProgressWriter

SCHEDULES = ("warm_restarts", "cosine", "constant")
#: Options that define the network: a resume with other values is another run (CheckpointError).
ARCH_OPTIONS = ("channels", "strides", "num_res_units", "act", "two_stage")
#: TrainConfig defaults of the decoder-only keys this trainer ignores (a warning when changed).
_IGNORED_COMMON = {"lr": 1e-4, "batch_size": 4, "scheduler": "constant"}


@dataclass
class UNetOptions:
    """The ``unet:`` config section (see the module docstring)."""

    patch_size: List[int] = field(default_factory=lambda: [128, 128, 128])  # [k, j, i] voxels of a training patch / inference window
    num_samples: int = 4  # RandCropByPosNegLabeld crops per case and step
    pos: float = 1.0  # RandCropByPosNegLabeld: target : background crop centres
    neg: float = 1.0  # (see pos)
    batch_cases: int = 1  # cases per micro-batch (a micro-batch has batch_cases x num_samples patches)
    channels: List[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # U-Net widths per level
    strides: List[int] = field(default_factory=lambda: [2, 2, 2, 2])  # one fewer than channels
    num_res_units: int = 2  # 0 = plain conv blocks, > 0 = residual units
    dropout: float = 0.1
    act: str = "relu"  # activation
    lr: float = 0.008  # Novograd learning rate
    scheduler: str = "warm_restarts"  # warm_restarts | cosine | constant
    T_0: int = 5  # CosineAnnealingWarmRestarts, in epochs
    T_mult: int = 3
    eta_min: float = 0.0  # the schedule's lowest rate
    val_interval: int = 1  # validate every N epochs (and after the last)
    sw_batch_size: int = 4  # sliding-window inference: windows per forward pass
    overlap: float = 0.25  # sliding-window overlap
    largest_component: Optional[bool] = None  # keep the largest component (null: yes for liver, no for tumour)
    two_stage: bool = False  # coarse ROI model + fine model
    coarse_size: List[int] = field(default_factory=lambda: [128, 128, 128])  # [k, j, i] the coarse model's input (whole volume resized)
    roi_margin_mm: float = 20.0  # margin around the liver box (training crops and inference ROI)
    cache_rate: float = 1.0  # CacheDataset: fraction of the training cases cached in RAM
    num_workers: int = 0  # DataLoader worker processes (and CacheDataset threads)

    def validate(self) -> None:
        def bad(key: str, why: str) -> None:
            raise InputError(f"config key 'unet.{key}' {why}")

        if not self.channels or len(self.channels) < 2 or any(c < 1 for c in self.channels):
            bad("channels", f"must list at least two positive channel counts, got {self.channels}")
        if len(self.strides) != len(self.channels) - 1:
            bad("strides", f"must have one entry fewer than unet.channels ({len(self.channels) - 1}), got {self.strides}")
        if any(s < 1 for s in self.strides):
            bad("strides", f"must be positive integers, got {self.strides}")
        factor = int(np.prod(self.strides))
        for key in ("patch_size", "coarse_size"):
            v = getattr(self, key)
            if len(v) != 3 or any(s < 1 for s in v):
                bad(key, f"must be three positive sizes [k, j, i] in voxels, got {v}")
            if any(s % factor for s in v):
                bad(key, f"sizes must be multiples of {factor} (the product of unet.strides), got {v}")
        for key in ("num_samples", "batch_cases", "T_0", "T_mult", "val_interval", "sw_batch_size"):
            if getattr(self, key) < 1:
                bad(key, f"must be at least 1, got {getattr(self, key)}")
        for key in ("num_res_units", "num_workers", "pos", "neg", "roi_margin_mm", "eta_min"):
            if getattr(self, key) < 0:
                bad(key, f"must not be negative, got {getattr(self, key)}")
        if self.pos + self.neg <= 0:
            bad("pos", "and unet.neg must not both be 0")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must lie in [0, 1), got {self.dropout}")
        if not 0.0 <= self.overlap < 1.0:
            bad("overlap", f"must lie in [0, 1), got {self.overlap}")
        if not 0.0 <= self.cache_rate <= 1.0:
            bad("cache_rate", f"must lie in [0, 1], got {self.cache_rate}")
        if not self.lr > 0:
            bad("lr", f"must be positive, got {self.lr}")
        if self.act.lower() not in ACTIVATIONS:
            bad("act", f"must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        if self.scheduler not in SCHEDULES:
            bad("scheduler", f"must be one of {', '.join(SCHEDULES)}, got {self.scheduler!r}")

    def network(self) -> Dict[str, Any]:
        return {"channels": [int(c) for c in self.channels], "strides": [int(s) for s in self.strides],
                "num_res_units": int(self.num_res_units), "dropout": float(self.dropout),
                "act": self.act.lower(), "kernel_size": 3}


# ---------------------------------------------------------------------------------------------
# MONAI data pipeline
# ---------------------------------------------------------------------------------------------
def load_case(item: Dict[str, Any], target: str, roi_margin_mm: Optional[float] = None) -> Dict[str, Any]:
    """``{"path", "id"}`` → ``{"image", "label", "id"}``, uint8 ``(1, K, J, I)`` (run as a MONAI ``Lambda``).

    ``label`` is the target mask; with ``roi_margin_mm`` set, both are cropped to the liver's
    (``label > 0``) bounding box grown by that margin (mm, per axis from the case's spacing).
    """
    with np.load(item["path"]) as z:
        image, label = z["image"], z["label"]
        spacing = [float(s) for s in z["spacing"]]
    tgt = target_mask(label, target).astype(np.uint8)
    if roi_margin_mm is not None:
        roi = roi_slices(label > 0, spacing, roi_margin_mm)
        if roi is not None:
            image, tgt = image[roi], tgt[roi]
    return {"image": np.ascontiguousarray(image)[None], "label": np.ascontiguousarray(tgt)[None], "id": item["id"]}


def item_seed(seed: int, epoch: int, position: int) -> int:
    """The random-transform seed of the case at ``position`` of epoch ``epoch`` (uint32)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(position)]).generate_state(1)[0])


class SeededCases(torch.utils.data.Dataset):
    """Training items keyed by ``(epoch, position, case index)``; each seeds its own random crops."""

    def __init__(self, fine, coarse, seed: int):
        self.fine, self.coarse, self.seed = fine, coarse, int(seed)

    def __len__(self) -> int:
        return len(self.fine)

    def __getitem__(self, key: Tuple[int, int, int]) -> Dict[str, torch.Tensor]:
        epoch, position, idx = (int(v) for v in key)
        self.fine.transform.set_random_state(seed=item_seed(self.seed, epoch, position))
        crops = self.fine[idx]
        crops = crops if isinstance(crops, list) else [crops]
        out = {"image": torch.stack([torch.as_tensor(c["image"]).as_subclass(torch.Tensor).float() for c in crops]),
               "label": torch.stack([torch.as_tensor(c["label"]).as_subclass(torch.Tensor).float() for c in crops])}
        if self.coarse is not None:
            d = self.coarse[idx]
            out["coarse_image"] = torch.as_tensor(d["image"]).as_subclass(torch.Tensor).float()[None]
            out["coarse_label"] = torch.as_tensor(d["label"]).as_subclass(torch.Tensor).float()[None]
        return out


def collate_cases(items: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Concatenate the cases' patches (and coarse volumes) along the batch axis."""
    return {k: torch.cat([it[k] for it in items], dim=0) for k in items[0]}


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------
class UNetTrainer(Trainer):
    """The U-Net trainer (module docstring); the run loop is :class:`.base.Trainer`'s."""

    KIND = MODEL_KIND
    RESUME_OPTIONS = ARCH_OPTIONS
    RESUME_FREE_OPTIONS = ("num_workers", "cache_rate")  # speed only
    LR_OPTION = "unet.lr"

    def __init__(self, config: TrainConfig, progress: Optional[ProgressWriter] = None, rank: int = 0):
        super().__init__(config, progress, rank)
        self.model = UNetModel(self.opts.network(), two_stage=self.opts.two_stage)
        kaiming_init(self.model)
        self.init_from = None
        if config.checkpoint:
            self._load_initial_weights(Path(config.checkpoint).expanduser())
        self.model.to(self.device)
        self.net = distributed.wrap_ddp(self.model, self.device)
        from monai.losses import DiceLoss
        from monai.optimizers import Novograd
        self.loss_fn = DiceLoss(sigmoid=True, batch=True)
        self.optimizer = Novograd(self.model.parameters(), lr=self.opts.lr, weight_decay=config.weight_decay)
        self.train_cases: List[Dict[str, Any]] = []
        self.val_cases: List[Dict[str, Any]] = []
        self.dataset: Optional[SeededCases] = None
        self._batches: Any = None

    # ------------------------------------------------------------------ state
    def _load_initial_weights(self, path: Path) -> None:
        state, meta = read_unet_checkpoint(path)
        net = self.opts.network()
        for k in ("channels", "strides", "num_res_units", "act"):
            if meta["network"].get(k) != net[k]:
                raise CheckpointError(f"checkpoint {path} has unet.{k}={meta['network'].get(k)!r}, the config says "
                                      f"{net[k]!r}; use the same network options to start from it")
        if bool(meta.get("two_stage")) != self.opts.two_stage:
            raise CheckpointError(f"checkpoint {path} has unet.two_stage={bool(meta.get('two_stage'))}, the config "
                                  f"says {self.opts.two_stage}")
        self.model.load_state_dict(state, strict=True)
        self.init_from = str(path)

    def model_state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    trainable_state = model_state

    def load_trainable_state(self, state: Dict[str, torch.Tensor], ckpt: Dict[str, Any], path: Path) -> None:
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or ["?"])[0][:200]
            raise CheckpointError(f"cannot resume from {path}: its weights do not fit this network ({first})") from None

    def inference_settings(self) -> Dict[str, Any]:
        o = self.opts
        lcc = (self.cfg.target == "liver") if o.largest_component is None else bool(o.largest_component)
        return {"patch_size": [int(s) for s in o.patch_size], "coarse_size": [int(s) for s in o.coarse_size],
                "roi_margin_mm": float(o.roi_margin_mm), "sw_batch_size": int(o.sw_batch_size),
                "overlap": float(o.overlap), "largest_component": lcc}

    def metadata(self) -> Dict[str, Any]:
        meta = super().metadata()
        meta.update({"base_model": MODEL_KIND, "architecture": "monai_unet", "network": self.opts.network(),
                     "two_stage": bool(self.opts.two_stage), **self.inference_settings(), "init_from": self.init_from})
        return meta

    def describe(self) -> str:
        return (f"U-Net training ({'two-stage' if self.opts.two_stage else 'one-stage'}, target {self.cfg.target}) "
                f"on {self.device}; run folder {self.out}")

    def train_mode(self) -> None:
        self.model.train()

    def eval_mode(self) -> None:
        self.model.eval()

    # ------------------------------------------------------------------ data
    def _cases(self, split: str) -> List[Dict[str, Any]]:
        root = Path(self.cfg.cache)
        return [{"path": str(root / c["file"]), "id": c["id"], "label_values": c.get("label_values")}
                for c in self.manifest.get("cases", []) if c.get("split") == split and c.get("labelled")]

    def _has_target(self, case: Dict[str, Any]) -> bool:
        values = case.get("label_values")
        if values is not None:
            return any(v > 0 for v in values) if self.cfg.target == "liver" else 2 in values
        with np.load(case["path"]) as z:
            return bool(target_mask(z["label"], self.cfg.target).any())

    def prepare_data(self, cancel) -> None:
        for key, default in _IGNORED_COMMON.items():
            if getattr(self.cfg, key) != default:
                self.progress.log(f"warning: the common key {key!r} is not used by the unet trainer "
                                  f"(see unet.lr, unet.batch_cases/num_samples, unet.scheduler)")
        from monai.data import CacheDataset
        from monai.transforms import (CastToTyped, Compose, Lambda, RandCropByPosNegLabeld, Resized,
                                      ScaleIntensityRanged, SpatialPadd)
        o = self.opts
        self.train_cases = self._cases("train")
        self.val_cases = self._cases("val")
        if not any(self._has_target(c) for c in self.train_cases):
            n = len(self.train_cases)
            raise InputError(f"no labelled case of the train split in {self.cfg.cache} contains the target "
                             f"{self.cfg.target!r} ({self.cfg.label_meaning}; {n} labelled train case(s))")
        data = [{"path": c["path"], "id": c["id"]} for c in self.train_cases]
        patch = tuple(int(s) for s in o.patch_size)
        fine_tf = Compose([
            Lambda(functools.partial(load_case, target=self.cfg.target,
                                     roi_margin_mm=o.roi_margin_mm if o.two_stage else None)),
            SpatialPadd(keys=["image", "label"], spatial_size=patch),
            RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=patch, pos=o.pos,
                                   neg=o.neg, num_samples=o.num_samples, image_key="image", image_threshold=0),
            ScaleIntensityRanged(keys=["image"], a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
            CastToTyped(keys=["label"], dtype=np.float32),
        ])
        workers = max(1, o.num_workers)
        t0 = time.monotonic()
        fine = CacheDataset(data, transform=fine_tf, cache_rate=o.cache_rate, num_workers=workers, progress=False)
        coarse = None
        if o.two_stage:
            coarse_tf = Compose([
                Lambda(functools.partial(load_case, target="liver")),
                ScaleIntensityRanged(keys=["image"], a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
                Resized(keys=["image", "label"], spatial_size=tuple(int(s) for s in o.coarse_size),
                        mode=("trilinear", "nearest")),
            ])
            coarse = CacheDataset(data, transform=coarse_tf, cache_rate=o.cache_rate, num_workers=workers,
                                  progress=False)
        self.progress.log(f"cached {len(data)} training case(s) in {time.monotonic() - t0:.1f} s "
                          f"(cache_rate {o.cache_rate:g}{', two-stage' if o.two_stage else ''})")
        self.dataset = SeededCases(fine, coarse, self.cfg.seed)

    def _order(self, epoch: int) -> List[Tuple[int, int, int]]:
        """This rank's ``(epoch, position, case)`` keys of ``epoch`` (see the module docstring)."""
        n = len(self.train_cases)
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 100003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        world = self.dist.world_size
        n_eff = math.ceil(n / world) * world
        perm = perm + perm[: n_eff - n]
        keys = [(epoch, p, c) for p, c in enumerate(perm)]
        return list(distributed.shard(keys, self.dist))

    def _loader(self, keys: Sequence[Tuple[int, int, int]]):
        o = self.opts
        return torch.utils.data.DataLoader(self.dataset, batch_size=o.batch_cases, sampler=list(keys),
                                           num_workers=o.num_workers, collate_fn=collate_cases,
                                           generator=torch.Generator().manual_seed(0),
                                           persistent_workers=False)

    # ------------------------------------------------------------------ hooks of the run loop
    def batches_in_epoch(self, epoch: int) -> int:
        return math.ceil(len(self._order(0)) / self.opts.batch_cases)

    def make_scheduler(self, total: int) -> Any:
        o = self.opts
        if o.scheduler == "warm_restarts":
            return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(self.optimizer, T_0=o.T_0, T_mult=o.T_mult,
                                                                        eta_min=o.eta_min)
        if o.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, total), eta_min=o.eta_min)
        return None

    def start_fields(self) -> Dict[str, Any]:
        o = self.opts
        return {"base_model": MODEL_KIND, "train_cases": len(self.train_cases), "val_cases": len(self.val_cases),
                "two_stage": o.two_stage, "patches_per_step": o.batch_cases * o.num_samples * self.cfg.grad_accum}

    def begin_epoch(self, epoch: int, cancel) -> None:
        keys = self._order(epoch)
        self._batches = iter(self._loader(keys[self.batch_in_epoch * self.opts.batch_cases:]))

    def train_step(self, group: range) -> Dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, count = 0.0, 0
        for n_in_group, _ in enumerate(group):
            batch = next(self._batches)
            loss = self._micro_step(batch, len(group), last_in_group=(n_in_group == len(group) - 1))
            n = int(batch["image"].shape[0])
            loss_sum += loss * n
            count += n
        self.optimizer_step()
        if self.scheduler is not None:  # the fractional epoch after this step
            n_batches = self.batches_in_epoch(self.epoch)
            if self.opts.scheduler == "warm_restarts":
                self.scheduler.step(self.epoch + group.stop / n_batches)
            else:
                self.scheduler.step()
        total = distributed.sum_across_ranks([loss_sum, count])
        return {"loss": total[0] / max(1.0, total[1]), "samples": total[1]}

    def validate_now(self, epoch: int) -> bool:
        return (epoch + 1) % self.opts.val_interval == 0 or epoch + 1 == self.cfg.epochs

    def num_val_items(self) -> int:
        return len(self.val_cases)

    def val_predictions(self, mine: List[int]) -> Iterable[Dict[str, Tuple[Any, Any]]]:
        """The inference pipeline (``predict_mask``) on each val case of ``mine``, on its cache grid."""
        settings = self.inference_settings()
        for i in mine:
            with np.load(self.val_cases[i]["path"]) as z:
                image, label = z["image"], z["label"]
                spacing = [float(s) for s in z["spacing"]]
            image01 = torch.from_numpy(image.astype(np.float32) / np.float32(255.0))
            pred = predict_mask(self.model, image01, spacing, settings, device=self.device, amp=self.amp)
            yield {"dice": (pred, target_mask(label, self.cfg.target))}

    def validation_fields(self) -> Dict[str, Any]:
        return {"cases": len(self.val_cases)}

    def _micro_step(self, batch: Dict[str, torch.Tensor], n_group: int, last_in_group: bool) -> float:
        """Forward + backward of one micro-batch (loss scaled by 1 / micro-batches per step)."""
        import contextlib
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        cx = batch["coarse_image"].to(self.device) if "coarse_image" in batch else None
        sync = contextlib.nullcontext() if last_in_group or not hasattr(self.net, "no_sync") else self.net.no_sync()
        with sync:
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                fine, coarse = self.net(x, cx)
            loss = self.loss_fn(fine.float(), y)
            if coarse is not None:
                loss = loss + self.loss_fn(coarse.float(), batch["coarse_label"].to(self.device))
            scaled = loss / n_group
            self.backward(scaled)
        return float(loss.detach())


__all__ = ["UNetOptions", "UNetTrainer", "item_seed", "load_case", "target_mask"]
