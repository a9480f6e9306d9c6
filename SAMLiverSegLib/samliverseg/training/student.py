"""Slicing-SAM3D student training (trainer kind ``student``; design digest section 3, phase 0).

The model is :class:`~samliverseg.modeling.slicing_student.SlicingStudent`: the frozen image
encoder of ``base_model`` (``lite_medsam``: TinyViT; ``sam_vit_b``/``medsam``: ViT-B) applied to
every axial slice ``array[k]``, and a trainable 3D CNN decoder over a slab of ``D_s`` consecutive
slices. Only the decoder is trained.

Embedding cache
---------------
The encoder is frozen, so the embedding of each slice is computed once per case (the student's
``embed``: square resize to S, the base model's normalisation, the encoder) and saved in the run
folder, ``embeddings/<case id>_<key>.pt`` (atomic; ``key`` hashes the encoder and its weights
file, the case's ``case_hash``, the target and the options below). A resumed or repeated run
loads them instead of recomputing; an interrupted embedding pass keeps the finished cases.
Storage is **float16** by default (``student.cache_dtype``; half the memory and disk, relative
error ~1e-3 on the embeddings, far below what the decoder's training noise changes), cast back
to float32 for the decoder. Roughly 2 MB per slice for lite_medsam (256×64×64) in float16.
``student.slice_margin`` (when set) embeds only the slices within the target's k-range ±
margin (the rest of a long scan is never seen by the decoder then).

The loss target of a slice is its label (``liver``: label > 0, ``tumor``: label == 2) resized
like the image (square, to the decoder's native ``4h × 4w``, bilinear + threshold 0.5), stored
beside the embeddings as uint8.

Augmentation (what commutes with a frozen per-slice encoder)
-------------------------------------------------------------
The encoder sees one slice at a time, so anything that only reorders slices commutes with it
exactly and can be applied to the cached embeddings:

* **depth shift**: every slab starts at a random k (``[0, K − D_s]``; with probability
  ``student.foreground_fraction`` it is placed to contain a random target slice);
* **depth flip** (``student.depth_flip``): the slab's slice order is reversed with p = 0.5
  (embeddings and target together).

In-plane geometry (flips, rotations, scaling, elastic) and intensity changes do **not** commute
with the encoder (``E(flip(x)) ≠ flip(E(x))``, the ViT/TinyViT features are not equivariant). They
would need the encoder in the loop. The option offered instead is ``student.inplane_flip``: the
embeddings of the left-right flipped slices (flip along i) are computed once as well (twice the
embedding time and storage), and a slab uses them with p = 0.5 with the flipped target.

Training
--------
An epoch draws ``cases × student.slabs_per_case`` random slabs (rounded up to whole batches of
``batch_size`` slabs per rank) from the labelled ``train`` cases; the slab list of epoch ``e`` is
a pure function of ``(seed, e)``, so a resumed run continues exactly where it stopped.
Loss: MONAI ``DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")`` between the native
logits ``(B, 1, D_s, 4h, 4w)`` and the target; Adam (``lr``, ``weight_decay``), ``grad_accum``
batches per optimiser step, optional cosine schedule, AMP on CUDA. Validation after each epoch:
Algorithm 1 (slab split, last slab overlapped) over each labelled ``val`` case's cached
embeddings, 3D Dice of ``σ(logits) > 0.5`` against the target at the native resolution, averaged
over cases (a case whose target is empty is skipped: the base class's one rule); ``best.pt`` keeps the best, ``last.pt`` the latest state (``best.pt`` follows
``last.pt`` when there is no val case).

DDP (``torchrun``): the decoder is wrapped in DistributedDataParallel; each global batch of
``batch_size × world`` slabs is sharded across the ranks; the missing case embeddings are
computed by the ranks in turn (case i by rank i mod world) and read by all; validation cases are
sharded and the Dice averaged; rank 0 writes checkpoints and progress; a cancel request on any
rank stops every rank after the same step (the base class's vote).

Output: ``model.pth`` = ``{"model": the student's whole state dict (frozen encoder + the best
decoder), "metadata": {"kind": "student", "base_model"/"encoder", "slab_depth", "hidden",
"embed_dim", "image_size", "normalization", "window", "window_hu", "spacing", "target",
"label_meaning", ...}}``; :func:`~samliverseg.automatic.student.segment_volume` uses it.
The common config keys ``box_jitter_px``, ``points_per_slice``, ``train_prompt_encoder`` and
``max_slices_per_case`` do not apply to this trainer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from samliverseg.core.errors import CancelledError, CheckpointError, InputError
from samliverseg.automatic.student import build_slicing_student
from samliverseg.io import torchfile
from samliverseg.modeling.slicing_student import DECODER_NORMS, STUDENT_KIND, THRESHOLD, slab_plan, student_metadata
from samliverseg.models.build_sam import find_model_checkpoint, get_spec
from samliverseg.training import checkpoint as ck
from samliverseg.training import distributed
from samliverseg.training.base import Trainer, content_hash, no_target_error
from samliverseg.training.config import TrainConfig
from samliverseg.training.progress import ProgressWriter

EMBED_FORMAT = 1
CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
#: Student options that must match for a resume (the decoder would be another network).
RESUME_OPTIONS = ("slab_depth", "hidden", "decoder_norm", "inplane_flip", "slice_margin", "cache_dtype")


@dataclass
class StudentOptions:
    """The ``student:`` section of a training config."""

    slab_depth: int = 8  # D_s: consecutive slices per slab
    hidden: int = 64  # decoder width (multiple of 4)
    decoder_norm: str = "channel"  # channel (LayerNorm per voxel) | instance (over the slab)
    slabs_per_case: int = 8  # random slabs drawn per training case per epoch
    foreground_fraction: float = 0.5  # share of slabs placed to contain a target slice
    depth_flip: bool = True  # reverse the slab's slice order with p = 0.5 (exact on cached embeddings)
    inplane_flip: bool = False  # also cache the embeddings of left-right flipped slices (2x embedding time)
    cache_dtype: str = "float16"  # storage of the cached embeddings: float16 | float32
    slice_margin: Optional[int] = None  # embed only the target's k-range +- margin (None: all slices)
    embed_batch: int = 4  # slices per encoder call while embedding

    def validate(self) -> None:
        if self.slab_depth < 1:
            raise InputError(f"config key 'student.slab_depth' must be at least 1, got {self.slab_depth}")
        if self.hidden < 4 or self.hidden % 4:
            raise InputError(f"config key 'student.hidden' must be a positive multiple of 4, got {self.hidden}")
        if self.decoder_norm not in DECODER_NORMS:
            raise InputError(f"config key 'student.decoder_norm' must be one of {', '.join(DECODER_NORMS)}, got "
                             f"{self.decoder_norm!r}")
        if self.slabs_per_case < 1:
            raise InputError(f"config key 'student.slabs_per_case' must be at least 1, got {self.slabs_per_case}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise InputError(f"config key 'student.foreground_fraction' must lie in [0, 1], got "
                             f"{self.foreground_fraction}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise InputError(f"config key 'student.cache_dtype' must be one of {', '.join(CACHE_DTYPES)}, got "
                             f"{self.cache_dtype!r}")
        if self.slice_margin is not None and self.slice_margin < 0:
            raise InputError(f"config key 'student.slice_margin' must not be negative, got {self.slice_margin}")
        if self.embed_batch < 1:
            raise InputError(f"config key 'student.embed_batch' must be at least 1, got {self.embed_batch}")


def write_student_model(student: torch.nn.Module, path: Path, trained: Dict[str, torch.Tensor],
                        meta: Dict[str, Any]) -> None:
    """``model.pth`` of a student (kinds student and semi): the whole state dict (frozen encoder +
    the ``trained`` decoder) + metadata with the parameter counts."""
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    state.update(trained)
    ck.save_checkpoint({"model": state, "metadata": dict(meta, parameters=student.parameter_counts())}, path)


@dataclass
class CaseData:
    """The cached training material of one case (CPU tensors)."""

    case_id: str
    features: torch.Tensor  # (K', C, h, w) cache dtype
    target: torch.Tensor  # (K', L, L) uint8, L = 4h
    k0: int  # the first embedded slice of the case
    features_flip: Optional[torch.Tensor] = None  # embeddings of the i-flipped slices
    fg: List[int] = field(default_factory=list)  # local indices of the slices containing the target

    @property
    def depth(self) -> int:
        return int(self.features.shape[0])


class StudentTrainer(Trainer):
    """The slicing-SAM3D student trainer (module docstring); the run loop is :class:`.base.Trainer`'s."""

    KIND = STUDENT_KIND
    RESUME_OPTIONS = RESUME_OPTIONS
    RESUME_FREE_OPTIONS = ("embed_batch",)  # speed only

    def __init__(self, config: TrainConfig, progress: Optional[ProgressWriter] = None, rank: int = 0):
        super().__init__(config, progress, rank)
        self.spec = get_spec(config.base_model)
        torch.manual_seed(config.seed)  # the decoder's initial weights
        self.student = build_slicing_student(self.spec, checkpoint=config.checkpoint, slab_depth=self.opts.slab_depth,
                                             hidden=self.opts.hidden, device=self.device,
                                             decoder_norm=self.opts.decoder_norm)
        self.base_checkpoint = find_model_checkpoint(self.spec, config.checkpoint)
        self.decoder = distributed.wrap_ddp(self.student.decoder, self.device)
        from monai.losses import DiceCELoss
        self.loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
        self.optimizer = torch.optim.Adam(self.student.decoder.parameters(), lr=config.lr,
                                          weight_decay=config.weight_decay)
        self.train_cases: List[CaseData] = []
        self.val_cases: List[CaseData] = []

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return self.student.trainable_state()

    def load_trainable_state(self, state: Dict[str, torch.Tensor], ckpt: Dict[str, Any], path: Path) -> None:
        try:
            self.student.load_trainable_state(state)
        except RuntimeError as exc:
            raise CheckpointError(f"cannot resume from {path}: its decoder does not fit ({str(exc).splitlines()[0]})") \
                from None

    def metadata(self) -> Dict[str, Any]:
        meta = student_metadata(self.student)
        meta.update(super().metadata())
        meta.update({"kind": STUDENT_KIND, "trained": ["decoder."], "model_name": self.cfg.model_name or self.out.name,
                     "augmentation": {"depth_shift": True, "depth_flip": self.opts.depth_flip,
                                      "inplane_flip": self.opts.inplane_flip}})
        return meta

    def write_model(self, path: Path, trained: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        write_student_model(self.student, path, trained, meta)

    def describe(self) -> str:
        return (f"slicing-SAM3D student training ({self.spec.name} encoder, frozen; slab {self.opts.slab_depth}, "
                f"hidden {self.opts.hidden}) on {self.device} (target {self.cfg.target}); run folder {self.out}")

    def train_mode(self) -> None:
        self.student.train()

    def eval_mode(self) -> None:
        self.student.eval()

    # ------------------------------------------------------------------ data
    def _cases(self, split: str) -> List[Dict[str, Any]]:
        return [c for c in self.manifest.get("cases", []) if c.get("split") == split and c.get("labelled")]

    def _embed_key(self, case: Dict[str, Any]) -> str:
        ckpt = self.base_checkpoint
        st = ckpt.stat() if ckpt is not None and ckpt.exists() else None
        info = {"v": EMBED_FORMAT, "model": self.spec.name, "ckpt": str(ckpt), "size": st.st_size if st else None,
                "mtime": st.st_mtime_ns if st else None, "case": case["id"], "case_hash": case.get("case_hash"),
                "target": self.cfg.target, "flip": self.opts.inplane_flip, "margin": self.opts.slice_margin,
                "dtype": self.opts.cache_dtype, "image_size": int(self.spec.image_size),
                "normalization": self.spec.normalization}
        return content_hash(info)

    def _embed_path(self, case: Dict[str, Any]) -> Path:
        return self.out / "embeddings" / f"{case['id']}_{self._embed_key(case)}.pt"

    def _compute_case(self, case: Dict[str, Any], path: Path, cancel: Callable[[], bool]) -> None:
        with np.load(Path(self.cfg.cache) / case["file"]) as z:
            image, label = z["image"], z["label"]
        tgt = self.target(label)
        k0, k1 = 0, int(image.shape[0])
        if self.opts.slice_margin is not None:
            ks = np.nonzero(tgt.reshape(tgt.shape[0], -1).any(1))[0]
            if len(ks):
                k0 = max(0, int(ks[0]) - self.opts.slice_margin)
                k1 = min(int(image.shape[0]), int(ks[-1]) + 1 + self.opts.slice_margin)
        dtype = CACHE_DTYPES[self.opts.cache_dtype]
        t0 = time.monotonic()
        feats, flips = [], []
        step = self.opts.embed_batch
        for a in range(k0, k1, step):
            if cancel():
                raise CancelledError("cancelled while precomputing the slice embeddings")
            sl = torch.from_numpy(np.ascontiguousarray(image[a:min(a + step, k1)], dtype=np.float32))
            feats.append(self.student.embed(sl).to("cpu", dtype))
            if self.opts.inplane_flip:
                flips.append(self.student.embed(torch.flip(sl, dims=[-1])).to("cpu", dtype))
        features = torch.cat(feats, 0)
        L = int(features.shape[-1]) * 4
        m = torch.from_numpy(tgt[k0:k1].astype(np.float32))[:, None]
        shrink = m.shape[-2] > L or m.shape[-1] > L
        m = F.interpolate(m, size=(L, L), mode="bilinear", align_corners=False, antialias=shrink)
        target = (m[:, 0] > 0.5).to(torch.uint8)
        d = {"features": features, "target": target, "k0": k0, "case_id": case["id"]}
        if flips:
            d["features_flip"] = torch.cat(flips, 0)
        ck.save_checkpoint(d, path)
        dt = time.monotonic() - t0
        n = (k1 - k0) * (2 if self.opts.inplane_flip else 1)
        self.progress.log(f"{case['id']}: embedded {n} slices in {dt:.1f} s ({n / max(dt, 1e-9):.2f} slices/s)")

    def _load_case(self, path: Path) -> CaseData:
        d = torchfile.load(path, what="embeddings file")
        target = d["target"]
        fg = torch.nonzero(target.flatten(1).any(1)).flatten().tolist()
        return CaseData(str(d["case_id"]), d["features"], target, int(d["k0"]), d.get("features_flip"), fg)

    def _build_cases(self, split: str, cancel: Callable[[], bool]) -> List[CaseData]:
        cases = self._cases(split)
        info = self.dist
        loaded: Dict[int, CaseData] = {}
        for i, case in enumerate(cases):
            if info.enabled and i % info.world_size != info.rank:
                continue
            path = self._embed_path(case)
            if path.exists():
                try:  # a damaged file is recomputed
                    loaded[i] = self._load_case(path)
                    continue
                except Exception as exc:  # noqa: BLE001
                    self.progress.log(f"{case['id']}: cannot read {path} ({exc}); recomputing")
            self._compute_case(case, path, cancel)
            loaded[i] = self._load_case(path)
        distributed.barrier()
        out = []
        for i, case in enumerate(cases):
            data = loaded[i] if i in loaded else self._load_case(self._embed_path(case))
            if split == "train" and not data.fg:
                self.progress.log(f"{case['id']}: no slice contains the target {self.cfg.target!r}; "
                                  f"its slabs are drawn at random positions only")
            out.append(data)
        if out:
            self.progress.log(f"{split}: {len(out)} case(s), {sum(c.depth for c in out)} slice embeddings "
                              f"({self.opts.cache_dtype}) in {self.out / 'embeddings'}")
        return out

    # ------------------------------------------------------------------ slabs
    def batches_in_epoch(self, epoch: int) -> int:
        return max(1, math.ceil(len(self.train_cases) * self.opts.slabs_per_case / self.global_batch_size))

    def epoch_plan(self, epoch: int) -> torch.Tensor:
        """The slabs of epoch ``epoch``: an int64 tensor (n, 4) of (case, start, depth flip, in-plane
        flip), a pure function of (seed, epoch, the training cases)."""
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 100003 + epoch)
        n_cases = len(self.train_cases)
        n = self.batches_in_epoch(epoch) * self.global_batch_size
        reps = -(-n // n_cases)
        case_idx = torch.cat([torch.randperm(n_cases, generator=g) for _ in range(reps)])[:n]
        u_fg = torch.rand(n, generator=g)
        u_pos = torch.rand(n, generator=g)
        u_off = torch.rand(n, generator=g)
        dflip = (torch.rand(n, generator=g) < 0.5) if self.opts.depth_flip else torch.zeros(n, dtype=torch.bool)
        iflip = (torch.rand(n, generator=g) < 0.5) if self.opts.inplane_flip else torch.zeros(n, dtype=torch.bool)
        d_s = self.opts.slab_depth
        starts = torch.empty(n, dtype=torch.int64)
        for i in range(n):
            c = self.train_cases[int(case_idx[i])]
            hi = max(0, c.depth - d_s)  # the last valid start
            if c.fg and float(u_fg[i]) < self.opts.foreground_fraction:
                k = c.fg[min(len(c.fg) - 1, int(float(u_pos[i]) * len(c.fg)))]
                lo_s, hi_s = max(0, k - d_s + 1), min(hi, k)
                s = lo_s + min(hi_s - lo_s, int(float(u_off[i]) * (hi_s - lo_s + 1)))
            else:
                s = min(hi, int(float(u_pos[i]) * (hi + 1)))
            starts[i] = s
        return torch.stack([case_idx.long(), starts, dflip.long(), iflip.long()], 1)

    def _slab(self, c: CaseData, start: int, dflip: bool, iflip: bool):
        """(C, D, h, w) float32 embeddings and (1, D, L, L) float32 target of one slab."""
        idx = torch.clamp(torch.arange(start, start + self.opts.slab_depth), max=c.depth - 1)
        src = c.features_flip if (iflip and c.features_flip is not None) else c.features
        f = src[idx].float().permute(1, 0, 2, 3)
        t = c.target[idx].float()
        if iflip and c.features_flip is not None:
            t = torch.flip(t, dims=[-1])
        if dflip:
            f, t = torch.flip(f, dims=[1]), torch.flip(t, dims=[0])
        return f, t[None]

    def _batch(self, rows: torch.Tensor):
        items = [self._slab(self.train_cases[int(r[0])], int(r[1]), bool(r[2]), bool(r[3])) for r in rows]
        return (torch.stack([f for f, _ in items]).to(self.device), torch.stack([t for _, t in items]).to(self.device))

    # ------------------------------------------------------------------ loops
    @torch.no_grad()
    def _predict_case(self, c: CaseData) -> torch.Tensor:
        """Algorithm 1 on the cached embeddings of a case: (K', L, L) bool."""
        d_s = self.opts.slab_depth
        out = torch.zeros((c.depth,) + tuple(c.target.shape[-2:]), dtype=torch.bool)
        for start, w0, w1 in slab_plan(c.depth, d_s):
            idx = torch.clamp(torch.arange(start, start + d_s), max=c.depth - 1)  # pads a thin case
            emb = c.features[idx].float().permute(1, 0, 2, 3)[None].to(self.device)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = self.student.decoder(emb).float()
            out[w0:w1] = (torch.sigmoid(logits[0, 0]) > THRESHOLD).cpu()[w0 - start:w1 - start]
        return out

    # ------------------------------------------------------------------ hooks of the run loop
    def prepare_data(self, cancel: Callable[[], bool]) -> None:
        self.train_cases = self._build_cases("train", cancel)
        self.val_cases = self._build_cases("val", cancel)
        if not self.train_cases:
            raise InputError(f"no labelled case in the train split of {self.cfg.cache}")
        if not any(c.fg for c in self.train_cases):
            raise no_target_error(self.cfg)

    def start_fields(self) -> Dict[str, Any]:
        return {"base_model": self.spec.name, "train_slices": sum(c.depth for c in self.train_cases),
                "val_slices": sum(c.depth for c in self.val_cases), "train_cases": len(self.train_cases),
                "val_cases": len(self.val_cases), "slabs_per_epoch": self.batches_in_epoch(0) * self.global_batch_size,
                "slab_depth": self.opts.slab_depth, **self.student.parameter_counts()}

    def train_step(self, group: range) -> Dict[str, float]:
        plan = self.epoch_plan(self.epoch)
        bs, world = self.cfg.batch_size, self.dist.world_size
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, count = 0.0, 0
        for b in group:
            rows = plan[b * bs * world:(b + 1) * bs * world]
            rows = rows[self.dist.rank::world] if self.dist.enabled else rows
            emb, tgt = self._batch(rows)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = self.decoder(emb)
            loss = self.loss_fn(logits.float(), tgt)
            self.backward(loss / len(group))
            loss_sum += float(loss.detach()) * len(rows)
            count += len(rows)
        self.optimizer_step()
        if self.scheduler is not None:
            self.scheduler.step()
        total = distributed.sum_across_ranks([loss_sum, count])
        return {"loss": total[0] / max(1.0, total[1]), "samples": total[1]}

    def num_val_items(self) -> int:
        return len(self.val_cases)

    def val_predictions(self, mine: List[int]) -> Iterable[Dict[str, Tuple[Any, Any]]]:
        for i in mine:
            c = self.val_cases[i]
            yield {"dice": (self._predict_case(c), c.target.bool())}


__all__ = ["CaseData", "StudentOptions", "StudentTrainer", "write_student_model"]
