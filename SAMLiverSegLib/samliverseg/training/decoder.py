"""MedSAM-style decoder fine-tuning (trainer kind ``decoder``).

* The image encoder is frozen. The image embedding of every training/validation slice is
  computed once (``SlicePredictor.preprocess`` + the encoder, exactly as at inference) and saved
  in the run folder (``embeddings/<key>_<split>.pt``, atomically); a resumed or repeated run with
  the same model, cache and slice selection loads them instead of recomputing.
* Slices: the axial slices (``array[k]``) of the cache's ``train``/``val`` labelled cases that
  contain the target (``liver``: label > 0, ``tumor``: label == 2); at most
  ``max_slices_per_case`` per case, evenly spaced over the case's target slices.
* Targets: the label slice is mapped into the model frame like the image (resize to the
  aspect-preserving size, pad bottom/right to S) and then to the decoder's low-res size (4E,
  256 x 256 for lite_medsam); the loss is MONAI ``DiceCELoss(sigmoid=True, squared_pred=True,
  reduction="mean")`` between the low-res logits (``multimask_output=False``) and that mask.
* Prompts: the label's 2D bounding box in the model frame, each side moved by a random integer
  in ``[-box_jitter_px, box_jitter_px]`` (seeded trainer generator); ``points_per_slice``
  positive points drawn from the label pixels when > 0. Validation uses the exact box.
* Only the mask decoder (and, with ``train_prompt_encoder``, the prompt encoder) is trained,
  with Adam (``lr``, ``weight_decay``), ``grad_accum`` micro-batches per optimiser step, an
  optional cosine schedule, AMP on CUDA.
* Validation: the mean 2D Dice of the thresholded low-res logits over the val slices after each
  epoch; ``best.pt`` keeps the best, ``last.pt`` the latest state; at the end ``model.pth`` is the
  full model state dict (base model + trained parts of the best checkpoint) with metadata,
  loadable with ``build_model(base_model, checkpoint="model.pth")``.
* Reproducibility: the data order of epoch e is a permutation drawn from ``seed`` and e; jitter
  and points come from a trainer generator whose state is saved with the torch/numpy/python RNGs
  in each checkpoint, with the position inside the epoch, so that a resumed run reaches the same
  weights as an uninterrupted one.
* Cancellation: ``cancel()`` is polled after every optimiser step (SIGTERM/SIGINT set it in
  ``train.py``); the trainer then saves ``last.pt`` atomically, emits ``cancelled`` and raises
  :class:`~samliverseg.core.errors.CancelledError` (exit code 130).

Distributed data parallel (``torchrun --nproc_per_node W samliverseg train --config C.yaml``;
``train.py`` has joined the process group, :mod:`.distributed`):

* ``batch_size`` is per process: one optimiser step takes a *global* batch of
  ``G = batch_size * W`` slices, ``order[b*G:(b+1)*G]`` of the same seeded epoch order on every
  rank, and rank r decodes its share ``global_batch[r::W]`` (:func:`.distributed.shard`). The
  learning rate is not rescaled.
* Every rank draws the box jitter / points of the *whole* global batch from its trainer generator
  (the generators stay identical on all ranks) and keeps its share's rows, so the prompts are
  those a single process with ``batch_size = G`` draws.
* The prompt encoder + mask decoder run as one module wrapped in
  :func:`.distributed.wrap_ddp`; DDP averages the gradients over the ranks. The loss is a mean
  over the samples of a batch (MONAI ``DiceCELoss``: the Dice term is computed per sample and
  channel and averaged, the BCE term is a mean over all pixels of equally sized masks), so with
  ``n_r`` of the batch's ``N`` samples on rank r the rank's loss is weighted by ``n_r * W / N``:
  ``(1/W) * sum_r (n_r W / N) grad L_r = sum_r (n_r / N) grad L_r = grad L`` of the whole batch,
  exactly a single-process step with ``batch_size = G`` (up to float rounding), also for a short
  last batch. A rank whose share is empty decodes one sample with weight 0 (it must still take
  part in the gradient all-reduce).
* DDP needs every trainable parameter to receive a gradient in each step; the parameters that
  cannot reach the loss (the IoU head, the point embeddings when no points are given, ...) are
  found once by an autograd probe on one training slice and frozen (a single process never
  updates them either: their gradient is always None).
* Embeddings: rank 0 computes (or loads) them and writes the file; the other ranks wait for it
  (``broadcast_object`` of the path) and load it. The run folder must be visible to every rank.
* Validation: each rank scores its share of the val slices; the Dice is the sample-weighted
  mean across ranks (the same number as a single process). Cancellation is agreed on by all
  ranks after each step (any rank's ``cancel()`` stops all of them after the same step).
* Checkpoints, ``model.pth``, progress lines and logs come from rank 0 only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from samliverseg.models.build_sam import build_model, find_model_checkpoint, get_spec
from samliverseg.core.devices import resolve_device
from samliverseg.core.errors import CancelledError, InputError, SAMLiverSegError
from samliverseg.interactive.predictor import SlicePredictor
from samliverseg.training import checkpoint as ck
from samliverseg.training import distributed
from samliverseg.training.config import TrainConfig
from samliverseg.training.prepare import load_manifest
from samliverseg.training.progress import ProgressWriter

EMBED_FORMAT = 1


@dataclass
class SliceSet:
    """Precomputed training material for one split (all tensors on CPU)."""

    features: torch.Tensor  # (N, C, E, E) float32
    masks: torch.Tensor  # (N, S, S) uint8: the label in the model-input frame
    low_res: torch.Tensor  # (N, 1, L, L) float32 0/1: the loss target
    ids: List[str]  # "case:k"
    path: Optional[Path] = None  # the embeddings file it was saved to / loaded from

    def __len__(self) -> int:
        return int(self.features.shape[0])


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process in MiB (None where it cannot be read)."""
    try:
        import resource  # Unix
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except ImportError:
        try:
            import psutil  # Windows: peak working set
            info = psutil.Process().memory_info()
            return getattr(info, "peak_wset", info.rss) / 2**20
        except Exception:  # noqa: BLE001
            return None


