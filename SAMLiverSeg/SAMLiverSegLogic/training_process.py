"""Training from the Slicer panel, without Qt: ``samliverseg prepare`` then ``samliverseg train``.

A :class:`TrainingJob` turns the panel's choices (:class:`TrainingRequest`: labelled folder,
optional unlabelled folder, trainer kind, epochs, device, base model, target, run folder) into
two subprocesses run one after the other with the Slicer Python (never in Slicer's process, so a
crash, an out-of-memory or a kill never touches the scene):

1. ``samliverseg prepare LABELLED [--unlabelled DIR] -o RUN/cache`` (a rerun reuses the cases
   already converted);
2. ``samliverseg train --config RUN/train.yaml`` (the YAML written atomically beside the
   checkpoints; ``output`` is ``RUN`` itself), or ``... --resume`` to continue from
   ``RUN/last.pt``.

Both run through :class:`~SAMLiverSegLogic.process.BackgroundProcess` with stderr read apart:
stdout of ``train`` carries the JSON-lines progress protocol (``samliverseg.training.progress``),
stderr the human log. The GUI polls :meth:`TrainingJob.poll` from a timer; every event updates
:class:`TrainingState`: the phase, epoch/step out of the total, the ETA the trainer estimates
(``eta_s``), the per-step train loss and per-epoch mean loss and validation Dice (for the plot;
``x`` is the optimiser step), the last lines of the log, and the end: ``done`` (exit 0, the model
path), ``cancelled`` (exit 130 after a graceful stop, or killed) or ``error`` (the ``error``
event's message and the exit code: 2 bad input, 3 checkpoint, 4 out of memory, 1 unexpected).

Stop (:meth:`TrainingJob.stop`) never blocks and sends no signal: the subprocess runs under
Slicer's ``PythonSlicer``, a launcher that does not forward signals (a SIGTERM would stop the
launcher and orphan the trainer). It writes the control file ``RUN/STOP`` that the trainer
watches after every optimiser step and while it prepares its data; the trainer then finishes the
current step, writes ``last.pt`` atomically, emits ``cancelled``, removes the file and exits with
130. The file holds a token the trainer also got in ``SAMLIVERSEG_STOP_TOKEN``, so a Stop pressed
while the trainer starts is not taken for a left-over of an earlier run. If the run is
still alive ``grace_s`` seconds later, :meth:`poll` kills the whole process
tree by PID, children first (``process.kill_process_tree``; ``last.pt`` is then the one of the
last finished epoch, or absent). Stopping ``prepare`` kills its tree at once (converted cases are
written atomically; a rerun reuses them). A ``STOP`` left by a killed run is removed before the
next start or resume.

On success the finished ``model.pth`` is usable by name (``samliverseg.models.user_models``: the Segment
Anything effect and ``samliverseg segment --model NAME``). ``samliverseg train`` registers it
itself before its ``done`` event (``model_name``, or ``NAME-2``... when taken) and names it there
(``registered``); the job takes that name and never reads model files in Slicer's process. The
subprocess and Slicer must share the user models folder (``SAMLIVERSEG_MODELS`` /
``SAMLIVERSEG_CACHE``), as Slicer and its subprocesses do.
"""

from __future__ import annotations

import collections
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple

from samliverseg.core.errors import InputError
from samliverseg.models.kinds import KIND_NAMES

from .process import BackgroundProcess, samliverseg_command

#: The trainer kinds of ``samliverseg train``, in panel order: the one table, ``samliverseg.models.kinds``.
TRAINER_KINDS = KIND_NAMES
TRAINER_DESCRIPTIONS = {
    "decoder": "fine-tune the mask decoder of a SAM-style model (MedSAM recipe; box prompts)",
    "unet": "train a 3D U-Net from scratch (automatic, no prompt)",
    "adapter": "train adapters inside a frozen SAM encoder (Medical SAM Adapter)",
    "student": "distil a fast automatic student from a SAM teacher",
    "semi": "semi-supervised training with unlabelled CT (needs the unlabelled folder)",
}
TRAIN_DEVICES = ("auto", "cpu", "cuda")
TRAIN_TARGETS = ("liver", "tumor")
EXIT_CANCELLED = 130

