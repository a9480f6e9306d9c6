"""Training run folders (issue 12): a folder that holds a run is never overwritten silently, one
trainer per folder (an OS lock), the STOP file, the rules for a config changed on resume, and a full
disk during training.

All real: ``samliverseg train`` in this process (``training.train.main``) or in a subprocess
(``libtest_helpers.tiny_sam_command``), the tiny random-weight SAM, a phantom cache, real locks held
by real processes, a real small disk (``libtest_helpers.run_on_small_disk``: a tmpfs in a private
user+mount namespace).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import signal
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest

from libtest_helpers import TINY, TINY_SPEC, run_on_small_disk, tiny_config, tiny_config_dict, tiny_sam_command, writer
from samliverseg.core.atomic import is_temp_name
from samliverseg.core.errors import CancelledError, CheckpointError
from samliverseg.training import checkpoint as ck
from samliverseg.training import runfolder as rf
from samliverseg.training.decoder import DecoderTrainer
from samliverseg.training.progress import read_events
from samliverseg.training.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def user_models(tmp_path, monkeypatch):
    """`train` registers the finished model in $SAMLIVERSEG_MODELS: a temporary folder."""
    monkeypatch.setenv("SAMLIVERSEG_MODELS", str(tmp_path / "models"))


def config(cache: Dict[str, Any], out: Path, path: Path, **over: Any) -> Path:
    path.write_text(json.dumps(tiny_config_dict("decoder", cache, out, **over)))  # JSON is YAML
    return path


def snapshot(folder: Path) -> Dict[str, Any]:
    """Every file below ``folder``: (SHA-256, mtime)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_of(capsys) -> Dict[str, Any]:
    cap = capsys.readouterr()
    ev = read_events(cap.out)
    assert ev and ev[-1]["event"] == "error", cap.out[-2000:]
    assert "\n" not in ev[-1]["message"] and "Traceback" not in cap.err
    return ev[-1]


def env(tmp: Path) -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                SAMLIVERSEG_MODELS=str(tmp / "models"))


def train_cmd(cfg: Path, *args: str) -> List[str]:
    return tiny_sam_command("train", TINY, "--config", cfg, *args, **TINY_SPEC)


