"""MedSAM-style decoder fine-tuning (trainer kind ``decoder``).

* The image encoder is frozen. The image embedding of every training/validation slice is
  computed once (``SlicePredictor.preprocess`` + the encoder, exactly as at inference) and saved
  in the run folder, one file per case written atomically as soon as the case is done
  (``embeddings/<split>_<case>_<key>.pt``); a resumed, repeated or stopped-and-restarted run with
  the same model, cache and slice selection loads them instead of recomputing (a SIGTERM, a STOP
  file or a SIGKILL during the precompute loses at most the case being computed).
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from samliverseg.core.errors import CancelledError, CheckpointError, SAMLiverSegError
from samliverseg.interactive.predictor import SlicePredictor
from samliverseg.interactive.slice_view import cache_view
from samliverseg.io import torchfile
from samliverseg.models.build_sam import build_model, find_model_checkpoint, get_spec
from samliverseg.training import checkpoint as ck
from samliverseg.training import distributed
from samliverseg.training.base import Trainer, content_hash, no_target_error, target_mask
from samliverseg.training.config import TrainConfig
from samliverseg.training.progress import ProgressWriter

EMBED_FORMAT = 2  # 2: each slice turned upright as the engine shows it (slice_view)


@dataclass
class SliceSet:
    """Precomputed training material for one split (all tensors on CPU)."""

    features: torch.Tensor  # (N, C, E, E) float32
    masks: torch.Tensor  # (N, S, S) uint8: the label in the model-input frame
    low_res: torch.Tensor  # (N, 1, L, L) float32 0/1: the loss target
    ids: List[str]  # "case:k"
    path: Optional[Path] = None  # the folder of the embeddings files

    def __len__(self) -> int:
        return int(self.features.shape[0])


def select_slices(cfg: TrainConfig, manifest: Dict[str, Any], split: str) -> List[Tuple[Dict[str, Any], List[int]]]:
    """The axial slices of ``split``'s labelled cases that contain the target: at most
    ``max_slices_per_case`` per case, evenly spaced over the case's target slices (the centre
    slice of each of ``max_slices_per_case`` equal runs)."""
    out = []
    for case in manifest.get("cases", []):
        if case.get("split") != split or not case.get("labelled"):
            continue
        with np.load(Path(cfg.cache) / case["file"]) as z:
            label = z["label"]
        ks = [k for k in range(label.shape[0]) if target_mask(label[k], cfg.target).any()]
        if len(ks) > cfg.max_slices_per_case:  # the centres of equal runs: never only the object's tip
            m = cfg.max_slices_per_case
            ks = [ks[int((i + 0.5) * len(ks) / m)] for i in range(m)]
        if ks:
            out.append((case, ks))
    return out


def draw_prompts(masks: torch.Tensor, image_size: int, cfg: TrainConfig, generator: torch.Generator,
                 device: torch.device, jitter: bool):
    """Boxes (B, 4) xyxy and optional points ((B, P, 2), (B, P)) in the model-input frame: the
    masks' boxes, each side moved by a random integer in ``[-box_jitter_px, box_jitter_px]`` when
    ``jitter``, + ``points_per_slice`` positive points drawn from the mask (``generator``)."""
    S = int(image_size)
    boxes, pts = [], []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        box = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
        if jitter and cfg.box_jitter_px > 0:
            j = cfg.box_jitter_px
            box = (box + torch.randint(-j, j + 1, (4,), generator=generator).float()).clamp(0, S - 1)
            box = torch.stack([torch.minimum(box[0], box[2]), torch.minimum(box[1], box[3]),
                               torch.maximum(box[0], box[2]), torch.maximum(box[1], box[3])])
        boxes.append(box)
        if cfg.points_per_slice > 0:
            sel = torch.randint(0, xs.numel(), (cfg.points_per_slice,), generator=generator)
            pts.append(torch.stack([xs[sel], ys[sel]], dim=1).float())  # the encoder adds 0.5
    boxes_t = torch.stack(boxes).to(device)
    points = None
    if pts:
        c = torch.stack(pts).to(device)
        points = (c, torch.ones(c.shape[:2], dtype=torch.int64, device=device))
    return boxes_t, points


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


class DecoderTrainer(Trainer):
    """MedSAM-style decoder fine-tuning (module docstring); the run loop is :class:`.base.Trainer`'s."""

    KIND = "decoder"

    def __init__(self, config: TrainConfig, progress: Optional[ProgressWriter] = None, rank: int = 0):
        super().__init__(config, progress, rank)
        self.spec = get_spec(config.base_model)
        self.model = build_model(self.spec, checkpoint=config.checkpoint, device=self.device)
        self.base_checkpoint = find_model_checkpoint(self.spec, config.checkpoint)
        self.trainable_prefixes = self.configure_trainable()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.head: torch.nn.Module = PromptedDecoder(self.model)  # DDP-wrapped in on_start() when distributed
        self.frozen_unused: List[str] = []
        self.predictor = SlicePredictor(self.model, self.device)
        from monai.losses import DiceCELoss
        self.loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.train_set: Any = None
        self.val_set: Any = None

    def configure_trainable(self) -> Tuple[str, ...]:
        """Freeze the model except what this kind trains; returns the trained key prefixes."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        prefixes = ("mask_decoder.",) + (("prompt_encoder.",) if self.cfg.train_prompt_encoder else ())
        for name, p in self.model.named_parameters():
            if name.startswith(prefixes):
                p.requires_grad_(True)
        return prefixes

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                if k.startswith(self.trainable_prefixes)}

    def load_trainable_state(self, state: Dict[str, torch.Tensor], ckpt: Dict[str, Any], path: Path) -> None:
        missing = self.model.load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            raise CheckpointError(f"cannot resume from {path}: unexpected keys {missing.unexpected_keys[:3]}")

    def metadata(self) -> Dict[str, Any]:
        meta = super().metadata()
        meta.update({"base_model": self.spec.name, "architecture": self.spec.architecture,
                     "image_size": int(self.spec.image_size), "trained": list(self.trainable_prefixes)})
        return meta

    def write_model(self, path: Path, trained: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        """The full model state (base + the trained parts), loadable with ``build_model(base_model,
        checkpoint=path)``."""
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        state.update(trained)
        ck.save_checkpoint({"model": state, "metadata": meta}, path)

    def describe(self) -> str:
        return (f"decoder fine-tuning of {self.spec.name} on {self.device} (target {self.cfg.target}); "
                f"run folder {self.out}")

    def train_mode(self) -> None:
        self.model.train()

    def eval_mode(self) -> None:
        self.model.eval()

    # ------------------------------------------------------------------ data
    def _embed_key(self, case: Dict[str, Any], ks: List[int]) -> str:
        ckpt = self.base_checkpoint
        st = ckpt.stat() if ckpt is not None and ckpt.exists() else None
        info = {"v": EMBED_FORMAT, "model": self.spec.name, "ckpt": str(ckpt), "size": st.st_size if st else None,
                "mtime": st.st_mtime_ns if st else None, "target": self.cfg.target,
                "case": (case["id"], case.get("case_hash"), list(ks))}
        return content_hash(info)

    def _embed_path(self, case: Dict[str, Any], ks: List[int], split: str) -> Path:
        """One file per case (a chunk): what was computed before a stop or a kill is kept."""
        return self.out / "embeddings" / f"{split}_{case['id']}_{self._embed_key(case, ks)}.pt"

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
                status = ("ok", None)
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
        return self._build_set_local(split, cancel, compute=False)

    def _embed_case(self, case: Dict[str, Any], ks: List[int], cancel: Callable[[], bool]) -> Dict[str, Any]:
        """The embeddings, model-frame masks and loss targets of the slices ``ks`` of ``case``."""
        S = int(self.spec.image_size)
        feats, masks, lows, ids = [], [], [], []
        with np.load(Path(self.cfg.cache) / case["file"]) as z:
            image, label = z["image"], z["label"]
            spacing = [float(x) for x in z["spacing"]]
            view = cache_view(z)
        pix = view.spacing((spacing[1], spacing[0]))  # rows (j), cols (i) of the slice, turned
        for k in ks:
            if cancel():
                raise CancelledError("cancelled while precomputing the image embeddings")
            emb = self.predictor.embed(np.ascontiguousarray(view.image(image[k])), pix)
            h, w = emb.input_hw
            m = torch.from_numpy(self.target(np.ascontiguousarray(view.image(label[k]))).astype(np.float32))[None, None]
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            m = F.pad(m, (0, S - w, 0, S - h))
            L = int(emb.features.shape[-1]) * 4
            low = (F.interpolate(m, size=(L, L), mode="bilinear", align_corners=False) > 0.5).float()
            feats.append(emb.features[0].cpu())
            masks.append((m[0, 0] > 0.5).to(torch.uint8))
            lows.append(low[0])
            ids.append(f"{case['id']}:{k}")
        return {"features": torch.stack(feats), "masks": torch.stack(masks), "low_res": torch.stack(lows), "ids": ids}

    def _build_set_local(self, split: str, cancel: Callable[[], bool], compute: bool = True) -> Optional[SliceSet]:
        """Each case's embeddings are loaded from their file, else computed and written (atomically)
        before the next case starts (``compute=False``: the files must exist, rank 0 wrote them)."""
        selection = select_slices(self.cfg, self.manifest, split)
        if not selection:
            return None
        parts: List[Dict[str, Any]] = []
        t0, n_new, n_loaded = time.monotonic(), 0, 0
        for case, ks in selection:
            path = self._embed_path(case, ks, split)
            d = None
            if path.exists() or not compute:
                try:
                    d = torchfile.load(path, what="embeddings file")
                    n_loaded += len(d["ids"])
                except Exception as exc:  # noqa: BLE001 - a damaged file is recomputed
                    if not compute:
                        raise
                    self.progress.log(f"{split}: cannot read {path} ({exc}); recomputing")
            if d is None:
                d = self._embed_case(case, ks, cancel)
                if self.rank == 0:
                    ck.save_checkpoint(d, path)
                n_new += len(d["ids"])
            parts.append(d)
        dt = time.monotonic() - t0
        if n_loaded:
            self.progress.log(f"{split}: {n_loaded} slice embeddings loaded from {self.out / 'embeddings'}")
        if n_new:
            self.progress.log(f"{split}: embedded {n_new} slices in {dt:.1f} s ({n_new / max(dt, 1e-9):.2f} slices/s)")
        ids = [i for d in parts for i in d["ids"]]
        feats, masks, lows = (torch.cat([d[k] for d in parts]) for k in ("features", "masks", "low_res"))
        keep = [i for i in range(len(ids)) if masks[i].any()]  # a target too small to survive resizing
        if not keep:
            return None
        return SliceSet(feats[keep], masks[keep], lows[keep], [ids[i] for i in keep], path=self.out / "embeddings")

    def _prompts(self, masks: torch.Tensor, jitter: bool):
        return draw_prompts(masks, self.spec.image_size, self.cfg, self.generator, self.device, jitter)

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

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 100003 + epoch)
        return torch.randperm(len(self.train_set), generator=g)

    # ------------------------------------------------------------------ hooks of the run loop
    def prepare_data(self, cancel: Callable[[], bool]) -> None:
        self.train_set = self._build_set("train", cancel)
        self.val_set = self._build_set("val", cancel)
        if self.train_set is None or len(self.train_set) == 0:
            raise no_target_error(self.cfg)

    def batches_in_epoch(self, epoch: int) -> int:
        return -(-len(self.train_set) // self.global_batch_size)

    def on_start(self) -> None:
        if not self.dist.enabled:
            return
        self.frozen_unused = self._freeze_unused()
        if self.frozen_unused:
            self.progress.log(f"DDP: {len(self.frozen_unused)} trainable tensors cannot reach the loss and stay "
                              f"frozen (e.g. {', '.join(self.frozen_unused[:3])})")
        self.head = distributed.wrap_ddp(self.head, self.device)

    def start_fields(self) -> Dict[str, Any]:
        return {"base_model": self.spec.name, "train_slices": len(self.train_set),
                "val_slices": len(self.val_set) if self.val_set is not None else 0,
                "global_batch_size": self.global_batch_size}

    def train_step(self, group: range) -> Dict[str, float]:
        bs, world, distributed_run = self.global_batch_size, self.dist.world_size, self.dist.enabled
        order = self._order(self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, count, global_count = 0.0, 0, 0
        for b in group:
            idx = order[b * bs:(b + 1) * bs]
            global_count += len(idx)
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
            sync = contextlib.nullcontext() if (b == group[-1] or not distributed_run) else self.head.no_sync()
            with sync:
                low = self._decode(self.head, self.train_set.features[idx], boxes, points)
                loss = self.loss_fn(low, self.train_set.low_res[idx].to(self.device))
                self.backward(loss / len(group) if weight == 1.0 else loss * (weight / len(group)))
            if weight > 0:
                loss_sum += float(loss.detach()) * len(idx)
                count += len(idx)
        self.optimizer_step()
        if self.scheduler is not None:
            self.scheduler.step()
        mean = distributed.mean_across_ranks(loss_sum / count if count else 0.0, count)
        return {"loss": mean, "samples": global_count}

    def num_val_items(self) -> int:
        return 0 if self.val_set is None else len(self.val_set)

    def val_predictions(self, mine: List[int]) -> Iterable[Dict[str, Tuple[Any, Any]]]:
        """The thresholded low-res logits of each val slice of ``mine`` against its low-res target."""
        # the prompts of all val slices in order (the points come from the trainer generator, whose
        # draws must not depend on the rank), then this rank's share
        boxes, points = self._prompts(self.val_set.masks, jitter=False)
        head = distributed.unwrap(self.head)
        for i in range(0, len(mine), self.cfg.batch_size):
            sl = torch.as_tensor(mine[i:i + self.cfg.batch_size], dtype=torch.long)
            on = sl.to(boxes.device)
            pts = (points[0][on], points[1][on]) if points is not None else None
            low = self._decode(head, self.val_set.features[sl], boxes[on], pts)
            pred = (low > 0).cpu()
            for n in range(len(sl)):
                yield {"dice": (pred[n], self.val_set.low_res[sl[n]] > 0.5)}


__all__ = ["DecoderTrainer", "PromptedDecoder", "SliceSet", "draw_prompts", "select_slices"]
