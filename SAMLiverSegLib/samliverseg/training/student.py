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
over cases; ``best.pt`` keeps the best, ``last.pt`` the latest state (``best.pt`` follows
``last.pt`` when there is no val case).

DDP (``torchrun``): the decoder is wrapped in DistributedDataParallel; each global batch of
``batch_size × world`` slabs is sharded across the ranks; the missing case embeddings are
computed by the ranks in turn (case i by rank i mod world) and read by all; validation cases are
sharded and the Dice averaged; rank 0 writes checkpoints and progress; a cancel request on rank 0
is broadcast so that every rank stops after the same step.

Output: ``model.pth`` = ``{"model": the student's whole state dict (frozen encoder + the best
decoder), "metadata": {"kind": "student", "base_model"/"encoder", "slab_depth", "hidden",
"embed_dim", "image_size", "normalization", "window", "window_hu", "spacing", "target",
"label_meaning", ...}}``; :func:`~samliverseg.automatic.student.segment_volume` uses it.
The common config keys ``box_jitter_px``, ``points_per_slice``, ``train_prompt_encoder`` and
``max_slices_per_case`` do not apply to this trainer.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from samliverseg.models.build_sam import find_model_checkpoint, get_spec
from samliverseg.core.errors import CancelledError, CheckpointError, InputError
from samliverseg.automatic.student import build_slicing_student
from samliverseg.modeling.slicing_student import DECODER_NORMS, STUDENT_KIND, THRESHOLD, slab_plan, student_metadata
from samliverseg.training import checkpoint as ck
from samliverseg.training import distributed
from samliverseg.training.config import TrainConfig
from samliverseg.training.decoder import peak_rss_mb
from samliverseg.training.prepare import load_manifest
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