CACHE_DIR = "cache"
#: the control file the trainer watches (``samliverseg.training``: ``OUTPUT/STOP`` stops it as SIGTERM does)
STOP_NAME = "STOP"
CONFIG_NAME = "train.yaml"
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"
MODEL_NAME = "model.pth"


@dataclass
class TrainingRequest:
    """The panel's choices. ``options`` adds config keys (``batch_size``, ``lr``, a kind's section
    such as ``{"unet": {"patch_size": [96, 96, 96]}}``...), validated by the trainer."""

    labelled: str
    run_folder: str
    kind: str = "decoder"
    unlabelled: str = ""
    epochs: int = 10
    device: str = "auto"
    base_model: str = "lite_medsam"
    target: str = "liver"
    checkpoint: str = ""  # base weights (empty: the weights cache)
    window: str = "abdomen"  # the CT window of the cache (`prepare --window`)
    val_fraction: float = 0.2
    model_name: str = ""  # registered name of the finished model (empty: the run folder's name)
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def run(self) -> Path:
        return Path(self.run_folder).expanduser().resolve()

    @property
    def cache(self) -> Path:
        return self.run / CACHE_DIR

    @property
    def config_path(self) -> Path:
        return self.run / CONFIG_NAME

    @property
    def stop_path(self) -> Path:
        return self.run / STOP_NAME

    def validate(self, for_resume: bool = False) -> None:
        """Raise :class:`InputError` (one line saying what to change) on a bad choice."""
        if not str(self.run_folder).strip():
            raise InputError("choose a run folder (checkpoints, log and the finished model go there)")
        if self.kind not in TRAINER_KINDS:
            raise InputError(f"unknown trainer kind {self.kind!r}: one of {', '.join(TRAINER_KINDS)}")
        if self.target not in TRAIN_TARGETS:
            raise InputError(f"unknown target {self.target!r}: liver or tumor")
        if self.device not in TRAIN_DEVICES and not str(self.device).startswith("cuda:"):
            raise InputError(f"unknown device {self.device!r}: auto, cpu or cuda")
        if int(self.epochs) < 1:
            raise InputError("epochs must be at least 1")
        if self.checkpoint and not Path(self.checkpoint).expanduser().is_file():
            raise InputError(f"base checkpoint {self.checkpoint} does not exist")
        if for_resume:
            return
        labelled = Path(self.labelled).expanduser() if str(self.labelled).strip() else None
        if labelled is None or not labelled.exists():
            raise InputError("choose the folder of labelled CT (image + label pairs, or a dataset.json)"
                             + (f": {self.labelled} does not exist" if labelled is not None else ""))
        if self.kind == "semi" and not str(self.unlabelled).strip():
            raise InputError("semi-supervised training needs the folder of unlabelled CT")
        if str(self.unlabelled).strip() and not Path(self.unlabelled).expanduser().is_dir():
            raise InputError(f"unlabelled folder {self.unlabelled} does not exist")
        if self.run == labelled.resolve():
            raise InputError("the run folder must differ from the labelled folder")

    def config(self) -> Dict[str, Any]:
        """The ``samliverseg train`` YAML config (a mapping; ``output`` is the run folder)."""
        cfg: Dict[str, Any] = {"kind": self.kind, "cache": str(self.cache), "output": str(self.run),
                               "base_model": self.base_model, "target": self.target,
                               "epochs": int(self.epochs), "device": self.device,
                               "model_name": self.model_name or self.run.name}
        if self.checkpoint:
            cfg["checkpoint"] = str(Path(self.checkpoint).expanduser().resolve())
        cfg.update(self.options)
        return cfg

    def prepare_args(self) -> List[str]:
        args = ["prepare", str(Path(self.labelled).expanduser().resolve()), "-o", str(self.cache),
                "--window", self.window, "--val-fraction", str(self.val_fraction)]
        if self.kind == "semi" and str(self.unlabelled).strip():
            args += ["--unlabelled", str(Path(self.unlabelled).expanduser().resolve())]
        return args

    def train_args(self, resume: bool = False) -> List[str]:
        """``train`` continues the run (``--resume``) or starts it over (``--overwrite``: the trainer
        refuses a folder that holds a run otherwise; the panel asked the user before starting over)."""
        return ["train", "--config", str(self.config_path)] + (["--resume"] if resume else ["--overwrite"])


