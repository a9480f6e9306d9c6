"""The training progress protocol: one JSON object per line on stdout, human logs on stderr.

Every progress line is a JSON object with at least::

    {"event": "<name>", "time": <unix seconds>, "epoch": <int>, "step": <int>,
     "total_steps": <int|null>, "eta_s": <float|null>, ...event fields}

Events (``EVENTS``) and their extra fields:

* ``start``: ``kind``, ``output``, ``device``, ``epochs``, ``resumed``, ``world_size`` and what the
  trainer trains on (``base_model``, ``train_slices``/``val_slices`` for the slice trainers;
  ``train_cases``/``val_cases``, ``two_stage``, ``patches_per_step`` for ``unet``);
* ``step``: ``loss``, ``lr``, ``samples_per_s`` (one line per optimiser step; ``semi`` adds its
  loss terms, ``lambda``/``beta`` and the confident-voxel fraction);
* ``epoch``: ``losses`` (``{"train": mean loss of the epoch}``), ``lr``;
* ``validation``: ``dice`` (mean 2D Dice on the val slices), ``best_dice``, ``is_best``;
* ``checkpoint``: ``path``, ``which`` (``"last"`` | ``"best"`` | ``"model"``);
* ``done``: ``best_dice``, ``model``, ``last``, ``best``;
* ``error``: ``message``, ``exit_code``;
* ``cancelled``: ``checkpoint`` (the path saved, or null), ``exit_code``.

``epoch`` is 0-based and is the epoch in progress (``epochs`` when finished); ``step`` counts the
optimiser steps done so far. ``eta_s`` is estimated from the mean time per step measured in this
process (null before the first step). Only rank 0 writes (``rank`` argument); other ranks' writers
are silent. Logs (``log()``) go to stderr and to ``log_path`` (appended) when given.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO, Union

from samliverseg.core.jsonutil import dumps

EVENTS = ("start", "step", "epoch", "validation", "checkpoint", "done", "error", "cancelled")


class ProgressWriter:
    """Writes progress events (JSON lines) and human logs; silent on ranks other than 0."""

    def __init__(self, stream: Optional[TextIO] = None, log_path: Optional[Union[str, Path]] = None,
                 rank: int = 0, total_steps: Optional[int] = None, err_stream: Optional[TextIO] = None):
        self.stream = stream if stream is not None else sys.stdout
        self.err_stream = err_stream if err_stream is not None else sys.stderr
        self.rank = int(rank)
        self.enabled = self.rank == 0
        self.total_steps = total_steps
        self.log_path = Path(log_path) if log_path is not None else None
        self._t0: Optional[float] = None
        self._step0 = 0
        self.epoch = 0
        self.step = 0

    def set_log_path(self, path: Union[str, Path]) -> None:
        self.log_path = Path(path)

    def mark_start(self, step: int) -> None:
        """Start the ETA clock at ``step`` (the first step this process will do)."""
        self._t0 = time.monotonic()
        self._step0 = int(step)

    def eta_s(self) -> Optional[float]:
        if self._t0 is None or self.total_steps is None or self.step <= self._step0:
            return None
        per_step = (time.monotonic() - self._t0) / (self.step - self._step0)
        return round(max(0, self.total_steps - self.step) * per_step, 1)

    def emit(self, event: str, epoch: Optional[int] = None, step: Optional[int] = None, **fields: Any) -> Optional[dict]:
        if event not in EVENTS:
            raise ValueError(f"unknown progress event {event!r}")
        if epoch is not None:
            self.epoch = int(epoch)
        if step is not None:
            self.step = int(step)
        if not self.enabled:
            return None
        record = {"event": event, "time": round(time.time(), 3), "epoch": self.epoch, "step": self.step,
                  "total_steps": self.total_steps, "eta_s": 0.0 if event == "done" else self.eta_s()}
        record.update(fields)
        try:
            self.stream.write(dumps(record, indent=None) + "\n")  # NaN/inf -> null, numpy/torch -> python
            self.stream.flush()
        except (OSError, ValueError):  # the reader went away (e.g. Slicer quit): keep training/saving
            pass
        return record

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        try:
            self.err_stream.write(line + "\n")
            self.err_stream.flush()
        except (OSError, ValueError):
            pass
        if self.log_path is not None:
            try:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError:
                pass


def read_events(text: str) -> list:
    """Parse progress lines (non-JSON lines are ignored): for tests and process managers."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out
