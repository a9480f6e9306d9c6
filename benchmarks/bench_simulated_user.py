#!/usr/bin/env python
"""A simulated user: one box, then up to five corrective clicks. Prints tables (it is no test).

    PYTHONPATH=SAMLiverSegLib .venv/bin/python benchmarks/bench_simulated_user.py \
        [--backend auto] [--cases ircadb,totalseg] [--starts 20,35,50,65,80] [--clicks 5] [--json out.json]

The loop of the CVPR 2025 interactive 3D segmentation challenge, on the shared real CT:

* step 0: a box on one axial slice of the reference (its bounding box there plus ``--margin``
  voxels; ``--margin`` // 2, at least 1, for tumours), on the slice at ``--starts`` percent of the
  object's extent in k (50 = the middle), segmented and propagated (``CorrectionSession``);
* steps 1..``--clicks``: the largest 3D connected component of the error (false negatives and false
  positives labelled apart, 26-connected) is found, and one click is placed at its deepest point
  (the maximum of its distance transform, in mm) on that point's axial slice: a positive click for a
  false negative, a negative one for a false positive;
* Dice after each step, the area under the Dice curve over steps 0..N (trapezoids, divided by N),
  and the seconds of each correction (the slices of the objects' extent +-10 are embedded first, so
  these are the seconds of a correction with cached embeddings; the initial box's seconds are reported
  apart).

Objects: the liver of ircadb-1.1 and of the totalseg example, each of the 7 ircadb-1.1 tumours.
With ``--variants`` the case variants of ``benchmarks/variants.py`` (when that file exists) are run
too. A failed step (an error) is reported in the table and the object's Dice stays where it was.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from samliverseg.core.errors import SAMLiverSegError
from samliverseg.core.evaluation import dice
from samliverseg.core.maskutil import bbox_2d
from samliverseg.core.prompts import Prompts, SliceBox
from samliverseg.demo import sample_data
from samliverseg.interactive.engine import PromptEngine
from samliverseg.interactive.session3d import CorrectionSession

HERE = Path(__file__).resolve().parent
#: Slices embedded beyond the objects' extent before the runs (propagation may leak a few slices).
PREFETCH_MARGIN = 10


def start_slice(truth: np.ndarray, percent: float) -> int:
    """The axial slice at ``percent`` of the object's extent in k (0 = its first slice), holding the object."""
    ks = np.flatnonzero(truth.any(axis=(1, 2)))
    k = int(round(ks[0] + percent / 100.0 * (ks[-1] - ks[0])))
    return int(ks[np.argmin(np.abs(ks - k))])


def box_on(truth: np.ndarray, k: int, margin: int) -> SliceBox:
    i0, j0, i1, j1 = bbox_2d(truth[k])
    return SliceBox.axial(i0 - margin, j0 - margin, i1 + margin, j1 + margin, k)


