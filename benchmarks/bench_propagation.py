#!/usr/bin/env python
"""Propagation from one box on any slice, on every variant of the shared cases. Prints tables (no test).

    .venv/bin/python benchmarks/bench_propagation.py [--quick] [--backend auto] [--json out.json]

For the liver of ``ircadb-1.1`` (manual mask) and of the TotalSegmentator example (its model's
mask), and every variant of ``variants.py`` (geometry-true flips, a mirrored patient, crops,
3 / 5 mm slices), one box (the truth's box on that slice + the case's margin) on the slice at
20, 35, 50, 65 and 80 % of the liver's extent from its caudal end, then propagation: Dice (and
HD95 with ``--hd95``). Also, on the original cases: the liver from one positive point (the
deepest liver point, outside the tumours, on the middle slice) and, for ircadb-1.1, each tumour
from one box on its middle slice (what ``bench_engine.py`` measures).

``--views axial,coronal,sagittal`` also boxes the original cases (or ``--view-variants``) on a
coronal (j) and a sagittal (i) slice at the same fractions of the liver's extent along that axis,
in index order (``variants.view_box_prompt``), and segments them (propagation across that axis,
then across axial slices: ``PropagationSettings.axial_handoff``, off with
``--set axial_handoff=False``): its own table, keys ``case/variant[view]@fraction``, and each
ircadb tumour boxed on its middle coronal and sagittal slice (``case/tumour[view]``).

``--settings legacy`` runs the propagation rules of before issue 13 (``PropagationSettings.legacy()``)
for a before/after table from one code base. ``--embed-cache DIR`` keeps slice embeddings on disk
(keyed by the windowed slice, its spacing, the model and the backend) so that a second run only
decodes; it is a benchmark convenience, ~4 MB per slice.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from samliverseg.core.evaluation import dice, evaluate
from samliverseg.core.maskutil import interior_point, middle_slice
from samliverseg.core.prompts import Prompts
from samliverseg.interactive.engine import PromptEngine, PropagationSettings
from samliverseg.interactive.predictor import SliceEmbedding

import variants
from bench_engine import print_table

QUICK_VARIANTS = ("original", "flip_k", "mirror_i", "resample_5mm")
QUICK_FRACTIONS = (0.20, 0.50, 0.80)


class DiskEmbeddings:
    """Slice embeddings kept as ``.npy`` files in ``folder`` (wraps ``predictor.embed``)."""

    def __init__(self, engine: PromptEngine, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.predictor = engine.predictor
        self.compute = engine.predictor.embed
        # the model, the backend and the predictor's image-side code (resize, pad, encode): a cache made
        # before a change to how slices are resized or padded is not reused; a change to the prompt
        # side (predict, postprocess) keeps it
        cls = type(self.predictor)
        image_side = "".join(inspect.getsource(f) for f in (cls.input_size, cls.preprocess, cls.embed))
        code = hashlib.sha1((image_side + repr(self.predictor.spec)).encode()).hexdigest()[:12]
        self.tag = f"{engine.spec.name}|{engine.backend.name}|{engine.backend.precision}|{code}"
        self.hits = self.misses = 0
        engine.predictor.embed = self.embed

    def embed(self, image: np.ndarray, pixel_spacing=(1.0, 1.0), field_mm=None) -> SliceEmbedding:
        h = hashlib.sha1(np.ascontiguousarray(image).tobytes())
        h.update(f"{image.shape}|{tuple(float(s) for s in pixel_spacing)}|{self.tag}".encode())
        if field_mm is not None and max(n * float(s) for n, s in zip(image.shape, pixel_spacing)) < field_mm:
            h.update(f"|padded to {self.predictor.input_size(*image.shape, pixel_spacing, field_mm)}".encode())  # its place in the input
        path = self.folder / f"{h.hexdigest()}.npz"
        if path.is_file():
            self.hits += 1
            with np.load(path) as z:
                return SliceEmbedding(features=torch.from_numpy(z["features"]), original_hw=tuple(int(v) for v in z["original_hw"]),
                                      input_hw=tuple(int(v) for v in z["input_hw"]), image_size=int(z["image_size"]))
        self.misses += 1
        emb = self.compute(image, pixel_spacing, field_mm)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # two benchmarks may embed the same slice at once
        np.savez(tmp, features=emb.features.float().cpu().numpy(), original_hw=np.array(emb.original_hw),
                 input_hw=np.array(emb.input_hw), image_size=np.array(emb.image_size))
        tmp.replace(path)
        return emb


def run(engine: PromptEngine, prompts: Prompts, truth: np.ndarray, spacing, hd95: bool) -> dict:
    t0 = time.perf_counter()
    res = engine.segment(prompts)
    out = {"seconds": round(time.perf_counter() - t0, 2), "stop": res.report["stop_reasons"],
           "slices": res.report["slices_with_mask"], "field_mm": res.report["field_mm"]}
    if "axial_handoff" in res.report:  # a coronal or sagittal prompt, propagated again across axial slices
        out["handoff"] = res.report["axial_handoff"]["prompt"]
    if hd95:
        m = evaluate(res.mask, truth, spacing)
        out.update(dice=float(m["dice"]), hd95_mm=float(m["hd95_mm"]))
    else:
        out["dice"] = float(dice(res.mask, truth))
    return out


def point_prompt(truth: np.ndarray, avoid: Optional[np.ndarray] = None) -> Prompts:
    """The deepest point of ``truth`` on its middle slice, outside ``avoid`` (bench_engine's rule)."""
    k = middle_slice(truth, "k")
    region = truth[k] > 0 if avoid is None else (truth[k] > 0) & ~(avoid[k] > 0)
    x, y = interior_point(region)
    return Prompts(positive=[(float(x), float(y), float(k))])


def cell(r: dict, hd95: bool) -> str:
    if "error" in r:
        return "error"
    return f"{r['dice']:.3f}" + (f" / {r['hd95_mm']:.1f}" if hd95 else "")


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    """The options every liver benchmark on the shared cases takes: the model, its backend and
    device, the cases, the embedding cache and the JSON output."""
    ap.add_argument("--model", default="lite_medsam")
    ap.add_argument("--backend", default="auto", help="torch, onnxruntime, openvino or auto (default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="ircadb,totalseg", help="ircadb, totalseg and/or phantom (variants.load_cases)")
    ap.add_argument("--embed-cache", default=None, help="folder for slice embeddings kept between runs")
    ap.add_argument("--json", default=None, help="also write the numbers as JSON")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap)
    ap.add_argument("--variants", default=None, help="comma-separated (default: all; --quick: a subset)")
    ap.add_argument("--fractions", default=None, help="comma-separated prompt-slice fractions (default 0.2..0.8)")
    ap.add_argument("--quick", action="store_true", help=f"variants {','.join(QUICK_VARIANTS)} at {QUICK_FRACTIONS}")
    ap.add_argument("--no-extras", action="store_true", help="skip the one-point and tumour rows")
    ap.add_argument("--views", default="axial",
                    help="comma-separated: axial (the variants' table, always run), coronal, sagittal (on --view-variants; "
                         "the tumours too, boxed on their middle slice, unless --no-extras)")
    ap.add_argument("--view-variants", default="original",
                    help="comma-separated variants (of those run) that the coronal / sagittal rows are run on (default: original)")
    ap.add_argument("--settings", default="current", choices=("current", "legacy"))
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a PropagationSettings field (repeatable), e.g. --set search_margin_mm=20")
    ap.add_argument("--crop-field", default=None, metavar="MM",
                    help="show a volume cropped inside the body at this field (mm), padded, not magnified; "
                         "'none': fill the input (default: the model's crop_field_mm)")
    ap.add_argument("--hd95", action="store_true", help="also HD95 (slower)")
    args = ap.parse_args(argv)
    from samliverseg.demo import sample_data

    if variants.needs_shared_data(args.cases.split(",")) and sample_data.shared_data_dir() is None:
        print(f"benchmark skipped: {sample_data.missing_reason()}")
        return 0
    names = args.variants.split(",") if args.variants else (QUICK_VARIANTS if args.quick else variants.VARIANTS)
    fracs = [float(f) for f in args.fractions.split(",")] if args.fractions else (
        QUICK_FRACTIONS if args.quick else variants.PROMPT_FRACTIONS)
    try:
        settings = variants.with_overrides(
            PropagationSettings.legacy() if args.settings == "legacy" else PropagationSettings(), args.set)
    except (AttributeError, ValueError) as exc:
        ap.error(f"--set: {exc}")
    engine = PromptEngine(args.model, device=args.device, backend=args.backend, cache_mb=8192, settings=settings)
    if args.crop_field is not None:  # the model's field for crops (ModelSpec.crop_field_mm): "none" fills the input
        engine.spec = engine.predictor.spec = dataclasses.replace(
            engine.spec, crop_field_mm=None if args.crop_field == "none" else float(args.crop_field))
    disk = DiskEmbeddings(engine, Path(args.embed_cache)) if args.embed_cache else None
    results: Dict[str, dict] = {"settings": args.settings, "overrides": args.set, "backend": engine.backend.name,
                                "crop_field_mm": engine.spec.crop_field_mm}
    views = args.views.split(",")
    view_variants = args.view_variants.split(",")
    for view in views:
        if view not in variants.VIEW_AXES:
            ap.error(f"unknown view {view!r}: use {', '.join(variants.VIEW_AXES)}")
    rows: List[list] = []
    extras: List[list] = []
    view_rows: List[list] = []
    t_all = time.perf_counter()
    for case in variants.load_cases(args.cases.split(",")):
        tumours = {}
        if case.name.startswith("ircadb") and not args.no_extras:
            _, tumours = sample_data.load_ircadb(structures=sample_data.IRCADB_LIVER_STRUCTURES[1:])
        for vname in names:
            if vname.startswith("resample") and abs(case.volume.spacing[2] - float(vname[9:-2])) < 1e-3:
                continue  # already on that grid: the original
            v = variants.make_variant(case, vname)
            engine.set_volume(v.volume)
            row = [v.name]
            for f in fracs:
                key = f"{v.name}@{f:.2f}"
                try:
                    r = run(engine, variants.box_prompt_at(v, f), v.truth, v.volume.spacing, args.hd95)
                except Exception as exc:  # report, keep going
                    r = {"error": str(exc)[:200]}
                r["slice"] = variants.prompt_slice(v.volume, v.truth, f)
                results[key] = r
                row.append(cell(r, args.hd95))
                print(f"{key}: {r}", flush=True)
            rows.append(row)
            for view in (w for w in views if w != "axial" and vname in view_variants):
                row = [f"{v.name} ({view})"]
                for f in fracs:
                    key = f"{v.name}[{view}]@{f:.2f}"
                    prompts = variants.view_box_prompt(v, variants.VIEW_AXES[view], f)
                    try:
                        r = run(engine, prompts, v.truth, v.volume.spacing, args.hd95)
                    except Exception as exc:  # report, keep going
                        r = {"error": str(exc)[:200]}
                    r["slice"] = prompts.slice_indices()[0]
                    results[key] = r
                    row.append(cell(r, args.hd95))
                    print(f"{key}: {r}", flush=True)
                view_rows.append(row)
            if vname == "original" and not args.no_extras:
                avoid = sample_data.tumor_union(tumours) if tumours else None
                r = run(engine, point_prompt(v.truth, avoid), v.truth, v.volume.spacing, args.hd95)
                results[f"{case.name}/point"] = r
                extras.append([case.name, "liver", "1 point (middle slice)", cell(r, args.hd95), r["stop"].get("up", ""),
                               r["stop"].get("down", "")])
                for tname, tmask in tumours.items():
                    r = run(engine, variants.box_prompt(tmask, middle_slice(tmask, "k"), max(1, case.margin // 2)),
                            tmask, v.volume.spacing, args.hd95)
                    results[f"{case.name}/{tname}"] = r
                    extras.append([case.name, tname, "1 box (middle slice)", cell(r, args.hd95), r["stop"].get("up", ""),
                                   r["stop"].get("down", "")])
                    for view in (w for w in views if w != "axial"):
                        tcase = variants.Case(tname, v.volume, tmask, max(1, case.margin // 2))
                        r = run(engine, variants.view_box_prompt(tcase, variants.VIEW_AXES[view], 0.5), tmask,
                                v.volume.spacing, args.hd95)
                        results[f"{case.name}/{tname}[{view}]"] = r
                        extras.append([case.name, tname, f"1 box (middle {view} slice)", cell(r, args.hd95),
                                       r.get("handoff", r["stop"].get("up", "")), r["stop"].get("down", "")])
    what = "Dice / HD95 mm" if args.hd95 else "Dice"
    print_table(f"liver {what} from one box on the slice at a fraction of its extent (caudal 0 -> cranial 1) + propagation; "
                f"settings {args.settings}, crop field {engine.spec.crop_field_mm} mm, model {engine.spec.name}, backend {engine.backend.name} {engine.backend.precision}",
                ["case/variant"] + [f"{int(round(100 * f))} %" for f in fracs], rows)
    if view_rows:
        print_table(f"liver {what} from one box on a coronal / sagittal slice at a fraction of its extent along that axis "
                    f"(index order) + propagation across it; settings {args.settings}",
                    ["case (view)"] + [f"{int(round(100 * f))} %" for f in fracs], view_rows)
    if extras:
        print_table(f"one point / tumours ({what}), settings {args.settings}", ["case", "object", "prompt", what, "stop (up); a view's: the hand-off's prompt", "stop (down)"],
                    extras)
    vals = [r["dice"] for k, r in results.items() if "@" in k and "[" not in k and "dice" in r]
    if vals:
        print(f"\nbox table: min {min(vals):.3f}, mean {np.mean(vals):.3f}, entries below 0.93: {sum(v < 0.93 for v in vals)} of {len(vals)}")
    print(f"total {time.perf_counter() - t_all:.0f} s" + (f"; embeddings from disk {disk.hits}, computed {disk.misses}" if disk else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