class PromptedDecoder(torch.nn.Module):
    """The trained part of a SAM as one module (what DDP wraps): prompt encoder + mask decoder.

    ``forward(features, boxes, point_coords, point_labels) -> low-res logits (B, 1, 4E, 4E)``,
    the same computation as ``SamModel.decode(..., multimask_output=False)``.
    """

    def __init__(self, sam: torch.nn.Module):
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, point_coords: Optional[torch.Tensor] = None,
                point_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        low, _ = self.mask_decoder(image_embeddings=features, image_pe=self.prompt_encoder.get_dense_pe(),
                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                   multimask_output=False)
        return low


class DecoderTrainer:
    def __init__(self, config: TrainConfig, progress: Optional[ProgressWriter] = None, rank: int = 0):
        self.cfg = config
        self.rank = rank
        self.out = Path(config.output).expanduser()
        self.progress = progress or ProgressWriter(rank=rank)
        if self.progress.log_path is None:
            self.progress.set_log_path(self.out / "train.log")
        self.dist = distributed.current()
        if self.dist.enabled:
            self.rank = self.dist.rank
        self.device = resolve_device(config.device)
        if self.dist.enabled and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank % max(1, torch.cuda.device_count()))
        self.amp = bool(config.amp and self.device.type == "cuda")
        self.spec = get_spec(config.base_model)
        self.manifest = load_manifest(Path(config.cache))
        self.model = build_model(self.spec, checkpoint=config.checkpoint, device=self.device)
        self.base_checkpoint = find_model_checkpoint(self.spec, config.checkpoint)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.trainable_prefixes = ("mask_decoder.",) + (("prompt_encoder.",) if config.train_prompt_encoder else ())
        for name, p in self.model.named_parameters():
            if name.startswith(self.trainable_prefixes):
                p.requires_grad_(True)
        self.params = [p for n, p in self.model.named_parameters() if p.requires_grad]
        self.head: torch.nn.Module = PromptedDecoder(self.model)  # DDP-wrapped in run() when distributed
        self.frozen_unused: List[str] = []
        self.resumed_world_size = self.dist.world_size
        self.predictor = SlicePredictor(self.model, self.device)
        self.generator = torch.Generator().manual_seed(int(config.seed))
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        import random
        random.seed(config.seed)
        from monai.losses import DiceCELoss
        self.loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0
        self.best_dice: Optional[float] = None
        self.history: List[Dict[str, Any]] = []
        self._epoch_loss_sum = 0.0
        self._epoch_loss_n = 0
        self.scheduler = None
        self.train_set: Optional[SliceSet] = None
        self.val_set: Optional[SliceSet] = None

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                if k.startswith(self.trainable_prefixes)}

    def metadata(self) -> Dict[str, Any]:
        s = self.manifest.get("settings", {})
        return {"kind": "decoder", "base_model": self.spec.name, "architecture": self.spec.architecture,
                "image_size": int(self.spec.image_size), "window": s.get("window"), "window_hu": s.get("window_hu"),
                "spacing": s.get("spacing"), "target": self.cfg.target, "label_meaning": self.cfg.label_meaning,
                "trained": list(self.trainable_prefixes), "cache": str(self.cfg.cache),
                "cache_settings_hash": s.get("settings_hash")}

    def checkpoint_dict(self) -> Dict[str, Any]:
        return {"format": ck.FORMAT, "version": ck.VERSION, "kind": "decoder", "model": self.trainable_state(),
                "trainable_keys": sorted(self.trainable_state()), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "best_dice": self.best_dice, "epoch_loss": [self._epoch_loss_sum, self._epoch_loss_n],
                "rng": ck.rng_state(self.generator), "config": self.cfg.to_dict(), "metadata": self.metadata(),
                "history": self.history, "world_size": self.dist.world_size}

    def save(self, which: str) -> Path:
        path = self.out / (ck.LAST_NAME if which == "last" else ck.BEST_NAME)
        if self.rank == 0:
            ck.save_checkpoint(self.checkpoint_dict(), path)
            self.progress.emit("checkpoint", self.epoch, self.step, path=str(path), which=which)
        return path

    def restore(self, path: Path) -> None:
        ckpt = ck.load_for_resume(path, self.cfg.to_dict(), sorted(self.trainable_state()))
        missing = self.model.load_state_dict(ckpt["model"], strict=False)
        if missing.unexpected_keys:
            raise ck.CheckpointError(f"cannot resume from {path}: unexpected keys {missing.unexpected_keys[:3]}")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batch_in_epoch, self.step = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"]), int(ckpt["step"])
        self.best_dice = ckpt.get("best_dice")
        self._epoch_loss_sum, self._epoch_loss_n = ckpt.get("epoch_loss", [0.0, 0])
        self.history = list(ckpt.get("history") or [])
        ck.set_rng_state(ckpt["rng"], self.generator)
        self.resumed_world_size = int(ckpt.get("world_size") or 1)
        old = ckpt.get("config") or {}
        for k, v in self.cfg.to_dict().items():
            if k not in ck.RESUME_KEYS and k not in ("epochs", "output", "device") and old.get(k) != v:
                self.progress.log(f"warning: {k} changed since the checkpoint ({old.get(k)!r} -> {v!r}); "
                                  f"the resumed run will differ from an uninterrupted one")

    # ------------------------------------------------------------------ data
    def _target(self, label: np.ndarray) -> np.ndarray:
        return label > 0 if self.cfg.target == "liver" else label == 2

    def _select_slices(self, split: str) -> List[Tuple[Dict[str, Any], List[int]]]:
        out = []
        for case in self.manifest.get("cases", []):
            if case.get("split") != split or not case.get("labelled"):
                continue
            with np.load(Path(self.cfg.cache) / case["file"]) as z:
                label = z["label"]
            ks = [k for k in range(label.shape[0]) if self._target(label[k]).any()]
            if len(ks) > self.cfg.max_slices_per_case:
                pick = np.linspace(0, len(ks) - 1, self.cfg.max_slices_per_case).round().astype(int)
                ks = [ks[i] for i in sorted(set(pick.tolist()))]
            if ks:
                out.append((case, ks))
        return out

    def _embed_key(self, selection) -> str:
        ckpt = self.base_checkpoint
        st = ckpt.stat() if ckpt is not None and ckpt.exists() else None
        info = {"v": EMBED_FORMAT, "model": self.spec.name, "ckpt": str(ckpt), "size": st.st_size if st else None,
                "mtime": st.st_mtime_ns if st else None, "target": self.cfg.target,
                "cases": [(c["id"], c.get("case_hash"), ks) for c, ks in selection]}
        return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _build_set(self, split: str, cancel: Callable[[], bool]) -> Optional[SliceSet]:
        """The split's slice set; when distributed rank 0 makes (or loads) and saves it, the others load it."""
        if not self.dist.enabled:
            return self._build_set_local(split, cancel)
        status: Any = None
        error: Optional[BaseException] = None
        s: Optional[SliceSet] = None
        if self.rank == 0:
            try:
                s = self._build_set_local(split, cancel)
                status = ("ok", str(s.path) if s is not None else None)
            except BaseException as exc:  # told to the other ranks, then re-raised here
                error = exc
                status = ("cancelled" if isinstance(exc, CancelledError) else "error", str(exc))
        status = distributed.broadcast_object(status)
        if error is not None:
            raise error
        what, info = status
        if what == "cancelled":
            raise CancelledError(info)
        if what == "error":
            raise SAMLiverSegError(f"rank 0 could not prepare the {split} embeddings: {info}")
        if self.rank == 0:
            return s
        if info is None:
            return None
        d = torch.load(info, map_location="cpu", weights_only=True)
        return SliceSet(d["features"], d["masks"], d["low_res"], list(d["ids"]), path=Path(info))

    def _build_set_local(self, split: str, cancel: Callable[[], bool]) -> Optional[SliceSet]:
        selection = self._select_slices(split)
        if not selection:
            return None
        key = self._embed_key(selection)
        path = self.out / "embeddings" / f"{key}_{split}.pt"
        if path.exists():
            try:
                d = torch.load(path, map_location="cpu", weights_only=True)
                self.progress.log(f"{split}: {len(d['ids'])} slice embeddings loaded from {path}")
                return SliceSet(d["features"], d["masks"], d["low_res"], list(d["ids"]), path=path)
            except Exception as exc:  # a damaged cache file is recomputed
                self.progress.log(f"{split}: cannot read {path} ({exc}); recomputing")
        S = int(self.spec.image_size)
        feats, masks, lows, ids = [], [], [], []
        t0 = time.monotonic()
        n_total = sum(len(ks) for _, ks in selection)
        for case, ks in selection:
            with np.load(Path(self.cfg.cache) / case["file"]) as z:
                image, label = z["image"], z["label"]
                spacing = [float(x) for x in z["spacing"]]
            pix = (spacing[1], spacing[0])  # rows (j), cols (i)
            for k in ks:
                if cancel():
                    raise CancelledError("cancelled while precomputing the image embeddings")
                emb = self.predictor.embed(image[k], pix)
                h, w = emb.input_hw
                m = torch.from_numpy(self._target(label[k]).astype(np.float32))[None, None]
                m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                m = F.pad(m, (0, S - w, 0, S - h))
                L = int(emb.features.shape[-1]) * 4
                low = (F.interpolate(m, size=(L, L), mode="bilinear", align_corners=False) > 0.5).float()
                feats.append(emb.features[0].cpu())
                masks.append((m[0, 0] > 0.5).to(torch.uint8))
                lows.append(low[0])
                ids.append(f"{case['id']}:{k}")
        dt = time.monotonic() - t0
        self.progress.log(f"{split}: embedded {n_total} slices in {dt:.1f} s ({n_total / max(dt, 1e-9):.2f} slices/s)")
        keep = [i for i in range(len(ids)) if masks[i].any()]  # a target too small to survive resizing
        if not keep:
            return None
        s = SliceSet(torch.stack([feats[i] for i in keep]), torch.stack([masks[i] for i in keep]),
                     torch.stack([lows[i] for i in keep]), [ids[i] for i in keep], path=path)
        if self.rank == 0:
            ck.save_checkpoint({"features": s.features, "masks": s.masks, "low_res": s.low_res, "ids": s.ids}, path)
        return s

    def _prompts(self, masks: torch.Tensor, jitter: bool):
        """Boxes (B, 4) xyxy and optional points ((B, P, 2), (B, P)) in the model-input frame."""
        S = int(self.spec.image_size)
        boxes, pts = [], []
        for m in masks:
            ys, xs = torch.nonzero(m, as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
            if jitter and self.cfg.box_jitter_px > 0:
                j = self.cfg.box_jitter_px
                box = box + torch.randint(-j, j + 1, (4,), generator=self.generator).float()
                box = torch.stack([box[0].clamp(0, S - 1), box[1].clamp(0, S - 1), box[2].clamp(0, S - 1), box[3].clamp(0, S - 1)])
                box = torch.stack([torch.minimum(box[0], box[2]), torch.minimum(box[1], box[3]),
                                   torch.maximum(box[0], box[2]), torch.maximum(box[1], box[3])])
            boxes.append(box)
            if self.cfg.points_per_slice > 0:
                sel = torch.randint(0, xs.numel(), (self.cfg.points_per_slice,), generator=self.generator)
                pts.append(torch.stack([xs[sel], ys[sel]], dim=1).float())  # the encoder adds 0.5
        boxes_t = torch.stack(boxes).to(self.device)
        points = None
        if pts:
            c = torch.stack(pts).to(self.device)
            points = (c, torch.ones(c.shape[:2], dtype=torch.int64, device=self.device))
        return boxes_t, points

    def _decode(self, head: torch.nn.Module, feats: torch.Tensor, boxes: torch.Tensor, points) -> torch.Tensor:
        coords, labels = points if points is not None else (None, None)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            low = head(feats.to(self.device), boxes, coords, labels)
        return low.float()

    def _forward(self, feats: torch.Tensor, masks: torch.Tensor, jitter: bool) -> torch.Tensor:
        boxes, points = self._prompts(masks, jitter)
        return self._decode(distributed.unwrap(self.head), feats, boxes, points)

    def _freeze_unused(self) -> List[str]:
        """Freeze the trainable parameters that cannot reach the loss (DDP needs a gradient for each).

        One autograd probe on the first training slice with the run's prompt structure (box,
        ``points_per_slice`` points, no mask prompt); the trainer generator is left as it was.
        """
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        state = self.generator.get_state()
        boxes, points = self._prompts(self.train_set.masks[:1], jitter=True)
        self.generator.set_state(state)
        low = self._decode(self.head, self.train_set.features[:1], boxes, points)
        loss = self.loss_fn(low, self.train_set.low_res[:1].to(self.device))
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        unused = [n for (n, _), g in zip(named, grads) if g is None]
        for n, p in named:
            if n in unused:
                p.requires_grad_(False)
        return unused

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (``flag`` when not distributed)."""
        if not self.dist.enabled:
            return bool(flag)
        return distributed.mean_across_ranks(1.0 if flag else 0.0) > 0

    # ------------------------------------------------------------------ loops
    @property
    def global_batch_size(self) -> int:
        """Slices per batch over all ranks: ``batch_size`` per process times the world size."""
        return self.cfg.batch_size * self.dist.world_size

    def steps_per_epoch(self, batch: Optional[int] = None) -> int:
        """Optimiser steps per epoch with batches of ``batch`` slices (default ``batch_size``; this
        trainer's run passes its global batch; subclasses may call it without)."""
        n_batches = math.ceil(len(self.train_set) / (batch or self.cfg.batch_size))
        return math.ceil(n_batches / self.cfg.grad_accum)

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 100003 + epoch)
        return torch.randperm(len(self.train_set), generator=g)

    @torch.no_grad()
    def validate(self) -> Optional[float]:
        """Mean 2D Dice over the val slices (each rank scores its share; sample-weighted mean)."""
        if self.val_set is None or len(self.val_set) == 0:
            return None
        self.model.eval()
        dices: List[float] = []
        # the prompts of all val slices in order (the points come from the trainer generator, whose
        # draws must not depend on the rank), then this rank's share
        boxes, points = self._prompts(self.val_set.masks, jitter=False)
        mine = list(distributed.shard(range(len(self.val_set)), self.dist))
        head = distributed.unwrap(self.head)
        for i in range(0, len(mine), self.cfg.batch_size):
            sl = torch.as_tensor(mine[i:i + self.cfg.batch_size], dtype=torch.long)
            on = sl.to(boxes.device)
            pts = (points[0][on], points[1][on]) if points is not None else None
            low = self._decode(head, self.val_set.features[sl], boxes[on], pts)
            pred = (low > 0).float().cpu()
            tgt = self.val_set.low_res[sl]
            inter = (pred * tgt).flatten(1).sum(1)
            denom = pred.flatten(1).sum(1) + tgt.flatten(1).sum(1)
            dices.extend(torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom)).tolist())
        self.model.train()
        local = float(np.mean(dices)) if dices else 0.0
        return distributed.mean_across_ranks(local, len(dices))

    def run(self, resume: bool = False, cancel: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
        cancel = cancel or (lambda: False)
        cfg = self.cfg
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self.progress.log(f"decoder fine-tuning of {self.spec.name} on {self.device} (target {cfg.target}); "
                          f"run folder {self.out}")
        last = self.out / ck.LAST_NAME
        if resume:  # refuse a wrong checkpoint before minutes of embedding precompute
            if not last.exists():
                raise ck.CheckpointError(f"--resume: no checkpoint {last} to resume from")
            ck.load_for_resume(last, cfg.to_dict(), sorted(self.trainable_state()))
        try:
            self.train_set = self._build_set("train", cancel)
            self.val_set = self._build_set("val", cancel)
        except CancelledError:
            self.progress.emit("cancelled", self.epoch, self.step, checkpoint=None, exit_code=CancelledError.exit_code)
            raise
        if self.train_set is None or len(self.train_set) == 0:
            raise InputError(f"no training slice contains the target {cfg.target!r} in {cfg.cache} "
                             f"(labelled cases of the train split)")
        total = self.steps_per_epoch(self.global_batch_size) * cfg.epochs
        if cfg.scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, total))
        resumed = False
        if resume:
            self.restore(last)
            resumed = True
            self.progress.log(f"resumed from {last}: epoch {self.epoch}, step {self.step}")
            if self.resumed_world_size != self.dist.world_size:
                self.progress.log(f"warning: the checkpoint was written by a run of {self.resumed_world_size} "
                                  f"process(es), this run has {self.dist.world_size}: the global batch "
                                  f"(batch_size x processes) differs, so the resumed run will differ from an "
                                  f"uninterrupted one")
        if self.dist.enabled:
            self.frozen_unused = self._freeze_unused()
            if self.frozen_unused:
                self.progress.log(f"DDP: {len(self.frozen_unused)} trainable tensors cannot reach the loss and stay "
                                  f"frozen (e.g. {', '.join(self.frozen_unused[:3])})")
            self.head = distributed.wrap_ddp(self.head, self.device)
            self.progress.log(f"distributed: {self.dist.world_size} processes ({self.dist.backend}), "
                              f"{cfg.batch_size} slices per process, global batch {self.global_batch_size}")
        self.progress.total_steps = total
        self.progress.mark_start(self.step)
        self.progress.emit("start", self.epoch, self.step, kind="decoder", base_model=self.spec.name,
                           output=str(self.out), device=str(self.device), train_slices=len(self.train_set),
                           val_slices=len(self.val_set) if self.val_set is not None else 0, epochs=cfg.epochs,
                           resumed=resumed, target=cfg.target, world_size=self.dist.world_size,
                           global_batch_size=self.global_batch_size)
        self.model.train()
        n = len(self.train_set)
        bs, acc = self.global_batch_size, cfg.grad_accum
        world, distributed_run = self.dist.world_size, self.dist.enabled
        n_batches = math.ceil(n / bs)
        t_run, samples_run = time.monotonic(), 0
        while self.epoch < cfg.epochs:
            order = self._order(self.epoch)
            while self.batch_in_epoch < n_batches:
                t0 = time.monotonic()
                first = self.batch_in_epoch
                group = range(first, min(first + acc, n_batches))
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum, count = 0.0, 0
                global_count = 0
                for b in group:
                    idx = order[b * bs:(b + 1) * bs]
                    # the prompts of the whole (global) batch: every rank's generator draws the same
                    boxes, points = self._prompts(self.train_set.masks[idx], jitter=True)
                    weight = 1.0
                    if distributed_run:
                        rows = list(distributed.shard(range(len(idx)), self.dist))
                        weight = len(rows) * world / len(idx)  # the DDP mean is then the whole batch's
                        if not rows:  # no share in a short last batch: still join the all-reduce
                            rows, weight = [0], 0.0
                        sel = torch.as_tensor(rows, dtype=torch.long)
                        idx, boxes = idx[sel], boxes[sel.to(boxes.device)]
                        if points is not None:
                            points = (points[0][sel.to(boxes.device)], points[1][sel.to(boxes.device)])
                    last_micro = b == group[-1]
                    sync = contextlib.nullcontext() if (last_micro or not distributed_run) else self.head.no_sync()
                    with sync:
                        low = self._decode(self.head, self.train_set.features[idx], boxes, points)
                        loss = self.loss_fn(low, self.train_set.low_res[idx].to(self.device))
                        scaled = loss / len(group) if weight == 1.0 else loss * (weight / len(group))
                        if self.scaler is not None:
                            self.scaler.scale(scaled).backward()
                        else:
                            scaled.backward()
                    if weight > 0:
                        loss_sum += float(loss.detach()) * len(idx)
                        count += len(idx)
                    global_count += len(order[b * bs:(b + 1) * bs])
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.batch_in_epoch = group.stop
                self.step += 1
                if distributed_run:  # the global batch's mean loss, the same on every rank
                    mean = distributed.mean_across_ranks(loss_sum / count if count else 0.0, count)
                    loss_sum, count = mean * global_count, global_count
                self._epoch_loss_sum += loss_sum
                self._epoch_loss_n += count
                samples_run += count
                dt = time.monotonic() - t0
                self.progress.emit("step", self.epoch, self.step, loss=loss_sum / count,
                                   lr=self.optimizer.param_groups[0]["lr"], samples_per_s=round(count / max(dt, 1e-9), 2))
                if self._any_rank(cancel()):
                    return self._cancel()
            # end of epoch
            mean_loss = self._epoch_loss_sum / max(1, self._epoch_loss_n)
            lr = self.optimizer.param_groups[0]["lr"]
            self.progress.emit("epoch", self.epoch, self.step, losses={"train": mean_loss}, lr=lr)
            dice = self.validate()
            record = {"epoch": self.epoch, "step": self.step, "train_loss": mean_loss, "val_dice": dice}
            self.history.append(record)
            is_best = dice is not None and (self.best_dice is None or dice > self.best_dice)
            if dice is not None:
                if is_best:
                    self.best_dice = dice
                self.progress.emit("validation", self.epoch, self.step, dice=dice, best_dice=self.best_dice, is_best=is_best)
            self.progress.log(f"epoch {self.epoch + 1}/{cfg.epochs}: train loss {mean_loss:.4f}"
                              + (f", val Dice {dice:.4f}" if dice is not None else ""))
            self.epoch += 1
            self.batch_in_epoch = 0
            self._epoch_loss_sum, self._epoch_loss_n = 0.0, 0
            if is_best or (dice is None):
                self.save("best")
            self.save("last")
            if self._any_rank(cancel()) and self.epoch < cfg.epochs:
                return self._cancel(saved=True)
        model_path = self.export_model()
        distributed.barrier()  # model.pth exists when any rank returns
        elapsed = time.monotonic() - t_run
        sps = samples_run / elapsed if elapsed > 0 else None
        self.progress.emit("done", self.epoch, self.step, best_dice=self.best_dice, model=str(model_path),
                           last=str(self.out / ck.LAST_NAME), best=str(self.out / ck.BEST_NAME),
                           samples_per_s=sps, peak_rss_mb=peak_rss_mb())
        return {"status": "done", "model": model_path, "best_dice": self.best_dice, "samples_per_s": sps,
                "history": self.history, "step": self.step}

    def _cancel(self, saved: bool = False) -> Dict[str, Any]:
        path = self.out / ck.LAST_NAME if saved else self.save("last")
        self.progress.log(f"cancelled at epoch {self.epoch}, step {self.step}; state saved in {path} "
                          f"(continue with --resume)")
        self.progress.emit("cancelled", self.epoch, self.step, checkpoint=str(path), exit_code=CancelledError.exit_code)
        raise CancelledError(f"training cancelled; resume with --resume (checkpoint {path})")

    def export_model(self) -> Path:
        """model.pth: the full model state (base + trained parts of best.pt, else last) + metadata (rank 0)."""
        path = self.out / ck.MODEL_NAME
        if self.rank != 0:
            return path
        src = self.out / ck.BEST_NAME
        if not src.exists():
            src = self.out / ck.LAST_NAME
        trained = ck.load_checkpoint(src)["model"]
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        state.update(trained)
        meta = dict(self.metadata(), best_dice=self.best_dice, source=str(src), step=self.step)
        ck.save_checkpoint({"model": state, "metadata": meta}, path)
        self.progress.emit("checkpoint", self.epoch, self.step, path=str(path), which="model")
        return path
