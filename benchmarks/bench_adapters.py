#!/usr/bin/env python
"""Benchmark of Med-SA adapters: parameter counts and a short LiteMedSAM adapter fine-tune on
3D-IRCADb-01 patient 1. Prints tables (it is no test).

    .venv/bin/python benchmarks/bench_adapters.py [--epochs 2] [--train-slices 8] [--threads 1]

1. Parameter counts (base / adapters / fraction) for SAM ViT-B (built on the meta device: no
   weights needed) and LiteMedSAM (TinyViT), with the default adapter config.
2. A one-case experiment. Patient 1 of ``../shared/data/ircadb-1.1`` is cut along k into three
   blocks of axial slices: the first half of the liver's slice range is the ``train`` case, the
   next tenth the ``val`` case, the rest the ``test`` case, with ``--gap`` slices dropped at each
   cut, so train, val and test slices are disjoint (but they come from one patient: this says
   whether the machinery learns, not how well adapters generalise). A cache is prepared in a
   temporary folder with ``samliverseg prepare`` (window ``abdomen``, an explicit split file),
   the adapters of lite_medsam are trained with ``samliverseg train`` (kind ``adapter``, target
   liver, CPU), and the per-slice 2D Dice on the test slices, from the reference's box on each
   slice (+ ``--margin`` pixels), is compared between zero-shot LiteMedSAM and the adapted model
   (``load_adapted_model`` on the run's model.pth), both through ``SlicePredictor``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from samliverseg.demo import sample_data
from samliverseg.models.build_sam import build_lite_medsam, build_model, build_sam_vit_b
from samliverseg.modeling.adapters import AdapterConfig, apply_adapters, count_parameters
from samliverseg.models.adapters import load_adapted_model
from samliverseg.interactive.predictor import SlicePredictor
from samliverseg.interactive.slice_view import cache_view


def parameter_table(cfg: AdapterConfig) -> list:
    rows = []
    with torch.device("meta"):
        vit_b = apply_adapters(build_sam_vit_b(), cfg)
    for name, model in (("SAM ViT-B", vit_b), ("LiteMedSAM (TinyViT)", apply_adapters(build_lite_medsam(), cfg))):
        c = count_parameters(model)
        rows.append({"model": name, **c})
    return rows


def make_dataset(folder: Path, gap: int) -> dict:
    """Three NIfTI cases (train/val/test blocks of axial slices) + a split file."""
    import SimpleITK as sitk

    volume, masks = sample_data.load_ircadb()
    liver = masks["liver"] > 0
    tumour = sample_data.tumor_union(masks) > 0
    label = liver.astype(np.uint8)
    label[tumour & liver] = 2
    ks = np.flatnonzero(liver.any(axis=(1, 2)))
    a, b = int(ks[len(ks) // 2]), int(ks[(len(ks) * 6) // 10])
    K = volume.shape[0]
    blocks = {"ircadb_train": (0, a - gap), "ircadb_val": (a, b - gap), "ircadb_test": (b, K)}
    image = volume.to_sitk()
    lab = sitk.GetImageFromArray(label)
    lab.CopyInformation(image)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (k0, k1) in blocks.items():
        sitk.WriteImage(image[:, :, k0:k1], str(folder / f"{name}.nii.gz"))
        sitk.WriteImage(lab[:, :, k0:k1], str(folder / f"{name}_label.nii.gz"))
    split = {"ircadb_train": "train", "ircadb_val": "val", "ircadb_test": "test"}
    (folder.parent / "split.json").write_text(json.dumps(split))
    liver_in = {n: int(liver[k0:k1].any(axis=(1, 2)).sum()) for n, (k0, k1) in blocks.items()}
    return {"blocks": blocks, "liver_slices": liver_in, "split_file": str(folder.parent / "split.json")}


def run_cli(args: list, env: dict, log: Path) -> list:
    """Run ``python -m samliverseg ...``; return the progress events (JSON lines on stdout)."""
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "samliverseg"] + args, stdout=subprocess.PIPE, stderr=err,
                              text=True, env=env)
    events = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    if proc.returncode != 0:
        raise SystemExit(f"samliverseg {args[0]} failed with exit code {proc.returncode}; see {log}:\n"
                         + log.read_text()[-2000:])
    return events


def slice_dice(model, image: np.ndarray, label: np.ndarray, spacing, ks, margin: int) -> list:
    from monai.metrics import compute_dice

    pred = SlicePredictor(model, torch.device("cpu"))
    out = []
    for k in ks:
        truth = label[k]
        jj, ii = np.nonzero(truth)
        box = (max(0, ii.min() - margin), max(0, jj.min() - margin),
               min(truth.shape[1] - 1, ii.max() + margin), min(truth.shape[0] - 1, jj.max() + margin))
        emb = pred.embed(image[k], (spacing[1], spacing[0]))
        mask = pred.predict(emb, box=box, multimask_output=False).masks[0]
        d = compute_dice(torch.from_numpy(mask)[None, None].float(), torch.from_numpy(truth)[None, None].float())
        out.append(float(d))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-slices", type=int, default=8, help="max_slices_per_case: training (and val) slices")
    ap.add_argument("--test-slices", type=int, default=12, help="test slices (evenly spaced over the test block)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--jitter", type=int, default=5, help="box_jitter_px while training")
    ap.add_argument("--margin", type=int, default=0, help="test box margin in pixels around the reference")
    ap.add_argument("--gap", type=int, default=3, help="slices dropped at each train/val/test cut")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (OMP_NUM_THREADS) for all steps")
    ap.add_argument("--workdir", default=None, help="keep the cache and the run here (default: a temp folder)")
    ap.add_argument("--json", default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = AdapterConfig()
    results: dict = {"adapter_config": cfg.to_dict()}

    print("## Parameters (default adapter config: bottleneck ratio 1/16, MLP adapters, HyP rank 8)\n")
    rows = parameter_table(cfg)
    results["parameters"] = rows
    print("| model | encoder params | encoder adapters | fraction of encoder | HyP (decoder) | all adapters / base |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['encoder_base']:,} | {r['encoder_adapters']:,} | {100 * r['encoder_fraction']:.2f} % "
              f"| {r['decoder_adapters']:,} | {r['adapters']:,} / {r['base']:,} ({100 * r['fraction']:.2f} %) |")

    if sample_data.shared_data_dir() is None:
        print(f"\nskipping the fine-tune: {sample_data.missing_reason()}")
        return 0
    tmp = tempfile.TemporaryDirectory(prefix="bench_adapters_") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SAMLIVERSEG_MODELS=str(work / "models"))  # keep the user's model registry clean
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    try:
        t0 = time.perf_counter()
        data = make_dataset(work / "pairs", args.gap)
        run_cli(["prepare", str(work / "pairs"), "-o", str(work / "cache"), "--window", "abdomen",
                 "--split-file", data["split_file"], "--val-fraction", "0"], env, work / "prepare.log")
        t_prep = time.perf_counter() - t0
        train_cfg = {"kind": "adapter", "cache": str(work / "cache"), "output": str(work / "run"),
                     "base_model": "lite_medsam", "target": "liver", "epochs": args.epochs,
                     "batch_size": args.batch_size, "lr": args.lr, "box_jitter_px": args.jitter,
                     "max_slices_per_case": args.train_slices, "seed": 0, "device": "cpu", "adapter": {}}
        (work / "train.yaml").write_text(json.dumps(train_cfg))
        t0 = time.perf_counter()
        events = run_cli(["train", "--config", str(work / "train.yaml")], env, work / "train.log")
        t_train = time.perf_counter() - t0
        start = next(e for e in events if e["event"] == "start")
        vals = [round(e["dice"], 4) for e in events if e["event"] == "validation"]
        losses = [round(e["losses"]["train"], 4) for e in events if e["event"] == "epoch"]
        steps = [e for e in events if e["event"] == "step"]

        with np.load(work / "cache" / "cases" / "ircadb_test.npz") as z:
            image, label, spacing = z["image"], z["label"] > 0, [float(s) for s in z["spacing"]]
            view = cache_view(z)  # the slices as the engine and the trainers show them to the model
        image, label = view.image(image), view.image(label)
        rows, cols = view.spacing((spacing[1], spacing[0]))
        spacing = [cols, rows, spacing[2]]
        ks = np.flatnonzero(label.any(axis=(1, 2)))
        ks = ks[np.unique(np.linspace(0, len(ks) - 1, min(args.test_slices, len(ks))).round().astype(int))]
        t0 = time.perf_counter()
        base = slice_dice(build_model("lite_medsam"), image, label, spacing, ks, args.margin)
        adapted_model = load_adapted_model(work / "run" / "model.pth")
        adapted = slice_dice(adapted_model, image, label, spacing, ks, args.margin)
        t_eval = time.perf_counter() - t0
    finally:
        if tmp is not None:
            tmp.cleanup()

    results["experiment"] = {
        "blocks_k": data["blocks"], "liver_slices_per_block": data["liver_slices"],
        "train_samples": start["train_slices"], "val_samples": start["val_slices"],
        "trainable_parameters": start["trainable_parameters"], "epochs": args.epochs, "optimiser_steps": len(steps),
        "train_loss_per_epoch": losses, "val_dice_per_epoch": vals, "test_slices": [int(k) for k in ks],
        "dice_zero_shot": base, "dice_adapted": adapted, "seconds": {"prepare": t_prep, "train": t_train,
                                                                     "evaluate": t_eval},
        "threads": args.threads or torch.get_num_threads(),
    }
    b, a = np.array(base), np.array(adapted)
    print("\n## One-case experiment: lite_medsam adapters, 3D-IRCADb-01 patient 1, liver, CPU\n")
    print(f"k blocks (train / val / test): {data['blocks']}; liver slices per block: {data['liver_slices']}")
    print(f"training: {start['train_slices']} train slices, {start['val_slices']} val slices, {args.epochs} epochs, "
          f"{len(steps)} optimiser steps of batch {args.batch_size}, lr {args.lr}, jitter {args.jitter} px, "
          f"{start['trainable_parameters']:,} trainable parameters; {t_train:.0f} s wall "
          f"(incl. start-up and validation)")
    print(f"train loss per epoch {losses}; val Dice (low-res, exact box) per epoch {vals}\n")
    print("| test slices | zero-shot Dice mean (min) | adapted Dice mean (min) | mean difference | slices better / worse |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {len(ks)} | {b.mean():.4f} ({b.min():.4f}) | {a.mean():.4f} ({a.min():.4f}) | {a.mean() - b.mean():+.4f} "
          f"| {int((a > b + 1e-4).sum())} / {int((a < b - 1e-4).sum())} |")
    print("\nOne patient: train, val and test slices are disjoint blocks of the same CT, so this shows that the "
          "adapters learn and run end to end, not how they generalise.")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
