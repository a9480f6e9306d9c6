"""The trainer base class: THE run loop of every trainer kind (``models.kinds``), nnU-Net style.

A kind (``decoder.py``, ``adapter.py``, ``unet.py``, ``student.py``, ``semi/trainer.py``) subclasses
:class:`Trainer`, builds its model, loss and optimiser in ``__init__`` (after ``super().__init__``)
and fills in hooks; everything else is done here, once, the same way for every kind:

* **set-up**: the config section (``self.opts``), the process group's rank and the device
  (:func:`.distributed.rank_device`: under DDP on CUDA rank r uses ``cuda:LOCAL_RANK``, whatever
  index the config names), AMP (CUDA only), the manifest, the seeds (torch/numpy/python and the
  trainer generator ``self.generator``);
* **the loop**: epochs of ``batches_in_epoch(epoch)`` micro-batches, ``grad_accum`` of them per
  optimiser step (``train_step(group)`` does one optimiser step and returns its loss, sample count
  and extra values, already averaged over the ranks);
* **the progress protocol** (:mod:`.progress`): ``start``, ``step``, ``epoch``, ``validation``,
  ``checkpoint``, ``done``, ``error`` (``train.py``), ``cancelled``, with the fields they had;
* **the run folder** (:mod:`.runfolder`): rank 0 takes the folder's OS lock (one trainer per
  folder), refuses a folder that holds a run unless ``resume`` or ``overwrite``, picks the resume
  checkpoint (the newest complete one: ``last.pt``, else ``best.pt``), checks it and the config
  (a resume may change only ``RESUME_APPLIED_KEYS``, ``RESUME_FREE_OPTIONS`` and ``LR_OPTION``;
  every other change is refused) before anything is written, then removes stale ``.tmp`` files
  and a left-over ``STOP`` file; the lock is released when ``run`` returns or raises;
* **the cancel vote**: after every step (and after the data preparation and each epoch's
  checkpoints) every rank says whether its ``cancel()`` is set or the file ``OUTPUT/STOP`` has
  appeared (rank 0 removes it when the run stops), and **any** rank's yes stops all ranks after
  the same step (:func:`.distributed.any_rank`); ``last.pt`` is then written, a
  ``cancelled`` event emitted and :class:`~samliverseg.core.errors.CancelledError` raised (exit 130);
* **checkpoints**: one dict layout (:meth:`checkpoint_dict`: trainable state, optimiser,
  scheduler, scaler, epoch / batch-in-epoch / step, epoch sums, RNG states incl. the trainer
  generator, config, metadata, history, world size + the kind's ``extra_state()``), written
  atomically by rank 0, then **a barrier on every rank** (a rank never runs ahead of a checkpoint
  that is being written); ``restore`` checks kind, resume keys and the kind's ``RESUME_OPTIONS``
  and gives exact resume (a resumed run reaches the weights of an uninterrupted one);
* **validation**: ``val_predictions(mine)`` yields ``{name: (prediction, target)}`` per val item
  (a slice or a case) of this rank's share; the Dice of each is MONAI ``compute_dice`` with
  ``ignore_empty=True``: **an item whose target is empty is skipped** (it has no Dice); the score
  is the mean over the scored items of all ranks, and when no item was scored there is no val
  Dice (``None``: no ``validation`` event, ``best.pt`` follows ``last.pt``);
* ``best.pt`` (best val Dice; every epoch while there is none), ``last.pt``, the export of
  ``model.pth`` with metadata (from ``best.pt``, else ``last.pt``; ``write_model`` hook), the
  registration in the user models folder (``register=True``, what ``samliverseg train`` does) and
  the ``done`` event.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from samliverseg.core.errors import CancelledError, CheckpointError, InputError, SAMLiverSegError
from samliverseg.models.kinds import get_kind
from samliverseg.training import checkpoint as ck
from samliverseg.training import distributed
from samliverseg.training import runfolder as rf
from samliverseg.training.config import TrainConfig, options_from_dict
from samliverseg.training.prepare import load_manifest
from samliverseg.training.progress import ProgressWriter

#: Config keys a resume may change; every other change is refused (CheckpointError, exit 3).
#: ``epochs``: the run goes on to the new number of epochs (a cosine schedule is stretched to end at
#: the new last step); ``lr`` (the kind's ``LR_OPTION``): from the resumed step on, every parameter
#: group's rate and the schedule's base rates are scaled by new/old; ``output``/``device``/``model_name``
#: do not change the training.
RESUME_APPLIED_KEYS = ("epochs", "lr", "output", "device", "model_name")


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process in MiB (None where it cannot be read)."""
    try:
        import resource  # Unix: ru_maxrss in KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except ImportError:
        try:
            import psutil  # Windows: peak working set
            info = psutil.Process().memory_info()
            return getattr(info, "peak_wset", info.rss) / 2**20
        except Exception:  # noqa: BLE001
            return None


