"""U-Net trainer (kind ``unet``) and its inference (``unet_inference.segment_volume``).

Real, small CPU runs (no mocks): a cache of three (24, 64, 64) phantoms prepared with
``prepare_dataset`` (resampled from 2.5 x 2.5 x 4 mm to 3 x 3 x 4 mm, so that inference has to
resample), a tiny U-Net (channels 8-16-32-64, 32^3 patches).
"""

import json
import os

import numpy as np
import pytest
import torch

from libtest_helpers import make_phantom_cache, rot
from libtest_helpers import writer
from samliverseg.core.errors import CancelledError, CheckpointError, InputError
from samliverseg.core.evaluation import dice
from samliverseg.demo.phantom import make_phantom
from samliverseg.training import checkpoint as ck
from samliverseg.training.config import config_from_dict
from samliverseg.training.progress import read_events
from samliverseg.training.train import main as train_main
from samliverseg.training.unet import UNetOptions, UNetTrainer, item_seed
from samliverseg.automatic.unet import (coarse_box_to_full, load_unet_model, margin_voxels, roi_slices,
                                        segment_volume)
from samliverseg.io.volume import Volume

SHAPE, SPACING = (24, 64, 64), (2.5, 2.5, 4.0)


def phantom(seed, n_tumors=2):
    return make_phantom(SHAPE, SPACING, seed=seed, n_tumors=n_tumors)


