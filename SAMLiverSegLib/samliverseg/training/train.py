"""``samliverseg train --config CONFIG.yaml [--resume] [--output DIR]``.

Builds the trainer named by the config's ``kind`` (``TRAINERS``), runs it and reports progress as JSON lines on stdout (:mod:`.progress`); logs go to stderr and to
``OUTPUT/train.log``.

Signals: SIGTERM or SIGINT lets the current optimiser step finish, then ``last.pt`` is written
atomically, a ``cancelled`` event is printed and the process exits with code 130. Run again with
``--resume`` to continue from ``last.pt``.

Exit codes:

====  ==========================================================================
0     done (``done`` event)
2     bad input: config (unknown key, bad value), cache, model name (``error`` event)
3     checkpoint problem: unreadable/incompatible resume checkpoint, base weights
      missing, a checkpoint that cannot be written (full disk) (``error`` event)
4     out of memory, GPU or CPU RAM (``error`` event suggests a smaller batch or patch)
130   cancelled by SIGTERM/SIGINT (``cancelled`` event; state saved in ``last.pt``)
1     an unexpected error (``error`` event with the exception's text)
====  ==========================================================================
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from typing import List, Optional

from samliverseg.core.errors import CancelledError, SAMLiverSegError
from samliverseg.training.progress import ProgressWriter

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_OOM = 4
EXIT_CANCELLED = CancelledError.exit_code  # 130


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="the training config (YAML; see training/config.py)")
    parser.add_argument("--resume", action="store_true", help="continue the run from OUTPUT/last.pt")
    parser.add_argument("--output", default=None, help="the run folder (overrides the config's `output`)")
    return parser


#: kind -> "module:Class". A trainer is ``Class(cfg, progress=ProgressWriter, rank=int)`` with
#: ``run(resume: bool, cancel: Callable[[], bool]) -> dict``; it emits the progress events, writes
#: ``last.pt``/``best.pt``/``model.pth`` in ``cfg.output`` (rank 0 only) and raises
#: CancelledError after emitting ``cancelled``. Under torchrun the process group is already set
#: up (:mod:`.distributed`) when the trainer is built.
TRAINERS = {
    "decoder": "samliverseg.training.decoder:DecoderTrainer",
    "unet": "samliverseg.training.unet:UNetTrainer",
    "adapter": "samliverseg.training.adapter:AdapterTrainer",
    "student": "samliverseg.training.student:StudentTrainer",
    "semi": "samliverseg.training.semi.trainer:SemiTrainer",
}


def build_trainer(cfg, progress: ProgressWriter, rank: int = 0):
    import importlib
    module, _, cls = TRAINERS.get(cfg.kind, ":").partition(":")
    try:
        trainer_cls = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError):
        raise SAMLiverSegError(f"trainer kind {cfg.kind!r} is not available in this installation") from None
    return trainer_cls(cfg, progress=progress, rank=rank)


def register_result(cfg, result, progress: ProgressWriter) -> Optional[str]:
    """Register a finished run's ``model.pth`` in the user models folder (``user_models.py``).

    Name: ``cfg.model_name``, else the run folder's name (made valid: other characters than
    letters, digits, ``-_.`` become ``-``; a built-in model's name gets ``-trained``). A model of
    that name registered from
    this same file (a re-run or a resumed run) is replaced; one from another run is kept and this
    model gets the first free ``NAME-2``, ``NAME-3``, ... . A failure to register is logged and
    does not fail the (finished) training. Returns the name, or None.
    """
    from pathlib import Path

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


def _oom_kind(exc: BaseException) -> Optional[str]:
    """'cuda' / 'cpu' when ``exc`` is an out-of-memory error of that device, else None.

    torch's CPU allocator raises a RuntimeError ("DefaultCPUAllocator: can't allocate memory"),
    not a MemoryError; CUDA raises torch.cuda.OutOfMemoryError (a RuntimeError)."""
    oom = getattr(__import__("torch").cuda, "OutOfMemoryError", None)
    text = str(exc)
    if (oom is not None and isinstance(exc, oom)) or "CUDA out of memory" in text:
        return "cuda"
    if isinstance(exc, MemoryError) or "can't allocate memory" in text or "DefaultCPUAllocator" in text:
        return "cpu"
    return None


def _is_oom(exc: BaseException) -> bool:
    return _oom_kind(exc) is not None


OOM_ADVICE = ("lower batch_size (unet: batch_cases, num_samples or patch_size; decoder/adapter: "
              "max_slices_per_case), or use amp: true on a GPU")


def run_train(args: argparse.Namespace) -> int:
    from samliverseg.training.config import load_config

    from samliverseg.training import distributed
    rank = distributed.env_info().rank
    progress = ProgressWriter(rank=rank)
    stop = threading.Event()

    def _on_signal(signum, frame):  # finish the step, then checkpoint and exit 130
        if not stop.is_set():
            progress.log(f"received {signal.Signals(signum).name}: stopping after the current step")
        stop.set()

    old = {}
    if threading.current_thread() is threading.main_thread():
        # SIGBREAK: what a Windows process manager can send to a process group (CTRL_BREAK_EVENT)
        for sig in (signal.SIGTERM, signal.SIGINT) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ()):
            old[sig] = signal.signal(sig, _on_signal)
    try:
        from pathlib import Path
        out = getattr(args, "output", None)
        cfg = load_config(args.config, {"output": str(Path(out).expanduser().resolve()) if out else None})
        progress.set_log_path(Path(cfg.output).expanduser() / "train.log")
        distributed.setup(cfg.device)
        trainer = build_trainer(cfg, progress, rank)
        result = trainer.run(resume=bool(getattr(args, "resume", False)), cancel=stop.is_set)
        if rank == 0:
            register_result(cfg, result, progress)
        return EXIT_OK
    except CancelledError:
        return EXIT_CANCELLED  # the trainer has emitted `cancelled`
    except SAMLiverSegError as exc:
        msg = str(exc)
        progress.log(f"error: {msg}")
        progress.emit("error", message=msg, exit_code=exc.exit_code)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - reported as an event, never a silent crash
        kind = _oom_kind(exc)
        if kind is not None:
            where = "CUDA out of memory" if kind == "cuda" else "out of memory (CPU RAM)"
            msg = f"{where}: {OOM_ADVICE}; the last checkpoint (if any) is unchanged, continue with --resume"
            progress.log(f"error: {msg}")
            progress.emit("error", message=msg, exit_code=EXIT_OOM)
            return EXIT_OOM
        progress.log("unexpected error:\n" + traceback.format_exc())
        progress.emit("error", message=f"{type(exc).__name__}: {exc}", exit_code=EXIT_UNEXPECTED)
        return EXIT_UNEXPECTED
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        distributed.cleanup()


def main(argv: Optional[List[str]] = None) -> int:
    parser = add_train_arguments(argparse.ArgumentParser(prog="samliverseg train",
                                                         description="train a model on a prepared cache"))
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