def target_mask(label: np.ndarray, target: str) -> np.ndarray:
    """Boolean target of a label array: ``label > 0`` (liver incl. tumour) or ``label == 2`` (tumour)."""
    return label > 0 if target == "liver" else label == 2


def item_dice(pred: Any, target: Any) -> float:
    """Dice of one prediction against its target (MONAI ``compute_dice``); NaN when the target is
    empty (``ignore_empty=True``: such an item is skipped by the validation)."""
    from monai.metrics import compute_dice
    p = torch.as_tensor(np.asarray(pred) if not torch.is_tensor(pred) else pred).bool().float()[None, None]
    t = torch.as_tensor(np.asarray(target) if not torch.is_tensor(target) else target).bool().float()[None, None]
    return float(compute_dice(p.cpu(), t.cpu(), include_background=True, ignore_empty=True).reshape(-1)[0])


def content_hash(obj: Any, n: int = 16) -> str:
    """A short SHA-256 of JSON-able ``obj`` (keys sorted; other objects by ``str``): cache file keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Trainer:
    """One training run of kind ``KIND`` (see the module docstring for what the base does)."""

    KIND: str = ""
    #: Options of the kind's config section that must match for a resume (another network or
    #: another data pipeline otherwise): CheckpointError naming the key.
    RESUME_OPTIONS: Tuple[str, ...] = ()
    #: Options of the kind's section a resume may change (they do not change the training, e.g.
    #: DataLoader workers); every other change of the section is refused.
    RESUME_FREE_OPTIONS: Tuple[str, ...] = ()
    #: The config key of the learning rate this kind's optimiser starts from (a resume applies a change).
    LR_OPTION: str = "lr"
    #: Names of the validation scores ``val_predictions`` yields; the first is the run's val Dice.
    VAL_SCORES: Tuple[str, ...] = ("dice",)
    #: Step values averaged over an epoch (sample-weighted) for the ``epoch`` event and the history.
    EPOCH_MEANS: Tuple[str, ...] = ("loss",)

    def __init__(self, config: TrainConfig, progress: Optional[ProgressWriter] = None, rank: int = 0):
        self.cfg = config
        self.opts = config.options(self.KIND) if get_kind(self.KIND).options else None
        self.dist = distributed.current()  # train.py has joined the process group, if any
        self.rank = self.dist.rank if self.dist.enabled else int(rank)
        self.device = distributed.rank_device(config.device, self.dist)
        self.out = Path(config.output).expanduser()
        self.progress = progress or ProgressWriter(rank=self.rank)  # OUTPUT/train.log once the folder is ours
        self.amp = bool(config.amp and self.device.type == "cuda")
        self.manifest = load_manifest(Path(config.cache))
        self.settings: Dict[str, Any] = self.manifest.get("settings", {})
        seed_everything(int(config.seed))
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches done in the current epoch
        self.step = 0  # optimiser steps done
        self.best_dice: Optional[float] = None
        self.history: List[Dict[str, Any]] = []
        self._sums: Dict[str, float] = {}  # sample-weighted sums of the step values of this epoch
        self.resumed_world_size = self.dist.world_size

    # ================================================================== hooks (override)
    def describe(self) -> str:
        """One log line saying what this run trains."""
        return f"{self.KIND} training on {self.device} (target {self.cfg.target}); run folder {self.out}"

    def prepare_data(self, cancel: Callable[[], bool]) -> None:
        """Build the training/validation material (may raise CancelledError or InputError)."""

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches in epoch ``epoch``."""
        raise NotImplementedError

    def steps_in_epoch(self, epoch: int) -> int:
        return math.ceil(self.batches_in_epoch(epoch) / self.cfg.grad_accum)

    def total_steps(self) -> int:
        return sum(self.steps_in_epoch(e) for e in range(self.cfg.epochs))

    def make_scheduler(self, total: int) -> Any:
        """The lr scheduler (None: constant), built once the steps are known, before a resume."""
        if self.cfg.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, total))
        return None

    def on_start(self) -> None:
        """After the data, the scheduler and a resume; before the first step (e.g. wrap in DDP)."""

    def start_fields(self) -> Dict[str, Any]:
        """Extra fields of the ``start`` event."""
        return {}

    def begin_epoch(self, epoch: int, cancel: Callable[[], bool]) -> None:
        """Called before the first (or resumed) step of every epoch (a CancelledError cancels the run)."""

    def train_step(self, group: range) -> Dict[str, float]:
        """One optimiser step over the micro-batches ``group`` of the current epoch; returns
        ``{"loss": mean over all ranks, "samples": samples over all ranks, ...extra step fields}``."""
        raise NotImplementedError

    def epoch_fields(self, means: Dict[str, float]) -> Dict[str, Any]:
        """The ``epoch`` event's fields from the epoch means of the step values."""
        return {"losses": {"train": means.get("loss")}}

    def validate_now(self, epoch: int) -> bool:
        return True

    def num_val_items(self) -> int:
        return 0

    def val_predictions(self, mine: List[int]) -> Iterable[Dict[str, Tuple[Any, Any]]]:
        """For each val item index in ``mine`` (this rank's share): ``{score name: (pred, target)}``
        (boolean arrays of the same shape)."""
        return []

    def validation_fields(self) -> Dict[str, Any]:
        """Extra fields of the ``validation`` event."""
        return {}

    def train_mode(self) -> None:
        """Put the model in training mode (and back after validation)."""

    def eval_mode(self) -> None:
        """Put the model in evaluation mode for the validation."""

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        """The trained weights (CPU copies) that checkpoints hold as ``"model"``."""
        raise NotImplementedError

    def load_trainable_state(self, state: Dict[str, torch.Tensor], ckpt: Dict[str, Any], path: Path) -> None:
        raise NotImplementedError

    def extra_state(self) -> Dict[str, Any]:
        """Kind-specific checkpoint entries (restored by ``load_extra_state``)."""
        return {}

    def load_extra_state(self, ckpt: Dict[str, Any]) -> None:
        pass

    def metadata(self) -> Dict[str, Any]:
        """The model's metadata (kind, base model, window, spacing, target, label meaning, ...)."""
        s = self.settings
        return {"kind": self.KIND, "window": s.get("window"), "window_hu": s.get("window_hu"),
                "spacing": s.get("spacing"), "target": self.cfg.target, "label_meaning": self.cfg.label_meaning,
                "cache": str(self.cfg.cache), "cache_settings_hash": s.get("settings_hash")}

    def write_model(self, path: Path, trained: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        """Write ``model.pth`` from the trained weights of best.pt (else last.pt) (rank 0)."""
        ck.save_checkpoint({"model": trained, "metadata": meta}, path)

    def after_export(self) -> None:
        """After ``model.pth`` (every rank), before ``done``."""

    def done_fields(self) -> Dict[str, Any]:
        return {}

    # ================================================================== shared helpers
    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    @property
    def global_batch_size(self) -> int:
        """Samples per micro-batch over all ranks: ``batch_size`` per process times the world size."""
        return self.cfg.batch_size * self.dist.world_size

    def target(self, label: np.ndarray) -> np.ndarray:
        return target_mask(label, self.cfg.target)

    def stop_requested(self, cancel: Callable[[], bool]) -> bool:
        """THE cancel vote: True on every rank when any rank's ``cancel()`` is true."""
        return distributed.any_rank(bool(cancel()))

    # ================================================================== checkpoints
    def checkpoint_dict(self) -> Dict[str, Any]:
        state = self.trainable_state()
        d = {"format": ck.FORMAT, "version": ck.VERSION, "kind": self.KIND, "model": state,
             "trainable_keys": sorted(state),
             "optimizer": self.optimizer.state_dict(),
             "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
             "scaler": self.scaler.state_dict() if self.scaler is not None else None,
             "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
             "best_dice": self.best_dice, "sums": dict(self._sums), "rng": ck.rng_state(self.generator),
             "config": self.cfg.to_dict(), "metadata": self.metadata(), "history": self.history,
             "world_size": self.dist.world_size}
        d.update(self.extra_state())
        return d

    def save(self, which: str) -> Path:
        """Write ``last.pt``/``best.pt`` atomically (rank 0), then a barrier on every rank."""
        path = self.out / (ck.LAST_NAME if which == "last" else ck.BEST_NAME)
        if self.rank == 0:
            ck.save_checkpoint(self.checkpoint_dict(), path)
            self.progress.emit("checkpoint", self.epoch, self.step, path=str(path), which=which)
        distributed.barrier()
        return path

    def check_checkpoint(self, path: Path) -> Dict[str, Any]:
        """Load ``path`` and check it belongs to a run of this config (CheckpointError otherwise)."""
        ckpt = ck.load_checkpoint(path)
        kind = ckpt.get("kind") or (ckpt.get("config") or {}).get("kind")
        if kind != self.KIND:
            raise CheckpointError(f"cannot resume from {path}: it is a checkpoint of trainer kind {kind!r}, "
                                  f"expected kind {self.KIND!r}")
        old = (ckpt.get("config") or {}).get(self.KIND) or {}
        defaults = type(self.opts)() if self.opts is not None else None
        for key in self.RESUME_OPTIONS:
            want, have = getattr(self.opts, key), old.get(key, getattr(defaults, key))
            if have != want:
                raise CheckpointError(f"cannot resume from {path}: it was made with {self.KIND}.{key}={have!r}, "
                                      f"the config says {self.KIND}.{key}={want!r}")
        ck.check_resume(ckpt, path, self.cfg.to_dict(), sorted(self.trainable_state()))
        free = set(RESUME_APPLIED_KEYS) | {f"{self.KIND}.{k}" for k in self.RESUME_FREE_OPTIONS} | {self.LR_OPTION}
        for key, (have, want) in self.config_changes(ckpt).items():
            if key not in free:
                raise CheckpointError(f"cannot resume from {path}: {key} changed ({have!r} -> {want!r}), and a resume "
                                      f"continues the same run (it may change only {', '.join(sorted(free))}): "
                                      f"set it back, or start a new run (another --output, or --overwrite)")
        return ckpt

    def flat_config(self, cfg: Dict[str, Any]) -> Dict[str, Any]:
        """A config dict as ``{key: value}`` with this kind's section as ``kind.option`` (its
        defaults filled in); the other kinds' sections are left out (this kind never reads them)."""
        from samliverseg.models.kinds import KIND_NAMES
        flat = {k: v for k, v in cfg.items() if k not in KIND_NAMES}
        if self.opts is not None:
            section = cfg.get(self.KIND) or {}
            try:
                opts = dataclasses.asdict(options_from_dict(type(self.opts), section, self.KIND))
            except SAMLiverSegError:  # a section an older version wrote: compared as it is
                opts = dict(section)
            flat.update({f"{self.KIND}.{k}": v for k, v in opts.items()})
        return flat

    def config_changes(self, ckpt: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
        """``{key: (checkpoint's value, this config's value)}`` of every key that differs."""
        old, new = self.flat_config(ckpt.get("config") or {}), self.flat_config(self.cfg.to_dict())
        return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}

    def restore(self, path: Path) -> None:
        """Continue from ``path``: weights, optimiser, scheduler, scaler, counters, sums, RNG states."""
        ckpt = self.check_checkpoint(path)
        self.load_trainable_state(ckpt["model"], ckpt, path)
        self.load_extra_state(ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batch_in_epoch, self.step = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"]), int(ckpt["step"])
        self.best_dice = ckpt.get("best_dice")
        self._sums = dict(ckpt.get("sums") or {})
        self.history = list(ckpt.get("history") or [])
        ck.set_rng_state(ckpt["rng"], self.generator)
        self.resumed_world_size = int(ckpt.get("world_size") or 1)
        self.apply_resume_changes(ckpt)

    def apply_resume_changes(self, ckpt: Dict[str, Any]) -> None:
        """Apply the changes a resume may make (``RESUME_APPLIED_KEYS``), each logged."""
        changes = self.config_changes(ckpt)
        for key, (have, want) in changes.items():
            self.progress.log(f"resume: {key} changed ({have!r} -> {want!r}); the new value applies from step "
                              f"{self.step} on")
        if self.LR_OPTION in changes:
            have, want = changes[self.LR_OPTION]
            ratio = float(want) / float(have)
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * ratio
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * ratio
            if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
                self.scheduler.base_lrs = [b * ratio for b in self.scheduler.base_lrs]
        if self.scheduler is not None and hasattr(self.scheduler, "T_max"):  # a cosine over all the steps
            self.scheduler.T_max = max(1, self.total_steps())

    # ================================================================== validation
    @torch.no_grad()
    def validate(self) -> Dict[str, Optional[float]]:
        """``{score: mean Dice over the scored val items of all ranks, or None}`` (module docstring)."""
        n = self.num_val_items()
        if n == 0:
            return {name: None for name in self.VAL_SCORES}
        mine = list(distributed.shard(list(range(n)), self.dist))
        scores: Dict[str, List[float]] = {name: [] for name in self.VAL_SCORES}
        self.eval_mode()
        try:
            for out in self.val_predictions(mine):
                for name, (pred, tgt) in out.items():
                    d = item_dice(pred, tgt)
                    if math.isfinite(d):
                        scores[name].append(d)
        finally:
            self.train_mode()
        result: Dict[str, Optional[float]] = {}
        for name in self.VAL_SCORES:
            vals = scores[name]
            total = distributed.sum_across_ranks([sum(vals), float(len(vals))])
            result[name] = total[0] / total[1] if total[1] > 0 else None
        return result

    # ================================================================== the run
    def run(self, resume: bool = False, cancel: Optional[Callable[[], bool]] = None,
            register: bool = False, overwrite: bool = False) -> Dict[str, Any]:
        """Train (module docstring). ``resume``: continue from the run folder's newest complete
        checkpoint; ``overwrite``: start over in a folder that holds a run (its checkpoints and model
        are removed first); neither: a folder that holds a run is refused (InputError, exit 2).
        ``cancel`` (e.g. a signal handler's flag) and the file ``OUTPUT/STOP`` stop the run after the
        current step (``last.pt``, ``cancelled``, CancelledError: exit 130)."""
        lock = rf.RunLock(self.out)
        source = self._open_folder(lock, resume, overwrite)
        try:
            return self._run(source, cancel or (lambda: False), register)
        finally:
            lock.release()

    def _open_folder(self, lock: rf.RunLock, resume: bool, overwrite: bool) -> Optional[Path]:
        """Rank 0 takes the folder's lock and applies the folder rules (``runfolder``), before
        anything is written there; the other ranks learn the outcome. Returns the resume checkpoint."""
        if resume and overwrite:
            raise InputError("--resume and --overwrite exclude each other: continue the run, or start it over")
        outcome: Any = None
        error: Optional[BaseException] = None
        if self.rank == 0:
            try:
                if self.out.exists() and not self.out.is_dir():
                    raise InputError(f"the run folder {self.out} is a file: choose a folder for --output")
                if resume and not self.out.is_dir():
                    raise CheckpointError(f"--resume: the run folder {self.out} does not exist (no {ck.LAST_NAME} "
                                          f"to resume from)")
                self.out.mkdir(parents=True, exist_ok=True)
                lock.acquire()
                state = rf.run_state(self.out)
                source = None
                notes = []
                if resume:
                    source = rf.resume_source(self.out, notes.append)
                    if source is None:
                        raise CheckpointError(f"--resume: no checkpoint ({ck.LAST_NAME} or {ck.BEST_NAME}) to resume "
                                              f"from in {self.out}; a run stopped before its first checkpoint "
                                              f"starts again without --resume (its embeddings are reused)")
                    self.check_checkpoint(source)  # a wrong checkpoint or config: refused before anything is written
                elif state is not None and not overwrite:
                    raise rf.refuse_new_run(self.out, state)
                elif state is not None:
                    notes.append(f"--overwrite: removed {', '.join(rf.remove_run_files(self.out))} of the previous run")
                lock.mark()  # the folder is ours from here on
                notes += [f"removed {p.name}, left by a write that never finished" for p in rf.remove_stale_tmp(self.out)]
                if rf.StopFile(self.out).remove_left_over():
                    notes.append(f"removed {rf.STOP_NAME}, left from before")
                outcome = ("ok", str(source) if source is not None else None, notes)
            except BaseException as exc:  # told to the other ranks, then raised here
                lock.release()
                error = exc
                outcome = ("error", type(exc).__name__, str(exc))
        if self.dist.enabled:
            outcome = distributed.broadcast_object(outcome)
        if error is not None:
            raise error
        if outcome[0] == "error":
            cls = InputError if outcome[1] == "InputError" else CheckpointError
            raise cls(f"rank 0: {outcome[2]}")
        if self.progress.log_path is None:  # the folder is ours: OUTPUT/train.log from here on
            self.progress.set_log_path(self.out / "train.log")
        for note in outcome[2]:
            self.progress.log(note)
        return Path(outcome[1]) if outcome[1] else None

    def _run(self, source: Optional[Path], user_cancel: Callable[[], bool], register: bool) -> Dict[str, Any]:
        cfg = self.cfg
        stop_file = rf.StopFile(self.out)
        self._stop_file = stop_file

        def cancel() -> bool:
            return bool(user_cancel()) or stop_file.seen()

        self.progress.log(self.describe())
        try:
            self.prepare_data(cancel)
            if self.stop_requested(cancel):
                raise CancelledError("cancelled while preparing the training data")
        except CancelledError:
            self._stop_file_done()
            self.progress.emit("cancelled", self.epoch, self.step, checkpoint=None, exit_code=CancelledError.exit_code)
            raise
        total = self.total_steps()
        self.scheduler = self.make_scheduler(total)
        resumed = False
        if source is not None:
            self.restore(source)
            resumed = True
            self.progress.log(f"resumed from {source}: epoch {self.epoch}, step {self.step}")
            if self.resumed_world_size != self.dist.world_size:
                self.progress.log(f"warning: the checkpoint was written by a run of {self.resumed_world_size} "
                                  f"process(es), this run has {self.dist.world_size}: the global batch "
                                  f"(batch_size x processes) differs, so the resumed run will differ from an "
                                  f"uninterrupted one")
        self.on_start()
        if self.dist.enabled:
            self.progress.log(f"distributed: {self.dist.world_size} processes ({self.dist.backend}), "
                              f"{cfg.batch_size} samples per process, global batch {self.global_batch_size}")
        self.progress.total_steps = total
        self.progress.mark_start(self.step)
        self.progress.emit("start", self.epoch, self.step, kind=self.KIND, output=str(self.out),
                           device=str(self.device), epochs=cfg.epochs, resumed=resumed, target=cfg.target,
                           world_size=self.dist.world_size, **self.start_fields())
        self.train_mode()
        t_run, samples_run = time.monotonic(), 0.0
        while self.epoch < cfg.epochs:
            n_batches = self.batches_in_epoch(self.epoch)
            try:
                self.begin_epoch(self.epoch, cancel)
            except CancelledError:
                return self._cancel()
            while self.batch_in_epoch < n_batches:
                t0 = time.monotonic()
                group = range(self.batch_in_epoch, min(self.batch_in_epoch + cfg.grad_accum, n_batches))
                stats = dict(self.train_step(group))
                self.batch_in_epoch = group.stop
                self.step += 1
                samples = float(stats.pop("samples"))
                samples_run += samples
                for k in self.EPOCH_MEANS:
                    v = stats.get(k)
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        self._sums[k] = self._sums.get(k, 0.0) + float(v) * samples
                        self._sums[k + "#n"] = self._sums.get(k + "#n", 0.0) + samples
                stats.setdefault("lr", self.optimizer.param_groups[0]["lr"])
                dt = time.monotonic() - t0
                self.progress.emit("step", self.epoch, self.step, samples_per_s=round(samples / max(dt, 1e-9), 3),
                                   **stats)
                if self.stop_requested(cancel):
                    return self._cancel()
            means = {k: self._sums[k] / self._sums[k + "#n"] for k in self.EPOCH_MEANS if self._sums.get(k + "#n")}
            self.progress.emit("epoch", self.epoch, self.step, lr=self.optimizer.param_groups[0]["lr"],
                               **self.epoch_fields(means))
            scores = self.validate() if self.validate_now(self.epoch) else {n: None for n in self.VAL_SCORES}
            dice = scores[self.VAL_SCORES[0]]
            self.history.append({"epoch": self.epoch, "step": self.step, "train_loss": means.get("loss"),
                                 "val_dice": dice, **{k: v for k, v in scores.items() if k != self.VAL_SCORES[0]},
                                 **{k: v for k, v in means.items() if k != "loss"}})
            is_best = dice is not None and (self.best_dice is None or dice > self.best_dice)
            if dice is not None:
                if is_best:
                    self.best_dice = dice
                extra = {k: v for k, v in scores.items() if k != self.VAL_SCORES[0]}
                self.progress.emit("validation", self.epoch, self.step, dice=dice, best_dice=self.best_dice,
                                   is_best=is_best, **extra, **self.validation_fields())
            loss = means.get("loss")
            self.progress.log(f"epoch {self.epoch + 1}/{cfg.epochs}: train loss "
                              + (f"{loss:.4f}" if loss is not None else "n/a")
                              + (f", val Dice {dice:.4f}" if dice is not None else ""))
            self.epoch += 1
            self.batch_in_epoch = 0
            self._sums = {}
            if is_best or self.best_dice is None:
                self.save("best")
            self.save("last")
            if self.epoch < cfg.epochs and self.stop_requested(cancel):
                return self._cancel(saved=True)
        model_path = self.export_model()
        self.after_export()
        name = register_result(self.cfg, {"model": model_path}, self.progress) if register and self.rank == 0 else None
        elapsed = time.monotonic() - t_run
        sps = samples_run / elapsed if elapsed > 0 and samples_run else None
        self.progress.emit("done", self.epoch, self.step, best_dice=self.best_dice, model=str(model_path),
                           last=str(self.out / ck.LAST_NAME), best=str(self.out / ck.BEST_NAME),
                           samples_per_s=sps, peak_rss_mb=peak_rss_mb(), registered=name, **self.done_fields())
        return {"status": "done", "model": model_path, "best_dice": self.best_dice, "samples_per_s": sps,
                "history": self.history, "step": self.step, "registered": name, **self.done_fields()}

    def _stop_file_done(self) -> None:
        """The run stops: remove ``OUTPUT/STOP`` if it asked for that (rank 0)."""
        stop_file = getattr(self, "_stop_file", None)
        if stop_file is not None and self.rank == 0 and stop_file.seen():
            stop_file.remove()
            self.progress.log(f"{stop_file.path} asked to stop; removed it")

    def _cancel(self, saved: bool = False) -> Dict[str, Any]:
        path = self.out / ck.LAST_NAME if saved else self.save("last")
        self._stop_file_done()
        self.progress.log(f"cancelled at epoch {self.epoch}, step {self.step}; state saved in {path} "
                          f"(continue with --resume)")
        self.progress.emit("cancelled", self.epoch, self.step, checkpoint=str(path), exit_code=CancelledError.exit_code)
        raise CancelledError(f"training cancelled; resume with --resume (checkpoint {path})")

    def export_model(self) -> Path:
        """``model.pth`` from best.pt (else last.pt) + metadata (rank 0), then a barrier."""
        path = self.out / ck.MODEL_NAME
        if self.rank == 0:
            src = self.out / ck.BEST_NAME
            if not src.exists():
                src = self.out / ck.LAST_NAME
            trained = ck.load_checkpoint(src)["model"]
            meta = dict(self.metadata(), best_dice=self.best_dice, source=str(src), step=self.step)
            self.write_model(path, trained, meta)
            self.progress.emit("checkpoint", self.epoch, self.step, path=str(path), which="model")
        distributed.barrier()
        return path


def register_result(cfg: Any, result: Dict[str, Any], progress: ProgressWriter) -> Optional[str]:
    """Register a finished run's ``model.pth`` (``result["model"]``) in the user models folder.

    Name: ``cfg.model_name``, else the run folder's name (made valid: other characters than
    letters, digits, ``-_.`` become ``-``; a built-in model's name gets ``-trained``). A model of
    that name registered from this same file (a re-run or a resumed run) is replaced; one from
    another run is kept and this model gets the first free ``NAME-2``, ``NAME-3``, ... . A failure
    to register is logged and does not fail the (finished) training. Returns the name, or None.
    """
    from samliverseg.models import user_models as um

    model = result.get("model") if isinstance(result, dict) else None
    if not model or not Path(model).is_file():
        return None
    src = Path(model).expanduser().resolve()
    wanted = cfg.model_name or um.name_from(Path(cfg.output).expanduser().resolve().name)
    try:
        name = um.validate_name(wanted)
        existing = um.models_dir() / name / um.MODEL_FILE
        replace = existing.is_file() and um.read_entry(existing.parent).source == str(src)
        if not replace:
            name = um.unique_name(name)
        entry = um.register_trained_model(src, name=name, replace=replace)
    except (SAMLiverSegError, OSError) as exc:
        progress.log(f"warning: the model was not registered for use by name ({exc}); it is in {src} "
                     f"(register it with `samliverseg models --register {src} --name NAME`)")
        return None
    note = f" ({wanted!r} was taken)" if name != wanted else ""
    progress.log(f"registered the model as {name!r}{note} in {entry.folder}: use it with "
                 f"`samliverseg segment --model {name} ...`")
    return name


def no_target_error(cfg: TrainConfig) -> InputError:
    return InputError(f"no training slice contains the target {cfg.target!r} in {cfg.cache} "
                      f"(labelled cases of the train split)")


__all__ = ["Trainer", "content_hash", "item_dice", "no_target_error", "peak_rss_mb", "register_result", "seed_everything", "target_mask"]
