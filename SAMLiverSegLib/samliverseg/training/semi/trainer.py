"""Semi-SAM+ semi-supervised training (trainer kind ``semi``; design digest, section 3).

A slicing-SAM3D student (``modeling/slicing_student.py``: the frozen 2D encoder of
``base_model`` per slice + a trainable 3D CNN decoder over slabs of ``D_s`` slices) learns from
labelled and unlabelled CT. An EMA copy of the student (the mean teacher) gives consistency
targets, and frozen SAM teachers (``teachers.py``: ``lite_medsam`` by default, optionally
``sam_med3d``) turn the student's coarse mask into pseudo-labels filtered by the variance of a
multi-augmentation prompt ensemble (Algorithm 2). The result is a student whose decoder holds the
EMA weights with the best validation Dice; ``model.pth`` has the layout and metadata of a
``student`` model with ``kind: "semi"``: ``slicing_student.load_student(path, kinds=("student",
"semi"))`` rebuilds it, and ``student_inference.segment_volume`` (which ``user_models`` and
``samliverseg segment --model`` use for kind ``semi``) runs it prompt-free (Algorithm 1).

Data
----
From the cache's ``manifest.json``: the ``train`` cases with a label (labelled set), the
``train`` cases without one (unlabelled set), the labelled ``val`` cases (validation). Unlabelled
cases of the ``val``/``test`` splits are not used. Each train case contributes one *block* of at
most ``max_slices_per_case`` consecutive axial slices (labelled: centred on the target's k-range;
unlabelled: centred in the volume; raise ``max_slices_per_case`` or crop the cache to the liver
for long scans); validation cases are used whole.

Every micro-batch holds ``batch_size`` labelled and ``batch_size`` unlabelled slabs per rank
(1 : 1); an epoch of the warm-up is one pass over the labelled set, an epoch of the later phases
one pass over the larger of the two sets (the other one is cycled), each set in a seeded
permutation per epoch.

What is cached, and why it is equivalent (the manual's "cached dataloader")
-------------------------------------------------------------------------
The encoder is frozen and sees one slice at a time, so its output for a slab is the stack of its
outputs for the slices. Each case gets a seeded pool of *views* (``semi_transforms.View``:
an in-plane element of the square's dihedral group + a MONAI intensity augmentation); the
per-slice embedding of every view of the block is computed once and stored as a ``.npy`` file
(memory-mapped; ``semi.cache_dtype``, float16 by default) in ``semi.embedding_cache`` (default
``OUTPUT/embeddings``):

* labelled cases: ``semi.labelled_views`` views (the first is the identity);
* unlabelled cases: ``semi.weak_views`` weak views (the identity + weakly augmented ones: the
  EMA teacher's input and the pool the T_j are drawn from) + ``semi.strong_views`` strongly
  augmented ones (the student's input x_u^aug);
* validation cases: the identity.

At an iteration a transform is drawn as (view, depth flip) and applied with a random slab start:
depth flips and slab crops only permute/select slices, so the embedding of ``T(x[z:z+D_s])`` is
the view's cached embedding ``[z:z+D_s]`` flipped, *exactly* what encoding the transformed slab
would give. The only approximation is that the in-plane/intensity part comes from a finite pool
per case instead of a fresh draw each time. The same cached embedding is the 2D teacher's
``E ← encode(img_j)`` when the teacher is the base model (one encoder, one preprocessing); a 2D
teacher with another model gets its own cache of the weak views. The student's strong view is
further perturbed on the fly by multiplicative feature noise ``E·(1 + U(−a, a))``
(``semi.feature_noise`` = a), which costs nothing.

One iteration, unlabelled slab (phase 1)
----------------------------------------
1. student view ``T_s`` (a strong view + depth flip): logits ``S_θ(T_s x)``; ``p_s = T_s⁻¹ σ(·)``;
   the coarse mask ``M_c = p_s > 0.5`` (no gradient);
2. EMA view ``T_w`` (a weak view + depth flip): ``p_t = T_w⁻¹ σ(S_θ'(T_w x))`` (no gradient);
3. Algorithm 2: for j = 1…N (``semi.n_transforms``) draw ``T_j`` (a weak view + depth flip),
   ``M_c^(j) = T_j(M_c)``, every teacher decodes twice (mask prompt, point prompt sampled from
   ``M_c^(j)``), both answers go back through ``T_j⁻¹``; then per voxel ``Var``,
   ``M_conf = [Var < u_th]`` (adaptive u_th, ``semi_math``), ``Pseudo = mean · M_conf``; only
   voxels of slices where the student's coarse mask is not empty (where a prompt exists) can be
   confident;
4. ``L_con = mean (p_s − p_t)²`` and ``L_rs-con = Σ_v M_conf (p_s − Pseudo)² / Σ_v M_conf`` over
   the voxels v of the slab; both are averaged over the unlabelled slabs of the micro-batch (so
   that DDP's gradient average over ranks equals the average over the global batch).

Labelled slabs: a labelled view + depth flip, ``L_sup`` = MONAI ``DiceCELoss(sigmoid=True,
squared_pred=True)`` against the transformed target (Dice/CE are invariant to a voxel
permutation applied to both). Everything is in the student's native frame: ``(D_s, L, L)``,
``L = 4E`` (256 for LiteMedSAM): the slice squashed to the encoder's square input and seen at
the decoder's output size, which is also the teacher's low-res size, so no mask is resampled
during training (targets are resized once when cached).

``L_total = L_sup + λ(t)·L_con + β(t)·L_rs-con`` with ``λ(t) = λ_max·r(t/T_r)``,
``β(t) = β_max·exp(−t/T_d)``, t in epochs since the start of phase 1 (fractional within an
epoch); ``r`` is the mean-teacher ramp-up ``exp(−5(1−x)²)`` by default (why: ``semi_math``).

Schedule
--------
``epochs`` (the common key) is split into ``semi.warmup_epochs`` (default 20 % of the epochs,
rounded down), ``semi.finetune_epochs`` (default 20 %) and the semi-supervised epochs in between
(the manual's 50 / 100–150 / 50):

* phase 0, warm-up: labelled slabs only (``L_sup``), constant lr ``semi.warmup_lr`` (2e-3); only
  the decoder is ever trained (the encoder is frozen);
* phase 1, semi-supervised: the full loss; poly LR ``lr·(1 − s/S)^0.9`` over the optimiser steps
  of phases 1 + 2 (``lr`` = the common key);
* phase 2, fine-tune with the teachers frozen: at its start the pseudo-labels of every unlabelled
  block are computed once (the EMA student's coarse mask by Algorithm 1, then Algorithm 2 over
  the whole block) and stored (``OUTPUT/pseudo_labels/``); the student then trains on labelled
  (``L_sup``) and unlabelled (``β(t)·L_rs-con`` against those fixed pseudo-labels) slabs; no
  teacher is queried any more and ``λ = 0`` (the EMA still averages the student: it is the
  exported model).

Common keys: ``batch_size`` is per rank and per set (labelled, unlabelled); ``lr`` is the base of
the poly schedule; ``scheduler`` is ignored (the phases fix the schedule); ``max_slices_per_case``
bounds the blocks; ``box_jitter_px``, ``points_per_slice`` and ``train_prompt_encoder`` do not
apply.

EMA teacher, validation, outputs
--------------------------------
``θ' ← m_t θ' + (1 − m_t) θ`` after every optimiser step, from the start, with
``m_t = min(m, 1 − 1/t)`` for the t-th step (``semi.ema_momentum`` m = 0.99; the warm start of the
mean-teacher reference code, ``semi.ema_warm_start``, see ``semi_math``: without it a run of a few
hundred steps exports an EMA that is still mostly the random initial decoder). After each epoch
both the EMA and the student are scored on the validation cases (Algorithm 1 over the cached
identity embeddings, logits resized to the case grid, 3D Dice of ``σ > 0.5`` against the target;
a case whose target is empty is skipped: the base class's one rule); the ``validation`` event's ``dice`` is the EMA's. ``best.pt``
keeps the state with the best EMA Dice, ``last.pt`` the latest; in both ``"model"`` holds the EMA
decoder (θ') and ``"student"`` θ. ``model.pth`` = the whole student state dict (frozen encoder +
the EMA decoder of ``best.pt``) with ``student_metadata`` and ``kind: "semi"``.

``semi.save_uncertainty``: at the end, for every unlabelled train case and every val case, the
ensemble of the final model (coarse mask by Algorithm 1 with the best EMA, then Algorithm 2 over
the block) is written to ``OUTPUT/uncertainty/<case>_variance.nii.gz`` (float32, Var),
``_confidence.nii.gz`` (uint8, M_conf) and ``_pseudo.nii.gz`` (float32, Pseudo) on the case's
cache grid (its spacing/origin/direction; 0 outside the block).

Memory risk controls: ``grad_accum`` micro-batches per optimiser step, half precision (autocast
fp16 + GradScaler) with ``amp: true`` on CUDA, the cached (memory-mapped) embeddings, the
adaptive u_th, and slabs (the manual's patch sliding) instead of whole volumes.

Reproducibility and DDP
-----------------------
Every random choice of an item (slab start, views, flips, feature noise, the T_j, the teachers'
points) comes from a generator seeded by ``(seed, epoch, stream, global position of the item in
the epoch)``. So a resumed run (``last.pt`` holds θ, θ', optimiser, position) repeats the exact
draws of an uninterrupted one, and under ``torchrun`` an item's pseudo-label is the same whichever
rank computes it. The decoder is wrapped in DDP (gradients averaged; ``no_sync`` during
accumulation); all ranks start from the same seeded decoder, take identical optimiser steps and
apply the same EMA update, so θ' is identical on every rank without any broadcast (the 2-process
test checks the hashes, ``semi.rank_hashes``). Each rank takes ``batch_size`` labelled and
``batch_size`` unlabelled items of every global micro-batch; embeddings, frozen pseudo-labels and
validation cases are shared out by rank and written to the run folder (which every rank must
see); checkpoints and progress come from rank 0; a cancel on any rank stops every rank after the
same step (the base class's vote).

Progress: ``step`` events carry ``loss`` (total), ``sup``, ``con``, ``rs_con``, ``lambda``,
``beta``, ``conf_fraction`` (confident voxels / voxels of the unlabelled slabs), ``u_th`` (the
effective threshold), ``phase`` and ``lr``; ``epoch`` events the epoch means of the same;
``validation`` events ``dice`` (EMA), ``student_dice``, ``best_dice``, ``phase``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from samliverseg.core.atomic import atomic_path
from samliverseg.core.errors import CancelledError, CheckpointError, InputError
from samliverseg.core.jsonutil import write_json
from samliverseg.io import torchfile
from samliverseg.modeling.slicing_student import THRESHOLD, slab_plan, student_from_sam, student_metadata
from samliverseg.models.build_sam import build_model, find_model_checkpoint, get_spec
from samliverseg.training import checkpoint as ck
from samliverseg.training import distributed
from samliverseg.training.base import Trainer, content_hash, no_target_error
from samliverseg.training.config import TrainConfig
from samliverseg.training.progress import ProgressWriter
from samliverseg.training.semi import math as sm
from samliverseg.training.semi.teachers import (BOX_MODES, Sam2DTeacher, Teacher, TeacherView, build_3d_teacher,
                                                is_3d_teacher, teacher_names)
from samliverseg.training.semi.transforms import GeomTransform, View, ViewPool, make_pool, resize_mask
from samliverseg.training.student import write_student_model

SEMI_KIND = "semi"
EMBED_FORMAT = 1
PSEUDO_FORMAT = 1
CACHE_DTYPES = {"float16": np.float16, "float32": np.float32}
#: Options that must match for a resume (another network or another data pipeline otherwise).
RESUME_OPTIONS = ("slab_depth", "hidden", "decoder_norm", "weak_views", "strong_views", "labelled_views", "cache_dtype", "teachers")
LOSS_KEYS = ("loss", "sup", "con", "rs_con", "lambda", "beta", "conf_fraction", "u_th")


@dataclass
class SemiOptions:
    """The ``semi:`` section of a training config (module docstring)."""

    slab_depth: int = 8  # D_s: consecutive slices per slab
    hidden: int = 64  # student decoder width (multiple of 4)
    decoder_norm: str = "channel"  # the student decoder's norm: channel | instance (slicing_student.py)
    warmup_epochs: Optional[int] = None  # phase 0 (default: 20 % of epochs, rounded down)
    finetune_epochs: Optional[int] = None  # phase 2 (default: 20 % of epochs, rounded down)
    warmup_lr: float = 2e-3  # constant lr of phase 0
    poly_power: float = 0.9  # poly LR of phases 1-2: lr * (1 - s/S)^power
    lambda_max: float = 1.0  # λ_max of L_con
    beta_max: float = 0.3  # β_max of L_rs-con
    rampup_epochs: float = 10.0  # T_r
    rampdown_epochs: float = 40.0  # T_d
    rampup: str = "sigmoid"  # sigmoid (mean-teacher exp(-5(1-x)^2)) | linear | logistic
    ema_momentum: float = 0.99  # m of the EMA teacher
    ema_warm_start: bool = True  # m_t = min(m, 1 - 1/t) for the t-th update (mean-teacher reference code)
    n_transforms: int = 4  # N of Algorithm 2 (2N teacher answers per teacher)
    u_th: float = 0.05  # variance threshold of M_conf
    adaptive_u_th: bool = True  # raise u_th when the teachers jitter
    min_confident: float = 0.5  # ... so that at least this share of the prompted voxels is confident
    u_th_max: float = 0.15  # ... but never above this
    teachers: str = "lite_medsam"  # comma-separated: registered 2D models and/or sam_med3d(_turbo)
    sam_med3d_checkpoint: Optional[str] = None  # weights of a 3D teacher (else the registry lookup)
    teacher_box: str = "auto"  # add the coarse mask's box to 2D prompts: auto (box-only models) | always | never
    weak_views: int = 3  # cached weak views per unlabelled case (the identity + augmented)
    strong_views: int = 2  # cached strong views per unlabelled case (the student's input)
    labelled_views: int = 1  # cached views per labelled case (the identity + weakly augmented)
    feature_noise: float = 0.1  # multiplicative U(-a, a) noise on the student's unlabelled embeddings
    foreground_fraction: float = 0.5  # share of labelled slabs placed to contain a target slice
    cache_dtype: str = "float16"  # float16 | float32 storage of the embeddings
    embed_batch: int = 4  # slices per encoder call while embedding
    embedding_cache: Optional[str] = None  # folder of the embedding cache (default OUTPUT/embeddings)
    save_uncertainty: bool = False  # write variance / confidence / pseudo-label maps at the end
    rank_hashes: bool = False  # debug: each rank writes hashes of θ and θ' at the end (OUTPUT/ranks/)

    def validate(self) -> None:
        def bad(key: str, what: str, value: Any) -> InputError:
            return InputError(f"config key 'semi.{key}' {what}, got {value!r}")

        if self.slab_depth < 1:
            raise bad("slab_depth", "must be at least 1", self.slab_depth)
        if self.hidden < 4 or self.hidden % 4:
            raise bad("hidden", "must be a positive multiple of 4", self.hidden)
        from samliverseg.modeling.slicing_student import DECODER_NORMS
        if self.decoder_norm not in DECODER_NORMS:
            raise bad("decoder_norm", f"must be one of {', '.join(DECODER_NORMS)}", self.decoder_norm)
        for key in ("warmup_epochs", "finetune_epochs"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise bad(key, "must not be negative", v)
        for key in ("warmup_lr",):
            if not getattr(self, key) > 0:
                raise bad(key, "must be positive", getattr(self, key))
        for key in ("poly_power", "lambda_max", "beta_max", "rampup_epochs", "rampdown_epochs", "feature_noise"):
            if getattr(self, key) < 0:
                raise bad(key, "must not be negative", getattr(self, key))
        if self.rampup not in sm.RAMPUPS:
            raise bad("rampup", f"must be one of {', '.join(sm.RAMPUPS)}", self.rampup)
        if not 0.0 <= self.ema_momentum < 1.0:
            raise bad("ema_momentum", "must lie in [0, 1)", self.ema_momentum)
        if self.n_transforms < 1:
            raise bad("n_transforms", "must be at least 1", self.n_transforms)
        if not 0.0 < self.u_th <= 0.25:
            raise bad("u_th", "must lie in (0, 0.25] (a variance of values in [0, 1])", self.u_th)
        if not 0.0 <= self.min_confident <= 1.0:
            raise bad("min_confident", "must lie in [0, 1]", self.min_confident)
        if self.u_th_max < self.u_th:
            raise bad("u_th_max", "must be at least u_th", self.u_th_max)
        if not teacher_names(self.teachers):
            raise bad("teachers", "must name at least one teacher (e.g. lite_medsam)", self.teachers)
        if self.teacher_box not in BOX_MODES:
            raise bad("teacher_box", f"must be one of {', '.join(BOX_MODES)}", self.teacher_box)
        if self.weak_views < 1 or self.weak_views > 8:
            raise bad("weak_views", "must lie in 1..8 (the identity + up to 7 in-plane transforms)", self.weak_views)
        if self.labelled_views < 1 or self.labelled_views > 8:
            raise bad("labelled_views", "must lie in 1..8", self.labelled_views)
        if self.strong_views < 0:
            raise bad("strong_views", "must not be negative", self.strong_views)
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise bad("foreground_fraction", "must lie in [0, 1]", self.foreground_fraction)
        if self.cache_dtype not in CACHE_DTYPES:
            raise bad("cache_dtype", f"must be one of {', '.join(CACHE_DTYPES)}", self.cache_dtype)
        if self.embed_batch < 1:
            raise bad("embed_batch", "must be at least 1", self.embed_batch)

    def phase_epochs(self, epochs: int) -> Tuple[int, int, int]:
        """(warm-up, semi-supervised, fine-tune) epochs out of ``epochs``."""
        w = self.warmup_epochs if self.warmup_epochs is not None else int(epochs * 0.2)
        f = self.finetune_epochs if self.finetune_epochs is not None else int(epochs * 0.2)
        if w + f > epochs:
            key = "warmup_epochs" if self.warmup_epochs is not None else "finetune_epochs"
            raise InputError(f"config key 'semi.{key}': warm-up ({w}) + fine-tune ({f}) epochs exceed 'epochs' "
                             f"({epochs}); raise epochs or lower them")
        return w, epochs - w - f, f


@dataclass(eq=False)
class CaseBlock:
    """The cached material of one case's block of slices [k0, k1) (CPU)."""

    index: int
    case_id: str
    case_hash: str
    labelled: bool
    k0: int
    k1: int
    image: np.ndarray  # uint8 (Dk, H, W) window units
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: np.ndarray
    full_shape: Tuple[int, int, int]
    pool: ViewPool
    emb: Dict[Tuple[str, str], np.ndarray] = field(default_factory=dict)  # (encoder key, view key) -> (Dk, C, h, w)
    target: Optional[torch.Tensor] = None  # (Dk, L, L) uint8 (labelled)
    target_full: Optional[np.ndarray] = None  # (Dk, H, W) bool (labelled)
    fg: List[int] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return self.k1 - self.k0


