"""``samliverseg train --config CONFIG.yaml [--resume] [--output DIR]``.

Builds the trainer of the config's ``kind`` (``models.kinds``: a :class:`.base.Trainer`), runs it and reports progress as JSON lines on stdout (:mod:`.progress`); logs go to stderr and to
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
70    an unexpected error (``error`` event with the exception's text; the traceback is logged)
====  ==========================================================================
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from typing import List, Optional

from samliverseg.core.errors import (EXIT_OUT_OF_MEMORY, EXIT_UNEXPECTED, CancelledError, SAMLiverSegError,
                                     out_of_memory_kind)
from samliverseg.models.kinds import KINDS
from samliverseg.training.base import register_result
from samliverseg.training.progress import ProgressWriter

EXIT_OK = 0
EXIT_CANCELLED = CancelledError.exit_code  # 130


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train`` options; ``--help`` ends with the kinds and every config key with its default
    (``config.describe_keys``, generated when the help is shown: it imports every trainer)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    plain_help = parser.format_help

    def format_help() -> str:
        from samliverseg.training.config import describe_keys
        parser.epilog = describe_keys()
        return plain_help()

    parser.format_help = format_help  # type: ignore[method-assign]
    parser.add_argument("--config", help="the training config (YAML; the keys are listed below)")
    parser.add_argument("--resume", action="store_true", help="continue the run from OUTPUT/last.pt")
    parser.add_argument("--output", default=None, help="the run folder (overrides the config's `output`)")
    parser.add_argument("--example-config", metavar="KIND", choices=tuple(KINDS), default=None,
                        help="print a commented example config of trainer kind KIND and exit "
                             f"({', '.join(KINDS)})")
    return parser


def build_trainer(cfg, progress: ProgressWriter, rank: int = 0):
    """The :class:`.base.Trainer` of ``cfg.kind`` (``models.kinds``: kind -> trainer class)."""
    from samliverseg.models.kinds import get_kind, resolve
    try:
        trainer_cls = resolve(get_kind(cfg.kind).trainer)
    except (KeyError, ImportError, AttributeError, ValueError):
        raise SAMLiverSegError(f"trainer kind {cfg.kind!r} is not available in this installation") from None
    return trainer_cls(cfg, progress=progress, rank=rank)


OOM_ADVICE = ("lower batch_size (unet: batch_cases, num_samples or patch_size; decoder/adapter: "
              "max_slices_per_case), or use amp: true on a GPU")


def run_train(args: argparse.Namespace) -> int:
    from samliverseg.training.config import example_config, load_config

    if getattr(args, "example_config", None):
        sys.stdout.write(example_config(args.example_config))
        return EXIT_OK
    if not getattr(args, "config", None):
        msg = "--config CONFIG.yaml is required (see --example-config KIND)"
        ProgressWriter().emit("error", message=msg, exit_code=2)
        print(f"error: {msg}", file=sys.stderr)
        return 2

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
        trainer.run(resume=bool(getattr(args, "resume", False)), cancel=stop.is_set, register=True)
        return EXIT_OK
    except CancelledError:
        return EXIT_CANCELLED  # the trainer has emitted `cancelled`
    except SAMLiverSegError as exc:
        msg = str(exc)
        progress.log(f"error: {msg}")
        progress.emit("error", message=msg, exit_code=exc.exit_code)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - reported as an event, never a silent crash
        kind = out_of_memory_kind(exc)
        if kind is not None:
            where = "CUDA out of memory" if kind == "cuda" else "out of memory (CPU RAM)"
            msg = f"{where}: {OOM_ADVICE}; the last checkpoint (if any) is unchanged, continue with --resume"
            progress.log(f"error: {msg}")
            progress.emit("error", message=msg, exit_code=EXIT_OUT_OF_MEMORY)
            return EXIT_OUT_OF_MEMORY
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


__all__ = ["EXIT_UNEXPECTED", "add_train_arguments", "build_trainer", "main", "register_result", "run_train"]


if __name__ == "__main__":
    sys.exit(main())