def make_cache(root, n=3, n_tumors=2, val_fraction=0.34, shape=SHAPE):
    make_phantom_cache(root, n, shape, SPACING, n_tumors=n_tumors, window="liver", spacing=(3.0, 3.0, 4.0),
                       val_fraction=val_fraction, seed=0)
    return root / "cache"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = make_cache(tmp_path_factory.mktemp("unet"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["summary"]["train"] == 2 and m["summary"]["val"] == 1
    return out


def ucfg_dict(cache, out, epochs=2, common=None, **unet):
    u = dict(patch_size=[32, 32, 32], channels=[8, 16, 32, 64], strides=[2, 2, 2], num_res_units=0, num_samples=2,
             lr=0.1, dropout=0.0, val_interval=100, coarse_size=[32, 32, 32], roi_margin_mm=10.0)
    u.update(unet)
    d = dict(cache=str(cache), output=str(out), kind="unet", epochs=epochs, seed=3, device="cpu", unet=u)
    d.update(common or {})
    return d


def ucfg(cache, out, epochs=2, common=None, **unet):
    return config_from_dict(ucfg_dict(cache, out, epochs, common, **unet))


@pytest.fixture(scope="module")
def two_stage(cache, tmp_path_factory):
    """A two-stage model trained for 20 optimiser steps (10 epochs x 2 cases)."""
    run = tmp_path_factory.mktemp("two_stage_run")
    pw, out = writer()
    cfg = ucfg(cache, run, epochs=10, two_stage=True, num_samples=4, val_interval=5)
    res = UNetTrainer(cfg, progress=pw).run()
    return {"run": run, "res": res, "events": out.events()}


# ------------------------------------------------------------------------------- options
def test_options_validation_names_the_key(cache, tmp_path):
    cfg = ucfg(cache, tmp_path)
    o = cfg.options()
    assert isinstance(o, UNetOptions) and o.patch_size == [32, 32, 32] and o.T_0 == 5 and o.T_mult == 3
    d = UNetOptions()
    assert d.channels == [16, 32, 64, 128, 256] and d.strides == [2, 2, 2, 2] and d.lr == 0.008 and d.num_samples == 4
    bad = {"bogus": 1, "patch_size": [30, 32, 32], "strides": [2, 2], "act": "tanh", "lr": -1.0, "coarse_size": [32, 32],
           "dropout": 1.5, "num_samples": 0, "scheduler": "step"}
    for key, value in bad.items():
        with pytest.raises(InputError, match=f"unet.{key}"):
            config_from_dict(dict(cache="c", output="o", kind="unet", unet={key: value}))
    with pytest.raises(InputError, match="unet.patch_size"):  # wrong type
        config_from_dict(dict(cache="c", output="o", kind="unet", unet={"patch_size": "big"}))


def test_roi_helpers():
    m = np.zeros((20, 30, 40), np.uint8)
    m[5:8, 10:12, 20:30] = 1
    # spacing (si, sj, sk) = (1, 2, 4) mm: a 4 mm margin is 1 voxel along k, 2 along j, 4 along i
    assert margin_voxels((1.0, 2.0, 4.0), 4.0) == (1, 2, 4)
    assert roi_slices(m, (1.0, 2.0, 4.0), 4.0) == (slice(4, 9), slice(8, 14), slice(16, 34))
    assert roi_slices(m, (1.0, 2.0, 4.0), 1000.0) == (slice(0, 20), slice(0, 30), slice(0, 40))
    assert roi_slices(np.zeros((4, 4, 4)), (1, 1, 1), 1.0) is None
    # coarse voxel c of a 2x downsampled axis covers full voxels [2c, 2c + 2)
    assert coarse_box_to_full([1, 0, 3], [2, 4, 4], (4, 4, 4), (8, 10, 8)) == ([2, 0, 6], [4, 10, 8])
    assert item_seed(0, 1, 2) == item_seed(0, 1, 2) != item_seed(0, 1, 3)


# ------------------------------------------------------------------------------- training
def _state(run):
    return ck.load_checkpoint(run / "last.pt")["model"]


@pytest.mark.parametrize("stop_at", [3, 2])
def test_resume_and_cancel_reach_the_same_weights(cache, tmp_path, stop_at):
    # residual units, dropout (torch RNG), warm restarts with T_0 = 1 (the rate restarts every epoch)
    kw = dict(epochs=2, num_res_units=1, dropout=0.1, T_0=1, T_mult=2, lr=0.02)
    pw, out = writer()
    straight = UNetTrainer(ucfg(cache, tmp_path / "a", **kw), progress=pw)
    init = straight.model_state()
    res = straight.run()
    ev = out.events()
    names = [e["event"] for e in ev]
    assert res["status"] == "done" and res["step"] == 4  # 2 cases, 1 per step, 2 epochs
    assert names[0] == "start" and names[-1] == "done" and names.count("step") == 4 and names.count("epoch") == 2
    assert names.count("validation") == 1  # val_interval 100: only after the last epoch
    assert ev[0]["kind"] == "unet" and ev[0]["train_cases"] == 2 and ev[0]["val_cases"] == 1
    lrs = [e["lr"] for e in ev if e["event"] == "step"]
    assert lrs[1] == pytest.approx(0.02) and lrs[0] == pytest.approx(0.01)  # warm restart at the epoch end (T_0 = 1)
    assert all(os.path.exists(tmp_path / "a" / f) for f in ("last.pt", "best.pt", "model.pth", "train.log"))

    pw1, out1 = writer()
    first = UNetTrainer(ucfg(cache, tmp_path / "b", **kw), progress=pw1)
    with pytest.raises(CancelledError):
        first.run(cancel=lambda: first.step >= stop_at)  # 3: mid epoch 1; 2: the last step of epoch 0
    assert out1.events()[-1]["event"] == "cancelled" and out1.events()[-1]["step"] == stop_at
    saved = ck.load_checkpoint(tmp_path / "b" / "last.pt")
    assert saved["step"] == stop_at and (saved["epoch"], saved["batch_in_epoch"]) == {3: (1, 1), 2: (0, 2)}[stop_at]
    assert not (tmp_path / "b" / "model.pth").exists()
    pw2, out2 = writer()
    res2 = UNetTrainer(ucfg(cache, tmp_path / "b", **kw), progress=pw2).run(resume=True)
    assert res2["step"] == 4 and out2.events()[0]["resumed"] is True and out2.events()[0]["step"] == stop_at
    assert [h["epoch"] for h in res2["history"]] == [0, 1]

    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a.keys() == b.keys() and all(k.startswith("fine.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res2["best_dice"] == res["best_dice"]
    assert any(not torch.equal(a[k], init[k]) for k in a)  # training changed the weights: the check can fail
    if stop_at != 3:
        return
    # a resume with another network is refused, naming the key
    with pytest.raises(CheckpointError, match="unet.num_res_units"):
        UNetTrainer(ucfg(cache, tmp_path / "b", **dict(kw, num_res_units=2)), progress=writer()[0]).run(resume=True)
    with pytest.raises(CheckpointError, match="last.pt"):
        UNetTrainer(ucfg(cache, tmp_path / "d", **kw), progress=writer()[0]).run(resume=True)

    # model.pth of a one-stage model: metadata and inference on the input grid
    obj = torch.load(tmp_path / "a" / "model.pth", weights_only=True)
    meta = obj["metadata"]
    assert meta["kind"] == "unet" and meta["two_stage"] is False and meta["patch_size"] == [32, 32, 32]
    assert meta["spacing"] == [3.0, 3.0, 4.0] and meta["window"] == "liver" and meta["window_hu"] == [-300.0, 300.0]
    assert meta["network"]["channels"] == [8, 16, 32, 64] and meta["target"] == "liver"
    vol = phantom(0).to_volume()
    mask = segment_volume(tmp_path / "a" / "model.pth", vol, device="cpu")
    assert mask.shape == vol.shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}

    # `checkpoint:` starts a new run from a unet model.pth (same network), else CheckpointError
    start = UNetTrainer(ucfg(cache, tmp_path / "e", common={"checkpoint": str(tmp_path / "a" / "model.pth")}, **kw),
                        progress=writer()[0]).model_state()
    assert all(torch.equal(start[k], obj["model"][k]) for k in obj["model"])
    with pytest.raises(CheckpointError, match="unet.channels"):
        UNetTrainer(ucfg(cache, tmp_path / "e", common={"checkpoint": str(tmp_path / "a" / "model.pth")},
                         **dict(kw, channels=[4, 8, 16, 32])), progress=writer()[0])


def test_data_workers_give_the_same_run(cache, tmp_path):
    """The random crops are seeded per (epoch, position): worker processes change nothing.

    Both runs are ``samliverseg train`` processes, as users run it: DataLoader workers fork their
    parent, and this test process may hold OpenVINO/ONNX Runtime thread pools from other tests."""
    import subprocess
    import sys

    import yaml

    for name, workers in (("w0", 0), ("w1", 1)):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(ucfg_dict(cache, tmp_path / name, epochs=1, num_workers=workers)))
        run = subprocess.run([sys.executable, "-m", "samliverseg", "train", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
    a, b = _state(tmp_path / "w0"), _state(tmp_path / "w1")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accum_and_batch_cases(cache, tmp_path):
    pw, out = writer()
    t = UNetTrainer(ucfg(cache, tmp_path / "g", epochs=1, common={"grad_accum": 2}), progress=pw)
    assert t.run()["step"] == 1  # 2 cases, 1 per micro-batch, 2 micro-batches per step
    steps = [e for e in out.events() if e["event"] == "step"]
    assert len(steps) == 1 and out.events()[0]["patches_per_step"] == 4
    t2 = UNetTrainer(ucfg(cache, tmp_path / "h", epochs=1, batch_cases=2), progress=writer()[0])
    assert t2.run()["step"] == 1


def test_two_stage_trains_and_segments(two_stage):
    ev, res, run = two_stage["events"], two_stage["res"], two_stage["run"]
    losses = [e["losses"]["train"] for e in ev if e["event"] == "epoch"]
    assert len(losses) == 10 and losses[-1] < losses[0]
    dices = [e["dice"] for e in ev if e["event"] == "validation"]
    assert len(dices) == 2 and res["best_dice"] == max(dices)
    model, meta = load_unet_model(run / "model.pth")
    assert model.two_stage and meta["two_stage"] is True and meta["coarse_size"] == [32, 32, 32]
    keys = torch.load(run / "model.pth", weights_only=True)["model"].keys()
    assert any(k.startswith("coarse.") for k in keys) and any(k.startswith("fine.") for k in keys)
    # a training phantom on its own (2.5 mm) grid: resampled to 3 mm, segmented, resampled back
    p = phantom(0)
    mask = segment_volume(run / "model.pth", p.to_volume(), device="cpu")
    print("two-stage val Dice", dices, "train phantom Dice", dice(mask, p.liver_mask))
    assert mask.shape == SHAPE and dice(mask, p.liver_mask) > 0.7


def test_segment_volume_on_oblique_and_flipped_grids(two_stage):
    """The same array with another direction/origin: the same mask, on that volume's grid."""
    path = two_stage["run"] / "model.pth"
    p = phantom(0)
    vol = p.to_volume()
    base = segment_volume(path, vol, device="cpu")
    assert base.any()
    oblique = Volume(vol.array, spacing=vol.spacing, origin=(12.0, -40.5, 7.25), direction=rot("z", 30) @ rot("x", 20))
    flipped = Volume(vol.array, spacing=vol.spacing, origin=(100.0, 5.0, -3.0),
                     direction=np.diag([-1.0, 1.0, -1.0]) @ rot("y", 15))
    for v in (oblique, flipped):
        m = segment_volume(path, v, device="cpu")
        assert m.shape == vol.shape and m.dtype == np.uint8
        assert (m == base).mean() > 0.998 and dice(m, base) > 0.99
        assert dice(m, p.liver_mask) > 0.7
    # a volume on another (finer, anisotropic) grid than the cache's still comes back on its grid
    fine = Volume(np.ascontiguousarray(vol.array[:, ::2, ::2]), spacing=(5.0, 5.0, 4.0), direction=rot("z", 90))
    m = segment_volume(path, fine, device="cpu")
    assert m.shape == fine.shape


# ------------------------------------------------------------------------------- bad input
def test_bad_model_files(cache, tmp_path):
    vol = phantom(1).to_volume()
    other = tmp_path / "decoder_model.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "metadata": {"kind": "decoder", "base_model": "lite_medsam"}}, other)
    with pytest.raises(CheckpointError, match="expected kind 'unet'"):
        segment_volume(other, vol, device="cpu")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable"):
        segment_volume(junk, vol, device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        segment_volume(tmp_path / "missing.pth", vol, device="cpu")


def test_no_target_in_train_split_is_input_error(tmp_path, capsys):
    cache = make_cache(tmp_path / "nt", n=2, n_tumors=0, val_fraction=0.0, shape=(12, 32, 32))
    with pytest.raises(InputError, match="'tumor'"):
        UNetTrainer(ucfg(cache, tmp_path / "r", common={"target": "tumor"}), progress=writer()[0]).run()
    # through `samliverseg train`: exit code 2 and an error event
    cfg = tmp_path / "unet.yaml"
    cfg.write_text(json.dumps(dict(cache=str(cache), output=str(tmp_path / "r2"), kind="unet", target="tumor",
                                   device="cpu", unet={"patch_size": [32, 32, 32], "channels": [8, 16, 32, 64],
                                                       "strides": [2, 2, 2]})))
    assert train_main(["--config", str(cfg)]) == 2
    ev = read_events(capsys.readouterr().out)
    assert ev[-1]["event"] == "error" and "tumor" in ev[-1]["message"] and ev[-1]["exit_code"] == 2


# ------------------------------------------------------------------------------- DDP
def test_torchrun_two_processes(tmp_path):
    """A real 2-process torchrun (gloo) of `samliverseg train`: 3 training cases (padded to 4),
    1 val case scored by rank 0 only (rank 1 has weight 0 in the Dice average)."""
    import subprocess
    import sys
    from pathlib import Path
    from samliverseg.automatic.unet import predict_mask
    from samliverseg.training.unet import target_mask

    cache = make_cache(tmp_path / "d", n=4, val_fraction=0.25, shape=(16, 48, 48))
    m = json.loads((cache / "manifest.json").read_text())
    assert m["summary"]["train"] == 3 and m["summary"]["val"] == 1
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(json.dumps(dict(cache=str(cache), output=str(tmp_path / "run"), kind="unet", epochs=1, seed=2,
                                   device="cpu", model_name="unet-ddp",
                                   unet=dict(patch_size=[16, 16, 16], channels=[4, 8, 16, 32], strides=[2, 2, 2],
                                             num_res_units=1, num_samples=2, lr=0.05))))
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", SAMLIVERSEG_MODELS=str(tmp_path / "models"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "samliverseg",
           "train", "--config", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ev = read_events(proc.stdout)
    names = [e["event"] for e in ev]
    assert names.count("start") == 1 and names.count("done") == 1 and names[-1] == "done", names
    assert ev[0]["world_size"] == 2 and ev[0]["train_cases"] == 3
    assert names.count("step") == 2 and ev[-1]["step"] == ev[-1]["total_steps"] == 2  # ceil(3 / 2) cases per rank
    run = tmp_path / "run"
    saved = ck.load_checkpoint(run / "last.pt")
    assert saved["world_size"] == 2 and saved["step"] == 2
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["unet-ddp"]
    # the logged val Dice is the val case's Dice (rank 1 scored nothing and has weight 0)
    model, meta = load_unet_model(run / "model.pth")
    val = next(c for c in m["cases"] if c["split"] == "val")
    with np.load(cache / val["file"]) as z:
        pred = predict_mask(model, z["image"].astype(np.float32) / 255.0, z["spacing"], meta)
        expected = dice(pred, target_mask(z["label"], "liver"))
    print("DDP val Dice", saved["history"][0]["val_dice"], "recomputed", expected)
    assert expected > 0.01 and saved["history"][0]["val_dice"] == pytest.approx(expected, abs=1e-5)
