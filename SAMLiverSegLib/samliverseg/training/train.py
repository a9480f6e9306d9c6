"""``samliverseg train --config CONFIG.yaml [--resume | --overwrite] [--output DIR]``.

Builds the trainer of the config's ``kind`` (``models.kinds``: a :class:`.base.Trainer`), runs it and reports progress as JSON lines on stdout (:mod:`.progress`); logs go to stderr and to
``OUTPUT/train.log``.

The run folder (``OUTPUT``, :mod:`.runfolder`): a folder that holds a finished run (``model.pth``)
or a started one (``last.pt``/``best.pt``) is refused (exit 2, nothing touched) unless ``--resume``
(continue it) or ``--overwrite`` (remove its checkpoints and model, then start over) is given. The
trainer holds an OS lock on ``OUTPUT/.lock`` (its PID and host inside) while it runs: a second
trainer in the same folder is refused (exit 2); the lock of a killed trainer does not block.
``--resume`` starts from the newest complete checkpoint (``last.pt``, else ``best.pt`` when it holds
the same or a later step) and removes temporary files a killed write left behind. A resume may
change ``epochs``, ``lr`` (unet: ``unet.lr``), ``device``, ``output`` and ``model_name`` (applied
from the resumed step on, logged); any other change of the config is refused (exit 3).

Stopping: SIGTERM or SIGINT, or a file named ``STOP`` created in ``OUTPUT`` (what the Slicer
module does: a signal to its launcher may not reach this process), lets the current optimiser step
finish, then ``last.pt`` is written atomically, a ``cancelled`` event is printed and the process
exits with code 130 (the STOP file is removed). The STOP file is checked after every optimiser step
and during the data preparation and the embedding precompute (embeddings already computed are
kept and reused). A STOP file left from before is removed when a run starts. Run again with
``--resume`` to continue; a run killed outright (SIGKILL, power loss) continues the same way from
its last checkpoint and reaches the same weights as an uninterrupted run.

Exit codes:

====  ==========================================================================
0     done (``done`` event)
2     bad input: config (unknown key, bad value), cache, model name, a run folder that holds a
      run (without --resume/--overwrite) or is in use by another trainer (``error`` event)
3     checkpoint problem: unreadable/incompatible resume checkpoint, a config change a resume
      cannot apply, base weights missing, a checkpoint or embeddings file that cannot be
      written ("disk full: ...", the previous checkpoint unchanged) (``error`` event)
4     out of memory, GPU or CPU RAM (``error`` event suggests a smaller batch or patch)
130   cancelled by SIGTERM/SIGINT or OUTPUT/STOP (``cancelled`` event; state saved in ``last.pt``)
70    an unexpected error (``error`` event with the exception's text; the traceback is logged)
====  ==========================================================================
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
import traceback
from typing import List, Optional

from samliverseg.core.errors import (EXIT_OUT_OF_MEMORY, EXIT_UNEXPECTED, CancelledError, CheckpointError,
                                     SAMLiverSegError, out_of_memory_kind)
from samliverseg.models.kinds import KINDS
from samliverseg.training.base import register_result
from samliverseg.core.errors import is_disk_full
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
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in OUTPUT from its newest complete checkpoint (last.pt, else best.pt)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an OUTPUT that holds a run: its last.pt, best.pt and model.pth are removed")
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
    from pathlib import Path
    cfg = None
    trainer = None
    agreed = False  # every rank ends here at the same step: done, or stopped by the cancel vote
    try:
        out = getattr(args, "output", None)
        cfg = load_config(args.config, {"output": str(Path(out).expanduser().resolve()) if out else None})
        distributed.setup(cfg.device)
        trainer = build_trainer(cfg, progress, rank)
        trainer.run(resume=bool(getattr(args, "resume", False)), cancel=stop.is_set, register=True,
                    overwrite=bool(getattr(args, "overwrite", False)))
        agreed = True
        return EXIT_OK
    except CancelledError:
        agreed = trainer is not None
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
        folder = Path(cfg.output).expanduser() if cfg is not None else None
        if is_disk_full(exc, folder if folder is not None and folder.is_dir() else None):
            msg = (f"disk full: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} while writing "
                   f"in {folder}; the last checkpoint (if any) is unchanged: free some space and continue with --resume")
            progress.log(f"error: {msg}")
            progress.emit("error", message=msg, exit_code=CheckpointError.exit_code)
            return CheckpointError.exit_code
        progress.log("unexpected error:\n" + traceback.format_exc())
        progress.emit("error", message=f"{type(exc).__name__}: {exc}", exit_code=EXIT_UNEXPECTED)
        return EXIT_UNEXPECTED
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        # The trainer (its DDP module and reducer hold the process group) goes first, while the group
        # and the interpreter are alive, not during interpreter shutdown after the group is gone.
        trainer = None
        gc.collect()
        distributed.cleanup(agreed=agreed)


def main(argv: Optional[List[str]] = None) -> int:
    parser = add_train_arguments(argparse.ArgumentParser(prog="samliverseg train",
                                                         description="train a model on a prepared cache"))
    return run_train(parser.parse_args(argv))


__all__ = ["EXIT_UNEXPECTED", "add_train_arguments", "build_trainer", "main", "register_result", "run_train"]


if __name__ == "__main__":
    sys.exit(main())
