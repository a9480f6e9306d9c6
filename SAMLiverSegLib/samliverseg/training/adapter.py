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
  does (``decoder.select_slices``). With ``sd_trans`` a sample is the slab of ``depth``
  consecutive slices centred on that slice (indices clamped at the volume's ends).
* Since the encoder runs with gradients through the adapters, embeddings cannot be precomputed:
  each step preprocesses its slices (``SlicePredictor.preprocess``, as at inference) and runs
  the encoder and the decoder. Keep CPU runs small (``max_slices_per_case``, ``batch_size`` 1-2).
* Loss: MONAI ``DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")`` between the
  low-res logits (``multimask_output=False``) and the label mapped into the model frame, on every
  slice of the sample that contains the target; prompts: the label's box with a random jitter of
  each side in ``[-box_jitter_px, box_jitter_px]`` (+ ``points_per_slice`` positive points), the
  decoder trainer's prompts (``decoder.draw_prompts``). Validation: mean 2D Dice of the thresholded low-res logits on
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

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from samliverseg.core.errors import CancelledError
from samliverseg.interactive.slice_view import cache_view
from samliverseg.modeling.adapters import (ADAPTER_KIND, AdapterConfig, adapter_state, apply_adapters, count_parameters,
                                 is_adapter_key)
from samliverseg.models.adapters import save_adapted_model
from samliverseg.models.weights import sha256_of
from samliverseg.training import distributed
from samliverseg.training.decoder import DecoderTrainer, select_slices
from samliverseg.training.config import TrainConfig
from samliverseg.training.progress import ProgressWriter


@dataclass
class AdapterOptions(AdapterConfig):
    """The ``adapter:`` config section: the adapter layout (AdapterConfig) + what else to train."""

    train_decoder: bool = False  # also fine-tune the mask decoder

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
    """Trains Med-SA adapters on a frozen base model (see the module docstring): the decoder
    trainer's set-up (base model, prompts, loss, Adam) with adapters inserted by
    :meth:`configure_trainable`; its own samples (slabs through the encoder) and gradient sync."""

    KIND = ADAPTER_KIND
    RESUME_OPTIONS = tuple(f.name for f in fields(AdapterOptions))

    def __init__(self, config: TrainConfig, progress: Optional[ProgressWriter] = None, rank: int = 0):
        self._base_sha256: Optional[str] = None
        super().__init__(config, progress, rank)
        self.counts = count_parameters(self.model)

    def configure_trainable(self) -> Tuple[str, ...]:
        torch.manual_seed(self.cfg.seed)  # the adapters' initial weights
        apply_adapters(self.model, self.opts.adapter_config(), freeze=True)
        self.model.eval()  # frozen BatchNorm statistics; the adapters have no dropout
        prefixes: Tuple[str, ...] = ()
        if self.opts.train_decoder:
            prefixes += ("mask_decoder.",)
        if self.cfg.train_prompt_encoder:
            prefixes += ("prompt_encoder.",)
        for name, p in self.model.named_parameters():
            p.requires_grad_(is_adapter_key(name) or (bool(prefixes) and name.startswith(prefixes)))
        distributed.broadcast_module(self.model)
        return prefixes

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return adapter_state(self.model, self.trainable_prefixes)

    def base_sha256(self) -> Optional[str]:
        if self._base_sha256 is None and self.base_checkpoint is not None and Path(self.base_checkpoint).is_file():
            self._base_sha256 = sha256_of(self.base_checkpoint)
        return self._base_sha256

    def metadata(self) -> Dict[str, Any]:
        meta = super().metadata()
        meta.update({"adapter": self.opts.adapter_config().to_dict(),
                     "train_decoder": bool(self.opts.train_decoder),
                     "trained": ["adapters"] + list(self.trainable_prefixes),
                     "trained_prefixes": list(self.trainable_prefixes),
                     "base_checkpoint": str(Path(self.base_checkpoint).resolve()) if self.base_checkpoint else None,
                     "trainable_parameters": sum(p.numel() for p in self.params),
                     "encoder_adapter_fraction": self.counts["encoder_fraction"]})
        return meta

    def write_model(self, path: Path, trained: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        """The adapter (+ trained parts) state + the base reference (``load_adapted_model``)."""
        save_adapted_model(self.model, path, base_model=self.spec.name, base_checkpoint=self.base_checkpoint,
                           trained_prefixes=self.trainable_prefixes, state=trained, metadata=meta,
                           base_sha256=self.base_sha256())

    def describe(self) -> str:
        n_train = sum(p.numel() for p in self.params)
        return (f"adapter fine-tuning of {self.spec.name} on {self.device} (target {self.cfg.target}); "
                f"{n_train} trainable parameters ({self.counts['adapters']} in adapters, "
                f"{100 * self.counts['encoder_fraction']:.2f} % of the encoder); run folder {self.out}")

    def train_mode(self) -> None:
        pass  # the whole model stays in eval mode (frozen BatchNorm statistics)

    eval_mode = train_mode

    # ------------------------------------------------------------------ data
    def _slab(self, k: int, n_slices: int) -> List[int]:
        d = self.opts.depth if self.opts.sd_trans else 1
        start = k - d // 2
        return [min(max(start + i, 0), n_slices - 1) for i in range(d)]

    def _build_set(self, split: str, cancel: Callable[[], bool]) -> Optional[SlabSet]:
        selection = select_slices(self.cfg, self.manifest, split)
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
                view = cache_view(z)
            image, label = view.image(image), view.image(label)  # each slice as the engine shows it
            p = view.spacing((spacing[1], spacing[0]))  # rows (j), cols (i) of the slice, turned
            for k in ks:
                slab = self._slab(k, image.shape[0])
                m_list, l_list = [], []
                for s in slab:
                    h, w = self.predictor.input_size(image.shape[1], image.shape[2], p)
                    m = torch.from_numpy(self.target(np.ascontiguousarray(label[s])).astype(np.float32))[None, None]
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

    # ------------------------------------------------------------------ hooks of the run loop
    def on_start(self) -> None:
        pass  # no DDP wrapper: the gradients are summed by _all_reduce_gradients

    def start_fields(self) -> Dict[str, Any]:
        return {"base_model": self.spec.name, "train_slices": len(self.train_set),
                "val_slices": len(self.val_set) if self.val_set is not None else 0,
                "trainable_parameters": sum(p.numel() for p in self.params),
                "encoder_adapter_fraction": self.counts["encoder_fraction"], "sd_trans": self.opts.sd_trans}

    def val_predictions(self, mine: List[int]) -> Iterable[Dict[str, Tuple[Any, Any]]]:
        """The centre slice of each val sample; the prompts of every global batch are drawn in full
        on every rank (the generators stay alike), each rank decodes its share."""
        g = self.global_batch_size
        for i in range(0, len(self.val_set), g):
            low, tgt = self._forward_samples(self.val_set, list(range(i, min(i + g, len(self.val_set)))),
                                             jitter=False, centre_only=True)
            if low is None:
                continue
            pred = (low > 0).cpu()
            for n in range(pred.shape[0]):
                yield {"dice": (pred[n], tgt[n].cpu() > 0.5)}

    # num_val_items (the decoder's): every rank loops over the whole val set in global batches
    # and scores its share (_forward_samples), so ``mine`` is not used here

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
            self.backward(scaled)
            loss_sum += float(loss.detach()) * low.shape[0]
            count += low.shape[0]
        self._all_reduce_gradients()
        return loss_sum, count

    def train_step(self, group: range) -> Dict[str, float]:
        order = self._order(self.epoch).tolist()
        bs = self.global_batch_size
        loss_sum, count = self.accumulate_gradients([order[b * bs:(b + 1) * bs] for b in group])
        self.optimizer_step()
        if self.scheduler is not None:
            self.scheduler.step()
        total = distributed.sum_across_ranks([loss_sum, count])
        return {"loss": total[0] / total[1] if total[1] else 0.0, "samples": total[1]}


__all__ = ["AdapterOptions", "AdapterTrainer", "SlabSet"]
