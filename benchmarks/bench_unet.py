#!/usr/bin/env python
"""Benchmark of the U-Net trainer (kind ``unet``) on CPU within a time budget. Prints a table (no test).

    .venv/bin/python benchmarks/bench_unet.py [--budget-s 150] [--cases phantom,ircadb,ircadb-2stage]
        [--threads N] [--work DIR --keep] [--json out.json]

Cases (each trained in its own subprocess, so that its peak RSS is its own):

* ``phantom``: four synthetic phantoms (48 x 96 x 96 voxels at 2 x 2 x 3 mm, 2 tumours each),
  prepared with ``--window liver``; 3 train cases, 1 val case (another seed: held out).
* ``ircadb`` / ``ircadb-2stage``: 3D-IRCADb-01 patient 1 (``../shared/data``; skipped when absent),
  liver = label 1, tumours = 2, prepared with ``--window liver --spacing 2 2 2``. There is one
  patient only, so it is cut across k into two cases: the cranial half (train) and the caudal
  half (val, held out; a different part of the liver). ``ircadb-2stage`` trains the coarse
  (``coarse_size`` 64^3, whole volume) + fine model.

Training: ``UNetTrainer`` with the CPU-sized network stated in the output (default channels
8-16-32-64-128, strides 2-2-2-2, 2 residual units, 64^3 patches, 2 crops per case, Novograd
lr 0.008, warm restarts T_0 = 5, T_mult = 3), target ``liver``; it runs until ``--budget-s`` seconds
of training have passed (the trainer's ``cancel`` is polled after each optimiser step, so the
last step may overrun a little), then the state of ``last.pt`` is evaluated with the trainer's
own inference pipeline (``unet_inference.predict_mask``) on the val case(s): mean Dice. For the
ircadb cases, ``segment_volume`` also segments the original full-resolution CT (0.57 x 0.57 x
1.6 mm; resampled to 2 mm, predicted, resampled back): Dice against the manual liver mask on the
whole volume (the train half included, so it is not a held-out number) and its time.

Columns: case, train/val cases, epochs and optimiser steps done, training patches per second,
peak RSS of the training subprocess (MiB, ``ru_maxrss``: caching, training and evaluation), val
Dice; for ircadb the full-volume Dice and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = ("phantom", "ircadb", "ircadb-2stage")


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------
# data (parent process)
# ---------------------------------------------------------------------------------------------
def prepare_phantoms(work: Path) -> Path:
    import SimpleITK as sitk
    from samliverseg.demo.phantom import make_phantom
    from samliverseg.training.prepare import prepare_dataset
    data = work / "phantom-pairs"
    data.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        p = make_phantom((48, 96, 96), (2.0, 2.0, 3.0), seed=100 + i, n_tumors=2)
        sitk.WriteImage(p.to_sitk("hu"), str(data / f"ph{i}.nii.gz"))
        sitk.WriteImage(p.to_sitk("labels"), str(data / f"ph{i}_label.nii.gz"))
    out = work / "phantom-cache"
    prepare_dataset(out, data, window="liver", val_fraction=0.25, seed=0)
    return out


def prepare_ircadb(work: Path) -> Path:
    """Two cases (cranial / caudal half) of ircadb patient 1 in a 2 mm cache; the volume path for inference."""
    import SimpleITK as sitk
    from samliverseg.demo import sample_data
    from samliverseg.training.prepare import prepare_dataset
    vol, masks = sample_data.load_ircadb()
    label = (masks["liver"] > 0).astype(np.uint8)
    for name, m in masks.items():
        if name.startswith("livertumor"):
            label[m > 0] = 2
    img, lab = vol.to_sitk(), vol.to_sitk(label)
    data = work / "ircadb-pairs"
    data.mkdir(parents=True, exist_ok=True)
    K = vol.shape[0]
    half = K // 2
    # the SimpleITK slice keeps the physical geometry of the sub-volume
    for name, sl in (("ircadbcranial", slice(half, K)), ("ircadbcaudal", slice(0, half))):
        sitk.WriteImage(img[:, :, sl], str(data / f"{name}.nii.gz"))
        sitk.WriteImage(lab[:, :, sl], str(data / f"{name}_label.nii.gz"))
    sitk.WriteImage(img, str(work / "ircadb_full.nii.gz"))
    np.savez_compressed(work / "ircadb_full_liver.npz", liver=(label > 0).astype(np.uint8))
    out = work / "ircadb-cache"
    m = prepare_dataset(out, data, window="liver", spacing=(2.0, 2.0, 2.0), val_fraction=0.5, seed=0)
    # the held-out half must be the caudal one whatever the seeded split says
    for c in m["cases"]:
        c["split"] = "val" if c["id"] == "ircadbcaudal" else "train"
    (out / "manifest.json").write_text(json.dumps(m, indent=1))
    return out


# ---------------------------------------------------------------------------------------------
# one training run (child process)
# ---------------------------------------------------------------------------------------------
class _Events:
    def __init__(self):
        self.events = []

    def write(self, s):
        for line in s.splitlines():
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def flush(self):
        pass


def train_case(args) -> dict:
    import torch
    from samliverseg.core.errors import CancelledError
    from samliverseg.core.evaluation import dice
    from samliverseg.training import checkpoint as ck
    from samliverseg.training.config import config_from_dict
    from samliverseg.training.progress import ProgressWriter
    from samliverseg.training.unet import UNetTrainer, target_mask
    from samliverseg.automatic.unet import UNetModel, predict_mask

    if args.threads:
        torch.set_num_threads(args.threads)
    two = args.case.endswith("2stage")
    unet = dict(patch_size=[args.patch] * 3, channels=[int(c) for c in args.channels.split(",")],
                strides=[2] * (len(args.channels.split(",")) - 1), num_res_units=args.res_units, num_samples=2,
                lr=0.008, val_interval=10**6, two_stage=two, coarse_size=[64, 64, 64], roi_margin_mm=20.0,
                sw_batch_size=2)
    cfg = config_from_dict(dict(cache=args.train_cache, output=args.run, kind="unet", epochs=10**6, seed=0,
                                device="cpu", unet=unet))
    ev = _Events()
    trainer = UNetTrainer(cfg, progress=ProgressWriter(stream=ev, err_stream=open(os.devnull, "w")))
    t_start = [None]

    def cancel():
        if t_start[0] is None:
            t_start[0] = time.monotonic()
        return time.monotonic() - t_start[0] > args.budget_s

    t0 = time.monotonic()
    try:
        trainer.run(cancel=cancel)
    except CancelledError:
        pass
    train_s = time.monotonic() - t0
    steps = [e for e in ev.events if e["event"] == "step"]
    first_step_t = steps[0]["time"] if steps else None
    patches = sum(trainer.opts.num_samples * trainer.opts.batch_cases for _ in steps)
    wall = (steps[-1]["time"] - first_step_t) if len(steps) > 1 else None
    sps = (patches - trainer.opts.num_samples) / wall if wall else None  # patches after the first step / time
    epoch_losses = [e["losses"]["train"] for e in ev.events if e["event"] == "epoch"]

    ckpt = ck.load_checkpoint(Path(args.run) / ck.LAST_NAME)
    model = UNetModel(ckpt["metadata"]["network"], two_stage=two)
    model.load_state_dict(ckpt["model"])
    model.eval()
    settings = ckpt["metadata"]
    dices, t_eval = [], time.monotonic()
    for case in trainer.val_cases:
        with np.load(case["path"]) as z:
            pred = predict_mask(model, z["image"].astype(np.float32) / 255.0, z["spacing"], settings)
            dices.append(dice(pred, target_mask(z["label"], "liver")))
    t_eval = time.monotonic() - t_eval
    out = {"case": args.case, "train_cases": len(trainer.train_cases), "val_cases": len(trainer.val_cases),
           "epochs": int(ckpt["epoch"]) + (1 if ckpt["batch_in_epoch"] else 0), "steps": int(ckpt["step"]),
           "train_s": round(train_s, 1), "patches_per_s": sps, "val_dice": float(np.mean(dices)) if dices else None,
           "val_eval_s": round(t_eval, 1), "first_epoch_loss": epoch_losses[0] if epoch_losses else None,
           "last_epoch_loss": epoch_losses[-1] if epoch_losses else None}
    if args.full_volume:
        import SimpleITK as sitk
        from samliverseg.automatic.unet import segment_volume
        from samliverseg.io.volume import Volume
        model_pth = trainer.export_model()  # from last.pt (no best.pt: no validation during the run)
        vol = Volume.from_sitk(sitk.ReadImage(args.full_volume))
        liver = np.load(args.full_liver)["liver"]
        t1 = time.monotonic()
        mask = segment_volume(model_pth, vol, device="cpu")
        out["full_s"] = round(time.monotonic() - t1, 1)
        out["full_dice"] = dice(mask, liver)
        out["full_shape_ok"] = mask.shape == vol.shape
    out["peak_rss_mb"] = round(peak_rss_mb(), 0)
    return out


# ---------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--budget-s", type=float, default=150.0, help="training seconds per case (default 150)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--patch", type=int, default=64, help="patch edge in voxels (multiple of 16; default 64)")
    ap.add_argument("--channels", default="8,16,32,64,128", help="U-Net channels (default 8,16,32,64,128)")
    ap.add_argument("--res-units", type=int, default=2, help="residual units (default 2)")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    # child mode
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--train-cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--full-volume", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--full-liver", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child
        res = train_case(args)
        Path(args.result).write_text(json.dumps(res))
        return 0

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from {CASES}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_unet_"))
    work.mkdir(parents=True, exist_ok=True)
    from samliverseg.demo import sample_data
    print(f"U-Net CPU benchmark: budget {args.budget_s:g} s of training per case; network channels {args.channels}, "
          f"{args.res_units} residual units, patch {args.patch}^3, 2 crops per case, Novograd lr 0.008; "
          f"{os.cpu_count()} CPUs (threads {args.threads or 'default'}); work folder {work}", flush=True)
    results = []
    try:
        caches = {}
        t = time.monotonic()
        if "phantom" in cases:
            caches["phantom"] = prepare_phantoms(work)
        if any(c.startswith("ircadb") for c in cases):
            if sample_data.shared_data_dir() is None:
                print(f"skipping ircadb: {sample_data.missing_reason()}")
                cases = [c for c in cases if not c.startswith("ircadb")]
            else:
                caches["ircadb"] = prepare_ircadb(work)
        print(f"prepared the caches in {time.monotonic() - t:.0f} s", flush=True)
        for case in cases:
            cache = caches["phantom" if case == "phantom" else "ircadb"]
            run = work / f"run-{case}"
            shutil.rmtree(run, ignore_errors=True)
            result = work / f"result-{case}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--train-cache", str(cache),
                   "--run", str(run), "--result", str(result), "--budget-s", str(args.budget_s),
                   "--threads", str(args.threads), "--patch", str(args.patch), "--channels", args.channels,
                   "--res-units", str(args.res_units)]
            if case.startswith("ircadb"):
                cmd += ["--full-volume", str(work / "ircadb_full.nii.gz"), "--full-liver", str(work / "ircadb_full_liver.npz")]
            t = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "SAMLiverSegLib")))
            if proc.returncode != 0:
                print(f"{case}: failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                continue
            r = json.loads(result.read_text())
            r["wall_s"] = round(time.monotonic() - t, 1)
            results.append(r)
            print(f"{case}: done in {r['wall_s']:.0f} s: {json.dumps(r)}", flush=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print()
    print(f"| case | train/val cases | epochs | steps | patches/s | peak RSS MiB | val Dice | loss first->last epoch "
          f"| full-volume Dice | full-volume s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['train_cases']}/{r['val_cases']} | {r['epochs']} | {r['steps']} | "
              f"{f(r['patches_per_s'], '.2f')} | {f(r['peak_rss_mb'], '.0f')} | {f(r['val_dice'], '.3f')} | "
              f"{f(r['first_epoch_loss'], '.3f')} -> {f(r['last_epoch_loss'], '.3f')} | "
              f"{f(r.get('full_dice'), '.3f')} | {f(r.get('full_s'), '.1f')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
