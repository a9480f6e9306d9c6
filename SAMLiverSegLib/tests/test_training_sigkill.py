"""Exact resume after SIGKILL, for every trainer kind (issue 12).

For each kind of ``models.kinds`` (tiny configs, ``libtest_helpers.tiny_config``: 2 epochs of 2-3
optimiser steps) a real ``samliverseg train`` process is killed with SIGKILL twice and resumed with
``--resume`` each time; the final checkpoint must equal, bit for bit, the one of an uninterrupted
run of the same config (weights, optimiser / scheduler / scaler / EMA state, step counters, RNG
states, the loss and Dice history):

1. killed as soon as it reports ``best.pt`` written at the end of epoch 1: the kill lands while
   ``last.pt`` is being prepared or written (or just after), so ``last.pt`` may be missing: the
   resume must start from ``best.pt``, which holds the same step;
2. before the second resume a partial ``.last.pt.*.tmp`` (the first half of a real checkpoint: what
   a kill inside ``torch.save`` leaves) lies in the folder: it must not block, and is removed;
3. killed after the first optimiser step of epoch 2 (mid-epoch): the resume replays epoch 2 from
   the epoch-1 checkpoint; the data order, augmentation and prompt draws come from the checkpointed
   RNG states and (epoch, position)-seeded generators, so the replay is exact (the last resume runs
   in the test process, through the same ``Trainer.run``, to save a process start-up).

No tolerance is needed: on one CPU thread every operation is deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch

from libtest_helpers import TINY, TINY_SPEC, tiny_config, tiny_config_dict, tiny_sam_command, writer
from samliverseg.models.kinds import KIND_NAMES, KINDS, resolve
from samliverseg.training import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
#: Entries of a checkpoint that name the run (paths), not its state.
NOT_STATE = ("config", "metadata")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def env(tmp: Path) -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                SAMLIVERSEG_MODELS=str(tmp / "models"))


def train_cmd(cfg: Path, *args: str) -> List[str]:
    return tiny_sam_command("train", TINY, "--config", cfg, *args, **TINY_SPEC)


def kill_when(cmd: List[str], env: Dict[str, str], when: Callable[[Dict[str, Any]], bool],
              timeout: float = 300) -> Tuple[List[Dict[str, Any]], str]:
    """Run ``cmd``; SIGKILL it as soon as it prints a progress event for which ``when`` is true.
    Returns the events it printed and its stderr; fails if it ended before."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    events: List[Dict[str, Any]] = []
    killed = False
    try:
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            events.append(json.loads(line))
            if when(events[-1]):
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed, f"the run ended before the kill point: {[e['event'] for e in events]}\n{err[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    return events, err


def same(a: Any, b: Any, where: str = "") -> List[str]:
    """Where two checkpoint values differ (tensors bit for bit, floats exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b), key=str)[:5]}"]
        return [d for k in a for d in same(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{where}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        return [] if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else [where]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b) else [where]
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return []
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def state(folder: Path) -> Dict[str, Any]:
    c = ck.load_checkpoint(folder / ck.LAST_NAME)
    return {k: v for k, v in c.items() if k not in NOT_STATE}


@pytest.mark.slow  # 2 training processes + 2 runs in-process per kind: 20-60 s each on 2 shared cores
@pytest.mark.parametrize("kind", KIND_NAMES)
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_run(kind, phantom_cache, tmp_path):
    straight = resolve(KINDS[kind].trainer)(tiny_config(kind, phantom_cache, tmp_path / "a"), progress=writer()[0])
    res = straight.run()
    steps_per_epoch = [h["step"] for h in res["history"]]
    assert len(steps_per_epoch) == 2 and steps_per_epoch[0] >= 2, steps_per_epoch

    run = tmp_path / "b"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(tiny_config_dict(kind, phantom_cache, run)))
    e = env(tmp_path)

    # 1. killed right after best.pt of epoch 1 is written: inside (or around) the write of last.pt
    events, _ = kill_when(train_cmd(cfg), e, lambda ev: ev["event"] == "checkpoint" and ev.get("which") == "best")
    assert events[-1]["epoch"] == 1 and ck.load_checkpoint(run / ck.BEST_NAME)["step"] == steps_per_epoch[0]
    if (run / ck.LAST_NAME).exists():  # the kill came after the write: make it the kill inside it
        (run / ck.LAST_NAME).unlink()

    # 2. what a kill inside torch.save leaves: a partial temporary file beside the checkpoints
    partial = run / ".last.pt.k1ll3d.tmp.pt"
    data = (run / ck.BEST_NAME).read_bytes()
    partial.write_bytes(data[: len(data) // 2])

    # 3. resumed (from best.pt), killed after the first optimiser step of epoch 2
    events, err = kill_when(train_cmd(cfg, "--resume"), e, lambda ev: ev["event"] == "step" and ev["epoch"] == 1)
    assert events[0]["event"] == "start" and events[0]["resumed"] is True, err[-2000:]
    assert events[0]["step"] == steps_per_epoch[0]
    assert not partial.exists()
    assert "best.pt" in err  # resumed from best.pt (the log line names it)

    # 4. resumed again (from last.pt of epoch 1), to the end (in this process: one start-up less)
    pw, out = writer()
    res2 = resolve(KINDS[kind].trainer)(tiny_config(kind, phantom_cache, run), progress=pw).run(resume=True)
    final = out.events()
    assert final[0]["resumed"] is True and final[0]["step"] == steps_per_epoch[0]
    assert final[-1]["event"] == "done" and res2["step"] == steps_per_epoch[1]

    a, b = state(tmp_path / "a"), state(run)
    diff = same(a, b)
    assert not diff, diff[:5]
    assert [h["train_loss"] for h in b["history"]] == [h["train_loss"] for h in res["history"]]
    init = resolve(KINDS[kind].trainer)(tiny_config(kind, phantom_cache, tmp_path / "c"), progress=writer()[0])
    assert same(init.trainable_state(), a["model"])  # training changed the weights: the comparison can fail