def write_config(request: TrainingRequest) -> Path:
    """Write the request's YAML config into the run folder, atomically."""
    import yaml
    from samliverseg.core.atomic import atomic_path

    path = request.config_path
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# written by the SAMLiverSeg training panel\n" + yaml.safe_dump(request.config(), sort_keys=False)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


#: The trainer keeps a ``STOP`` holding this variable's value at start (a Stop pressed while it was
#: starting), and removes any other as a left-over (``samliverseg.training.runfolder.StopFile``).
STOP_TOKEN_ENV = "SAMLIVERSEG_STOP_TOKEN"


def write_stop_file(path, token: str = "") -> None:
    """Create the trainer's control file ``RUN/STOP`` holding ``token`` (atomically: the trainer
    never sees half of it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text((token or "stop requested by the SAMLiverSeg training panel") + "\n", encoding="utf-8")
    os.replace(str(tmp), str(path))


def remove_stop_file(path) -> None:
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass
    except OSError:  # read-only folder: the trainer reports it when it starts
        pass


def previous_run(run_folder) -> Dict[str, bool]:
    """What a run folder already holds (the panel warns before starting over, offers Resume)."""
    run = Path(run_folder).expanduser() if str(run_folder).strip() else None
    has = (lambda name: bool(run is not None and (run / name).is_file()))
    return {"last": has(LAST_NAME) or has(BEST_NAME), "model": has(MODEL_NAME), "config": has(CONFIG_NAME),
            "cache": has(f"{CACHE_DIR}/manifest.json")}


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    s = int(round(max(0.0, float(seconds))))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


@dataclass
class TrainingState:
    """What the panel shows; updated by :meth:`TrainingJob.poll`."""

    status: str = "idle"  # idle | running | done | cancelled | error
    phase: str = ""  # prepare | loading | training | stopping | finished
    kind: str = ""
    epoch: int = 0  # 0-based epoch in progress (== epochs when finished)
    epochs: int = 0
    step: int = 0
    total_steps: Optional[int] = None
    eta_s: Optional[float] = None
    #: (step, loss) per optimiser step
    losses: List[Tuple[int, float]] = field(default_factory=list)
    #: (epoch, step, mean train loss) per epoch
    epoch_losses: List[Tuple[int, int, float]] = field(default_factory=list)
    #: (epoch, step, val Dice) per validation
    val_dice: List[Tuple[int, int, float]] = field(default_factory=list)
    best_dice: Optional[float] = None
    message: str = ""
    exit_code: Optional[int] = None
    model_path: Optional[str] = None
    checkpoint: Optional[str] = None  # last.pt written by the latest cancel / checkpoint event
    registered_name: Optional[str] = None
    resumed: bool = False
    events: int = 0

    def fraction(self) -> Optional[float]:
        """Progress in [0, 1], or None while it cannot be known (prepare, model loading)."""
        if self.status == "done":
            return 1.0
        if not self.total_steps:
            return None
        return min(1.0, self.step / float(self.total_steps))

    def progress_text(self) -> str:
        if self.status == "idle":
            return ""
        if self.phase == "prepare":
            return "preparing the training cache..."
        if self.phase == "loading":
            return "loading the model and the data..."
        parts = []
        if self.epochs:
            parts.append(f"epoch {min(self.epoch + 1, self.epochs)}/{self.epochs}")
        if self.total_steps:
            parts.append(f"step {self.step}/{self.total_steps}")
        if self.losses:
            parts.append(f"loss {self.losses[-1][1]:.4f}")
        if self.val_dice:
            parts.append(f"val Dice {self.val_dice[-1][2]:.3f}")
        if self.status == "running" and self.eta_s is not None:
            parts.append(f"ETA {format_duration(self.eta_s)}")
        text = ", ".join(parts)
        if self.status != "running":
            text = f"{self.status}: {self.message}" + (f" ({text})" if text else "")
        elif self.phase == "stopping":
            text = "stopping after the current step... " + text
        return text


class TrainingJob:
    """One training run of the panel: prepare, train (or resume), stop, register the model.

    ``python``: the interpreter of the subprocesses (Slicer: PythonSlicer; default this one).
    ``env``: their environment (default: this process's). ``launcher``: how to start a process
    (``process._default_launcher``; it is called with ``separate_stderr=True``). ``register``:
    ``register(model_path, name) -> name``, called only when the trainer's ``done`` event names no
    registered model (default: none; the trainer registers the model itself).
    """

    def __init__(self, request: TrainingRequest, python: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
                 launcher: Optional[Callable] = None, log_lines: int = 200,
                 register: Optional[Callable[[str, str], Optional[str]]] = None):
        self.request = request
        self.python = python
        self.env = dict(env) if env is not None else None
        self.launcher = launcher
        self.register = register
        self.stop_token = ""  # written into RUN/STOP; the trainer gets it in SAMLIVERSEG_STOP_TOKEN
        self.state = TrainingState(kind=request.kind, epochs=int(request.epochs))
        self.log: Deque[str] = collections.deque(maxlen=int(log_lines))
        self.log_total = 0  # lines ever appended to the log (the tail keeps the last ``log_lines``)
        self.process: Optional[BackgroundProcess] = None
        self.stage: Optional[str] = None  # "prepare" | "train" while a process runs
        self.stop_requested = False
        self.kill_deadline: Optional[float] = None
        self.killed = False
        self._terminal_event: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ control
    def running(self) -> bool:
        return self.state.status == "running"

    def start(self) -> None:
        """Validate, write the config, run ``prepare`` (then ``train`` from :meth:`poll`)."""
        if self.running():
            raise InputError("a training run is already going on")
        self.request.validate()
        self._reset(resumed=False)
        self.request.run.mkdir(parents=True, exist_ok=True)
        write_config(self.request)
        self._launch("prepare", self.request.prepare_args())

    def can_resume(self) -> bool:
        return not self.running() and previous_run(self.request.run_folder)["last"]

    def resume(self) -> None:
        """Continue the run of the run folder from ``last.pt`` (``train --resume``).

        The config is written again from the current request (more epochs may be asked for;
        the trainer warns when other settings changed since the checkpoint).
        """
        if self.running():
            raise InputError("a training run is already going on")
        self.request.validate(for_resume=True)
        found = previous_run(self.request.run_folder)
        if not found["last"]:
            raise InputError(f"nothing to resume: no {LAST_NAME} in {self.request.run} (press Start)")
        if not found["cache"]:
            raise InputError(f"the training cache {self.request.cache} is missing (press Start)")
        self._reset(resumed=True)
        write_config(self.request)
        self._launch("train", self.request.train_args(resume=True))

    def stop(self, grace_s: float = 60.0) -> None:
        """Ask the run to stop; never blocks, sends no signal. ``train``: write ``RUN/STOP`` (the
        trainer saves ``last.pt`` and exits); :meth:`poll` kills the process tree if it is still
        alive ``grace_s`` seconds later. ``prepare``: its process tree is killed now."""
        if self.process is None or not self.running() or self.stop_requested:
            return
        self.stop_requested = True
        self.state.phase = "stopping"
        if self.stage == "prepare":
            self._log("stop requested: preparing stops now (the cases converted so far are kept)")
            self.kill_deadline = time.monotonic()
            self._kill_tree()
            return
        try:
            write_stop_file(self.request.stop_path, self.stop_token)
            self._log(f"stop requested: the trainer finishes its step and saves {LAST_NAME} "
                      f"(killed after {grace_s:g} s otherwise)")
        except OSError as exc:  # cannot write into the run folder: the kill is all that is left
            self._log(f"cannot write {self.request.stop_path} ({exc}): killing the run")
            grace_s = 0.0
        self.kill_deadline = time.monotonic() + float(grace_s)

    def _kill_tree(self) -> None:
        from .process import kill_process_tree

        if self.killed or self.process is None or self.process.returncode is not None:
            return
        self.killed = True
        kill_process_tree(self.process.pid, timeout=0.0, force=True)  # SIGKILL; Popen reaps it later

    def poll(self) -> List[Dict[str, Any]]:
        """Read what the subprocess wrote since the last call (never blocks) and update the state."""
        proc = self.process
        if proc is None:
            return []
        events = proc.poll()
        for ev in events:
            self._handle(ev)
        if (proc.returncode is None and self.kill_deadline is not None
                and time.monotonic() > self.kill_deadline and not self.killed):
            self._log("the run did not stop in time: killing its processes")
            self._kill_tree()
        return events

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> str:
        """Poll until the run ends (scripts and tests; the GUI uses a timer). Returns the status."""
        t0 = time.monotonic()
        while self.running():
            self.poll()
            if timeout is not None and time.monotonic() - t0 > timeout:
                break
            time.sleep(interval)
        return self.state.status

    # ------------------------------------------------------------------ internals
    def _reset(self, resumed: bool) -> None:
        st = self.state
        st.status, st.message, st.exit_code, st.eta_s = "running", "", None, None
        st.kind, st.epochs, st.resumed = self.request.kind, int(self.request.epochs), resumed
        st.model_path = st.registered_name = st.checkpoint = None
        if not resumed:
            st.epoch, st.step, st.total_steps, st.best_dice = 0, 0, None, None
            st.losses, st.epoch_losses, st.val_dice = [], [], []
        self.stop_requested, self.kill_deadline, self.killed = False, None, False
        self._terminal_event = None

    def _launch(self, stage: str, args: List[str]) -> None:
        if stage == "train":
            remove_stop_file(self.request.stop_path)  # left by a run that was killed: it would stop this one
        cmd = samliverseg_command(*args, python=self.python)
        self.stop_token = uuid.uuid4().hex  # STOP holds it: the trainer keeps it even while starting
        env = dict(self.env if self.env is not None else os.environ, **{STOP_TOKEN_ENV: self.stop_token})
        kwargs: Dict[str, Any] = {"env": env, "separate_stderr": True}
        if self.launcher is not None:
            kwargs["launcher"] = self.launcher
        self.stage = stage
        self.state.phase = "prepare" if stage == "prepare" else "loading"
        self._log("$ samliverseg " + " ".join(args))
        self.process = BackgroundProcess(cmd, **kwargs)
        try:
            self.process.start()
        except OSError as exc:
            self._finish("error", f"cannot start {cmd[0]}: {exc}", None)

    def _log(self, line: str) -> None:
        self.log.append(line)
        self.log_total += 1

    def new_log_lines(self, seen: int) -> Tuple[List[str], int]:
        """The log lines appended since ``seen`` lines were shown (those still in the tail) and
        the new count: ``lines, seen = job.new_log_lines(seen)``."""
        n = min(self.log_total - int(seen), len(self.log))
        return (list(self.log)[len(self.log) - n:] if n > 0 else []), self.log_total

    def _handle(self, ev: Dict[str, Any]) -> None:
        kind = ev.get("event")
        st = self.state
        if kind == "log":
            self._log(ev.get("text", ""))
            return
        if kind == "finished":
            self._on_exit(self.process.exit_code)
            return
        if self.stage != "train":
            self._log(str(ev))
            return
        st.events += 1
        for key in ("epoch", "step"):
            if isinstance(ev.get(key), int):
                setattr(st, key, ev[key])
        if ev.get("total_steps"):
            st.total_steps = int(ev["total_steps"])
        if "eta_s" in ev:
            st.eta_s = ev["eta_s"]
        if kind == "start":
            st.phase = "stopping" if self.stop_requested else "training"
            st.epochs = int(ev.get("epochs") or st.epochs)
            st.resumed = bool(ev.get("resumed"))
            # steps redone after a kill (last.pt older than the last step seen) replace the old ones
            st.losses = [x for x in st.losses if x[0] <= st.step]
            st.epoch_losses = [x for x in st.epoch_losses if x[0] < st.epoch]
            st.val_dice = [x for x in st.val_dice if x[0] < st.epoch]
            self._log(f"training {ev.get('kind', st.kind)} on {ev.get('device', '?')}: "
                      f"{ev.get('train_slices', ev.get('train_cases', '?'))} training samples, "
                      f"{st.total_steps} steps" + (" (resumed)" if st.resumed else ""))
        elif kind == "step":
            if ev.get("loss") is not None:
                st.losses.append((st.step, float(ev["loss"])))
        elif kind == "epoch":
            train = (ev.get("losses") or {}).get("train")
            if train is not None:
                st.epoch_losses.append((st.epoch, st.step, float(train)))
        elif kind == "validation":
            if ev.get("dice") is not None:
                st.val_dice.append((st.epoch, st.step, float(ev["dice"])))
            if ev.get("best_dice") is not None:
                st.best_dice = float(ev["best_dice"])
        elif kind == "checkpoint":
            if ev.get("which") == "last":
                st.checkpoint = ev.get("path")
            elif ev.get("which") == "model":
                st.model_path = ev.get("path")
        elif kind in ("done", "error", "cancelled"):
            self._terminal_event = ev
            if kind == "done":
                st.model_path = ev.get("model") or st.model_path
                if ev.get("best_dice") is not None:
                    st.best_dice = float(ev["best_dice"])
            elif kind == "cancelled" and ev.get("checkpoint"):
                st.checkpoint = ev["checkpoint"]

    def _last_error_line(self) -> str:
        for line in reversed(self.log):
            if line.strip().startswith("error:") or "Error" in line:
                return line.strip()
        return self.log[-1].strip() if self.log else ""

    def _on_exit(self, rc: Optional[int]) -> None:
        stage = self.stage
        if stage == "prepare":
            if rc == 0 and not self.stop_requested:
                self._launch("train", self.request.train_args(resume=False))
                return
            if self.stop_requested:
                self._finish("cancelled", "stopped while preparing the training cache (press Start again)", rc)
            else:
                self._finish("error", f"prepare failed: {self._last_error_line() or f'exit code {rc}'}", rc)
            return
        ev = self._terminal_event or {}
        if rc == 0 and ev.get("event") == "done":
            self._finish("done", f"model saved in {self.state.model_path}", rc)
            self._register(ev)
        elif rc == EXIT_CANCELLED or ev.get("event") == "cancelled":
            if ev.get("event") == "cancelled" and not ev.get("checkpoint"):  # stopped while loading
                last = self.request.run / LAST_NAME
                note = (f"the earlier {LAST_NAME} is kept (press Resume)" if last.exists()
                        else "nothing was saved (press Start)")
                self._finish("cancelled", f"stopped before training began; {note}", rc)
                return
            where = self.state.checkpoint or str(self.request.run / LAST_NAME)
            self._finish("cancelled", f"stopped at epoch {self.state.epoch + 1}, step {self.state.step}; "
                                      f"state saved in {where} (press Resume)", rc)
        elif self.stop_requested:
            last = self.request.run / LAST_NAME
            note = (f"{LAST_NAME} holds the last finished epoch (press Resume)" if last.exists()
                    else f"no {LAST_NAME} was written yet (press Start)")
            self._finish("cancelled", f"killed before it could save its state; {note}", rc)
        else:
            msg = ev.get("message") if ev.get("event") == "error" else None
            self._finish("error", msg or self._last_error_line() or f"training failed (exit code {rc})", rc)

    def _finish(self, status: str, message: str, rc: Optional[int]) -> None:
        if self.stop_requested:
            remove_stop_file(self.request.stop_path)  # the trainer removes it; a killed one cannot
        st = self.state
        st.status, st.message, st.exit_code, st.phase = status, message, rc, "finished"
        if status != "running":
            st.eta_s = None if status != "done" else 0.0
        self.stage = None
        self._log(f"{status}: {message}" + (f" (exit code {rc})" if rc not in (None, 0) else ""))

    def _register(self, done_event: Mapping[str, Any]) -> None:
        """The name ``samliverseg train`` registered the finished model under (its ``done`` event);
        without one, ``register(model_path, name)`` when given. Slicer's process never reads model
        files itself (``samliverseg.models.user_models`` imports torch)."""
        st = self.state
        if not st.model_path:
            return
        st.registered_name = done_event.get("registered") or None
        if st.registered_name is None and self.register is not None:
            try:
                st.registered_name = self.register(st.model_path, self.request.model_name or self.request.run.name)
            except Exception as exc:  # noqa: BLE001 - the model file is there; only the shortcut is missing
                self._log(f"the model could not be registered: {exc}")
        if st.registered_name:
            self._log(f"model registered as {st.registered_name!r}: select it in the Segment Anything effect")
        else:
            st.message += f"; not registered (samliverseg models --register {st.model_path})"
            self._log("the model was not registered: run `samliverseg models --register MODEL.pth --name NAME`")