def next_click(pred: np.ndarray, truth: np.ndarray, spacing) -> Optional[Tuple[Tuple[float, float, float], bool, int]]:
    """((i, j, k), positive, voxels of the error component) at the deepest point of the largest 3D error
    component; None when there is no error."""
    best = None
    for positive, err in ((True, truth & ~pred), (False, pred & ~truth)):
        if not err.any():
            continue
        lab, n = ndimage.label(err, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        c = int(np.argmax(sizes))
        if best is None or sizes[c] > best[2]:
            best = (lab, c, int(sizes[c]), positive)
    if best is None:
        return None
    lab, c, size, positive = best
    sl = ndimage.find_objects((lab == c).astype(np.uint8))[0]
    comp = np.pad(lab[sl] == c, 1)
    si, sj, sk = (float(s) for s in spacing)
    dist = ndimage.distance_transform_edt(comp, sampling=(sk, sj, si))[1:-1, 1:-1, 1:-1]
    k, j, i = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (float(i + sl[2].start), float(j + sl[1].start), float(k + sl[0].start)), positive, size


def auc(dices: List[float]) -> float:
    n = len(dices) - 1
    return float((sum(dices) - (dices[0] + dices[-1]) / 2.0) / n) if n > 0 else float(dices[0])


def simulate(engine: PromptEngine, truth: np.ndarray, spacing, k: int, margin: int, clicks: int) -> dict:
    truth = truth > 0
    t0 = time.perf_counter()
    try:
        session = CorrectionSession(engine, Prompts(box=box_on(truth, k, margin)))
    except SAMLiverSegError as exc:
        return {"error": f"initial box: {exc}", "dice": [0.0] * (clicks + 1), "seconds": [], "clicks": []}
    out = {"box_seconds": time.perf_counter() - t0, "dice": [dice(session.mask, truth)], "seconds": [], "clicks": [],
           "decoded": [], "changed": []}
    for _ in range(clicks):
        pred = session.mask > 0
        click = next_click(pred, truth, spacing)
        if click is None:
            out["dice"].append(out["dice"][-1])
            continue
        ijk, positive, size = click
        t1 = time.perf_counter()
        try:
            corr = session.add_point(ijk, positive=positive)
        except SAMLiverSegError as exc:
            out.setdefault("errors", []).append(str(exc))
            out["dice"].append(out["dice"][-1])
            continue
        out["seconds"].append(time.perf_counter() - t1)
        out["clicks"].append(("+" if positive else "-") + f"k{int(ijk[2])}({size})")
        out["decoded"].append(len(corr.decoded_slices))
        out["changed"].append(len(corr.changed_slices))
        out["dice"].append(dice(session.mask, truth))
    out["auc"] = auc(out["dice"])
    return out


def fmt_row(cells, widths):
    return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"


def print_table(title: str, header: List[str], rows: List[list]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print(fmt_row(header, widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(fmt_row(r, widths))
    sys.stdout.flush()


def row_of(case: str, obj: str, start: str, r: dict, clicks: int) -> list:
    d = r["dice"] + [r["dice"][-1]] * (clicks + 1 - len(r["dice"]))
    secs = r.get("seconds") or []
    return [case, obj, start] + [f"{v:.3f}" for v in d] + [
        f"{r.get('auc', auc(d)):.3f}",
        f"{r['box_seconds']:.2f}" if "box_seconds" in r else "-",
        f"{np.mean(secs):.2f}/{np.max(secs):.2f}" if secs else "-",
        " ".join(r.get("clicks", [])) + ("; " + r["error"] if "error" in r else "")
        + ("; errors: " + " | ".join(r["errors"]) if r.get("errors") else ""),
    ]


def load_variants():
    """``benchmarks/variants.py`` (written beside this file by another change), or None."""
    path = HERE / "variants.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("bench_variants", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def run_case(engine, case: str, volume, objects: Dict[str, Tuple[np.ndarray, int, List[float]]], clicks: int,
             results: dict, rows: List[list]) -> None:
    engine.set_volume(volume)
    t0 = time.perf_counter()
    ks = np.flatnonzero(np.any([truth.any(axis=(1, 2)) for truth, _, _ in objects.values()], axis=0))
    todo = range(max(0, int(ks[0]) - PREFETCH_MARGIN), min(volume.array.shape[0], int(ks[-1]) + PREFETCH_MARGIN + 1))
    engine.prefetch(todo)
    print(f"{case}: {len(todo)} slices embedded in {time.perf_counter() - t0:.1f} s "
          f"(backend {engine.backend.name}, {engine.backend.precision})")
    sys.stdout.flush()
    for obj, (truth, margin, starts) in objects.items():
        for pct in starts:
            k = start_slice(truth, pct)
            r = simulate(engine, truth, volume.spacing, k, margin, clicks)
            r.update(start_percent=pct, start_slice=k)
            results[f"{case}/{obj}/{pct:g}%"] = r
            rows.append(row_of(case, obj, f"{pct:g}% (k={k})", r, clicks))
            print("  " + " ".join(str(c) for c in rows[-1]))
            sys.stdout.flush()


def summary(results: dict, clicks: int) -> List[list]:
    out = []
    for label, pick in (("liver", lambda key: key.split("/")[1] == "liver"),
                        ("tumours", lambda key: key.split("/")[1].startswith("livertumor"))):
        rs = [r for key, r in results.items() if pick(key)]
        if not rs:
            continue
        d = np.array([r["dice"] + [r["dice"][-1]] * (clicks + 1 - len(r["dice"])) for r in rs])
        secs = [s for r in rs for s in r.get("seconds", [])]
        out.append([label, str(len(rs))] + [f"{v:.3f}" for v in d.mean(axis=0)] + [
            f"{float(np.mean([r.get('auc', 0.0) for r in rs])):.3f}", f"{float(d[:, min(1, clicks)].min()):.3f}",
            f"{np.mean(secs):.2f}" if secs else "-", f"{np.median(secs):.2f}" if secs else "-",
            f"{np.max(secs):.2f}" if secs else "-"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lite_medsam")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--margin", type=int, default=5, help="box margin in voxels around the reference (liver)")
    ap.add_argument("--cases", default="ircadb,totalseg")
    ap.add_argument("--objects", default="liver,tumours", help="liver and/or tumours (ircadb-1.1 only)")
    ap.add_argument("--starts", default="50", help="start slices, percent of the object's k extent (liver only; "
                                                   "tumours start at 50)")
    ap.add_argument("--tumours", default="", help="only these tumours, e.g. 1,3 (default: all)")
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--variants", action="store_true", help="also the variants of benchmarks/variants.py")
    ap.add_argument("--json", default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    if sample_data.shared_data_dir() is None:
        print(f"benchmark skipped: {sample_data.missing_reason()}")
        return 0
    starts = [float(s) for s in args.starts.split(",") if s.strip()]
    engine = PromptEngine(args.model, device=args.device, backend=args.backend, cache_mb=4096)
    results: dict = {}
    rows: List[list] = []
    cases = []
    if "ircadb" in args.cases:
        vol, masks = sample_data.load_ircadb()
        objects = {}
        if "liver" in args.objects:
            objects["liver"] = (masks["liver"] > 0, args.margin, starts)
        if "tumour" in args.objects:
            wanted = {f"livertumor{int(t):02d}" for t in args.tumours.split(",") if t.strip()}
            for name in sorted(k for k in masks if k.startswith("livertumor")):
                if not wanted or name in wanted:
                    objects[name] = (masks[name] > 0, max(1, args.margin // 2), [50.0])
        cases.append(("ircadb-1.1", vol, objects))
    if "totalseg" in args.cases and "liver" in args.objects:
        vol, liver = sample_data.load_totalseg_example()
        cases.append(("totalseg-example", vol, {"liver": (liver > 0, max(2, args.margin // 2), starts)}))
    if args.variants:
        mod = load_variants()
        if mod is None:
            print("no benchmarks/variants.py: variants skipped")
        else:
            for case, vol, objects in list(cases):
                liver = objects.get("liver")
                if liver is None:
                    continue
                for name, v_vol, v_truth in mod.variants(vol, liver[0]):
                    cases.append((f"{case}/{name}", v_vol, {"liver": (v_truth > 0, liver[1], [50.0])}))
    for case, vol, objects in cases:
        run_case(engine, case, vol, objects, args.clicks, results, rows)
    steps = [f"Dice@{n}" for n in range(args.clicks + 1)]
    print_table(f"simulated user: model {engine.spec.name}, backend {engine.backend.name} ({engine.backend.precision}), "
                f"device {engine.device}; s = seconds per correction with cached embeddings (mean/max)",
                ["case", "object", "start", *steps, "AUC", "box s", "s/corr", "clicks (+/- on slice k, error voxels)"],
                rows)
    print_table("summary (means; min@1 = the lowest Dice after one correction; seconds per correction)",
                ["object", "runs", *steps, "AUC", "min@1", "mean s", "median s", "max s"], summary(results, args.clicks))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
