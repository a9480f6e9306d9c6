#!/usr/bin/env python
"""A simulated user: one box, then up to five corrective clicks. Prints tables (it is no test).

    PYTHONPATH=SAMLiverSegLib .venv/bin/python benchmarks/bench_simulated_user.py \
        [--backend auto] [--cases ircadb,totalseg] [--starts 20,35,50,65,80] [--clicks 5] [--variants original,...]
        [--embed-cache DIR] [--repeat-refused] [--views axial,coronal,sagittal] [--walk-axis auto,prompts]
        [--json out.json]

The loop of the CVPR 2025 interactive 3D segmentation challenge, on the shared real CT:

* step 0: a box on one axial slice of the reference (``variants.box_prompt``: its bounding box
  there plus the case's margin, 5 voxels on ircadb-1.1 and 2 on totalseg; half that, at least 1,
  for tumours), for the liver on the slice at ``--starts`` percent of its extent from its caudal
  end (``variants.prompt_slice``), for a tumour on its middle slice (``--tumour-starts``: at
  percents of its extent, as ``--starts``); segmented and propagated (``CorrectionSession``);
* steps 1..``--clicks``: the largest 3D connected component of the error (false negatives and false
  positives labelled apart, 26-connected) is found, and one click is placed at its deepest point
  (the maximum of its distance transform, in mm) on that point's axial slice: a positive click for a
  false negative, a negative one for a false positive;
* Dice after each step, the area under the Dice curve over steps 0..N (trapezoids, divided by N),
  and the seconds of each correction (the slices of the objects' extent +-10 are embedded first, so
  these are the seconds of a correction with cached embeddings; the initial box's seconds are reported
  apart), and the seconds until its clicked slice holds its result ("shown": what the Slicer effect
  shows first, ``first`` of ``CorrectionSession.add_point``; the whole correction where it comes
  whole).

``--views coronal,sagittal`` draws the first box on the slice at ``--starts`` percent of the
object's extent along j or i instead (``variants.view_box_prompt``, index order); ``--walk-axis``
chooses the slices corrections walk across (``CorrectionSession``'s ``axis``), several in turn from
each start.

Objects: the liver of ircadb-1.1 and of the totalseg example, each of the 7 ircadb-1.1 tumours
(``--cases phantom``: the liver of the synthetic island-lobe phantoms, ``variants.PHANTOM_SEEDS``);
``--variants`` chooses the case variants of ``benchmarks/variants.py`` (flips, crops, 3 / 5 mm
slices). A failed step (an error: the click was refused) is reported in the table and the object's
Dice stays where it was; the next click then goes to the largest error component that holds no refused
click, as a user would click elsewhere (``--repeat-refused``: the protocol of runs 1-8, where the same
click came again, the mask being unchanged).

``--correct-with box`` corrects with boxes instead of clicks: at each step the reference's box
(plus the case's margin) on the axial slice of the largest error's deepest point
(``CorrectionSession.add_box``, which walks from it with ``PropagationSettings.box_walk_growth``),
or a click where the reference is empty on that slice.

``--set NAME=VALUE`` overrides a ``PropagationSettings`` field for every run; ``--alt NAME=VALUE``
runs every start once more with that override, right after the run without it (``--alt
walk_growth=True``: clicks' walks with propagation's growth beyond the limit, the rule before
session 23), and the JSON records each correction's decoder calls (``decodes``) beside the slices
its walk decoded (``decoded``). ``decoder_precision`` is not a setting but the engine's (``--decoder-precision``,
default fp32): ``--alt decoder_precision=bf16`` runs the alt's corrections with a second predictor of
the same model whose decoder runs bf16 (embeddings stay the engine's, from the fp32 encoder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from samliverseg.core.errors import SAMLiverSegError
from samliverseg.core.evaluation import dice
from samliverseg.core.prompts import Prompts
from samliverseg.core.maskutil import middle_slice
from samliverseg.demo import sample_data
from samliverseg.interactive.backends import DECODER_PRECISIONS
from samliverseg.interactive.engine import PromptEngine, PropagationSettings
from samliverseg.interactive.predictor import SlicePredictor
from samliverseg.interactive.session3d import CorrectionSession

import variants
from bench_engine import print_table
from bench_propagation import DiskEmbeddings
#: Slices embedded beyond the objects' extent before the runs (propagation may leak a few slices).
PREFETCH_MARGIN = 10


def next_click(pred: np.ndarray, truth: np.ndarray, spacing, avoid: Sequence[Tuple[float, float, float]] = ()
               ) -> Optional[Tuple[Tuple[float, float, float], bool, int]]:
    """((i, j, k), positive, voxels of the error component) at the deepest point of the largest 3D error
    component that holds none of the ``avoid`` points (i, j, k); None when there is no such error.
    Of several deepest voxels, the one nearest the component's centre (in mm)."""
    best = None
    for positive, err in ((True, truth & ~pred), (False, pred & ~truth)):
        if not err.any():
            continue
        lab, n = ndimage.label(err, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        for i, j, k in avoid:
            sizes[lab[int(k), int(j), int(i)]] = 0
        if not sizes.any():
            continue
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
    # The deepest voxels are often several (a plateau). Of them, the one nearest (in mm) the error
    # component's centre: the same voxel in a mirrored volume, where np.argmax's first in index order
    # is another one (a flipped variant then differed from the original by the click alone).
    deepest = np.argwhere(dist >= dist.max() - 1e-6)
    mm = np.array([sk, sj, si])
    centre = np.argwhere(comp[1:-1, 1:-1, 1:-1]).mean(axis=0) * mm
    k, j, i = deepest[int(np.argmin((((deepest * mm) - centre) ** 2).sum(axis=1)))]
    return (float(i + sl[2].start), float(j + sl[1].start), float(k + sl[0].start)), positive, size


def auc(dices: List[float]) -> float:
    n = len(dices) - 1
    return float((sum(dices) - (dices[0] + dices[-1]) / 2.0) / n) if n > 0 else float(dices[0])


def simulate(engine: PromptEngine, truth: np.ndarray, spacing, prompts: Prompts, clicks: int,
             repeat_refused: bool = False, walk_axis: Optional[str] = None, boxes_margin: Optional[int] = None) -> dict:
    """The initial ``prompts`` (a box), then up to ``clicks`` corrections; ``walk_axis``: the
    session's (``CorrectionSession``'s ``axis``; None: its default). ``boxes_margin``: correct with
    boxes (``--correct-with box``): on the axial slice of the largest error's deepest point, the
    reference's box there plus this margin (``CorrectionSession.add_box``); a click where the
    reference is empty on that slice (a box cannot say "nothing here"). A box that changes nothing
    counts as refused (the next correction goes to another error)."""
    truth = truth > 0
    t0 = time.perf_counter()
    try:
        session = CorrectionSession(engine, prompts, axis=walk_axis)
    except SAMLiverSegError as exc:
        return {"error": f"initial box: {exc}", "dice": [0.0] * (clicks + 1), "seconds": [], "clicks": []}
    out = {"box_seconds": time.perf_counter() - t0, "dice": [dice(session.mask, truth)], "seconds": [], "clicks": [],
           "shown_seconds": [], "decoded": [], "changed": [], "walk_axis": session.axis}
    refused: List[Tuple[float, float, float]] = []
    for _ in range(clicks):
        pred = session.mask > 0
        click = next_click(pred, truth, spacing, () if repeat_refused else refused)
        if click is None:
            out["dice"].append(out["dice"][-1])
            continue
        ijk, positive, size = click
        out.setdefault("asked_ijk", []).append([int(v) for v in ijk])  # every correction asked, refused ones too
        k = int(round(ijk[2]))
        box = None
        if boxes_margin is not None and truth[k].any():
            box = variants.box_prompt(truth.astype(np.uint8), k, boxes_margin).box
        n_dec = len(engine.decode_times)
        t1 = time.perf_counter()
        shown: List[float] = []
        try:
            if box is not None:
                corr = session.add_box(box, first=lambda c: shown.append(time.perf_counter()))
                if not corr.changed_slices:
                    raise SAMLiverSegError(f"the box on slice k={k} changed nothing")
            else:
                corr = session.add_point(ijk, positive=positive, first=lambda c: shown.append(time.perf_counter()))
        except SAMLiverSegError as exc:
            out.setdefault("errors", []).append(str(exc))
            refused.append(ijk)
            out["dice"].append(out["dice"][-1])
            continue
        t2 = time.perf_counter()
        out["seconds"].append(t2 - t1)
        out["shown_seconds"].append((shown[0] if shown else t2) - t1)
        kind = "box " if box is not None else ("+" if positive else "-")
        out["clicks"].append(kind + f"{session.axis}{corr.slice_index}({size})")
        out["decoded"].append(len(corr.decoded_slices))
        out.setdefault("decodes", []).append(len(engine.decode_times) - n_dec)
        out["changed"].append(len(corr.changed_slices))
        out["dice"].append(dice(session.mask, truth))
    out["auc"] = auc(out["dice"])
    return out


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


def split_alt(alt: Optional[str]) -> Tuple[List[str], Optional[str]]:
    """An ``--alt``'s ``PropagationSettings`` overrides, and its ``decoder_precision`` (None: the engine's)."""
    items, precision = [], None
    for item in (alt or "").split(","):
        name, _, value = item.partition("=")
        if name == "decoder_precision":
            precision = value
        elif item:
            items.append(item)
    return items, precision


def run_case(engine, case: str, volume, objects: Dict[str, Tuple[np.ndarray, int, List[Optional[float]]]],
             clicks: int, results: dict, rows: List[list], repeat_refused: bool = False,
             views: Sequence[str] = ("axial",), walks: Sequence[str] = ("auto",),
             alts: Sequence[Optional[str]] = (None,), predictors: Optional[Dict[str, object]] = None,
             correct_with: str = "click") -> None:
    """Every object of one volume (its slices embedded once), boxed in each of ``views``; a start of
    None is the object's middle slice (of a view: in index order across its axis). Each start runs
    once per ``walks`` (``--walk-axis``) and per ``alts`` (None: the engine's settings; else
    ``NAME=VALUE`` overrides of them, ``--alt``; a ``decoder_precision`` there picks that one of
    ``predictors``), one after the other (interleaved: their seconds compare)."""
    engine.set_volume(volume)
    t0 = time.perf_counter()
    ks = np.flatnonzero(np.any([truth.any(axis=(1, 2)) for truth, _, _ in objects.values()], axis=0))
    todo = range(max(0, int(ks[0]) - PREFETCH_MARGIN), min(volume.array.shape[0], int(ks[-1]) + PREFETCH_MARGIN + 1))
    engine.prefetch(todo)
    print(f"{case}: {len(todo)} slices embedded in {time.perf_counter() - t0:.1f} s "
          f"(backend {engine.backend.name}, {engine.backend.precision})")
    sys.stdout.flush()
    for obj, (truth, margin, starts) in objects.items():
        for view, frac in ((v, f) for v in views for f in starts):
            where = "middle" if frac is None else f"{100 * frac:g}%"
            if view == "axial":
                k = middle_slice(truth, "k") if frac is None else variants.prompt_slice(volume, truth, frac)
                prompts, at = variants.box_prompt(truth.astype(np.uint8), k, margin), f"k={k}"
            else:
                axis = variants.VIEW_AXES[view]
                obj_case = variants.Case(case, volume, truth.astype(np.uint8), margin)
                prompts = variants.view_box_prompt(obj_case, axis, 0.5 if frac is None else frac)
                at, k = f"{axis}={prompts.box_slice(prompts.box)}", prompts.box_slice(prompts.box)
                where = f"{where} {view}"
            for walk, alt in ((w, a) for w in walks for a in alts):
                axis = {"auto": None, "prompts": prompts.slice_axis}.get(walk, walk)
                base, base_predictor = engine.settings, engine.predictor
                items, precision = split_alt(alt)
                engine.settings = variants.with_overrides(base, items)
                engine.predictor = base_predictor if precision is None else (predictors or {})[precision]
                try:
                    r = simulate(engine, truth, volume.spacing, prompts, clicks, repeat_refused, axis,
                                 margin if correct_with == "box" else None)
                    r["decoder_precision"] = engine.backend.decoder_precision
                finally:
                    engine.settings, engine.predictor = base, base_predictor
                label = where if len(walks) == 1 else f"{where}, walk {walk}"
                label = label if alt is None else f"{label}, {alt}"
                r.update(start=where, start_slice=k, walk=walk, alt=alt)
                results[f"{case}/{obj}/{label}"] = r
                rows.append(row_of(case, obj, f"{label} ({at})", r, clicks))
                print("  " + " ".join(str(c) for c in rows[-1]))
                sys.stdout.flush()


def summary(results: dict, clicks: int) -> List[list]:
    out = []
    walks = sorted({r.get("walk", "auto") for r in results.values()})
    alts = sorted({r.get("alt") or "" for r in results.values()})
    for (label, pick), walk, alt in ((g, w, a) for g in (("liver", lambda key: key.split("/")[-2] == "liver"),
                                                         ("tumours", lambda key: key.split("/")[-2].startswith("livertumor")))
                                     for w in walks for a in alts):
        rs = [r for key, r in results.items()
              if pick(key) and r.get("walk", "auto") == walk and (r.get("alt") or "") == alt]
        label = label if len(walks) == 1 else f"{label} (walk {walk})"
        label = f"{label} ({alt})" if alt else label
        if not rs:
            continue
        d = np.array([r["dice"] + [r["dice"][-1]] * (clicks + 1 - len(r["dice"])) for r in rs])
        secs = [s for r in rs for s in r.get("seconds", [])]
        shown = [s for r in rs for s in r.get("shown_seconds", [])]
        out.append([label, str(len(rs))] + [f"{v:.3f}" for v in d.mean(axis=0)] + [
            f"{float(np.mean([r.get('auc', 0.0) for r in rs])):.3f}", f"{float(d[:, min(1, clicks)].min()):.3f}",
            f"{np.mean(secs):.2f}" if secs else "-", f"{np.median(secs):.2f}" if secs else "-",
            f"{np.max(secs):.2f}" if secs else "-",
            f"{np.median(shown):.2f}/{np.max(shown):.2f}" if shown else "-"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lite_medsam")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--cases", default="ircadb,totalseg", help="ircadb, totalseg and/or phantom")
    ap.add_argument("--objects", default="liver,tumours", help="liver and/or tumours (ircadb-1.1 only)")
    ap.add_argument("--starts", default="50", help="start slices of the liver, percent of its k extent from its "
                                                   "caudal end (variants.prompt_slice)")
    ap.add_argument("--tumour-starts", default="middle",
                    help="start slices of each tumour: middle (its middle slice, the tumour benchmark's), or "
                         "percents of its k extent as --starts (its end slices are few pixels: a hard start)")
    ap.add_argument("--tumours", default="", help="only these tumours, e.g. 1,3 (default: all)")
    ap.add_argument("--views", default="axial",
                    help="comma-separated views the first box is drawn in: axial, coronal, sagittal (a view's "
                         "start is in index order across its axis, variants.view_box_prompt)")
    ap.add_argument("--walk-axis", default="auto",
                    help="comma-separated: the axis corrections walk across, each run in turn from every start: "
                         "auto (CorrectionSession's: the result's last propagation's, axial after a coronal or "
                         "sagittal box's hand-off), prompts (the first box's own axis: the rule before session "
                         "17), i, j or k")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a PropagationSettings field for every run (repeatable)")
    ap.add_argument("--alt", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                    help="also run every start with these overrides, right after the run without them "
                         "(repeatable: one more run per --alt; interleaved, so the seconds compare)")
    ap.add_argument("--decoder-precision", default="fp32", choices=DECODER_PRECISIONS,
                    help="the engine's mask decoder precision (an --alt decoder_precision=... runs the other)")
    ap.add_argument("--correct-with", default="click", choices=("click", "box"),
                    help="click (default): a positive or negative click at the largest error's deepest point; box: "
                         "the reference's box (plus the case's margin) on that point's axial slice, a click where "
                         "the reference is empty there (axial views only)")
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--repeat-refused", action="store_true",
                    help="after a refused click, click the same error again (the protocol of runs 1-8)")
    ap.add_argument("--variants", default="original",
                    help=f"comma-separated variants of benchmarks/variants.py ({', '.join(variants.VARIANTS)})")
    ap.add_argument("--embed-cache", default=None,
                    help="folder of slice embeddings kept between runs (bench_propagation.DiskEmbeddings)")
    ap.add_argument("--json", default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    if variants.needs_shared_data(args.cases.split(",")) and sample_data.shared_data_dir() is None:
        print(f"benchmark skipped: {sample_data.missing_reason()}")
        return 0
    starts = [float(v) / 100.0 for v in args.starts.split(",") if v.strip()]
    tumour_starts: List[Optional[float]] = [None] if args.tumour_starts.strip() == "middle" else [
        float(v) / 100.0 for v in args.tumour_starts.split(",") if v.strip()]
    views = [v for v in args.views.split(",") if v.strip()]
    walks = [w for w in args.walk_axis.split(",") if w.strip()]
    for walk in walks:
        if walk not in ("auto", "prompts", "i", "j", "k"):
            ap.error(f"unknown --walk-axis {walk!r}: use auto, prompts, i, j or k")
    for view in views:
        if view not in variants.VIEW_AXES:
            ap.error(f"unknown view {view!r}: use {', '.join(variants.VIEW_AXES)}")
    if args.correct_with == "box" and (views != ["axial"] or walks != ["auto"]):
        ap.error("--correct-with box takes axial boxes: use it with --views axial and --walk-axis auto")
    try:
        settings = variants.with_overrides(PropagationSettings(), args.set)
        for alt in args.alt:
            items, precision = split_alt(alt)
            variants.with_overrides(settings, items)  # a wrong one fails before the runs
            if precision is not None and precision not in DECODER_PRECISIONS:
                raise ValueError(f"decoder_precision takes {' or '.join(DECODER_PRECISIONS)}, not {precision!r}")
    except (AttributeError, ValueError) as exc:
        ap.error(f"--set/--alt: {exc}")
    engine = PromptEngine(args.model, device=args.device, backend=args.backend, cache_mb=4096, settings=settings,
                          decoder_precision=args.decoder_precision)
    predictors = {p: SlicePredictor(engine.model, engine.device, backend=args.backend, decoder_precision=p)
                  for p in {split_alt(alt)[1] for alt in args.alt} - {None}}
    for predictor in predictors.values():
        predictor.backend  # opened (converted, once per machine) before the runs: not in a correction's seconds
    if args.embed_cache:
        DiskEmbeddings(engine, Path(args.embed_cache))
    results: dict = {}
    rows: List[list] = []
    cases = []
    names = [v for v in args.variants.split(",") if v.strip()]
    for case in variants.load_cases(args.cases.split(",")):
        for vname in names:
            v = variants.make_variant(case, vname) if vname != "original" else case
            objects: dict = {}
            if "liver" in args.objects:
                objects["liver"] = (v.truth > 0, v.margin, starts)
            if "tumour" in args.objects and case.name.startswith("ircadb") and vname == "original":
                _, tumours = sample_data.load_ircadb(structures=sample_data.IRCADB_LIVER_STRUCTURES[1:])
                wanted = {f"livertumor{int(t):02d}" for t in args.tumours.split(",") if t.strip()}
                for name in sorted(tumours):
                    if not wanted or name in wanted:
                        objects[name] = (tumours[name] > 0, max(1, case.margin // 2), tumour_starts)
            if objects:
                cases.append((case.name if vname == "original" else v.name, v.volume, objects))
    for case, vol, objects in cases:
        run_case(engine, case, vol, objects, args.clicks, results, rows, args.repeat_refused, views, walks,
                 [None] + list(args.alt), predictors, args.correct_with)
    steps = [f"Dice@{n}" for n in range(args.clicks + 1)]
    print_table(f"simulated user: model {engine.spec.name}, backend {engine.backend.name} ({engine.backend.precision}), "
                f"device {engine.device}; s = seconds per correction with cached embeddings (mean/max)",
                ["case", "object", "start", *steps, "AUC", "box s", "s/corr",
                 "corrections (+/- clicks, box; on the slice across the walk axis, error voxels)"],
                rows)
    print_table("summary (means; min@1 = the lowest Dice after one correction; seconds per correction)",
                ["object", "runs", *steps, "AUC", "min@1", "mean s", "median s", "max s",
                 "shown s (median/max)"], summary(results, args.clicks))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