# ------------------------------------------------------------------------------- a folder that holds a run
def test_a_folder_that_holds_a_run_is_refused_without_resume_or_overwrite(phantom_cache, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = config(phantom_cache, run, tmp_path / "c.yaml", epochs=1)
    assert train_main(["--config", str(cfg)]) == 0
    capsys.readouterr()
    before = snapshot(run)
    assert {"last.pt", "best.pt", "model.pth", "train.log"} <= set(before)

    assert train_main(["--config", str(cfg)]) == 2  # a finished run
    ev = error_of(capsys)
    assert ev["exit_code"] == 2 and "finished run" in ev["message"] and "--resume" in ev["message"]
    assert "--overwrite" in ev["message"]
    assert snapshot(run) == before  # nothing touched, not even train.log

    assert train_main(["--config", str(cfg), "--resume", "--overwrite"]) == 2
    assert "exclude each other" in error_of(capsys)["message"]
    assert snapshot(run) == before

    # a started run (cancelled: last.pt and best.pt, no model.pth) is refused the same way
    started = tmp_path / "started"
    t = DecoderTrainer(tiny_config("decoder", phantom_cache, started), progress=writer()[0])
    with pytest.raises(CancelledError):
        t.run(cancel=lambda: t.step >= 1)
    kept = snapshot(started)
    assert train_main(["--config", str(config(phantom_cache, started, tmp_path / "s.yaml"))]) == 2
    assert "started run" in error_of(capsys)["message"]
    assert snapshot(started) == kept

    # --overwrite starts over: the old checkpoints and model are replaced by the new run's
    assert train_main(["--config", str(cfg), "--overwrite"]) == 0
    after = snapshot(run)
    assert all(after[n][1] != before[n][1] for n in ("last.pt", "best.pt", "model.pth"))
    assert "--overwrite: removed" in (run / "train.log").read_text()


# ------------------------------------------------------------------------------- lock + STOP file
@pytest.mark.slow  # 2 training processes: 20-40 s on 2 shared cores
def test_one_trainer_per_folder_stop_file_and_a_dead_trainers_lock(phantom_cache, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = config(phantom_cache, run, tmp_path / "c.yaml", epochs=500)  # runs until stopped
    (run).mkdir()
    (run / rf.STOP_NAME).write_text("")  # left from before: removed at start, not a stop
    os.utime(run / rf.STOP_NAME, (time.time() - 60, time.time() - 60))
    proc = subprocess.Popen(train_cmd(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path))
    try:
        events = []
        for line in proc.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] == "step":
                break
        assert events[-1]["event"] == "step", proc.stderr.read()[-3000:]
        assert not (run / rf.STOP_NAME).exists()

        # a second trainer in the same folder is refused while the first runs, with or without --resume
        for extra in ([], ["--resume"]):
            assert train_main(["--config", str(cfg), *extra]) == 2
            msg = error_of(capsys)["message"]
            assert "in use by another trainer" in msg and f"PID {proc.pid} " in msg

        # the STOP file: the step ends, last.pt is written, `cancelled`, exit 130, the file is removed
        (run / rf.STOP_NAME).write_text("")
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    ev = read_events(rest)
    assert ev[-1]["event"] == "cancelled" and ev[-1]["exit_code"] == 130
    assert ck.load_checkpoint(run / ck.LAST_NAME)["step"] == ev[-1]["step"]
    assert not (run / rf.STOP_NAME).exists() and "STOP" in err

    # a trainer killed outright leaves its lock file: it does not block (the OS lock died with it)
    proc = subprocess.Popen(train_cmd(cfg, "--resume"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(tmp_path))
    for line in proc.stdout:
        if json.loads(line)["event"] == "step":
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (run / rf.LOCK_NAME).read_text().split()[0] == str(proc.pid)
    # ... and a resume may shorten the run (epochs is applied): it finishes this epoch and exports
    cfg1 = config(phantom_cache, run, tmp_path / "c1.yaml", epochs=1)
    capsys.readouterr()
    assert train_main(["--config", str(cfg1), "--resume"]) == 0
    out = read_events(capsys.readouterr().out)
    assert out[0]["resumed"] is True and out[-1]["event"] == "done" and (run / ck.MODEL_NAME).exists()
    assert (run / rf.LOCK_NAME).read_text() == ""  # released


def test_stop_file_during_the_embedding_precompute_keeps_what_was_computed(phantom_cache, tmp_path, capsys):
    run = tmp_path / "run"
    emb = run / "embeddings"
    stop = run / rf.STOP_NAME

    def gui_asks_to_stop_after_one_case() -> bool:  # what the Slicer module does: it creates OUTPUT/STOP
        if len(list(emb.glob("*.pt"))) >= 1 and not stop.exists():
            stop.write_text("")
        return False

    pw, out = writer()
    t = DecoderTrainer(tiny_config("decoder", phantom_cache, run), progress=pw)
    with pytest.raises(CancelledError, match="precomputing"):
        t.run(cancel=gui_asks_to_stop_after_one_case)
    assert out.events()[-1]["event"] == "cancelled" and out.events()[-1]["checkpoint"] is None
    assert not stop.exists()
    kept = {p.name: p.stat().st_mtime_ns for p in emb.glob("*.pt")}
    assert len(kept) == 1

    # no checkpoint yet: --resume says to start again; a new run reuses the computed embeddings
    assert train_main(["--config", str(config(phantom_cache, run, tmp_path / "c.yaml")), "--resume"]) == 3
    assert "without --resume" in error_of(capsys)["message"]
    res = DecoderTrainer(tiny_config("decoder", phantom_cache, run), progress=writer()[0]).run()
    assert res["status"] == "done"
    assert {n: (emb / n).stat().st_mtime_ns for n in kept} == kept  # not recomputed
    assert len(list(emb.glob("*.pt"))) > 1 and "loaded from" in (run / "train.log").read_text()


# ------------------------------------------------------------------------------- config changed on resume
def test_config_change_on_resume_is_applied_or_refused(phantom_cache, tmp_path, capsys):
    run = tmp_path / "run"
    t = DecoderTrainer(tiny_config("decoder", phantom_cache, run, scheduler="cosine"), progress=writer()[0])
    with pytest.raises(CancelledError):
        t.run(cancel=lambda: t.step >= 1)
    kept = snapshot(run)

    # refused: anything that makes it another run (exit 3, named, nothing touched)
    for key, value in (("batch_size", 2), ("seed", 6), ("weight_decay", 0.1), ("max_slices_per_case", 2)):
        cfg = config(phantom_cache, run, tmp_path / f"{key}.yaml", scheduler="cosine", **{key: value})
        assert train_main(["--config", str(cfg), "--resume"]) == 3
        ev = error_of(capsys)
        assert ev["exit_code"] == 3 and f"{key} changed" in ev["message"], ev["message"]
        assert snapshot(run) == kept

    # applied: lr (scaled from the resumed step on) and epochs (the cosine is stretched to the new end)
    old_lr = ck.load_checkpoint(run / ck.LAST_NAME)["optimizer"]["param_groups"][0]["lr"]
    pw, out = writer()
    r = DecoderTrainer(tiny_config("decoder", phantom_cache, run, scheduler="cosine", lr=4e-3, epochs=3),
                       progress=pw).run(resume=True)
    steps = [e for e in out.events() if e["event"] == "step"]
    assert steps[0]["step"] == 2
    last = ck.load_checkpoint(run / ck.LAST_NAME)
    assert last["scheduler"]["T_max"] == r["step"] and last["scheduler"]["base_lrs"] == [pytest.approx(4e-3)]
    # the old schedule: a cosine over the 2 epochs' steps; after the resume the rate is twice the old one
    # and the cosine (chainable form: lr_s = lr_{s-1} (1 + cos(pi s/T)) / (1 + cos(pi (s-1)/T))) runs to the new end
    T_old, T = t.total_steps(), r["step"]
    assert T == T_old * 3 // 2 and old_lr == pytest.approx(2e-3 * (1 + math.cos(math.pi / T_old)) / 2)
    assert steps[0]["lr"] == pytest.approx(2 * old_lr * (1 + math.cos(math.pi * 2 / T)) / (1 + math.cos(math.pi / T)))
    assert steps[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    log = (run / "train.log").read_text()
    assert "resume: lr changed (0.002 -> 0.004)" in log and "resume: epochs changed (2 -> 3)" in log


# ------------------------------------------------------------------------------- full disk
def test_disk_full_during_training_exit_3_previous_checkpoint_intact(phantom_cache, tmp_path):
    seed = tmp_path / "seed"
    run = seed / "run"
    assert train_main(["--config", str(config(phantom_cache, run, tmp_path / "c1.yaml", epochs=1))]) == 0
    before = snapshot(run)
    used_kb = sum(-(-p.stat().st_size // 4096) * 4 for p in run.rglob("*") if p.is_file())
    ckpt_kb = (run / ck.LAST_NAME).stat().st_size // 1024
    disk = tmp_path / "disk"
    cfg = config(phantom_cache, disk / "run", tmp_path / "c2.yaml", epochs=2)
    # room for the previous run, its log and lock, and a third of one more checkpoint
    done, after = run_on_small_disk(train_cmd(cfg, "--resume"), disk, used_kb + 16 + ckpt_kb // 3, env=env(tmp_path),
                                    seed=seed, timeout=300)
    ev = read_events(done.stdout)
    assert done.returncode == 3, done.stderr[-3000:]
    assert ev[0]["event"] == "start" and ev[0]["resumed"] is True
    assert ev[-1]["event"] == "error" and ev[-1]["exit_code"] == 3
    assert ev[-1]["message"].startswith("disk full") and "\n" not in ev[-1]["message"]
    assert "unchanged" in ev[-1]["message"] and "Traceback" not in done.stderr
    now = snapshot(after / "run")
    for name in ("last.pt", "best.pt", "model.pth"):
        assert now[name][0] == before[name][0], name  # the previous checkpoints, byte for byte
    assert not [n for n in now if is_temp_name(n)]  # no partial file left behind


@pytest.mark.slow  # a real 2-process gloo run: 20-40 s on 2 shared cores
def test_stop_file_stops_every_rank_after_the_same_step(phantom_cache, tmp_path):
    """Two gloo ranks (as torchrun starts them): the STOP file stops both after the same step, rank 0
    writes last.pt and removes the file, both exit 130."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    cfg = config(phantom_cache, run, tmp_path / "c.yaml", epochs=500)
    base = dict(env(tmp_path), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [subprocess.Popen(train_cmd(cfg), env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        events = []
        for line in procs[0].stdout:
            events.append(json.loads(line))
            if events[-1]["event"] == "step":
                (run / rf.STOP_NAME).write_text("")
                break
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [130, 130], outs[0][1][-2000:] + outs[1][1][-2000:]
    ev = events + read_events(outs[0][0])
    assert ev[-1]["event"] == "cancelled" and ev[-1]["exit_code"] == 130
    assert ck.load_checkpoint(run / ck.LAST_NAME)["step"] == ev[-1]["step"]
    assert not (run / rf.STOP_NAME).exists()


def test_resume_skips_a_damaged_last_pt_for_a_complete_best_pt(phantom_cache, tmp_path):
    run = tmp_path / "run"
    t = DecoderTrainer(tiny_config("decoder", phantom_cache, run), progress=writer()[0])
    with pytest.raises(CancelledError):  # after the first step of epoch 2
        t.run(cancel=lambda: t.epoch >= 1 and t.batch_in_epoch >= 1)
    per_epoch = ck.load_checkpoint(run / ck.BEST_NAME)["step"]
    assert ck.load_checkpoint(run / ck.LAST_NAME)["step"] == per_epoch + 1
    data = (run / ck.LAST_NAME).read_bytes()
    (run / ck.LAST_NAME).write_bytes(data[: len(data) // 3])  # damaged on disk (not by our atomic writes)
    pw, out = writer()
    res = DecoderTrainer(tiny_config("decoder", phantom_cache, run), progress=pw).run(resume=True)
    assert out.events()[0]["resumed"] is True and out.events()[0]["step"] == per_epoch
    assert res["step"] == 2 * per_epoch
    assert "resuming from the other checkpoint" in (run / "train.log").read_text()
    # neither readable: refused with exit 3, naming the problem
    for name in (ck.LAST_NAME, ck.BEST_NAME):
        (run / name).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        DecoderTrainer(tiny_config("decoder", phantom_cache, run), progress=writer()[0]).run(resume=True)