@dataclass
class Item:
    """One slab of a micro-batch."""

    case: CaseBlock
    idx: torch.Tensor  # (D_s,) slice indices in the block
    view: View
    geom: GeomTransform
    emb: torch.Tensor  # (C, D_s, h, w) float32, the student's input (view frame)
    generator: torch.Generator
    target: Optional[torch.Tensor] = None  # (D_s, L, L) labelled, view frame
    ema_view: Optional[Tuple[View, GeomTransform]] = None
    queue: List[Tuple[View, bool]] = field(default_factory=list)


def state_hash(state: Dict[str, torch.Tensor]) -> str:
    """A SHA-256 over the tensors of a state dict (names sorted; exact bytes)."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class SemiTrainer(Trainer):
    """Semi-SAM+ (module docstring); the run loop is :class:`.base.Trainer`'s. Checkpoints hold the
    EMA decoder θ' as ``"model"`` (what is exported) and the student θ as ``"student"``."""

    KIND = SEMI_KIND
    RESUME_OPTIONS = RESUME_OPTIONS
    RESUME_FREE_OPTIONS = ("embed_batch",)  # speed only
    VAL_SCORES = ("dice", "student_dice")
    EPOCH_MEANS = LOSS_KEYS

    def __init__(self, config: TrainConfig, progress: Optional[ProgressWriter] = None, rank: int = 0):
        super().__init__(config, progress, rank)
        self.phases = self.opts.phase_epochs(config.epochs)
        self.spec = get_spec(config.base_model)
        self.window_hu = tuple(float(v) for v in (self.settings.get("window_hu") or (-160.0, 240.0)))
        # the base SAM: the student's frozen encoder and (when named) the 2D teacher share it
        self.sam = build_model(self.spec, checkpoint=config.checkpoint, device=self.device)
        for p in self.sam.parameters():
            p.requires_grad_(False)
        torch.manual_seed(config.seed)  # the decoder's initial weights (identical on every rank)
        self.student = student_from_sam(self.sam, slab_depth=self.opts.slab_depth, hidden=self.opts.hidden,
                                        decoder_norm=self.opts.decoder_norm)
        self.student.to(self.device)
        self.base_checkpoint = find_model_checkpoint(self.spec, config.checkpoint)
        self.student_key = self._encoder_key(self.spec.name, self.base_checkpoint)
        self.L = 4 * int(self.sam.embedding_size)
        self.teachers, self.embedders = self._build_teachers()
        self.decoder = distributed.wrap_ddp(self.student.decoder, self.device)
        self.ema: Dict[str, torch.Tensor] = {k: v.detach().clone()
                                             for k, v in self.student.decoder.state_dict().items()}
        from monai.losses import DiceCELoss
        self.loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
        self.optimizer = torch.optim.Adam(self.student.decoder.parameters(), lr=self.opts.warmup_lr,
                                          weight_decay=config.weight_decay)
        self.labelled: List[CaseBlock] = []
        self.unlabelled: List[CaseBlock] = []
        self.val: List[CaseBlock] = []
        self.frozen: Dict[str, Dict[str, torch.Tensor]] = {}
        self._perm_cache: Dict[Tuple, torch.Tensor] = {}
        self.timing = {"student_s": 0.0, "teacher_s": 0.0, "ema_s": 0.0}

    # ------------------------------------------------------------------ setup helpers
    def _encoder_key(self, name: str, checkpoint: Optional[Path]) -> str:
        st = checkpoint.stat() if checkpoint is not None and Path(checkpoint).exists() else None
        spec = get_spec(name)
        return content_hash({"v": EMBED_FORMAT, "model": name, "ckpt": str(checkpoint), "size": st.st_size if st else None,
                      "mtime": st.st_mtime_ns if st else None, "image_size": int(spec.image_size),
                      "normalization": spec.normalization, "dtype": self.opts.cache_dtype}, 12)

    def _build_teachers(self) -> Tuple[List[Teacher], Dict[str, Any]]:
        teachers: List[Teacher] = []
        embedders: Dict[str, Any] = {self.student_key: self.student}
        for name in teacher_names(self.opts.teachers):
            if is_3d_teacher(name):
                teachers.append(build_3d_teacher(name, self.opts.sam_med3d_checkpoint, self.device))
                continue
            if name == self.spec.name:
                teachers.append(Sam2DTeacher(self.sam, name=name, box=self.opts.teacher_box,
                                             embedding_key=self.student_key))
                continue
            spec = get_spec(name)  # InputError naming the model when unknown
            sam = build_model(spec, device=self.device)
            key = self._encoder_key(spec.name, find_model_checkpoint(spec))
            embedders[key] = student_from_sam(sam, slab_depth=self.opts.slab_depth, hidden=4).to(self.device)
            teachers.append(Sam2DTeacher(sam, name=name, box=self.opts.teacher_box, embedding_key=key))
            if 4 * int(sam.embedding_size) != self.L:
                raise InputError(f"config key 'semi.teachers': teacher {name!r} works at {4 * int(sam.embedding_size)} "
                                 f"px low-res masks, the student ({self.spec.name}) at {self.L}; choose a teacher "
                                 f"with the same embedding size")
        return teachers, embedders

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        """θ' (the EMA decoder, what is exported) with the student's key names (``decoder.*``)."""
        return self.ema_state()

    def ema_state(self) -> Dict[str, torch.Tensor]:
        """θ' with the student's key names (``decoder.*``), detached CPU copies."""
        return {f"decoder.{k}": v.detach().cpu().clone() for k, v in self.ema.items()}

    def extra_state(self) -> Dict[str, Any]:
        return {"student": self.student.trainable_state()}

    def load_trainable_state(self, state: Dict[str, torch.Tensor], ckpt: Dict[str, Any], path: Path) -> None:
        try:
            self.student.load_trainable_state(ckpt["student"])
            ema = {k[len("decoder."):]: v for k, v in state.items()}
            if set(ema) != set(self.ema):
                raise RuntimeError("the EMA state has other keys")
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"cannot resume from {path}: its decoder does not fit ({str(exc).splitlines()[0]})") \
                from None
        for k, v in ema.items():
            self.ema[k].copy_(v.to(self.ema[k].device, self.ema[k].dtype))

    def metadata(self) -> Dict[str, Any]:
        meta = student_metadata(self.student)
        meta.update(super().metadata())
        w, n, f = self.phases
        meta.update({"trained": ["decoder."], "weights": "EMA teacher (mean teacher) of the student decoder",
                     "model_name": self.cfg.model_name or self.out.name,
                     "teachers": [t.describe() for t in self.teachers],
                     "phases": {"warmup": w, "semi": n, "finetune": f},
                     "semi": {k: getattr(self.opts, k) for k in (
                         "ema_momentum", "ema_warm_start", "n_transforms", "u_th", "adaptive_u_th", "lambda_max",
                         "beta_max", "rampup_epochs", "rampdown_epochs", "rampup")}})
        return meta

    def write_model(self, path: Path, trained: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        write_student_model(self.student, path, trained, meta)

    def describe(self) -> str:
        w, n, f = self.phases
        return (f"Semi-SAM+ training: student {self.spec.name} encoder (frozen) + 3D decoder (slab "
                f"{self.opts.slab_depth}); teachers {', '.join(t.describe() for t in self.teachers)}; phases "
                f"warm-up {w} / semi {n} / fine-tune {f} epochs on {self.device}; run folder {self.out}")

    def train_mode(self) -> None:
        self.student.train()

    def eval_mode(self) -> None:
        self.student.eval()

    # ------------------------------------------------------------------ data
    def _block(self, depth: int, cap: Optional[int], center: float) -> Tuple[int, int]:
        n = depth if cap is None else min(depth, int(cap))
        k0 = int(round(center - n / 2.0))
        k0 = min(max(0, k0), depth - n)
        return k0, k0 + n

    def _load_block(self, index: int, case: Dict[str, Any], role: str) -> CaseBlock:
        with np.load(Path(self.cfg.cache) / case["file"]) as z:
            image = z["image"]
            label = z["label"] if "label" in z.files and case.get("labelled") else None
            spacing = tuple(float(v) for v in z["spacing"])
            origin = tuple(float(v) for v in z["origin"]) if "origin" in z.files else (0.0, 0.0, 0.0)
            direction = np.asarray(z["direction"], dtype=float).reshape(3, 3) if "direction" in z.files else np.eye(3)
        depth = int(image.shape[0])
        tgt = self.target(label) if label is not None else None
        if role == "val":
            k0, k1 = 0, depth
        elif tgt is not None:
            ks = np.nonzero(tgt.reshape(depth, -1).any(1))[0]
            center = (ks[0] + ks[-1] + 1) / 2.0 if len(ks) else depth / 2.0
            k0, k1 = self._block(depth, self.cfg.max_slices_per_case, center)
        else:
            k0, k1 = self._block(depth, self.cfg.max_slices_per_case, depth / 2.0)
        seed = int(content_hash([int(self.cfg.seed), case["id"], "views"], 8), 16)
        pool = make_pool(seed, self.opts.weak_views, self.opts.strong_views)
        if role == "val":
            pool = ViewPool(pool.weak[:1], [])
        elif role == "labelled":
            pool = ViewPool(make_pool(seed, self.opts.labelled_views, 0).weak, [])
        block = CaseBlock(index, case["id"], str(case.get("case_hash")), tgt is not None, k0, k1,
                          np.ascontiguousarray(image[k0:k1]), spacing, origin, direction, tuple(image.shape), pool)
        if tgt is not None:
            t = tgt[k0:k1]
            block.target = resize_mask(t.astype(np.float32), (self.L, self.L)).to(torch.uint8)
            block.target_full = t.astype(bool)
            block.fg = torch.nonzero(block.target.reshape(block.depth, -1).any(1)).flatten().tolist()  # (np.nonzero fails on an all-empty tensor)
        return block

    def _emb_root(self) -> Path:
        return Path(self.opts.embedding_cache).expanduser() if self.opts.embedding_cache else self.out / "embeddings"

    def _emb_path(self, c: CaseBlock, view: View, key: str) -> Path:
        h = content_hash({"case": c.case_id, "case_hash": c.case_hash, "k": [c.k0, c.k1], "view": view.as_dict(), "enc": key})
        return self._emb_root() / key / f"{c.case_id}_{h}.npy"

    def _jobs(self) -> List[Tuple[CaseBlock, View, str]]:
        jobs = []
        teacher_keys = sorted({t.embedding_key for t in self.teachers if t.embedding_key} - {self.student_key})
        for c in self.labelled + self.unlabelled + self.val:
            for v in c.pool.all:
                jobs.append((c, v, self.student_key))
            if c in self.unlabelled:
                for key in teacher_keys:
                    for v in c.pool.weak:
                        jobs.append((c, v, key))
        return jobs

    def _compute_embedding(self, c: CaseBlock, view: View, key: str, path: Path, cancel: Callable[[], bool]) -> None:
        embedder = self.embedders[key]
        img = view.image(c.image)
        dtype = CACHE_DTYPES[self.opts.cache_dtype]
        parts = []
        t0 = time.monotonic()
        for a in range(0, img.shape[0], self.opts.embed_batch):
            if cancel():
                raise CancelledError("cancelled while precomputing the slice embeddings")
            sl = torch.from_numpy(np.ascontiguousarray(img[a:a + self.opts.embed_batch]))
            parts.append(embedder.embed(sl).cpu().numpy().astype(dtype))
        arr = np.concatenate(parts, 0)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
        dt = time.monotonic() - t0
        self.progress.log(f"{c.case_id} view {view.key()}: embedded {arr.shape[0]} slices in {dt:.1f} s "
                          f"({arr.shape[0] / max(dt, 1e-9):.2f} slices/s)")

    def _load_embedding(self, path: Path, depth: int) -> np.ndarray:
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 4 or arr.shape[0] != depth:
            raise ValueError(f"unexpected shape {arr.shape}")
        return arr

    def _prepare_embeddings(self, cancel: Callable[[], bool]) -> None:
        jobs = self._jobs()
        for n, (c, v, key) in enumerate(jobs):
            if self.dist.enabled and n % self.dist.world_size != self.dist.rank:
                continue
            path = self._emb_path(c, v, key)
            if path.exists():
                try:
                    self._load_embedding(path, c.depth)
                    continue
                except Exception as exc:  # noqa: BLE001 - a damaged file is recomputed
                    self.progress.log(f"{c.case_id}: cannot read {path} ({exc}); recomputing")
            self._compute_embedding(c, v, key, path, cancel)
        distributed.barrier()
        for c, v, key in jobs:
            c.emb[(key, v.key())] = self._load_embedding(self._emb_path(c, v, key), c.depth)
        n_slices = sum(c.depth for c, _, _ in jobs)
        self.progress.log(f"embeddings: {len(jobs)} case views, {n_slices} slices ({self.opts.cache_dtype}) in "
                          f"{self._emb_root()}")

    def _build_data(self, cancel: Callable[[], bool]) -> None:
        cases = self.manifest.get("cases", [])
        lab = [c for c in cases if c.get("split") == "train" and c.get("labelled")]
        unl = [c for c in cases if c.get("split") == "train" and not c.get("labelled")]
        val = [c for c in cases if c.get("split") == "val" and c.get("labelled")]
        self.labelled = [self._load_block(i, c, "labelled") for i, c in enumerate(lab)]
        self.unlabelled = [self._load_block(i, c, "unlabelled") for i, c in enumerate(unl)]
        self.val = [self._load_block(i, c, "val") for i, c in enumerate(val)]
        if not self.labelled:
            raise InputError(f"no labelled case in the train split of {self.cfg.cache}")
        if not any(c.fg for c in self.labelled):
            raise no_target_error(self.cfg)
        if not self.unlabelled:
            self.progress.log("warning: the cache has no unlabelled train case: every phase trains on the labelled "
                              "cases only (supervised)")
        self._prepare_embeddings(cancel)

    # ------------------------------------------------------------------ plan
    def phase_of(self, epoch: int) -> int:
        w, n, _ = self.phases
        return 0 if epoch < w else (1 if epoch < w + n else 2)

    def micro_per_epoch(self, phase: int) -> int:
        n = len(self.labelled) if (phase == 0 or not self.unlabelled) else max(len(self.labelled), len(self.unlabelled))
        return max(1, math.ceil(n / self.global_batch_size))

    def batches_in_epoch(self, epoch: int) -> int:
        return self.micro_per_epoch(self.phase_of(epoch))

    def steps_before(self, epoch: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(epoch))

    def lr_at(self, step: int) -> float:
        """The lr of optimiser step ``step`` (0-based): constant warm-up lr, then poly."""
        s0 = self.steps_before(self.phases[0])
        if step < s0:
            return float(self.opts.warmup_lr)
        return sm.poly_lr(self.cfg.lr, step - s0, self.total_steps() - s0, self.opts.poly_power)

    def ramp_time(self, epoch: int, micro: int) -> float:
        """t in epochs since the start of phase 1 (fractional), 0 before it."""
        t = epoch - self.phases[0] + micro / self.micro_per_epoch(self.phase_of(epoch))
        return max(0.0, float(t))

    def weights_at(self, epoch: int, micro: int) -> Tuple[float, float]:
        phase = self.phase_of(epoch)
        if phase == 0 or not self.unlabelled:
            return 0.0, 0.0
        t = self.ramp_time(epoch, micro)
        lam = sm.consistency_weight(t, self.opts.lambda_max, self.opts.rampup_epochs, self.opts.rampup)
        beta = sm.pseudo_weight(t, self.opts.beta_max, self.opts.rampdown_epochs)
        return (0.0 if phase == 2 else lam), beta

    def _gen(self, *key: Any) -> torch.Generator:
        h = hashlib.sha256(json.dumps([int(self.cfg.seed)] + list(key)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))

    def _stream_item(self, n: int, epoch: int, stream: str, pos: int) -> int:
        rep, within = divmod(pos, n)
        k = (epoch, stream, rep)
        if k not in self._perm_cache:
            if len(self._perm_cache) > 64:
                self._perm_cache.clear()
            self._perm_cache[k] = torch.randperm(n, generator=self._gen("perm", epoch, stream, rep))
        return int(self._perm_cache[k][within])

    def _positions(self, micro: int) -> List[int]:
        """Global positions of this rank's ``batch_size`` items in micro-batch ``micro``."""
        g, w, r = self.global_batch_size, self.dist.world_size, self.dist.rank
        return [micro * g + r + w * b for b in range(self.cfg.batch_size)]

    # ------------------------------------------------------------------ items
    def _slab_idx(self, c: CaseBlock, start: int) -> torch.Tensor:
        return torch.clamp(torch.arange(start, start + self.opts.slab_depth), max=c.depth - 1)

    def _view_emb(self, c: CaseBlock, view: View, key: str, idx: torch.Tensor, flip_k: bool) -> torch.Tensor:
        """(D, C, h, w) float32 embeddings of ``T(x[idx])`` (T = view + depth flip)."""
        arr = c.emb[(key, view.key())]
        e = torch.from_numpy(np.ascontiguousarray(arr[idx.numpy()])).float()
        return torch.flip(e, dims=[0]) if flip_k else e

    def _pick(self, views: Sequence[View], g: torch.Generator) -> Tuple[View, bool]:
        v = views[int(torch.randint(len(views), (1,), generator=g))]
        return v, bool(torch.rand(1, generator=g) < 0.5)

    def _labelled_item(self, epoch: int, pos: int) -> Item:
        c = self.labelled[self._stream_item(len(self.labelled), epoch, "lab", pos)]
        g = self._gen("item", epoch, "lab", pos)
        d_s = self.opts.slab_depth
        hi = max(0, c.depth - d_s)
        u_fg, u_pos, u_off = (float(v) for v in torch.rand(3, generator=g))
        if c.fg and u_fg < self.opts.foreground_fraction:
            k = c.fg[min(len(c.fg) - 1, int(u_pos * len(c.fg)))]
            lo_s, hi_s = max(0, k - d_s + 1), min(hi, k)
            start = lo_s + min(hi_s - lo_s, int(u_off * (hi_s - lo_s + 1)))
        else:
            start = min(hi, int(u_pos * (hi + 1)))
        idx = self._slab_idx(c, start)
        view, flip = self._pick(c.pool.weak, g)
        geom = view.geom.with_depth_flip(flip)
        emb = self._view_emb(c, view, self.student_key, idx, flip).permute(1, 0, 2, 3)
        tgt = geom.apply(c.target[idx].float())
        return Item(c, idx, view, geom, emb, g, target=tgt)

    def _unlabelled_item(self, epoch: int, pos: int, phase: int) -> Item:
        c = self.unlabelled[self._stream_item(len(self.unlabelled), epoch, "unl", pos)]
        g = self._gen("item", epoch, "unl", pos)
        hi = max(0, c.depth - self.opts.slab_depth)
        start = min(hi, int(float(torch.rand(1, generator=g)) * (hi + 1)))
        idx = self._slab_idx(c, start)
        view, flip = self._pick(c.pool.strong or c.pool.weak, g)
        geom = view.geom.with_depth_flip(flip)
        emb = self._view_emb(c, view, self.student_key, idx, flip).permute(1, 0, 2, 3)
        if self.opts.feature_noise > 0:
            a = self.opts.feature_noise
            emb = emb * (1.0 + (2.0 * torch.rand(emb.shape, generator=g) - 1.0) * a)
        item = Item(c, idx, view, geom, emb, g)
        if phase == 1:
            wv, wf = self._pick(c.pool.weak, g)
            item.ema_view = (wv, wv.geom.with_depth_flip(wf))
            item.queue = [self._pick(c.pool.weak, g) for _ in range(self.opts.n_transforms)]
        return item

    # ------------------------------------------------------------------ models
    def _ema_logits(self, emb: torch.Tensor) -> torch.Tensor:
        """θ' decoder logits (B, 1, D, L, L) (no gradient)."""
        from torch.func import functional_call
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            return functional_call(self.student.decoder, self.ema, (emb.to(self.device),)).float()

    def _student_logits_eval(self, emb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            return self.student.decoder(emb.to(self.device)).float()

    def _ensemble(self, c: CaseBlock, idx: torch.Tensor, coarse: torch.Tensor, queue: Sequence[Tuple[View, bool]],
                  g: torch.Generator) -> Dict[str, torch.Tensor]:
        """Algorithm 2 on the slices ``idx`` of ``c``: coarse (D, L, L) bool in the original frame."""
        masks, valids = [], []
        d = int(idx.numel())
        L = self.L
        for view, flip in queue:
            geom = view.geom.with_depth_flip(flip)
            cj = geom.apply(coarse)
            for teacher in self.teachers:
                emb = self._view_emb(c, view, teacher.embedding_key, idx, flip) if teacher.embedding_key else None

                def image(view=view, flip=flip):
                    img = view.image(c.image)[idx.numpy()]
                    return np.ascontiguousarray(img[::-1] if flip else img)

                tv = TeacherView(emb, image, geom.spacing(c.spacing), self.window_hu)
                ans = teacher.predict(tv, cj, g)
                masks.append(geom.invert(ans.mask_prob))
                masks.append(geom.invert(ans.point_prob))
                v = ans.valid.flip(0) if flip else ans.valid
                valids.append(v)
        valid = torch.stack(valids).all(0)[:, None, None].expand(d, L, L)
        u_min = self.opts.min_confident if self.opts.adaptive_u_th else 0.0
        return sm.filter_ensemble(torch.stack(masks), self.opts.u_th, valid, u_min, self.opts.u_th_max)

    def _coarse_block(self, c: CaseBlock, ema: bool = True) -> torch.Tensor:
        """Algorithm 1 over the block's identity embeddings: probabilities (Dk, L, L) (no gradient)."""
        d_s = self.opts.slab_depth
        out = torch.zeros(c.depth, self.L, self.L)
        ident = c.pool.weak[0]
        for start, w0, w1 in slab_plan(c.depth, d_s):
            idx = self._slab_idx(c, start)
            emb = self._view_emb(c, ident, self.student_key, idx, False).permute(1, 0, 2, 3)[None]
            logits = self._ema_logits(emb) if ema else self._student_logits_eval(emb)
            out[w0:w1] = torch.sigmoid(logits[0, 0]).cpu()[w0 - start:w1 - start]
        return out

    def _block_ensemble(self, c: CaseBlock, tag: str) -> Dict[str, torch.Tensor]:
        """Pseudo-labels of a whole block with the current EMA (phase 2, uncertainty maps)."""
        g = self._gen("block", tag, c.case_id)
        coarse = self._coarse_block(c) > THRESHOLD
        queue = [self._pick(c.pool.weak, g) for _ in range(self.opts.n_transforms)]
        return self._ensemble(c, torch.arange(c.depth), coarse, queue, g)

    # ------------------------------------------------------------------ phase 2: frozen pseudo-labels
    def _pseudo_path(self, c: CaseBlock) -> Path:
        return self.out / "pseudo_labels" / f"{c.case_id}.pt"

    def _freeze_pseudo_labels(self, cancel: Callable[[], bool]) -> None:
        tag = self.steps_before(sum(self.phases[:2]))  # the step at which phase 2 starts
        t0 = time.monotonic()
        for n, c in enumerate(self.unlabelled):
            if self.dist.enabled and n % self.dist.world_size != self.dist.rank:
                continue
            path = self._pseudo_path(c)
            if path.exists():
                try:
                    d = torchfile.load(path, what="pseudo-label file")
                    if int(d.get("format", 0)) == PSEUDO_FORMAT and int(d.get("step", -1)) == tag:
                        continue
                except Exception:  # noqa: BLE001 - recomputed
                    pass
                self.progress.log(f"{c.case_id}: the frozen pseudo-labels in {path} belong to another run state; "
                                  f"recomputing them with the current EMA")
            if cancel():
                raise CancelledError("cancelled while computing the frozen pseudo-labels")
            res = self._block_ensemble(c, f"freeze{tag}")
            ck.save_checkpoint({"format": PSEUDO_FORMAT, "step": tag, "case": c.case_id,
                                "pseudo": res["pseudo"].half(), "conf": res["conf"].bool(),
                                "var": res["var"].half(), "u_th": float(res["u_th"])}, path)
        distributed.barrier()
        for c in self.unlabelled:
            d = torchfile.load(self._pseudo_path(c), what="pseudo-label file")
            self.frozen[c.case_id] = {"pseudo": d["pseudo"].float(), "conf": d["conf"].float()}
        conf = sum(float(v["conf"].sum()) for v in self.frozen.values())
        tot = sum(v["conf"].numel() for v in self.frozen.values())
        self.progress.log(f"phase 2: pseudo-labels of {len(self.frozen)} unlabelled case(s) frozen "
                          f"({conf / max(1, tot):.3f} of the voxels confident; {time.monotonic() - t0:.1f} s)")

    # ------------------------------------------------------------------ one micro-batch
    def _micro(self, epoch: int, micro: int, scale: float, sync: bool) -> Dict[str, float]:
        phase = self.phase_of(epoch)
        lam, beta = self.weights_at(epoch, micro)
        pos = self._positions(micro)
        lab = [self._labelled_item(epoch, p) for p in pos]
        unl = [self._unlabelled_item(epoch, p, phase) for p in pos] if (phase > 0 and self.unlabelled) else []
        x = torch.stack([it.emb for it in lab + unl]).to(self.device)
        ctx = self.decoder.no_sync() if (not sync and hasattr(self.decoder, "no_sync")) else contextlib.nullcontext()
        stats = {"lambda": lam, "beta": beta}
        with ctx:
            t0 = time.monotonic()
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = self.decoder(x)
            logits = logits.float()
            nl = len(lab)
            tgt = torch.stack([it.target for it in lab])[:, None].to(self.device)
            l_sup = self.loss_fn(logits[:nl], tgt)
            zero = logits.sum() * 0.0
            l_con, l_rs = zero, zero
            self.timing["student_s"] += time.monotonic() - t0
            if unl:
                p_view = torch.sigmoid(logits[nl:, 0])
                p_s = torch.stack([it.geom.invert(p_view[b]) for b, it in enumerate(unl)])  # original frame
                confs, pseudos, u_ths = [], [], []
                if phase == 1:
                    t1 = time.monotonic()
                    xw = torch.stack([self._view_emb(it.case, it.ema_view[0], self.student_key, it.idx,
                                                     it.ema_view[1].flip_k).permute(1, 0, 2, 3) for it in unl])
                    pw = torch.sigmoid(self._ema_logits(xw)[:, 0])
                    p_t = torch.stack([it.ema_view[1].invert(pw[b]) for b, it in enumerate(unl)])
                    l_con = sm.consistency_loss(p_s, p_t)
                    self.timing["ema_s"] += time.monotonic() - t1
                    t2 = time.monotonic()
                    coarse = (p_s.detach() > THRESHOLD).cpu()
                    for b, it in enumerate(unl):
                        res = self._ensemble(it.case, it.idx, coarse[b], it.queue, it.generator)
                        confs.append(res["conf"])
                        pseudos.append(res["pseudo"])
                        u_ths.append(float(res["u_th"]))
                    self.timing["teacher_s"] += time.monotonic() - t2
                else:
                    for it in unl:
                        fr = self.frozen[it.case.case_id]
                        confs.append(fr["conf"][it.idx])
                        pseudos.append(fr["pseudo"][it.idx])
                conf = torch.stack(confs).to(self.device)
                pseudo = torch.stack(pseudos).to(self.device)
                l_rs = torch.stack([sm.rs_consistency_loss(p_s[b], pseudo[b], conf[b])
                                    for b in range(len(unl))]).mean()
                stats["conf_fraction"] = float(conf.mean())
                if u_ths:
                    stats["u_th"] = float(np.mean(u_ths))
            total = l_sup + lam * l_con + beta * l_rs
            self.backward(total * scale)
        stats.update({"loss": float(total.detach()), "sup": float(l_sup.detach()), "con": float(l_con.detach()),
                      "rs_con": float(l_rs.detach()), "samples": float(len(lab) + len(unl))})
        return stats

    # ------------------------------------------------------------------ validation
    def _val_mask(self, c: CaseBlock, ema: bool) -> np.ndarray:
        """Algorithm 1 over the case's identity embeddings, logits resized to the case grid, > 0.5."""
        prob = self._coarse_block(c, ema=ema)  # (Dk, L, L)
        h, w = c.image.shape[-2:]
        logit = torch.logit(prob.clamp(1e-6, 1 - 1e-6))[:, None]
        return (F.interpolate(logit, size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0).numpy()

    def num_val_items(self) -> int:
        return len(self.val)

    def val_predictions(self, mine: List[int]) -> Iterable[Dict[str, Tuple[Any, Any]]]:
        for i in mine:
            c = self.val[i]
            yield {"dice": (self._val_mask(c, True), c.target_full),
                   "student_dice": (self._val_mask(c, False), c.target_full)}

    def validation_fields(self) -> Dict[str, Any]:
        return {"phase": self.phase_of(self.epoch)}

    # ------------------------------------------------------------------ hooks of the run loop
    def prepare_data(self, cancel: Callable[[], bool]) -> None:
        self._build_data(cancel)

    def make_scheduler(self, total: int) -> Any:
        return None  # the phases fix the rate (lr_at)

    def on_start(self) -> None:
        if self.step == 0 and self.rank == 0 and (self.out / "pseudo_labels").is_dir():
            import shutil  # a fresh run: frozen pseudo-labels of an earlier run in this folder are stale
            shutil.rmtree(self.out / "pseudo_labels", ignore_errors=True)
        distributed.barrier()

    def start_fields(self) -> Dict[str, Any]:
        w, n, f = self.phases
        return {"base_model": self.spec.name, "train_slices": sum(c.depth for c in self.labelled + self.unlabelled),
                "val_slices": sum(c.depth for c in self.val), "labelled_cases": len(self.labelled),
                "unlabelled_cases": len(self.unlabelled), "val_cases": len(self.val),
                "teachers": [t.name for t in self.teachers], "phases": {"warmup": w, "semi": n, "finetune": f},
                "slab_depth": self.opts.slab_depth, **self.student.parameter_counts()}

    def begin_epoch(self, epoch: int, cancel: Callable[[], bool]) -> None:
        if self.phase_of(epoch) == 2 and self.unlabelled and not self.frozen:
            self._freeze_pseudo_labels(cancel)

    def train_step(self, group: range) -> Dict[str, Any]:
        phase = self.phase_of(self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.lr_at(self.step)
        for pg in self.optimizer.param_groups:
            pg["lr"] = lr
        parts = [self._micro(self.epoch, m, 1.0 / len(group), sync=(m == group.stop - 1)) for m in group]
        self.optimizer_step()
        m = sm.ema_momentum(self.opts.ema_momentum, self.step, self.opts.ema_warm_start)
        sm.ema_update_(self.ema.values(), self.student.decoder.state_dict().values(), m)
        stats: Dict[str, Any] = self._reduce({k: float(np.mean([p[k] for p in parts])) for k in parts[0]
                                               if k != "samples"})
        stats.update(phase=phase, lr=lr, samples=sum(p["samples"] for p in parts) * self.dist.world_size)
        return stats

    def epoch_fields(self, means: Dict[str, float]) -> Dict[str, Any]:
        return {"phase": self.phase_of(self.epoch),
                "losses": {"train": means.get("loss"), "sup": means.get("sup"), "con": means.get("con"),
                           "rs_con": means.get("rs_con")},
                **{k: means.get(k) for k in ("lambda", "beta", "conf_fraction", "u_th")}}

    def _reduce(self, stats: Dict[str, float]) -> Dict[str, Optional[float]]:
        """Means over the ranks (keys absent on a rank count as missing there)."""
        keys = list(LOSS_KEYS)
        vals = distributed.sum_across_ranks([v for k in keys for v in (stats.get(k, 0.0), 1.0 if k in stats else 0.0)])
        return {k: (vals[2 * i] / vals[2 * i + 1] if vals[2 * i + 1] > 0 else None) for i, k in enumerate(keys)}

    def after_export(self) -> None:
        if self.opts.save_uncertainty:
            self.save_uncertainty()
        if self.opts.rank_hashes:
            self._write_rank_hashes()

    def done_fields(self) -> Dict[str, Any]:
        return {"timing": {k: round(v, 2) for k, v in self.timing.items()}}

    # ------------------------------------------------------------------ outputs
    def save_uncertainty(self) -> List[Path]:
        """Variance / confidence / pseudo-label maps of the final model (module docstring)."""
        import SimpleITK as sitk

        src = self.out / ck.BEST_NAME
        if src.exists():  # the exported weights
            best = ck.load_checkpoint(src)["model"]
            for k, v in best.items():
                self.ema[k[len("decoder."):]].copy_(v.to(self.device))
        written: List[Path] = []
        cases = self.unlabelled + self.val
        for n, c in enumerate(cases):
            if self.dist.enabled and n % self.dist.world_size != self.dist.rank:
                continue
            res = self._block_ensemble(c, "uncertainty")  # val cases: their one (identity) view
            h, w = c.image.shape[-2:]
            maps = {"variance": (res["var"], np.float32), "confidence": (res["conf"], np.uint8),
                    "pseudo": (res["pseudo"], np.float32)}
            for name, (t, dtype) in maps.items():
                full = np.zeros(c.full_shape, dtype=np.float32)
                if name == "confidence":
                    up = F.interpolate(t.float()[:, None], size=(h, w), mode="nearest")
                else:
                    up = F.interpolate(t.float()[:, None], size=(h, w), mode="bilinear", align_corners=False)
                up = up[:, 0].numpy()
                full[c.k0:c.k1] = up
                img = sitk.GetImageFromArray(full.astype(dtype))
                img.SetSpacing(c.spacing)
                img.SetOrigin(c.origin)
                img.SetDirection(tuple(float(v) for v in c.direction.ravel()))
                path = self.out / "uncertainty" / f"{c.case_id}_{name}.nii.gz"
                with atomic_path(path) as tmp:
                    sitk.WriteImage(img, str(tmp), True)
                written.append(path)
        distributed.barrier()
        self.progress.log(f"uncertainty maps of {len(cases)} case(s) written to {self.out / 'uncertainty'}")
        return written

    def _write_rank_hashes(self) -> None:
        """Debug output for the DDP test: hashes of θ, θ' and of the pseudo-labels this rank computes
        (with its final θ') for every unlabelled case; identical on all ranks when consistent."""
        path = self.out / "ranks" / f"rank{self.dist.rank}.json"
        pseudo = {}
        for c in self.unlabelled:
            res = self._block_ensemble(c, "rank-hash")
            pseudo[c.case_id] = state_hash({"conf": res["conf"], "pseudo": res["pseudo"], "var": res["var"]})
        info = {"rank": self.dist.rank, "world_size": self.dist.world_size, "step": self.step,
                "ema": state_hash(self.ema_state()), "student": state_hash(self.student.trainable_state()),
                "pseudo": pseudo}
        write_json(path, info)
        distributed.barrier()


__all__ = ["SEMI_KIND", "SemiOptions", "SemiTrainer", "state_hash"]
