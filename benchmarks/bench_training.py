#!/usr/bin/env python
"""Benchmark of MedSAM-style decoder fine-tuning on 3D-IRCADb-01 patient 1, split by lesion.

    .venv/bin/python benchmarks/bench_training.py [--folds 2] [--train-lesions 1,2,3,4]
        [--epochs 15] [--max-slices 16] [--device cpu] [--json out.json] [--work DIR --keep]

It prints tables (it is no test). What it does:

* **Lesion split.** ``../shared/data/ircadb-1.1`` has one patient with seven tumours
  (``livertumor01`` .. ``07``). Fold A trains on the lesions of ``--train-lesions`` (default
  1-4: 162 337, 14 464, 7 192 and 4 859 voxels) and tests on the others (5-7: 19 426, 766,
  5 224 voxels); fold B (``--folds 2``, the default) swaps the two sides, so that every lesion is
  held out exactly once. The default sides are also the lesions' groups along k (1-2 on slices
  48-86, 3-4 on 88-104, 5-7 on 106-123): no axial slice holds a lesion of both sides.
* **Derived labels, written to a temporary work folder** (``--work``; never into the repository
  or ``../shared``): the training label is 1 on the liver and 2 on the training lesions only,
  and every axial slice that holds a voxel of a held-out lesion is removed from training by
  turning its label 2 into 1 (the trainer takes the slices that contain the target, label 2, so
  such a slice is not selected). A held-out lesion is thus never shown to the decoder, neither as
  tumour nor as background. The test label (1 liver, 2 held-out lesions) goes into the same
  cache as a second case of the same patient, put into the ``test`` split by an explicit
  ``"split"`` in the dataset.json (``training/prepare.py``); without it both cases of the one
  patient would land in ``train``. The trainer reads only ``train`` (there is no ``val`` case:
  a val split made of held-out lesions would select the epoch on the test lesions, so
  ``model.pth`` is the last epoch).
* **Training:** ``samliverseg train`` (a subprocess, kind ``decoder``, target ``tumor``,
  ``lite_medsam``), at most ``--max-slices`` slices, ``--epochs`` epochs (``SAMLIVERSEG_MODELS``
  points into the work folder, so that the run is not registered among the user's models). Reported: the slices
  used and excluded, the time of the embedding precompute (from the trainer's log), training
  throughput (samples/s, from the ``done`` event), the trainer's peak RSS, the train loss of the
  first and last epoch, wall time.
* **Evaluation** on the original CT with :class:`~samliverseg.interactive.engine.PromptEngine`, as
  ``bench_engine.py`` does (its functions are reused): per lesion, the 3D Dice of one box on the
  lesion's middle slice (the lesion's bounding box there + ``--margin`` voxels) + propagation,
  and the mean 2D Dice of one box per slice on every slice of the lesion. Zero-shot
  ``lite_medsam`` against the fine-tuned ``model.pth`` loaded with
  ``PromptEngine(model="lite_medsam", checkpoint=model.pth)``. The image encoder is frozen in
  fine-tuning (checked: its weights in ``model.pth`` equal the base ones), so the slice
  embeddings are computed once and the fine-tuned weights are loaded into the same engine.
  The training lesions are evaluated too and shown apart ("seen"; not a test).

CPU: about 1 s per LiteMedSAM slice embedding; the defaults take a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import box_prompt, equivalent_diameter_mm, peak_rss_mb, print_table, run_one  # noqa: E402

from samliverseg import sample_data  # noqa: E402
from samliverseg.models.build_sam import find_model_checkpoint, get_spec  # noqa: E402
from samliverseg.interactive.engine import PromptEngine  # noqa: E402
from samliverseg.core.evaluation import evaluate  # noqa: E402
from samliverseg.core.maskutil import bbox_2d  # noqa: E402
from samliverseg.core.prompts import Prompts, SliceBox  # noqa: E402
from samliverseg.training.prepare import prepare_dataset  # noqa: E402
from samliverseg.training.progress import read_events  # noqa: E402

MODEL = "lite_medsam"
PATIENT = "ircadb1"


def lesion_name(n: int) -> str:
    return f"livertumor{n:02d}"


def slices_of(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))


def lesion_split_labels(liver: np.ndarray, tumors: Dict[str, np.ndarray], train: Sequence[str],
                        test: Sequence[str]):
    """(train label, test label, info): uint8 [k, j, i], 0 background, 1 liver, 2 tumour.

    Train label: 2 on the ``train`` lesions, except on the axial slices that hold a voxel of a
    ``test`` lesion, where it is 1 (those slices have no target and are not trained on).
    Test label: 2 on the ``test`` lesions.
    """
    held = np.zeros(liver.shape, dtype=bool)
    for n in test:
        held |= tumors[n] > 0
    seen = np.zeros(liver.shape, dtype=bool)
    for n in train:
        seen |= tumors[n] > 0
    held_k = set(slices_of(held).tolist())
    seen_k = set(slices_of(seen).tolist())
    train_label = (liver > 0).astype(np.uint8)
    train_label[seen] = 2
    for k in held_k:
        train_label[k][train_label[k] == 2] = 1
    test_label = (liver > 0).astype(np.uint8)
    test_label[held] = 2
    info = {"train_target_slices": len(seen_k - held_k), "excluded_slices": sorted(seen_k & held_k),
            "held_out_slices": len(held_k)}
    return train_label, test_label, info


def write_label(volume, label: np.ndarray, path: Path) -> None:
    sitk.WriteImage(volume.to_sitk(label.astype(np.uint8)), str(path), True)


def write_ct(volume, path: Path) -> None:
    """The CT as NIfTI (int16 when the HU are integers, as in DICOM; else float32)."""
    arr = volume.array
    as_int = np.round(arr)
    if np.array_equal(as_int, arr) and as_int.min() >= -32768 and as_int.max() <= 32767:
        arr = as_int.astype(np.int16)
    sitk.WriteImage(volume.to_sitk(arr), str(path), False)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (prepare resolves symbolic links, and the case id is the file name)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def prepare_fold(work: Path, tag: str, ct: Path, volume, train_label, test_label, window: str) -> Dict:
    d = work / tag
    d.mkdir(parents=True, exist_ok=True)
    link_or_copy(ct, d / f"{tag}_train.nii")
    link_or_copy(ct, d / f"{tag}_test.nii")
    write_label(volume, train_label, d / f"{tag}_train_label.nii.gz")
    write_label(volume, test_label, d / f"{tag}_test_label.nii.gz")
    ds = {"name": f"3D-IRCADb-01 patient 1, lesion split {tag}",
          "labels": {"0": "background", "1": "liver", "2": "tumour"},
          "training": [{"image": f"{tag}_train.nii", "label": f"{tag}_train_label.nii.gz", "patient": PATIENT,
                        "split": "train"},
                       {"image": f"{tag}_test.nii", "label": f"{tag}_test_label.nii.gz", "patient": PATIENT,
                        "split": "test"}]}
    (d / "dataset.json").write_text(json.dumps(ds, indent=1))
    t0 = time.perf_counter()
    manifest = prepare_dataset(d / "cache", d / "dataset.json", window=window)
    seconds = time.perf_counter() - t0
    splits = {c["id"]: c["split"] for c in manifest["cases"]}
    if splits != {f"{tag}_train": "train", f"{tag}_test": "test"}:
        raise SystemExit(f"prepare did not keep the explicit lesion split: {splits}; problems {manifest['problems']}")
    return {"cache": d / "cache", "prepare_s": seconds}


def train_fold(work: Path, tag: str, cache: Path, args) -> Dict:
    run = work / tag / "run"
    cfg = {"kind": "decoder", "cache": str(cache), "output": str(run), "base_model": MODEL, "target": "tumor",
           "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "box_jitter_px": args.box_jitter,
           "max_slices_per_case": args.max_slices, "seed": args.seed, "device": args.device, "scheduler": "constant"}
    cfg_path = work / tag / "train.yaml"
    cfg_path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    # `samliverseg train` registers the finished model in the user models folder: keep that in the work folder
    env = dict(os.environ, PYTHONUNBUFFERED="1", SAMLIVERSEG_MODELS=str(work / "user-models"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "samliverseg", "train", "--config", str(cfg_path)],
                          capture_output=True, text=True, env=env, timeout=args.train_timeout)
    wall = time.perf_counter() - t0
    events = read_events(proc.stdout)
    if proc.returncode != 0 or not events or events[-1]["event"] != "done":
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"training {tag} failed (exit {proc.returncode}): {events[-1] if events else 'no events'}")
    start = next(e for e in events if e["event"] == "start")
    done = events[-1]
    losses = [e["losses"]["train"] for e in events if e["event"] == "epoch"]
    log = (run / "train.log").read_text(encoding="utf-8")
    m = re.search(r"train: embedded (\d+) slices in ([\d.]+) s", log)
    return {"run": run, "model": Path(done["model"]), "wall_s": wall, "train_slices": start["train_slices"],
            "steps": done["step"], "samples_per_s": done.get("samples_per_s"), "peak_rss_mb": done.get("peak_rss_mb"),
            "embed_slices": int(m.group(1)) if m else None, "embed_s": float(m.group(2)) if m else None,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "losses": losses}


def eval_lesion(engine: PromptEngine, mask: np.ndarray, spacing, margin: int) -> Dict:
    """3D Dice (one box on the middle slice + propagation) and 2D Dice (one box per slice)."""
    r = run_one(engine, box_prompt(mask, margin), mask, spacing)
    rows, cols = mask.shape[1:]
    d2 = []
    for k in slices_of(mask):
        i0, j0, i1, j1 = bbox_2d(mask[k])
        box = SliceBox.axial(max(0, i0 - margin), max(0, j0 - margin), min(cols - 1, i1 + margin),
                             min(rows - 1, j1 + margin), int(k))
        res = engine.segment_slice(Prompts(box=box))
        d2.append(float(evaluate(res.mask, mask[k], spacing[:2])["dice"]))
    return {"dice3d": r["dice"], "hd95_mm": r["hd95_mm"], "vol_ml": r["vol_ml"], "ref_ml": r["ref_ml"],
            "stop": r["stop"], "dice2d_mean": float(np.mean(d2)), "dice2d": d2}


def load_finetuned(engine: PromptEngine, model_path: Path, device: str) -> Dict:
    """Load model.pth with PromptEngine(checkpoint=...), check it, put its weights into ``engine``."""
    ft = PromptEngine(model=MODEL, checkpoint=str(model_path), device=device)
    base, new = engine.model.state_dict(), ft.model.state_dict()
    enc = [k for k in base if k.startswith("image_encoder.")]
    if not all(torch.equal(base[k].cpu(), new[k].cpu()) for k in enc):
        raise SystemExit(f"{model_path}: the image encoder differs from the base model; cannot reuse embeddings")
    changed = [k for k in base if k.startswith("mask_decoder.") and not torch.equal(base[k].cpu(), new[k].cpu())]
    meta = torch.load(model_path, map_location="cpu", weights_only=True)["metadata"]
    if meta.get("window") != engine.window.spec() or meta.get("target") != "tumor":
        raise SystemExit(f"{model_path}: metadata {meta.get('window')!r}/{meta.get('target')!r} does not match "
                         f"the engine's window {engine.window.spec()!r} / target tumor")
    engine.model.load_state_dict(new)
    del ft
    return {"decoder_tensors_changed": len(changed), "metadata_window": meta.get("window")}


def fmt(v, nd=3):
    return "-" if v is None else f"{v:.{nd}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-lesions", default="1,2,3,4", help="lesion numbers (1-7) trained on in fold A")
    ap.add_argument("--folds", type=int, default=2, choices=(1, 2), help="2: also the swapped split (fold B)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--max-slices", type=int, default=16, help="max_slices_per_case of the trainer")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--box-jitter", type=int, default=5, help="box_jitter_px (model-input pixels)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--margin", type=int, default=2, help="box margin in voxels around a lesion (bench_engine: 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="work folder (default: a new temporary folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--train-timeout", type=float, default=1800)
    ap.add_argument("--json", default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    if sample_data.shared_data_dir() is None:
        print(f"benchmark skipped: {sample_data.missing_reason()}")
        return 0
    if find_model_checkpoint(MODEL) is None:
        print(f"benchmark skipped: the {MODEL} weights are not installed")
        return 0
    t_all = time.perf_counter()
    volume, masks = sample_data.load_ircadb()
    tumors = {n: m for n, m in masks.items() if n.startswith("livertumor")}
    all_lesions = sorted(tumors)
    side_a = [lesion_name(int(x)) for x in args.train_lesions.split(",") if x.strip()]
    if not side_a or any(n not in tumors for n in side_a) or len(side_a) == len(all_lesions):
        raise SystemExit(f"--train-lesions must name some (not all) of 1..{len(all_lesions)}")
    side_b = [n for n in all_lesions if n not in side_a]
    folds = [("foldA", side_a, side_b)] + ([("foldB", side_b, side_a)] if args.folds == 2 else [])
    spacing = volume.spacing
    size = {n: {"voxels": int(tumors[n].sum()), "d_mm": equivalent_diameter_mm(tumors[n], spacing),
                "slices": [int(slices_of(tumors[n])[0]), int(slices_of(tumors[n])[-1])]} for n in all_lesions}
    window = get_spec(MODEL).window

    made_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="samliverseg-bench-training-")) if made_work else Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    results: Dict = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "lesions": size, "folds": {}}
    try:
        ct = work / "ct.nii"
        write_ct(volume, ct)
        # ---- training, one fold after the other
        for tag, train, test in folds:
            train_label, test_label, info = lesion_split_labels(masks["liver"], tumors, train, test)
            print(f"{tag}: train on {', '.join(train)}; test on {', '.join(test)}; "
                  f"{info['train_target_slices']} training slices with tumour, "
                  f"{len(info['excluded_slices'])} excluded (they hold a held-out lesion)", file=sys.stderr, flush=True)
            prep = prepare_fold(work, tag, ct, volume, train_label, test_label, window)
            print(f"{tag}: prepared in {prep['prepare_s']:.1f} s; training ...", file=sys.stderr, flush=True)
            tr = train_fold(work, tag, prep["cache"], args)
            print(f"{tag}: trained in {tr['wall_s']:.1f} s ({tr['steps']} steps)", file=sys.stderr, flush=True)
            results["folds"][tag] = {"train": train, "test": test, "split_info": info, "prepare_s": prep["prepare_s"],
                                     "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in tr.items()}}

        # ---- evaluation: zero-shot once for every lesion, then each fold's model
        engine = PromptEngine(MODEL, device=args.device, window=window, cache_mb=8192)
        engine.set_volume(volume)
        zero_state = {k: v.clone() for k, v in engine.model.state_dict().items()}
        t0 = time.perf_counter()
        zs = {}
        for n in all_lesions:
            print(f"zero-shot: {n}", file=sys.stderr, flush=True)
            zs[n] = eval_lesion(engine, tumors[n], spacing, args.margin)
        results["zero_shot"] = zs
        results["eval_embed"] = {"slices": len(engine.embed_times), "s": float(np.sum(engine.embed_times))}
        results["zero_shot_eval_s"] = time.perf_counter() - t0
        for tag, train, test in folds:
            engine.model.load_state_dict(zero_state)
            results["folds"][tag]["loaded"] = load_finetuned(engine, Path(results["folds"][tag]["training"]["model"]),
                                                             args.device)
            ft = {}
            for n in test + train:
                print(f"{tag} fine-tuned: {n}", file=sys.stderr, flush=True)
                ft[n] = eval_lesion(engine, tumors[n], spacing, args.margin)
            results["folds"][tag]["fine_tuned"] = ft
        engine.model.load_state_dict(zero_state)
    finally:
        if made_work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif made_work or args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)

    # ---- tables
    rows = []
    for tag, f in results["folds"].items():
        t, info = f["training"], f["split_info"]
        rows.append([tag, ",".join(n[-2:] for n in f["train"]), ",".join(n[-2:] for n in f["test"]),
                     f"{t['train_slices']}/{info['train_target_slices']}", len(info["excluded_slices"]),
                     f"{fmt(t['embed_s'], 1)} ({t['embed_slices']})", t["steps"], fmt(t["samples_per_s"], 1),
                     fmt(t["peak_rss_mb"], 0), f"{fmt(t['loss_first'])}->{fmt(t['loss_last'])}", fmt(t["wall_s"], 0)])
    print_table(f"decoder fine-tuning of {MODEL} (target tumor, {args.epochs} epochs, batch {args.batch_size}, "
                f"lr {args.lr:g}, max {args.max_slices} slices, device {args.device})",
                ["fold", "train lesions", "test lesions", "slices used/with tumour", "excluded", "embed s (slices)",
                 "steps", "samples/s", "trainer peak RSS MB", "loss first->last epoch", "wall s"], rows)

    def lesion_rows(role: str):
        out, pairs = [], []
        for tag, f in results["folds"].items():
            for n in (f["test"] if role == "held-out" else f["train"]):
                z, m = results["zero_shot"][n], f["fine_tuned"][n]
                s = size[n]
                pairs.append((z, m, len(z["dice2d"])))
                out.append([tag, n, s["voxels"], f"{s['d_mm']:.0f}", f"{s['slices'][0]}-{s['slices'][1]}",
                            fmt(z["dice3d"]), fmt(m["dice3d"]), f"{m['dice3d'] - z['dice3d']:+.3f}",
                            fmt(z["dice2d_mean"]), fmt(m["dice2d_mean"]), f"{m['dice2d_mean'] - z['dice2d_mean']:+.3f}"])
        if pairs:
            zs3, ft3 = np.mean([p[0]["dice3d"] for p in pairs]), np.mean([p[1]["dice3d"] for p in pairs])
            zs2, ft2 = np.mean([p[0]["dice2d_mean"] for p in pairs]), np.mean([p[1]["dice2d_mean"] for p in pairs])
            pz = np.mean([d for p in pairs for d in p[0]["dice2d"]])
            pf = np.mean([d for p in pairs for d in p[1]["dice2d"]])
            nsl = sum(p[2] for p in pairs)
            out.append(["mean", f"{len(pairs)} lesions", "", "", "", fmt(zs3), fmt(ft3), f"{ft3 - zs3:+.3f}",
                        fmt(zs2), fmt(ft2), f"{ft2 - zs2:+.3f}"])
            out.append(["pooled 2D", f"{nsl} slices", "", "", "", "", "", "", fmt(pz), fmt(pf), f"{pf - pz:+.3f}"])
            results[f"summary_{role}"] = {"lesions": len(pairs), "dice3d_zero_shot": zs3, "dice3d_fine_tuned": ft3,
                                          "dice2d_zero_shot": zs2, "dice2d_fine_tuned": ft2,
                                          "dice2d_pooled_zero_shot": pz, "dice2d_pooled_fine_tuned": pf, "slices": nsl}
        return out

    header = ["fold", "lesion", "voxels", "d mm", "slices k", "3D Dice ZS", "3D Dice FT", "3D diff",
              "2D Dice ZS", "2D Dice FT", "2D diff"]
    print_table(f"held-out lesions (test): one box (+{args.margin} vox) on the middle slice + propagation (3D), "
                f"one box per slice (2D mean); ZS = zero-shot {MODEL}, FT = fine-tuned model.pth",
                header, lesion_rows("held-out"))
    print_table("training lesions (seen in fine-tuning; a fit check, not a test)", header, lesion_rows("seen"))
    ee = results["eval_embed"]
    results["peak_rss_mb"] = peak_rss_mb()
    results["children_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    results["total_s"] = time.perf_counter() - t_all
    print(f"\nevaluation: {ee['slices']} slice embeddings in {ee['s']:.1f} s ({1000 * ee['s'] / max(1, ee['slices']):.0f} "
          f"ms/slice), shared by the zero-shot and fine-tuned decoders; peak RSS of this process "
          f"{results['peak_rss_mb']:.0f} MB, of the trainer processes {results['children_peak_rss_mb']:.0f} MB; "
          f"total {results['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
