#!/usr/bin/env python
"""Benchmark of the slicing-SAM3D student (lite_medsam's TinyViT encoder, frozen + a 3D CNN
decoder). Prints tables (it is no test).

    .venv/bin/python benchmarks/bench_student.py [--device cpu] [--epochs 6] [--slabs-per-case 16]
                                                  [--skip-finetune] [--work DIR] [--json OUT.json]

1. Parameters: frozen encoder / trainable decoder.
2. Inference speed (Algorithm 1, ``predict_volume``) on a phantom: seconds per volume, split into
   the encoder (per slice) and the decoder (per slab); the decoder is untrained here (speed only).
3. A short fine-tune on ``../shared/data/ircadb-1.1`` (3D-IRCADb-01 patient 1, the only labelled
   real case) through ``samliverseg train`` (kind ``student``, target liver), **holding out
   slices**: the volume is cut along k into two cases, an upper part with ~60 % of the liver
   slices (train split) and the lower part (val split; its labels are used only for the
   trainer's validation Dice, which picks ``best.pt``, and for the evaluation). The trained
   ``model.pth`` then segments the whole volume prompt-free (``student_inference.segment_volume``:
   timed, the ircadb seconds per volume), and the liver Dice is reported separately on the
   trained slices (train = test there) and on the held-out slices (same patient, never trained
   on; the val split also selected the best epoch, so it is not a fully untouched test set).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from samliverseg.demo import sample_data
from samliverseg.models.build_sam import find_model_checkpoint
from samliverseg.core.evaluation import evaluate
from samliverseg.automatic.student import build_slicing_student, predict_volume
from samliverseg.modeling.slicing_student import slab_plan
from samliverseg.demo.phantom import make_phantom
from samliverseg.training.prepare import prepare_dataset, split_patients
from samliverseg.training.progress import read_events
from samliverseg.io.volume import Volume
from samliverseg.core.windowing import apply_window

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def table(rows, headers) -> str:
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(cells)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows])


def speed(student, grey: np.ndarray, batch_slices: int) -> dict:
    """Seconds per volume (predict_volume) and the encoder/decoder split, measured separately."""
    t = torch.from_numpy(grey[: min(4, len(grey))])
    student.embed(t[:1])  # warm-up
    t0 = time.perf_counter()
    emb = student.embed(t, batch=batch_slices)
    enc_per_slice = (time.perf_counter() - t0) / len(t)
    slab = emb[:1].expand(student.slab_depth, *emb.shape[1:]).permute(1, 0, 2, 3)[None]
    with torch.no_grad():
        t0 = time.perf_counter()
        student.decode(slab, out_hw=grey.shape[1:])
        dec_per_slab = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    prob = predict_volume(student, grey, batch_slices=batch_slices)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"shape_kji": list(grey.shape), "s_per_volume": total, "cpu_s_per_volume": cpu,
            "encoder_s_per_slice": enc_per_slice,
            "decoder_s_per_slab": dec_per_slab, "slabs": len(slab_plan(len(grey), student.slab_depth)),
            "mean_prob": float(prob.mean())}


def piece(volume: Volume, array: np.ndarray, k0: int) -> Volume:
    return Volume(array=array, spacing=volume.spacing, origin=tuple(volume.ijk_to_lps([0.0, 0.0, float(k0)])),
                  direction=volume.direction)


def finetune(args, work: Path) -> dict:
    import SimpleITK as sitk

    vol, masks = sample_data.load_ircadb()
    liver = masks["liver"].astype(np.uint8)
    tumour = sample_data.tumor_union(masks)
    label = liver.copy()
    label[tumour > 0] = 2
    ks = np.nonzero(liver.any(axis=(1, 2)))[0]
    cut = int(ks[int(round(0.6 * len(ks)))])  # upper ~60 % of the liver slices are trained on
    data = work / "pairs"
    data.mkdir(parents=True, exist_ok=True)
    for name, a, b in (("ircadb1upper", 0, cut), ("ircadb1lower", cut, vol.shape[0])):
        pv = piece(vol, vol.array[a:b], a)
        sitk.WriteImage(pv.to_sitk(), str(data / f"{name}.nii.gz"))
        sitk.WriteImage(pv.to_sitk(label[a:b]), str(data / f"{name}_label.nii.gz"))
    seed = next(s for s in range(100) if split_patients({"ircadb1upper": 1, "ircadb1lower": 1}, 0.5, s)
                == {"ircadb1lower"})
    cache = work / "cache"
    m = prepare_dataset(cache, data, window="abdomen", val_fraction=0.5, seed=seed)
    splits = {c["id"]: c["split"] for c in m["cases"]}
    assert splits == {"ircadb1upper": "train", "ircadb1lower": "val"}, splits
    run = work / "run"
    cfg = {"kind": "student", "cache": str(cache), "output": str(run), "base_model": "lite_medsam",
           "target": "liver", "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
           "scheduler": "cosine", "seed": 0, "device": args.device, "model_name": "bench-student-ircadb",
           "student": {"slab_depth": args.slab_depth, "hidden": args.hidden, "slabs_per_case": args.slabs_per_case,
                       "foreground_fraction": 0.6, "depth_flip": True, "inplane_flip": False,
                       "cache_dtype": "float16"}}
    cfg_path = work / "student.yaml"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    exe = shutil.which("samliverseg", path=str(Path(sys.executable).parent)) or "samliverseg"
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    # `samliverseg train` registers the finished model by name: keep that inside the work folder
    env = dict(os.environ, SAMLIVERSEG_MODELS=str(work / "user_models"))
    proc = subprocess.run([exe, "train", "--config", str(cfg_path)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    train_cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    events = read_events(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"samliverseg train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    log = (run / "train.log").read_text()
    embed_lines = [line.split("] ", 1)[1] for line in log.splitlines() if "embedded" in line]
    steps = [e for e in events if e["event"] == "step"]
    epochs = [e for e in events if e["event"] == "epoch"]
    vals = [e for e in events if e["event"] == "validation"]
    done = events[-1]

    from samliverseg.automatic.student import segment_volume
    t0, c0 = time.perf_counter(), time.process_time()
    mask = segment_volume(run / "model.pth", vol, device=args.device)
    infer_s, infer_cpu = time.perf_counter() - t0, time.process_time() - c0
    sp = vol.spacing
    res = {
        "cut_k": cut, "shape_kji": list(vol.shape), "liver_slices": [int(ks[0]), int(ks[-1])],
        "train_wall_s": wall, "train_cpu_s": train_cpu, "embedding": embed_lines, "steps": len(steps),
        "step_s_mean": float(np.mean(np.diff([e["time"] for e in steps]))) if len(steps) > 1 else None,
        "epoch_losses": [e["losses"]["train"] for e in epochs], "val_dice_native": [e["dice"] for e in vals],
        "best_val_dice_native": done.get("best_dice"), "segment_volume_s": infer_s,
        "segment_volume_cpu_s": infer_cpu, "load_avg_end": os.getloadavg()[0],
        "dice_trained_slices": evaluate(mask[:cut], liver[:cut], sp)["dice"],
        "dice_heldout_slices": evaluate(mask[cut:], liver[cut:], sp)["dice"],
        "dice_whole_volume": evaluate(mask, liver, sp)["dice"],
        "hd95_heldout_mm": evaluate(mask[cut:], liver[cut:], sp)["hd95_mm"],
        "recall_heldout": evaluate(mask[cut:], liver[cut:], sp)["recall"],
        "precision_heldout": evaluate(mask[cut:], liver[cut:], sp)["precision"],
    }
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--slab-depth", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-slices", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--slabs-per-case", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--work", default=None, help="keep the cache and run here (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if find_model_checkpoint("lite_medsam") is None:
        print("LiteMedSAM weights not installed: nothing to benchmark")
        return 1
    sys.stdout.reconfigure(line_buffering=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    results = {}
    torch.manual_seed(0)
    student = build_slicing_student("lite_medsam", slab_depth=args.slab_depth, hidden=args.hidden, device=args.device)
    counts = student.parameter_counts()
    results["parameters"] = counts
    print("\n" + table([["encoder (TinyViT, frozen)", f"{counts['encoder_frozen']:,}"],
                        ["decoder (3D CNN, trainable)", f"{counts['decoder_trainable']:,}"],
                        ["trainable share", f"{100 * counts['decoder_trainable'] / sum(counts.values()):.1f} %"]],
                       ["part", "parameters"]))

    p = make_phantom((64, 160, 160), (1.5, 1.5, 2.5), seed=0, n_tumors=3)
    grey = apply_window(p.hu, "abdomen").astype(np.float32)
    results["phantom_speed"] = speed(student, grey, args.batch_slices)
    rows = [["phantom", "x".join(map(str, grey.shape)), f"{results['phantom_speed']['s_per_volume']:.1f}",
             f"{results['phantom_speed']['cpu_s_per_volume']:.1f}",
             f"{results['phantom_speed']['encoder_s_per_slice']:.2f}", f"{results['phantom_speed']['decoder_s_per_slab']:.2f}",
             results["phantom_speed"]["slabs"]]]
    if not args.skip_finetune:
        if sample_data.shared_data_dir() is None:
            print(sample_data.missing_reason())
        else:
            work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_student_"))
            try:
                ft = finetune(args, work)
            finally:
                if not args.work:
                    shutil.rmtree(work, ignore_errors=True)
            results["ircadb"] = ft
            rows.append(["ircadb (segment_volume, trained model)", "x".join(map(str, ft["shape_kji"])),
                         f"{ft['segment_volume_s']:.1f}", f"{ft['segment_volume_cpu_s']:.1f}", "", "", len(slab_plan(ft["shape_kji"][0], args.slab_depth))])
    print("\nInference, Algorithm 1 (slab %d, %s):" % (args.slab_depth, args.device))
    print(f"(wall seconds on a shared machine: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"process CPU seconds are less sensitive to the other processes)")
    print(table(rows, ["volume", "K x J x I", "s / volume", "CPU s / volume", "encoder s / slice", "decoder s / slab", "slabs"]))
    if "ircadb" in results:
        ft = results["ircadb"]
        print(f"\nFine-tune on ircadb-1.1 (samliverseg train, kind student, target liver; train = slices "
              f"0..{ft['cut_k'] - 1}, held out = {ft['cut_k']}..{ft['shape_kji'][0] - 1}; liver slices "
              f"{ft['liver_slices'][0]}..{ft['liver_slices'][1]}):")
        for line in ft["embedding"]:
            print("  " + line)
        print(f"  {ft['steps']} optimiser steps (batch {args.batch_size} slabs), {ft['step_s_mean']:.2f} s/step; "
              f"train wall {ft['train_wall_s']:.0f} s, CPU {ft['train_cpu_s']:.0f} s (embedding included)")
        print("  epoch losses: " + ", ".join(f"{v:.3f}" for v in ft["epoch_losses"]))
        print("  val Dice (held-out piece, native 256x256, per epoch): "
              + ", ".join(f"{v:.3f}" for v in ft["val_dice_native"]))
        print(table([["trained slices (train = test)", f"{ft['dice_trained_slices']:.3f}", ""],
                     ["held-out slices", f"{ft['dice_heldout_slices']:.3f}",
                      f"HD95 {ft['hd95_heldout_mm']:.1f} mm, precision {ft['precision_heldout']:.3f}, "
                      f"recall {ft['recall_heldout']:.3f}"],
                     ["whole volume", f"{ft['dice_whole_volume']:.3f}", ""]],
                    ["liver Dice, full resolution, prompt-free", "Dice", "other"]))
    results["peak_rss_mb"] = peak_rss_mb()
    print(f"\npeak RSS {results['peak_rss_mb']:.0f} MiB (this process; training ran in a subprocess)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
