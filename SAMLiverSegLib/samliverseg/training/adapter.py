"""Med-SA adapter fine-tuning (trainer kind ``adapter``).

The base model (``base_model``, e.g. lite_medsam) is frozen; Med-SA adapters
(:mod:`samliverseg.modeling.adapters`) are inserted into every transformer block of its image
encoder (and HyP-Adpt into the mask decoder) and only they are trained; with
``adapter.train_decoder: true`` the mask decoder is trained too (``train_prompt_encoder`` adds
the prompt encoder). Config section::

    kind: adapter
    adapter:
      bottleneck_ratio: 0.0625   # adapter width r = round(C / 16): ~2 % of the encoder
      bottleneck: null           # or a fixed width
      mlp_adapter: true          # the adapter beside each MLP
      mlp_scale: 0.5
      sd_trans: false            # SD-Trans: slabs of `depth` slices attend along depth
      depth: 3
      hyp: true                  # HyP-Adpt in the mask decoder
      hyp_rank: 8
      train_decoder: false       # also fine-tune the mask decoder

* Samples: the axial slices (``array[k]``) of the cache's labelled ``train``/``val`` cases that
  contain the target, at most ``max_slices_per_case`` per case, chosen as the decoder trainer
  does (``DecoderTrainer._select_slices``). With ``sd_trans`` a sample is the slab of ``depth``
  consecutive slices centred on that slice (indices clamped at the volume's ends).
* Since the encoder runs with gradients through the adapters, embeddings cannot be precomputed:
  each step preprocesses its slices (``SlicePredictor.preprocess``, as at inference) and runs
  the encoder and the decoder. Keep CPU runs small (``max_slices_per_case``, ``batch_size`` 1-2).
* Loss: MONAI ``DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")`` between the
  low-res logits (``multimask_output=False``) and the label mapped into the model frame, on every
  slice of the sample that contains the target; prompts: the label's box with a random jitter of
  each side in ``[-box_jitter_px, box_jitter_px]`` (+ ``points_per_slice`` positive points), the
  decoder trainer's ``_prompts``. Validation: mean 2D Dice of the thresholded low-res logits on
  the centre slice of each val sample, exact box.
* The whole model stays in eval mode (TinyViT's BatchNorm statistics are frozen, no dropout);
  Adam (``lr``, ``weight_decay``), ``grad_accum``, optional cosine schedule, AMP on CUDA.
* Checkpoints (``last.pt``, ``best.pt``) and ``model.pth`` hold only the adapter weights (+ the
  trained base parts) and a reference to the base model (name, checkpoint path and SHA-256);
  :func:`~samliverseg.modeling.adapters.load_adapted_model` rebuilds the model from it.
* Reproducibility and resume as in the decoder trainer: the order of epoch e is a permutation
  drawn from ``seed`` and e; jitter comes from a trainer generator saved with the RNG states
  and the position inside the epoch, so a resumed run reaches the weights of an uninterrupted one.
* Distributed (``torchrun``, :mod:`.distributed`), with the decoder trainer's conventions:
  ``batch_size`` is per process, a step takes the global batch ``G = batch_size * W`` samples
  ``order[b*G:(b+1)*G]`` of the same seeded order on every rank, and rank r runs its share
  ``global_batch[r::W]`` (``shard``). Every rank draws the jitter/points of the whole global
  batch from its generator and keeps its share's rows, so the prompts (and the generators) are
  those of a single process with ``batch_size = G``. Each rank's loss is its local mean weighted
  by its share of the batch's decoded slices (known on every rank from the labels), and the
  gradients are summed over the ranks with one all-reduce per step: the gradient of the whole
  batch's mean loss, as DDP would give, without DDP's rule that every trainable parameter must
  get a gradient (the IoU head gets none when the decoder is trained), and without a dummy
  sample on a rank whose share is empty. Validation: each rank scores its share, the Dice is the
  sample-weighted mean over the ranks. Cancellation is agreed on by all ranks after each step.
  Rank 0 writes checkpoints, ``model.pth`` and progress.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from samliverseg.models.build_sam import build_model, find_model_checkpoint, get_spec
from samliverseg.core.devices import resolve_device
from samliverseg.core.errors import CancelledError, CheckpointError, InputError
from samliverseg.modeling.adapters import (ADAPTER_KIND, AdapterConfig, adapter_state, apply_adapters, count_parameters,
                                 is_adapter_key)
from samliverseg.models.adapters import save_adapted_model
from samliverseg.interactive.predictor import SlicePredictor
from samliverseg.models.weights import sha256_of
from samliverseg.training import checkpoint as ck
from samliverseg.training import distributed
from samliverseg.training.config import TrainConfig
from samliverseg.training.decoder import DecoderTrainer, peak_rss_mb
from samliverseg.training.prepare import load_manifest
from samliverseg.training.progress import ProgressWriter


@dataclass
class AdapterOptions(AdapterConfig):
    """The ``adapter:`` config section: the adapter layout (AdapterConfig) + what else to train."""

    train_decoder: bool = False

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(**{f.name: getattr(self, f.name) for f in fields(AdapterConfig)})


@dataclass
class SlabSet:
    """Training material of one split: windowed slabs and their targets (CPU)."""

    images: List[np.ndarray]  # each (D, rows, cols) uint8, the windowed slices
    pixel_spacing: List[Tuple[float, float]]  # (rows = j, cols = i) mm
    masks: torch.Tensor  # (N, D, S, S) uint8: the label in the model-input frame
    low_res: torch.Tensor  # (N, D, L, L) uint8: the loss target
    ids: List[str]  # "case:k" of the centre slice

    def __len__(self) -> int:
        return len(self.ids)


class AdapterTrainer(DecoderTrainer):
    """Trains Med-SA adapters on a frozen base model (see the module docstring)."""

    KIND = ADAPTER_KIND

    def __init__(self, config: TrainConfig, progress: Optional[ProgressWriter] = None, rank: int = 0):
        self.cfg = config
        self.opts: AdapterOptions = config.options(self.KIND)
        self.dist = distributed.current()
        self.rank = self.dist.rank if self.dist.enabled else rank
        self.out = Path(config.output).expanduser()
        self.progress = progress or ProgressWriter(rank=self.rank)
        if self.progress.log_path is None:
            self.progress.set_log_path(self.out / "train.log")
        self.device = resolve_device(config.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank % max(1, torch.cuda.device_count()))
        self.amp = bool(config.amp and self.device.type == "cuda")
        self.spec = get_spec(config.base_model)
        self.manifest = load_manifest(Path(config.cache))
        self.model = build_model(self.spec, checkpoint=config.checkpoint, device=self.device)
        self.base_checkpoint = find_model_checkpoint(self.spec, config.checkpoint)
        self._base_sha256: Optional[str] = None
        torch.manual_seed(config.seed)  # the adapters' initial weights
        apply_adapters(self.model, self.opts.adapter_config(), freeze=True)
        self.model.eval()  # frozen BatchNorm statistics; the adapters have no dropout
        prefixes: Tuple[str, ...] = ()
        if self.opts.train_decoder:
            prefixes += ("mask_decoder.",)
        if config.train_prompt_encoder:
            prefixes += ("prompt_encoder.",)
        self.trainable_prefixes = prefixes
        for name, p in self.model.named_parameters():
            p.requires_grad_(is_adapter_key(name) or (bool(prefixes) and name.startswith(prefixes)))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        distributed.broadcast_module(self.model)
        self.predictor = SlicePredictor(self.model, self.device)
        self.generator = torch.Generator().manual_seed(int(config.seed))
        np.random.seed(config.seed % 2**32)
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
        self.train_set: Optional[SlabSet] = None
        self.val_set: Optional[SlabSet] = None
        self.counts = count_parameters(self.model)
        self.resumed_world_size = self.dist.world_size

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return adapter_state(self.model, self.trainable_prefixes)

    def base_sha256(self) -> Optional[str]:
        if self._base_sha256 is None and self.base_checkpoint is not None and Path(self.base_checkpoint).is_file():
            self._base_sha256 = sha256_of(self.base_checkpoint)
        return self._base_sha256

    def metadata(self) -> Dict[str, Any]:
        meta = super().metadata()
        meta.update({"kind": self.KIND, "adapter": self.opts.adapter_config().to_dict(),
                     "train_decoder": bool(self.opts.train_decoder),
                     "trained": ["adapters"] + list(self.trainable_prefixes),
                     "trained_prefixes": list(self.trainable_prefixes),
                     "base_checkpoint": str(Path(self.base_checkpoint).resolve()) if self.base_checkpoint else None,
                     "trainable_parameters": sum(p.numel() for p in self.params),
                     "encoder_adapter_fraction": self.counts["encoder_fraction"]})
        return meta

    def checkpoint_dict(self) -> Dict[str, Any]:
        d = super().checkpoint_dict()
        d["kind"] = self.KIND
        return d

    def restore(self, path: Path) -> None:
        ckpt = ck.load_checkpoint(path)
        kind = ckpt.get("kind") or (ckpt.get("config") or {}).get("kind")
        if kind != self.KIND:
            raise CheckpointError(f"cannot resume from {path}: it is a checkpoint of trainer kind {kind!r}, "
                                  f"expected kind {self.KIND!r}")
        old = (ckpt.get("config") or {}).get(self.KIND) or {}
        mine = self.opts.adapter_config().to_dict()
        try:
            theirs = AdapterConfig.from_any({k: v for k, v in old.items() if k in mine}).to_dict()
        except InputError as exc:
            raise CheckpointError(f"cannot resume from {path}: {exc}") from None
        for key, value in mine.items():
            if theirs.get(key) != value:
                raise CheckpointError(f"cannot resume from {path}: it was made with adapter.{key}="
                                      f"{theirs.get(key)!r}, the config says adapter.{key}={value!r}")
        if bool(old.get("train_decoder", False)) != bool(self.opts.train_decoder):
            raise CheckpointError(f"cannot resume from {path}: it was made with adapter.train_decoder="
                                  f"{bool(old.get('train_decoder', False))}, the config says {self.opts.train_decoder}")
        super().restore(path)

    # ------------------------------------------------------------------ data
    def _slab(self, k: int, n_slices: int) -> List[int]:
        d = self.opts.depth if self.opts.sd_trans else 1
        start = k - d // 2
        return [min(max(start + i, 0), n_slices - 1) for i in range(d)]

    def _build_set(self, split: str, cancel: Callable[[], bool]) -> Optional[SlabSet]:
        selection = self._select_slices(split)
        if not selection:
            return None
        S = int(self.spec.image_size)
        L = 4 * int(self.model.embedding_size)
        images, pix, masks, lows, ids = [], [], [], [], []
        for case, ks in selection:
            if cancel():
                raise CancelledError("cancelled while reading the training cache")
            with np.load(Path(self.cfg.cache) / case["file"]) as z:
                image, label = z["image"], z["label"]
                spacing = [float(x) for x in z["spacing"]]
            p = (spacing[1], spacing[0])  # rows (j), cols (i)
            for k in ks:
                slab = self._slab(k, image.shape[0])
                m_list, l_list = [], []
                for s in slab:
                    h, w = self.predictor.input_size(image.shape[1], image.shape[2], p)
                    m = torch.from_numpy(self._target(label[s]).astype(np.float32))[None, None]
                    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                    m = F.pad(m, (0, S - w, 0, S - h))
                    low = F.interpolate(m, size=(L, L), mode="bilinear", align_corners=False) > 0.5
                    m_list.append((m[0, 0] > 0.5).to(torch.uint8))
                    l_list.append(low[0, 0].to(torch.uint8))
                centre = len(slab) // 2
                if not m_list[centre].any():  # a target too small to survive the resize
                    continue
                images.append(np.ascontiguousarray(image[slab]))
                pix.append(p)
                masks.append(torch.stack(m_list))
                lows.append(torch.stack(l_list))
                ids.append(f"{case['id']}:{k}")
        if not ids:
            return None
        self.progress.log(f"{split}: {len(ids)} samples ({'slabs of ' + str(self.opts.depth) if self.opts.sd_trans else 'slices'})")
        return SlabSet(images, pix, torch.stack(masks), torch.stack(lows), ids)

    def _inputs(self, data: SlabSet, idx: List[int]) -> torch.Tensor:
        """(n * D, 3, S, S) model inputs of samples ``idx``, slab-major."""
        xs = [self.predictor.preprocess(data.images[i][s], data.pixel_spacing[i])[0]
              for i in idx for s in range(data.images[i].shape[0])]
        return torch.cat(xs).to(self.device)

    def _decoded(self, data: SlabSet, idx: List[int], centre_only: bool) -> torch.Tensor:
        """Boolean (n * D,) selection of the slices that are decoded (those containing the target)."""
        m = data.masks[idx]
        sel = m.flatten(2).any(-1).bool()  # (n, D)
        if centre_only:
            keep = torch.zeros_like(sel)
            keep[:, sel.shape[1] // 2] = True
            sel = sel & keep
        return sel.reshape(-1)

    def _forward_samples(self, data: SlabSet, batch: List[int], jitter: bool, centre_only: bool = False):
        """Encoder (with the adapters) + decoder on this rank's share of the global ``batch``
        (train-set indices) -> (low-res logits, targets) of the share's decoded slices.

        The prompts are drawn for the decoded slices of the whole batch, in order, so that every
        rank's generator advances alike; the share's rows are kept."""
        mine = list(distributed.shard(list(range(len(batch))), self.dist))  # positions in the batch
        S, L = data.masks.shape[-1], data.low_res.shape[-1]
        sel = self._decoded(data, batch, centre_only)  # (n * D,) over the whole batch
        owner = torch.arange(len(batch)).repeat_interleave(data.masks.shape[1])[sel]  # batch position per row
        boxes, points = self._prompts(data.masks[batch].reshape(-1, S, S)[sel], jitter)
        rows = torch.isin(owner, torch.tensor(mine, dtype=owner.dtype))
        if not mine or not bool(rows.any()):
            return None, None
        rows_dev = rows.to(boxes.device)
        boxes = boxes[rows_dev]
        if points is not None:
            points = (points[0][rows_dev], points[1][rows_dev])
        share = [batch[i] for i in mine]
        sel_mine = self._decoded(data, share, centre_only)
        target = data.low_res[share].reshape(-1, 1, L, L)[sel_mine].float().to(self.device)
        x = self._inputs(data, share)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            emb = self.model.image_encoder(x)
            low, _ = self.model.decode(emb[sel_mine.to(emb.device)], points=points, boxes=boxes,
                                       multimask_output=False)
        return low.float(), target

    def _n_decoded(self, data: SlabSet, idx: List[int]) -> int:
        return int(self._decoded(data, idx, False).sum())

    # ------------------------------------------------------------------ loops
    @torch.no_grad()
    def validate(self) -> Optional[float]:
        if self.val_set is None or len(self.val_set) == 0:
            return None
        dices: List[float] = []
        g = self.global_batch_size
        for i in range(0, len(self.val_set), g):
            low, tgt = self._forward_samples(self.val_set, list(range(i, min(i + g, len(self.val_set)))),
                                             jitter=False, centre_only=True)
            if low is None:
                continue
            pred = (low > 0).float()
            inter = (pred * tgt).flatten(1).sum(1)
            denom = pred.flatten(1).sum(1) + tgt.flatten(1).sum(1)
            dices.extend(torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom)).tolist())
        local = float(np.mean(dices)) if dices else 0.0
        return distributed.mean_across_ranks(local, weight=len(dices))

    def _all_reduce_gradients(self) -> None:
        """Sum the gradients over the ranks (each rank's loss already carries its batch share)."""
        if not self.dist.enabled:
            return
        import torch.distributed as dist
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    @property
    def global_batch_size(self) -> int:
        """Samples per optimiser step (per micro-batch) over all ranks: batch_size x processes."""
        return self.cfg.batch_size * self.dist.world_size

    def steps_per_epoch(self, batch: Optional[int] = None) -> int:
        n_batches = math.ceil(len(self.train_set) / (batch or self.global_batch_size))
        return math.ceil(n_batches / self.cfg.grad_accum)

    def accumulate_gradients(self, batches: List[List[int]]) -> Tuple[float, int]:
        """The gradients of one optimiser step: ``batches`` are the global micro-batches (train-set
        indices, the same on every rank); each rank runs its share of each, weighted so that the
        all-reduced sum is the gradient of the mean loss over the micro-batch, averaged over the
        micro-batches. Returns this rank's (sum of per-slice losses, decoded slices)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, count = 0.0, 0
        for idx in batches:
            n_global = self._n_decoded(self.train_set, idx)
            low, target = self._forward_samples(self.train_set, list(idx), jitter=True)
            if low is None:  # this rank's share of the batch is empty
                continue
            loss = self.loss_fn(low, target)
            scaled = loss * (low.shape[0] / max(1, n_global)) / len(batches)  # this rank's share
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
            loss_sum += float(loss.detach()) * low.shape[0]
            count += low.shape[0]
        self._all_reduce_gradients()
        return loss_sum, count

    def _should_stop(self, cancel: Callable[[], bool]) -> bool:
        stop = bool(cancel())
        if self.dist.enabled:
            stop = bool(distributed.broadcast_object(stop))
        return stop

    def run(self, resume: bool = False, cancel: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
        cancel = cancel or (lambda: False)
        cfg = self.cfg
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        n_train = sum(p.numel() for p in self.params)
        self.progress.log(f"adapter fine-tuning of {self.spec.name} on {self.device} (target {cfg.target}); "
                          f"{n_train} trainable parameters ({self.counts['adapters']} in adapters, "
                          f"{100 * self.counts['encoder_fraction']:.2f} % of the encoder); run folder {self.out}")
        try:
            self.train_set = self._build_set("train", cancel)
            self.val_set = self._build_set("val", cancel)
        except CancelledError:
            self.progress.emit("cancelled", self.epoch, self.step, checkpoint=None, exit_code=CancelledError.exit_code)
            raise
        if self.train_set is None or len(self.train_set) == 0:
            raise InputError(f"no training slice contains the target {cfg.target!r} in {cfg.cache} "
                             f"(labelled cases of the train split)")
        total = self.steps_per_epoch() * cfg.epochs
        if cfg.scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, total))
        last = self.out / ck.LAST_NAME
        resumed = False
        if resume:
            if not last.exists():
                raise CheckpointError(f"--resume: no checkpoint {last} to resume from")
            self.restore(last)
            resumed = True
            self.progress.log(f"resumed from {last}: epoch {self.epoch}, step {self.step}")
            if self.resumed_world_size != self.dist.world_size:
                self.progress.log(f"warning: the checkpoint was written by a run of {self.resumed_world_size} "
                                  f"process(es), this run has {self.dist.world_size}: the global batch "
                                  f"(batch_size x processes) differs, so the resumed run will differ from an "
                                  f"uninterrupted one")
        if self.dist.enabled:
            self.progress.log(f"distributed: {self.dist.world_size} processes ({self.dist.backend}), "
                              f"{cfg.batch_size} samples per process, global batch {self.global_batch_size}")
        self.progress.total_steps = total
        self.progress.mark_start(self.step)
        self.progress.emit("start", self.epoch, self.step, kind=self.KIND, base_model=self.spec.name,
                           output=str(self.out), device=str(self.device), train_slices=len(self.train_set),
                           val_slices=len(self.val_set) if self.val_set is not None else 0, epochs=cfg.epochs,
                           resumed=resumed, target=cfg.target, trainable_parameters=n_train,
                           encoder_adapter_fraction=self.counts["encoder_fraction"],
                           sd_trans=self.opts.sd_trans, world_size=self.dist.world_size)
        n = len(self.train_set)
        bs, acc = self.global_batch_size, cfg.grad_accum
        n_batches = math.ceil(n / bs)
        t_run, samples_run = time.monotonic(), 0
        while self.epoch < cfg.epochs:
            order = self._order(self.epoch).tolist()
            while self.batch_in_epoch < n_batches:
                t0 = time.monotonic()
                group = range(self.batch_in_epoch, min(self.batch_in_epoch + acc, n_batches))
                loss_sum, count = self.accumulate_gradients([order[b * bs:(b + 1) * bs] for b in group])
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.batch_in_epoch = group.stop
                self.step += 1
                self._epoch_loss_sum += loss_sum
                self._epoch_loss_n += count
                samples_run += count
                dt = time.monotonic() - t0
                step_loss = distributed.mean_across_ranks(loss_sum / count if count else 0.0, weight=count)
                self.progress.emit("step", self.epoch, self.step, loss=step_loss,
                                   lr=self.optimizer.param_groups[0]["lr"], samples_per_s=round(count / max(dt, 1e-9), 3))
                if self._should_stop(cancel):
                    return self._cancel()
            mean_loss = distributed.mean_across_ranks(self._epoch_loss_sum / max(1, self._epoch_loss_n),
                                                      weight=self._epoch_loss_n)
            lr = self.optimizer.param_groups[0]["lr"]
            self.progress.emit("epoch", self.epoch, self.step, losses={"train": mean_loss}, lr=lr)
            dice = self.validate()
            record = {"epoch": self.epoch, "step": self.step, "train_loss": mean_loss, "val_dice": dice}
            self.history.append(record)
            is_best = dice is not None and (self.best_dice is None or dice > self.best_dice)
            if dice is not None:
                if is_best:
                    self.best_dice = dice
                self.progress.emit("validation", self.epoch, self.step, dice=dice, best_dice=self.best_dice,
                                   is_best=is_best)
            self.progress.log(f"epoch {self.epoch + 1}/{cfg.epochs}: train loss {mean_loss:.4f}"
                              + (f", val Dice {dice:.4f}" if dice is not None else ""))
            self.epoch += 1
            self.batch_in_epoch = 0
            self._epoch_loss_sum, self._epoch_loss_n = 0.0, 0
            if is_best or dice is None:
                self.save("best")
            self.save("last")
            distributed.barrier()
            if self._should_stop(cancel) and self.epoch < cfg.epochs:
                return self._cancel(saved=True)
        model_path = self.export_model()
        distributed.barrier()
        elapsed = time.monotonic() - t_run
        sps = samples_run / elapsed if elapsed > 0 else None
        self.progress.emit("done", self.epoch, self.step, best_dice=self.best_dice, model=str(model_path),
                           last=str(self.out / ck.LAST_NAME), best=str(self.out / ck.BEST_NAME),
                           samples_per_s=sps, peak_rss_mb=peak_rss_mb())
        return {"status": "done", "model": model_path, "best_dice": self.best_dice, "samples_per_s": sps,
                "history": self.history, "step": self.step}

    def _cancel(self, saved: bool = False) -> Dict[str, Any]:
        path = self.out / ck.LAST_NAME
        if not saved:
            self.save("last")
        distributed.barrier()
        self.progress.log(f"cancelled at epoch {self.epoch}, step {self.step}; state saved in {path} "
                          f"(continue with --resume)")
        self.progress.emit("cancelled", self.epoch, self.step, checkpoint=str(path), exit_code=CancelledError.exit_code)
        raise CancelledError(f"training cancelled; resume with --resume (checkpoint {path})")

    def export_model(self) -> Path:
        """model.pth: the adapter (+ trained parts) state of best.pt (else last.pt) + the base reference."""
        src = self.out / ck.BEST_NAME
        if not src.exists():
            src = self.out / ck.LAST_NAME
        path = self.out / ck.MODEL_NAME
        if self.rank == 0:
            trained = ck.load_checkpoint(src)["model"]
            meta = dict(self.metadata(), best_dice=self.best_dice, source=str(src), step=self.step)
            save_adapted_model(self.model, path, base_model=self.spec.name, base_checkpoint=self.base_checkpoint,
                               trained_prefixes=self.trainable_prefixes, state=trained, metadata=meta,
                               base_sha256=self.base_sha256())
            self.progress.emit("checkpoint", self.epoch, self.step, path=str(path), which="model")
        return path


__all__ = ["AdapterOptions", "AdapterTrainer", "SlabSet"]
