#!/usr/bin/env python
"""Semi-SAM+ on phantoms: does adding unlabelled volumes help a student trained on k labelled ones?

    .venv/bin/python benchmarks/bench_semi.py [--labelled 2] [--unlabelled 4] [--val 2] [--test 2]
        [--shape 10 64 64] [--spacing 6 6 16] [--epochs 18] [--encoder lite_medsam] [--threads 2]
        [--skip-long] [--json out.json] [--work DIR --keep]   (see --help for the training options)

It prints a table (it is no test). The truth is known because every volume is a synthetic phantom
(``samliverseg.demo.phantom``; target: the liver, label > 0). What it does:

* **Data.** ``--labelled`` k + ``--val`` labelled phantoms (seeds 0, 1, ...) and ``--unlabelled``
  phantoms (seeds 100, ...; their labels are never written) are converted with
  ``samliverseg prepare`` into two caches that differ only by the unlabelled cases: the split of
  the labelled cases (k train, the rest val) is the same in both (checked). ``--test`` more
  labelled phantoms (seeds 200, ...) are held out and never seen by the trainer.
* **Runs** (each one ``samliverseg train`` in its own process, ``--threads`` torch threads, the
  ``--encoder`` as the student's frozen encoder and as the 2D teacher, all embeddings computed by
  the run itself and counted in its time):

  1. ``supervised``: kind ``semi`` on the labelled-only cache, so every phase trains on the k
     labelled volumes only (the same student, views, slabs, schedule and EMA model selection);
  2. ``semi``: the same config on the cache with the unlabelled volumes;
  3. ``supervised (same steps)``: as 1, with as many optimiser steps as run 2 (more epochs, the
     phases scaled): does the unlabelled data help at an equal number of updates?
  4. ``supervised (same time)``: as 1, with the number of epochs raised so that its cost matches
     run 2's (its per-epoch and embedding times measured in run 1): the comparison over the same
     CPU budget (``--skip-long`` leaves it out).
* **Training options** (the same in every run; ``--help``): slabs of 6 slices, decoder width 32,
  ``batch_size`` 1 (1 labelled + 1 unlabelled slab per step), N = 3 transforms, 2 weak + 1 strong
  views per unlabelled case, u_th 0.05 (adaptive), T_r 4 epochs. Two settings differ from the
  manual's because these runs have only tens to hundreds of optimiser steps: the learning rates
  (warm-up 1e-2 instead of 2e-3, then poly from 5e-3; at 2e-3 the decoder barely moves in 30
  steps) and the EMA momentum 0.95 instead of 0.99 (an average over ~20 steps rather than ~100).
  The student decoder uses ``decoder_norm: instance``: with the default ``channel`` norm the
  decoder stayed at a constant output (val Dice 0.0 after 48 steps at lr 2e-3…1e-2, the
  ``student`` trainer too) on these phantoms, whose liver is 2–3 % of the voxels, while the
  instance-norm decoder reached 0.78 in the same 48 steps.
* **Reported per run:** wall time (embedding + training), optimiser steps, training throughput
  (slabs/s, the ``done`` event: labelled + unlabelled slabs per second of training), the
  trainer's peak RSS, the time in the teachers / EMA / student, the best validation Dice of the
  EMA model (the val cases select the epoch: optimistic), and the **test Dice** of the exported
  ``model.pth`` on the held-out phantoms (Algorithm 1 on the whole volume, the computation of
  ``predict_volume``, ``σ > 0.5``; every test slice embedded once and shared by the models, whose
  frozen encoders are checked to be identical), mean and per case.

CPU budget: the machine it runs on is stated in the output (cores, load average at the start).
On a shared machine the times are noisy; the Dice values do not depend on them except through
run 4's epoch count. The embeddings are shared between the runs (``semi.embedding_cache``): run 1
computes those of the labelled and val cases, run 2 those of the unlabelled views; the cost of a
later run is its wall time + the embedding time of run 1 that it reused.
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
from typing import Any, Dict, List

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SAMLiverSegLib"))


def make_data(work: Path, args) -> Dict[str, Any]:
    from samliverseg.demo.phantom import make_phantom
    from samliverseg.training.prepare import prepare_dataset

    lab, unl, test = work / "labelled", work / "unlabelled", work / "test"
    for d in (lab, unl, test):
        d.mkdir(parents=True, exist_ok=True)
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    for i in range(args.labelled + args.val):
        p = make_phantom(shape, spacing, seed=i, n_tumors=2)
        sitk.WriteImage(p.to_sitk("hu"), str(lab / f"case{i:02d}.nii.gz"))
        sitk.WriteImage(p.to_sitk("labels"), str(lab / f"case{i:02d}_label.nii.gz"))
    for i in range(args.unlabelled):
        p = make_phantom(shape, spacing, seed=100 + i, n_tumors=2)
        sitk.WriteImage(p.to_sitk("hu"), str(unl / f"unl{i:02d}.nii.gz"))
    tests = []
    for i in range(args.test):
        p = make_phantom(shape, spacing, seed=200 + i, n_tumors=2)
        tests.append(p)
    frac = args.val / float(args.labelled + args.val)
    m_semi = prepare_dataset(work / "cache_semi", lab, unlabelled=unl, val_fraction=frac, seed=0)
    m_sup = prepare_dataset(work / "cache_sup", lab, val_fraction=frac, seed=0)

    def split(m, labelled):
        return sorted((c["id"], c["split"]) for c in m["cases"] if bool(c["labelled"]) == labelled)

    if split(m_semi, True) != split(m_sup, True):
        raise SystemExit("the two caches split the labelled cases differently")
    n_train = sum(s == "train" for _, s in split(m_sup, True))
    n_val = sum(s == "val" for _, s in split(m_sup, True))
    n_unl = sum(c["split"] == "train" for c in m_semi["cases"] if not c["labelled"])
    if (n_train, n_val, n_unl) != (args.labelled, args.val, args.unlabelled):
        raise SystemExit(f"unexpected split: {n_train} train, {n_val} val, {n_unl} unlabelled")
    return {"tests": tests, "cache_semi": work / "cache_semi", "cache_sup": work / "cache_sup"}


def config(args, cache: Path, out: Path, epochs: int, phases: Dict[str, int], emb: Path) -> Dict[str, Any]:
    return {"kind": "semi", "cache": str(cache), "output": str(out), "base_model": args.encoder, "target": "liver",
            "epochs": int(epochs), "batch_size": 1, "lr": args.lr, "seed": args.seed, "device": "cpu",
            "max_slices_per_case": int(args.shape[0]),
            "semi": {"teachers": args.encoder, "slab_depth": args.slab_depth, "hidden": args.hidden,
                     "warmup_epochs": phases["warmup"], "finetune_epochs": phases["finetune"],
                     "warmup_lr": args.warmup_lr, "ema_momentum": args.ema, "decoder_norm": args.decoder_norm,
                     "n_transforms": args.n_transforms, "weak_views": args.weak_views,
                     "strong_views": args.strong_views, "rampup_epochs": args.rampup,
                     "rampdown_epochs": 40.0, "u_th": args.u_th, "embedding_cache": str(emb)}}


def _mean(values):
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def run_train(cfg: Dict[str, Any], work: Path, name: str, threads: int) -> Dict[str, Any]:
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT / "SAMLiverSegLib"),
               SAMLIVERSEG_MODELS=str(work / "user_models"))  # never register benchmark models for the user
    code = (f"import sys, torch; torch.set_num_threads({threads}); from samliverseg.training.train import main; "
            f"sys.exit(main(sys.argv[1:]))")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, "--config", str(path)], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    from samliverseg.training.progress import read_events

    ev = read_events(proc.stdout)
    if proc.returncode != 0 or not ev or ev[-1]["event"] != "done":
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"run {name} failed with exit code {proc.returncode}")
    start = next(e for e in ev if e["event"] == "start")
    steps = [e for e in ev if e["event"] == "step"]
    done = ev[-1]
    vals = [e for e in ev if e["event"] == "validation"]
    epochs = [e for e in ev if e["event"] == "epoch"]
    train_s = done["time"] - start["time"]
    semi_steps = [s for s in steps if s["phase"] == 1]
    return {"name": name, "wall_s": wall, "setup_s": wall - train_s, "train_s": train_s, "steps": done["step"],
            "epochs": cfg["epochs"], "per_epoch_s": train_s / max(1, len(epochs)),
            "samples_per_s": done.get("samples_per_s"), "peak_rss_mb": done.get("peak_rss_mb"),
            "timing": done.get("timing"), "best_val_dice": done.get("best_dice"),
            "val_dice": [v["dice"] for v in vals],
            "conf_fraction": _mean([s["conf_fraction"] for s in semi_steps]),
            "u_th": _mean([s["u_th"] for s in semi_steps]),
            "model": done["model"], "unlabelled": start.get("unlabelled_cases")}


def test_dice(model_paths: List[str], tests, threads: int) -> List[List[float]]:
    """The 3D Dice of each model on each test phantom. The models share the frozen encoder, so every
    test slice is embedded once (by the first model) and each model's decoder runs Algorithm 1 on
    those embeddings: the computation of ``predict_volume`` (slabs of D_s, the last one overlapped,
    logits resized to the slice grid, σ > 0.5), without embedding the volume once per model."""
    import torch

    from samliverseg.modeling.slicing_student import slab_plan
    from samliverseg.automatic.student import load_student, model_window
    from samliverseg.core.windowing import apply_window

    torch.set_num_threads(threads)
    models = [load_student(p, kinds=("student", "semi")) for p in model_paths]
    s0, meta0 = models[0]
    embedded = []
    for p in tests:
        grey = apply_window(p.hu, model_window(meta0)).astype(np.float32)
        embedded.append(s0.embed(torch.from_numpy(grey), batch=4))
    out = []
    for student, meta in models:
        enc0 = {k: v for k, v in s0.state_dict().items() if k.startswith("encoder.")}
        assert all(torch.equal(v, student.state_dict()[k]) for k, v in enc0.items()), "encoders differ"
        dices = []
        for p, emb in zip(tests, embedded):
            k_total, d_s = emb.shape[0], student.slab_depth
            prob = np.zeros(p.hu.shape, dtype=np.float32)
            with torch.no_grad():
                for start, w0, w1 in slab_plan(k_total, d_s):
                    idx = torch.clamp(torch.arange(start, start + d_s), max=k_total - 1)
                    logits = student.decode(emb[idx].permute(1, 0, 2, 3)[None], out_hw=p.hu.shape[1:])
                    prob[w0:w1] = torch.sigmoid(logits[0, 0]).numpy()[w0 - start:w1 - start]
            pred, ref = prob > 0.5, p.labels > 0
            dices.append(2.0 * float((pred & ref).sum()) / max(1.0, float(pred.sum() + ref.sum())))
        out.append(dices)
    return out


def embedding_seconds(run_dir: Path) -> float:
    """The time the run spent embedding slices (its train.log lines "embedded N slices in X s")."""
    import re

    log = (run_dir / "train.log").read_text(encoding="utf-8") if (run_dir / "train.log").exists() else ""
    return float(sum(float(m.group(1)) for m in re.finditer(r"embedded \d+ slices in ([0-9.]+) s", log)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--labelled", type=int, default=2, help="k labelled training volumes")
    ap.add_argument("--unlabelled", type=int, default=4)
    ap.add_argument("--val", type=int, default=2)
    ap.add_argument("--test", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=[10, 64, 64], help="phantom size k j i")
    ap.add_argument("--spacing", type=float, nargs=3, default=[6.0, 6.0, 16.0], help="si sj sk mm")
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--finetune", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-3, help="base of the poly LR of phases 1-2")
    ap.add_argument("--warmup-lr", type=float, default=1e-2, help="constant LR of the warm-up")
    ap.add_argument("--ema", type=float, default=0.95, help="EMA momentum m (a short run: 1/(1-m) << steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decoder-norm", default="instance", help="the student decoder's norm (channel | instance)")
    ap.add_argument("--rampup", type=float, default=4.0, help="T_r in epochs")
    ap.add_argument("--u-th", type=float, default=0.05)
    ap.add_argument("--slab-depth", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--n-transforms", type=int, default=3)
    ap.add_argument("--weak-views", type=int, default=2)
    ap.add_argument("--strong-views", type=int, default=1)
    ap.add_argument("--encoder", default="lite_medsam")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-long", action="store_true", help="leave out the same-time supervised run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_semi_"))
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPU cores, load average {load0[0]:.1f} at the start; torch threads "
          f"{args.threads}; encoder/teacher {args.encoder}; work folder {work}", flush=True)
    try:
        data = make_data(work, args)
        phases = {"warmup": args.warmup, "finetune": args.finetune}
        emb = work / "embeddings"  # shared: the labelled/val embeddings are computed once (by run 1)
        runs = []
        sup = run_train(config(args, data["cache_sup"], work / "supervised", args.epochs, phases, emb), work,
                        "supervised", args.threads)
        sup["embed_s"] = emb_lab = embedding_seconds(work / "supervised")
        sup["cost_s"] = sup["wall_s"]
        runs.append(sup)
        print(f"supervised: {sup['wall_s']:.0f} s ({emb_lab:.0f} s embedding)", flush=True)
        semi = run_train(config(args, data["cache_semi"], work / "semi", args.epochs, phases, emb), work, "semi",
                         args.threads)
        semi["embed_s"] = embedding_seconds(work / "semi")
        semi["cost_s"] = semi["wall_s"] + emb_lab  # + the labelled/val embeddings it reused
        runs.append(semi)
        print(f"semi: {semi['wall_s']:.0f} s ({semi['embed_s']:.0f} s embedding)", flush=True)
        # supervised with as many optimiser steps as the semi run (does the unlabelled data help at equal steps?)
        per_epoch_steps = max(1, sup["steps"] // args.epochs)
        epochs = max(args.epochs, int(round(semi["steps"] / per_epoch_steps)))
        scale = epochs / float(args.epochs)
        ph = {"warmup": int(round(args.warmup * scale)), "finetune": int(round(args.finetune * scale))}
        same = run_train(config(args, data["cache_sup"], work / "supervised_steps", epochs, ph, emb), work,
                         "supervised (same steps)", args.threads)
        same["embed_s"] = embedding_seconds(work / "supervised_steps")
        same["cost_s"] = same["wall_s"] + emb_lab
        runs.append(same)
        print(f"supervised (same steps): {same['wall_s']:.0f} s", flush=True)
        if not args.skip_long:
            overhead = max(0.0, sup["setup_s"] - emb_lab)
            epochs = max(args.epochs, int(round((semi["cost_s"] - emb_lab - overhead) / sup["per_epoch_s"])))
            scale = epochs / float(args.epochs)
            ph = {"warmup": int(round(args.warmup * scale)), "finetune": int(round(args.finetune * scale))}
            long = run_train(config(args, data["cache_sup"], work / "supervised_long", epochs, ph, emb), work,
                             "supervised (same time)", args.threads)
            long["embed_s"] = embedding_seconds(work / "supervised_long")
            long["cost_s"] = long["wall_s"] + emb_lab
            runs.append(long)
            print(f"supervised (same time): {long['wall_s']:.0f} s", flush=True)
        t0 = time.time()
        for r, d in zip(runs, test_dice([r["model"] for r in runs], data["tests"], args.threads)):
            r["test_dice"] = d
        print(f"test evaluation: {time.time() - t0:.0f} s", flush=True)
        load1 = os.getloadavg()
        print()
        print(f"{args.labelled} labelled + {args.val} val + {args.test} test phantoms {tuple(args.shape)} at "
              f"{tuple(args.spacing)} mm; semi adds {args.unlabelled} unlabelled; load average {load0[0]:.1f} -> "
              f"{load1[0]:.1f} on {os.cpu_count()} cores")
        head = (f"{'run':<24}{'unlab':>6}{'epochs':>7}{'steps':>6}{'cost s':>8}{'embed':>7}{'train':>7}"
                f"{'slabs/s':>8}{'RSS MB':>8}{'teach s':>8}{'conf':>6}{'val Dice':>9}{'test Dice':>10}")
        print(head)
        print("-" * len(head))
        for r in runs:
            t = r["timing"] or {}
            print(f"{r['name']:<24}{r['unlabelled'] or 0:>6}{r['epochs']:>7}{r['steps']:>6}{r['cost_s']:>8.0f}"
                  f"{r['embed_s']:>7.0f}{r['train_s']:>7.0f}{(r['samples_per_s'] or 0):>8.2f}"
                  f"{(r['peak_rss_mb'] or 0):>8.0f}{t.get('teacher_s', 0):>8.0f}"
                  f"{(r['conf_fraction'] if r['conf_fraction'] is not None else float('nan')):>6.2f}"
                  f"{(r['best_val_dice'] or 0):>9.3f}{np.mean(r['test_dice']):>10.3f}")
        print("cost s: wall time of the run + the labelled/val embedding time it reused from run 1 (the CPU budget); "
              "embed: its own embedding time; train: from the start event to done; slabs/s: training throughput; "
              "RSS: the trainer's peak resident memory; teach s: time in the teachers; conf: mean confident-voxel "
              "fraction in phase 1; val Dice: best EMA Dice on the val phantoms (selects the epoch); test Dice: "
              "model.pth on the held-out phantoms")
        print("test Dice per case: " + "; ".join(f"{r['name']}: " + ", ".join(f"{d:.3f}" for d in r["test_dice"])
                                                for r in runs))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "load": [load0, load1]}, indent=1,
                                                  default=str))
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
