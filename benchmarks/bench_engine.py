#!/usr/bin/env python
"""Benchmark of the prompt engine on the real shared CT cases. Prints tables (it is no test).

    .venv/bin/python benchmarks/bench_engine.py [--model lite_medsam] [--device cpu] [--cases ircadb,totalseg]

* ``../shared/data/ircadb-1.1`` (3D-IRCADb-01 patient 1, manual labels):
  - liver Dice / HD95 from one box on the liver's middle slice + propagation;
  - liver Dice from one positive point (the deepest point of the liver on that slice);
  - per tumour (7): Dice from one box on its middle slice + propagation;
* ``../shared/data/totalseg-example`` (liver against TotalSegmentator's output);
* ms per slice embedding, ms per prompt decode, s per 3D propagation, peak memory (RSS).

Boxes are what a user drags: the reference's bounding box on that slice plus ``--margin`` voxels.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from samliverseg.interactive.engine import PromptEngine
from samliverseg.core.evaluation import evaluate
from samliverseg.core.maskutil import interior_point, middle_slice
from samliverseg.core.prompts import Prompts
from samliverseg.demo import sample_data

import variants


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def box_prompt(mask3d: np.ndarray, margin: int) -> Prompts:
    """The object's box on its middle slice (variants.box_prompt)."""
    return variants.box_prompt(mask3d, middle_slice(mask3d, "k"), margin)


def point_prompt(mask3d: np.ndarray, avoid: np.ndarray = None) -> Prompts:
    """The deepest point of the object on its middle slice (outside ``avoid``: the tumours,
    for a click on liver parenchyma)."""
    k = middle_slice(mask3d, "k")
    region = mask3d[k] > 0 if avoid is None else (mask3d[k] > 0) & ~(avoid[k] > 0)
    x, y = interior_point(region)
    return Prompts(positive=[(float(x), float(y), float(k))])


def equivalent_diameter_mm(mask: np.ndarray, spacing) -> float:
    vol_mm3 = float(mask.sum()) * float(np.prod(spacing))
    return 2.0 * (3.0 * vol_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0)


def run_one(engine: PromptEngine, prompts: Prompts, truth: np.ndarray, spacing) -> dict:
    t0 = time.perf_counter()
    res = engine.segment(prompts)
    m = evaluate(res.mask, truth, spacing)
    return {"dice": float(m["dice"]), "hd95_mm": float(m["hd95_mm"]), "seconds": time.perf_counter() - t0,
            "propagation_s": res.report["timings"]["propagation_s"], "stop": res.report["stop_reasons"],
            "vol_ml": float(m["volume_pred_ml"]), "ref_ml": float(m["volume_ref_ml"])}


def fmt_row(cells, widths):
    return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"


def print_table(title, header, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)] if rows else [len(h) for h in header]
    print(f"\n{title}")
    print(fmt_row(header, widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(fmt_row(r, widths))


def bench_case(engine, name, volume, liver, tumors, margin, results):
    engine.set_volume(volume)
    n0e, n0d = len(engine.embed_times), len(engine.decode_times)
    t0 = time.perf_counter()
    engine.prefetch(range(volume.array.shape[0]))
    prefetch_s = time.perf_counter() - t0
    rows = []
    r = run_one(engine, box_prompt(liver, margin), liver, volume.spacing)
    rows.append(["liver", "1 box + propagation", f"{r['dice']:.3f}", f"{r['hd95_mm']:.1f}", f"{r['vol_ml']:.0f}/{r['ref_ml']:.0f}",
                 f"{r['propagation_s']:.1f}", r["stop"].get("up", ""), r["stop"].get("down", "")])
    results[f"{name}/liver_box"] = r
    tumour_union = np.zeros_like(liver)
    for t in tumors.values():
        tumour_union |= t > 0
    r = run_one(engine, point_prompt(liver, tumour_union), liver, volume.spacing)
    rows.append(["liver", "1 point + propagation", f"{r['dice']:.3f}", f"{r['hd95_mm']:.1f}", f"{r['vol_ml']:.0f}/{r['ref_ml']:.0f}",
                 f"{r['propagation_s']:.1f}", r["stop"].get("up", ""), r["stop"].get("down", "")])
    results[f"{name}/liver_point"] = r
    for tname, tmask in tumors.items():
        d = equivalent_diameter_mm(tmask, volume.spacing)
        try:
            r = run_one(engine, box_prompt(tmask, max(1, margin // 2)), tmask, volume.spacing)
        except Exception as exc:  # report, keep going
            rows.append([tname, f"1 box (d={d:.0f} mm)", "error", str(exc)[:40], "", "", "", ""])
            continue
        rows.append([tname, f"1 box (d={d:.0f} mm)", f"{r['dice']:.3f}", f"{r['hd95_mm']:.1f}", f"{r['vol_ml']:.1f}/{r['ref_ml']:.1f}",
                     f"{r['propagation_s']:.1f}", r["stop"].get("up", ""), r["stop"].get("down", "")])
        results[f"{name}/{tname}"] = dict(r, diameter_mm=d)
    embeds = engine.embed_times[n0e:]
    decodes = engine.decode_times[n0d:]
    print_table(f"{name}: {volume.array.shape[::-1]} voxels (i, j, k) at {tuple(round(s, 2) for s in volume.spacing)} mm, "
                f"model {engine.spec.name}, window {engine.window.spec()}, device {engine.device}, "
                f"encoder {engine.predictor.precision}",
                ["object", "prompt", "Dice", "HD95 mm", "ml pred/ref", "prop. s", "stop (up)", "stop (down)"], rows)
    timing = {"slices": len(embeds), "embed_ms": 1000 * float(np.mean(embeds)) if embeds else float("nan"),
              "decode_ms": 1000 * float(np.mean(decodes)) if decodes else float("nan"), "prefetch_s": prefetch_s,
              "peak_rss_mb": peak_rss_mb()}
    print(f"timing: {timing['slices']} slices embedded at {timing['embed_ms']:.0f} ms/slice "
          f"(whole volume {prefetch_s:.1f} s), {len(decodes)} decodes at {timing['decode_ms']:.1f} ms/prompt, "
          f"peak RSS {timing['peak_rss_mb']:.0f} MB")
    results[f"{name}/timing"] = timing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lite_medsam")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--window", default=None)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="image encoder precision")
    ap.add_argument("--margin", type=int, default=5, help="box margin in voxels around the reference")
    ap.add_argument("--cases", default="ircadb,totalseg")
    ap.add_argument("--json", default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    if sample_data.shared_data_dir() is None:
        print(f"benchmark skipped: {sample_data.missing_reason()}")
        return 0
    engine = PromptEngine(args.model, checkpoint=args.checkpoint, device=args.device, window=args.window, cache_mb=4096,
                          precision=args.precision)
    results = {}
    if "ircadb" in args.cases:
        vol, masks = sample_data.load_ircadb()
        tumors = {k: v for k, v in masks.items() if k.startswith("livertumor")}
        bench_case(engine, "ircadb-1.1", vol, masks["liver"], tumors, args.margin, results)
    if "totalseg" in args.cases:
        vol, liver = sample_data.load_totalseg_example()
        bench_case(engine, "totalseg-example", vol, liver, {}, max(2, args.margin // 2), results)
    print(f"\npeak RSS of the whole run: {peak_rss_mb():.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