class StudentTrainer:
    def __init__(self, config: TrainConfig, progress: Optional[ProgressWriter] = None, rank: int = 0):
        self.cfg = config
        self.opts: StudentOptions = config.options("student")
        self.dist = distributed.current()
        self.rank = rank if not self.dist.enabled else self.dist.rank
        self.out = Path(config.output).expanduser()
        self.progress = progress or ProgressWriter(rank=self.rank)
        if self.progress.log_path is None:
            self.progress.set_log_path(self.out / "train.log")
        from samliverseg.core.devices import resolve_device
        self.device = resolve_device(config.device)  # train.py has joined the process group, if any
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank % max(1, torch.cuda.device_count()))
        self.amp = bool(config.amp and self.device.type == "cuda")
        self.spec = get_spec(config.base_model)
        self.manifest = load_manifest(Path(config.cache))
        torch.manual_seed(config.seed)  # the decoder's initial weights
        np.random.seed(config.seed % 2**32)
        import random
        random.seed(config.seed)
        self.student = build_slicing_student(self.spec, checkpoint=config.checkpoint, slab_depth=self.opts.slab_depth,
                                             hidden=self.opts.hidden, device=self.device,
                                             decoder_norm=self.opts.decoder_norm)
        self.base_checkpoint = find_model_checkpoint(self.spec, config.checkpoint)
        self.decoder = distributed.wrap_ddp(self.student.decoder, self.device)
        self.generator = torch.Generator().manual_seed(int(config.seed))
        from monai.losses import DiceCELoss
        self.loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
        self.optimizer = torch.optim.Adam(self.student.decoder.parameters(), lr=config.lr,
                                          weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.scheduler = None
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0
        self.best_dice: Optional[float] = None
        self.history: List[Dict[str, Any]] = []
        self._epoch_loss_sum = 0.0
        self._epoch_loss_n = 0
        self.train_cases: List[CaseData] = []
        self.val_cases: List[CaseData] = []

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return self.student.trainable_state()

    def metadata(self) -> Dict[str, Any]:
        s = self.manifest.get("settings", {})
        meta = student_metadata(self.student)
        meta.update({"window": s.get("window"), "window_hu": s.get("window_hu"), "spacing": s.get("spacing"),
                     "target": self.cfg.target, "label_meaning": self.cfg.label_meaning, "trained": ["decoder."],
                     "cache": str(self.cfg.cache), "cache_settings_hash": s.get("settings_hash"),
                     "model_name": self.cfg.model_name or self.out.name,
                     "augmentation": {"depth_shift": True, "depth_flip": self.opts.depth_flip,
                                      "inplane_flip": self.opts.inplane_flip}})
        return meta

    def checkpoint_dict(self) -> Dict[str, Any]:
        state = self.trainable_state()
        return {"format": ck.FORMAT, "version": ck.VERSION, "kind": STUDENT_KIND, "model": state,
                "trainable_keys": sorted(state), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                "best_dice": self.best_dice, "epoch_loss": [self._epoch_loss_sum, self._epoch_loss_n],
                "rng": ck.rng_state(self.generator), "config": self.cfg.to_dict(), "metadata": self.metadata(),
                "history": self.history}

    def save(self, which: str) -> Path:
        path = self.out / (ck.LAST_NAME if which == "last" else ck.BEST_NAME)
        if self.rank == 0:
            ck.save_checkpoint(self.checkpoint_dict(), path)
            self.progress.emit("checkpoint", self.epoch, self.step, path=str(path), which=which)
        distributed.barrier()
        return path

    def restore(self, path: Path) -> None:
        ckpt = ck.load_for_resume(path, self.cfg.to_dict(), sorted(self.trainable_state()))
        old_opts = (ckpt.get("config") or {}).get("student") or {}
        for key in RESUME_OPTIONS:
            want = getattr(self.opts, key)
            have = old_opts.get(key, getattr(StudentOptions(), key))
            if have != want:
                raise CheckpointError(f"cannot resume from {path}: it was made with student.{key}={have!r}, "
                                      f"the config says student.{key}={want!r}")
        try:
            self.student.load_trainable_state(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"cannot resume from {path}: its decoder does not fit ({str(exc).splitlines()[0]})") \
                from None
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
        old = ckpt.get("config") or {}
        for k, v in self.cfg.to_dict().items():
            if k not in ck.RESUME_KEYS and k not in ("epochs", "output", "device", "student") and old.get(k) != v:
                self.progress.log(f"warning: {k} changed since the checkpoint ({old.get(k)!r} -> {v!r}); "
                                  f"the resumed run will differ from an uninterrupted one")

    # ------------------------------------------------------------------ data
    def _target(self, label: np.ndarray) -> np.ndarray:
        return label > 0 if self.cfg.target == "liver" else label == 2

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
        return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _embed_path(self, case: Dict[str, Any]) -> Path:
        return self.out / "embeddings" / f"{case['id']}_{self._embed_key(case)}.pt"

    def _compute_case(self, case: Dict[str, Any], path: Path, cancel: Callable[[], bool]) -> None:
        with np.load(Path(self.cfg.cache) / case["file"]) as z:
            image, label = z["image"], z["label"]
        tgt = self._target(label)
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
        d = torch.load(path, map_location="cpu", weights_only=True)
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
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.dist.world_size

    def batches_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.train_cases) * self.opts.slabs_per_case / self.global_batch()))

    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch() / self.cfg.grad_accum)

    def epoch_plan(self, epoch: int) -> torch.Tensor:
        """The slabs of epoch ``epoch``: an int64 tensor (n, 4) of (case, start, depth flip, in-plane
        flip), a pure function of (seed, epoch, the training cases)."""
        g = torch.Generator().manual_seed(int(self.cfg.seed) * 100003 + epoch)
        n_cases = len(self.train_cases)
        n = self.batches_per_epoch() * self.global_batch()
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

    def validate(self) -> Optional[float]:
        if not self.val_cases:
            return None
        self.student.eval()
        mine = distributed.shard(list(range(len(self.val_cases))), self.dist)
        dices = []
        for i in mine:
            c = self.val_cases[i]
            pred, tgt = self._predict_case(c), c.target.bool()
            denom = int(pred.sum()) + int(tgt.sum())
            dices.append(1.0 if denom == 0 else 2.0 * int((pred & tgt).sum()) / denom)
        self.student.train()
        local = float(np.mean(dices)) if dices else 0.0
        return distributed.mean_across_ranks(local, weight=float(len(dices)))

    def _should_stop(self, cancel: Callable[[], bool]) -> bool:
        flag = bool(cancel())
        return bool(distributed.broadcast_object(flag)) if self.dist.enabled else flag

    def run(self, resume: bool = False, cancel: Optional[Callable[[], bool]] = None) -> Dict[str, Any]:
        cancel = cancel or (lambda: False)
        cfg = self.cfg
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        self.progress.log(f"slicing-SAM3D student training ({self.spec.name} encoder, frozen; slab {self.opts.slab_depth}, "
                          f"hidden {self.opts.hidden}) on {self.device} (target {cfg.target}); run folder {self.out}")
        try:
            self.train_cases = self._build_cases("train", cancel)
            self.val_cases = self._build_cases("val", cancel)
        except CancelledError:
            self.progress.emit("cancelled", self.epoch, self.step, checkpoint=None, exit_code=CancelledError.exit_code)
            raise
        if not self.train_cases:
            raise InputError(f"no labelled case in the train split of {cfg.cache}")
        if not any(c.fg for c in self.train_cases):
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
        self.progress.total_steps = total
        self.progress.mark_start(self.step)
        counts = self.student.parameter_counts()
        self.progress.emit("start", self.epoch, self.step, kind=STUDENT_KIND, base_model=self.spec.name,
                           output=str(self.out), device=str(self.device),
                           train_slices=sum(c.depth for c in self.train_cases),
                           val_slices=sum(c.depth for c in self.val_cases), train_cases=len(self.train_cases),
                           val_cases=len(self.val_cases), slabs_per_epoch=self.batches_per_epoch() * self.global_batch(),
                           slab_depth=self.opts.slab_depth, epochs=cfg.epochs, resumed=resumed, target=cfg.target,
                           world_size=self.dist.world_size, **counts)
        self.student.train()
        n_batches = self.batches_per_epoch()
        acc, bs, world = cfg.grad_accum, cfg.batch_size, self.dist.world_size
        t_run, samples_run = time.monotonic(), 0
        while self.epoch < cfg.epochs:
            plan = self.epoch_plan(self.epoch)
            while self.batch_in_epoch < n_batches:
                t0 = time.monotonic()
                group = range(self.batch_in_epoch, min(self.batch_in_epoch + acc, n_batches))
                self.optimizer.zero_grad(set_to_none=True)
                loss_sum, count = 0.0, 0
                for b in group:
                    rows = plan[b * bs * world:(b + 1) * bs * world]
                    rows = rows[self.dist.rank::world] if self.dist.enabled else rows
                    emb, tgt = self._batch(rows)
                    with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                        logits = self.decoder(emb)
                    loss = self.loss_fn(logits.float(), tgt)
                    scaled = loss / len(group)
                    if self.scaler is not None:
                        self.scaler.scale(scaled).backward()
                    else:
                        scaled.backward()
                    loss_sum += float(loss.detach()) * len(rows)
                    count += len(rows)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                if self.scheduler is not None:
                    self.scheduler.step()
                self.batch_in_epoch = group.stop
                self.step += 1
                loss_mean = distributed.mean_across_ranks(loss_sum / max(1, count), float(count))
                self._epoch_loss_sum += loss_mean * count * world
                self._epoch_loss_n += count * world
                samples_run += count * world
                dt = time.monotonic() - t0
                self.progress.emit("step", self.epoch, self.step, loss=loss_mean,
                                   lr=self.optimizer.param_groups[0]["lr"],
                                   samples_per_s=round(count * world / max(dt, 1e-9), 3))
                if self._should_stop(cancel):
                    return self._cancel()
            mean_loss = self._epoch_loss_sum / max(1, self._epoch_loss_n)
            self.progress.emit("epoch", self.epoch, self.step, losses={"train": mean_loss},
                               lr=self.optimizer.param_groups[0]["lr"])
            dice = self.validate()
            self.history.append({"epoch": self.epoch, "step": self.step, "train_loss": mean_loss, "val_dice": dice})
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
            if self._should_stop(cancel) and self.epoch < cfg.epochs:
                return self._cancel(saved=True)
        model_path = self.export_model()
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
        """model.pth: the whole student (frozen encoder + the decoder of best.pt, else last.pt) +
        metadata (kind "student")."""
        src = self.out / ck.BEST_NAME
        if not src.exists():
            src = self.out / ck.LAST_NAME
        trained = ck.load_checkpoint(src)["model"]
        state = {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
        state.update(trained)
        path = self.out / ck.MODEL_NAME
        if self.rank == 0:
            meta = dict(self.metadata(), best_dice=self.best_dice, source=str(src), step=self.step,
                        parameters=self.student.parameter_counts())
            ck.save_checkpoint({"model": state, "metadata": meta}, path)
            self.progress.emit("checkpoint", self.epoch, self.step, path=str(path), which="model")
        distributed.barrier()
        return path
