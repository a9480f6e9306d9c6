"""Decoder fine-tuning trainer: progress protocol, checkpoints, config, resume, signals.

Real runs (no mocks) on a tiny random-weight SAM registered for the test and a cache of three
phantom cases; one short real run with lite_medsam when its weights are installed.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from libtest_helpers import (Lines, make_phantom_cache, phantom_caches_in_two_orders, save_tiny_sam,
                             sigterm_after_first_step, tiny_sam_command, tiny_sam_fixture, writer)
from samliverseg.models.build_sam import build_model, find_model_checkpoint
from samliverseg.core.errors import CancelledError, CheckpointError, InputError
from samliverseg.training import checkpoint as ck
from samliverseg.training.config import TrainConfig, config_from_dict, load_config
from samliverseg.training.decoder import DecoderTrainer, select_slices
from samliverseg.training.progress import ProgressWriter, read_events
from samliverseg.training.train import main as train_main

TINY = "tiny_test_sam"
ROOT = Path(__file__).resolve().parents[1]


tiny_model = tiny_sam_fixture(TINY)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    m = make_phantom_cache(root, 3, (12, 64, 64), (3.0, 3.0, 5.0), val_fraction=0.34, seed=0)
    assert m["summary"]["train"] >= 1 and m["summary"]["val"] >= 1
    weights = save_tiny_sam(root / "tiny_test_sam.pth", seed=123)
    return {"cache": root / "cache", "weights": weights}


def tiny_cfg(cache, out, **kw):
    d = dict(cache=str(cache["cache"]), output=str(out), base_model=TINY, checkpoint=str(cache["weights"]),
             epochs=2, batch_size=2, lr=1e-3, box_jitter_px=3, points_per_slice=1, max_slices_per_case=3,
             seed=7, device="cpu", scheduler="cosine")
    d.update(kw)
    return config_from_dict(d)


# ------------------------------------------------------------------------------- progress
def test_progress_lines_and_rank(tmp_path):
    out, err = Lines(), Lines()
    pw = ProgressWriter(stream=out, err_stream=err, log_path=tmp_path / "x.log", total_steps=10)
    pw.mark_start(0)
    pw.emit("start", 0, 0)
    pw.emit("step", 0, 1, loss=float("nan"), lr=1e-3)
    pw.log("hello")
    ev = out.events()
    assert [e["event"] for e in ev] == ["start", "step"]
    assert all({"epoch", "step", "eta_s"} <= set(e) for e in ev)
    assert ev[1]["loss"] is None and ev[1]["eta_s"] is not None
    assert "hello" in (tmp_path / "x.log").read_text() and "hello" in "".join(err.buf)
    assert all(line.startswith("{") for line in "".join(out.buf).splitlines())  # logs never on stdout
    with pytest.raises(ValueError):
        pw.emit("bogus")
    silent_out = Lines()
    ProgressWriter(stream=silent_out, err_stream=Lines(), rank=1).emit("start", 0, 0)
    assert silent_out.buf == []


# ------------------------------------------------------------------------------- checkpoint
def _ckpt(value):
    return {"format": ck.FORMAT, "version": 1, "config": {"kind": "decoder", "base_model": "m"},
            "trainable_keys": ["mask_decoder.w"], "model": {"mask_decoder.w": torch.full((4,), float(value))}}


def test_checkpoint_atomic_full_disk_keeps_previous(tmp_path):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(_ckpt(1), path)

    def to_dev_full(obj, f):  # a real ENOSPC: serialise into /dev/full
        with open("/dev/full", "wb") as g:
            torch.save(obj, g)
            g.flush()

    with pytest.raises(CheckpointError, match="disk is full"):
        ck.save_checkpoint(_ckpt(2), path, writer=to_dev_full)
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temporary file left
    assert torch.equal(ck.load_checkpoint(path)["model"]["mask_decoder.w"], torch.ones(4))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_checkpoint_read_only_folder(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    ck.save_checkpoint(_ckpt(1), d / "last.pt")
    d.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="cannot write"):
            ck.save_checkpoint(_ckpt(2), d / "last.pt")
    finally:
        d.chmod(0o755)
    assert torch.equal(ck.load_checkpoint(d / "last.pt")["model"]["mask_decoder.w"], torch.ones(4))


def test_checkpoint_resume_checks(tmp_path):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(_ckpt(1), path)
    assert ck.load_for_resume(path, {"kind": "decoder", "base_model": "m"}, ["mask_decoder.w"])
    with pytest.raises(CheckpointError, match="base_model"):
        ck.load_for_resume(path, {"kind": "decoder", "base_model": "other"})
    with pytest.raises(CheckpointError, match="trainable parameters"):
        ck.load_for_resume(path, {"kind": "decoder", "base_model": "m"}, ["mask_decoder.w", "prompt_encoder.x"])
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="not a readable"):
        ck.load_checkpoint(tmp_path / "trunc.pt")


# ------------------------------------------------------------------------------- config
def test_config_yaml_unknown_key_and_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("cache: c\noutput: runs/o\nepochs: 3\nlr: 1e-3\ntarget: tumor\n")
    cfg = load_config(p, {"output": None})
    assert isinstance(cfg, TrainConfig) and cfg.epochs == 3 and cfg.lr == 1e-3 and cfg.target == "tumor"
    assert Path(cfg.output) == (tmp_path / "runs" / "o").resolve()
    assert load_config(p, {"output": str(tmp_path / "x")}).output == str(tmp_path / "x")
    p.write_text("cache: c\noutput: o\nlearning_rate: 1\n")
    with pytest.raises(InputError, match="'learning_rate'"):
        load_config(p)
    for bad in ({"device": "gpu0"}, {"amp": "yes"}, {"epochs": 0}, {"target": "kidney"}, {"kind": "gan"}, {"epochs": 1.5}):
        with pytest.raises(InputError):
            config_from_dict({"cache": "c", "output": "o", **bad})
    with pytest.raises(InputError, match="'cache'"):
        config_from_dict({"output": "o"})


# ------------------------------------------------------------------------------- trainer
def _decoder_state(run_dir):
    return ck.load_checkpoint(Path(run_dir) / "last.pt")["model"]


@pytest.mark.parametrize("stop_at", [2, 3])
def test_resume_reaches_same_weights(cache, tmp_path, stop_at):
    pw, out = writer()
    straight = DecoderTrainer(tiny_cfg(cache, tmp_path / "a"), progress=pw)
    res = straight.run()
    assert res["status"] == "done" and res["step"] == 6  # 6 slices / batch 2 = 3 steps x 2 epochs
    ev = out.events()
    names = [e["event"] for e in ev]
    assert names[0] == "start" and names[-1] == "done" and names.count("step") == 6
    assert names.count("epoch") == 2 and names.count("validation") == 2
    assert all({"epoch", "step", "eta_s"} <= set(e) for e in ev)

    pw1, out1 = writer()
    first = DecoderTrainer(tiny_cfg(cache, tmp_path / "b"), progress=pw1)
    with pytest.raises(CancelledError):
        first.run(cancel=lambda: first.step >= stop_at)
    assert out1.events()[-1]["event"] == "cancelled" and out1.events()[-1]["step"] == stop_at
    emb = sorted((tmp_path / "b" / "embeddings").glob("*.pt"))
    n_cases = sum(len(select_slices(first.cfg, first.manifest, split)) for split in ("train", "val"))
    assert len(emb) == n_cases >= 2  # one file per case and split
    mtimes = [p.stat().st_mtime_ns for p in emb]
    pw2, out2 = writer()
    second = DecoderTrainer(tiny_cfg(cache, tmp_path / "b"), progress=pw2)
    res2 = second.run(resume=True)
    assert res2["step"] == 6 and out2.events()[0]["resumed"] is True
    assert [p.stat().st_mtime_ns for p in emb] == mtimes  # embeddings not recomputed
    assert "loaded from" in (tmp_path / "b" / "train.log").read_text()

    a, b = _decoder_state(tmp_path / "a"), _decoder_state(tmp_path / "b")
    assert a.keys() == b.keys() and all(k.startswith("mask_decoder.") for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    # the training really changed the decoder (so the comparison can fail)
    base = build_model(TINY, checkpoint=cache["weights"]).state_dict()
    assert any(not torch.allclose(a[k], base[k]) for k in a)
    # the encoder was not touched; model.pth loads as the base model
    m = build_model(TINY, checkpoint=tmp_path / "a" / "model.pth")
    assert torch.equal(m.state_dict()["image_encoder.patch_embed.proj.weight"], base["image_encoder.patch_embed.proj.weight"])
    meta = torch.load(tmp_path / "a" / "model.pth", weights_only=True)["metadata"]
    assert meta["base_model"] == TINY and meta["label_meaning"].startswith("label > 0") and meta["window"] == "abdomen"


def test_different_seed_differs_and_bad_resume(cache, tmp_path):
    DecoderTrainer(tiny_cfg(cache, tmp_path / "a", epochs=1), progress=writer()[0]).run()
    DecoderTrainer(tiny_cfg(cache, tmp_path / "b", epochs=1, seed=8), progress=writer()[0]).run()
    a, b = _decoder_state(tmp_path / "a"), _decoder_state(tmp_path / "b")
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="train_prompt_encoder|trainable"):
        DecoderTrainer(tiny_cfg(cache, tmp_path / "a", train_prompt_encoder=True), progress=writer()[0]).run(resume=True)
    with pytest.raises(CheckpointError, match="target"):
        DecoderTrainer(tiny_cfg(cache, tmp_path / "a", target="tumor"), progress=writer()[0]).run(resume=True)


def test_grad_accum_and_prompt_encoder_training(cache, tmp_path):
    t = DecoderTrainer(tiny_cfg(cache, tmp_path / "a", epochs=1, batch_size=1, grad_accum=4,
                                train_prompt_encoder=True, target="tumor"), progress=writer()[0])
    res = t.run()
    n = len(t.train_set)
    assert res["step"] == -(-n // 4)
    keys = _decoder_state(tmp_path / "a").keys()
    assert any(k.startswith("prompt_encoder.") for k in keys)


# ------------------------------------------------------------------------------- CLI / signals
def _cli(cache, tmp_path, epochs):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(json.dumps(dict(cache=str(cache["cache"]), output="run", base_model=TINY,
                                   checkpoint=str(cache["weights"]), epochs=epochs, batch_size=1,
                                   max_slices_per_case=3, seed=1, device="cpu")))
    return cfg, tiny_sam_command("train", TINY, "--config", cfg)


def test_subprocess_sigterm_then_resume(cache, tmp_path):
    cfg, cmd = _cli(cache, tmp_path, epochs=40)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc, events, err = sigterm_after_first_step(cmd, env, timeout=60)
    assert proc.returncode == 130, err
    assert events[-1]["event"] == "cancelled" and events[-1]["step"] < events[-1]["total_steps"]
    run = tmp_path / "run"
    saved = ck.load_checkpoint(run / "last.pt")
    assert saved["step"] == events[-1]["step"] and (run / "train.log").exists()
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=120)
    ev2 = read_events(done.stdout)
    assert done.returncode == 0, done.stderr
    assert ev2[0]["event"] == "start" and ev2[0]["resumed"] and ev2[0]["step"] == saved["step"]
    assert ev2[-1]["event"] == "done" and ev2[-1]["step"] == ev2[-1]["total_steps"]
    assert build_model(TINY, checkpoint=run / "model.pth") is not None


def test_cli_errors_exit_codes(cache, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: c\noutput: o\nbogus_key: 1\n")
    assert train_main(["--config", str(bad)]) == 2
    ev = read_events(capsys.readouterr().out)
    assert ev[-1]["event"] == "error" and "bogus_key" in ev[-1]["message"] and ev[-1]["exit_code"] == 2
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(json.dumps(dict(cache=str(cache["cache"]), output=str(tmp_path / "r"), base_model=TINY,
                                   checkpoint=str(cache["weights"]), device="cpu")))
    assert train_main(["--config", str(cfg), "--resume"]) == 3  # nothing to resume from
    ev = read_events(capsys.readouterr().out)
    assert ev[-1]["event"] == "error" and "last.pt" in ev[-1]["message"]


# ------------------------------------------------------------------------------- lite_medsam
@pytest.mark.skipif(find_model_checkpoint("lite_medsam") is None, reason="LiteMedSAM weights not installed")
def test_lite_medsam_short_run_loss_decreases(cache, tmp_path):
    cfg = config_from_dict(dict(cache=str(cache["cache"]), output=str(tmp_path / "lm"), base_model="lite_medsam",
                                epochs=4, batch_size=4, lr=1e-4, max_slices_per_case=4, target="tumor",
                                device="cpu", box_jitter_px=2, seed=0))
    pw, out = writer()
    res = DecoderTrainer(cfg, progress=pw).run()
    losses = [e["losses"]["train"] for e in out.events() if e["event"] == "epoch"]
    print("lite_medsam epoch losses", losses, "best val Dice", res["best_dice"])
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    m = build_model("lite_medsam", checkpoint=tmp_path / "lm" / "model.pth")
    assert m.spec.name == "lite_medsam" and res["best_dice"] is not None


def test_the_trainer_shows_the_model_each_slice_as_the_engine_does(tmp_path):
    """One phantom stored LPS and stored RAS (i and j reversed, the same patient): the trainer's
    embeddings and targets of a slice are the same in both (each slice turned upright, as the
    engine turns it: ``slice_view``); a cache keeps the file's voxel order."""
    import numpy as np

    weights = save_tiny_sam(tmp_path / "tiny.pth", seed=5)
    caches, k = phantom_caches_in_two_orders(tmp_path)
    out = {}
    for order, (cache, case) in caches.items():
        trainer = DecoderTrainer(tiny_cfg({"cache": cache, "weights": weights}, tmp_path / order / "run"),
                                 progress=writer()[0])
        with np.load(cache / case["file"]) as z:
            image = z["image"]
        out[order] = (image[k], trainer._embed_case(case, [k], lambda: False))
    lps_image, lps = out["lps"]
    ras_image, ras = out["ras"]
    assert np.array_equal(ras_image, lps_image[::-1, ::-1])  # the cache keeps the file's order
    assert lps["masks"].sum() > 0
    assert torch.equal(lps["masks"], ras["masks"]) and torch.equal(lps["low_res"], ras["low_res"])
    assert torch.allclose(lps["features"], ras["features"])
