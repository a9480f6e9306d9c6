#!/usr/bin/env python
"""The model's own ceiling: a box from the reference on every slice. Prints a table (it is no test).

    PYTHONPATH=SAMLiverSegLib .venv/bin/python benchmarks/bench_oracle_boxes.py \
        [--backend auto] [--cases ircadb,totalseg] [--variants original,...] [--thresholds -1,0,1]
        [--embed-cache DIR] [--json out.json]

Propagation (``bench_propagation.py``) and the simulated user (``bench_simulated_user.py``) are
scored against the reference with Dice. How much of what they miss is theirs, and how much the
model's? Here every axial slice of the liver's reference gets the box a user would draw there
(``variants.box_on_slice``: its bounding box plus the case's margin, as on the benchmarks' prompted
slice), the model answers each slice on its own (``PromptEngine.segment_slice``, no propagation,
no HU gate), and the 3D Dice of those answers is reported: what a perfect box on every slice gives,
with no slice missed and none added beyond the reference's extent.

The answer's logits are also cut at other thresholds than the model's 0 (``--thresholds``): where a
higher one scores better, the model's mask is wider than the reference's on that case (a matter of
the reference's convention or of the model's calibration), which no prompt can change.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from samliverseg.core.atomic import write_text
from samliverseg.interactive.engine import PromptEngine

import variants
from bench_engine import print_table
from bench_propagation import DiskEmbeddings, add_engine_args


def oracle(engine: PromptEngine, case: variants.Case, thresholds: List[float]) -> dict:
    """Dice, false positives and false negatives (voxels) of one box per reference slice, per threshold."""
    engine.set_volume(case.volume)
    truth = case.truth > 0
    inter = np.zeros(len(thresholds))
    pred = np.zeros(len(thresholds))
    ks = [int(k) for k in np.flatnonzero(truth.any(axis=(1, 2)))]
    t0 = time.perf_counter()
    for k in ks:
        res = engine.segment_slice(variants.box_prompt(case.truth, k, case.margin))
        logits = engine.predictor.postprocess(res.low_res_logits[None], engine.embedding("k", k))[0].numpy()
        for n, th in enumerate(thresholds):
            m = logits > th
            inter[n] += np.count_nonzero(m & truth[k])
            pred[n] += np.count_nonzero(m)
    ref = int(truth.sum())
    return {"slices": len(ks), "seconds": round(time.perf_counter() - t0, 1), "reference_voxels": ref,
            "by_threshold": {f"{th:g}": {"dice": float(2 * inter[n] / (pred[n] + ref)), "fp": int(pred[n] - inter[n]),
                                         "fn": int(ref - inter[n])} for n, th in enumerate(thresholds)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap)
    ap.add_argument("--variants", default=None, help="comma-separated (default: all of benchmarks/variants.py)")
    ap.add_argument("--thresholds", default="-1,0,1", help="logit thresholds (the model's own is 0)")
    args = ap.parse_args(argv)
    from samliverseg.demo import sample_data

    if sample_data.shared_data_dir() is None:
        print(f"benchmark skipped: {sample_data.missing_reason()}")
        return 0
    thresholds = [float(t) for t in args.thresholds.split(",")]
    if 0.0 not in thresholds:
        thresholds.insert(0, 0.0)
    names = args.variants.split(",") if args.variants else variants.VARIANTS
    engine = PromptEngine(args.model, device=args.device, backend=args.backend, cache_mb=8192)
    disk = DiskEmbeddings(engine, Path(args.embed_cache)) if args.embed_cache else None
    results: Dict[str, dict] = {"backend": engine.backend.name, "precision": engine.backend.precision,
                                "thresholds": thresholds}
    rows = []
    t_all = time.perf_counter()
    for case in variants.load_cases(args.cases.split(",")):
        for vname in names:
            if vname.startswith("resample") and abs(case.volume.spacing[2] - float(vname[9:-2])) < 1e-3:
                continue  # already on that grid: the original
            v = variants.make_variant(case, vname)
            r = oracle(engine, v, thresholds)
            results[v.name] = r
            by = r["by_threshold"]
            rows.append([v.name, r["slices"]] + [f"{by[f'{t:g}']['dice']:.3f}" for t in thresholds]
                        + [f"{by['0']['fp']} / {by['0']['fn']}"])
            print(f"{v.name}: {r}", flush=True)
    print_table(f"liver Dice of one reference box on every axial slice (no propagation), model {engine.spec.name}, "
                f"backend {engine.backend.name} {engine.backend.precision}",
                ["case/variant", "slices"] + [f"logits > {t:g}" for t in thresholds] + ["fp / fn voxels at 0"], rows)
    print(f"total {time.perf_counter() - t_all:.0f} s" + (f"; embeddings from disk {disk.hits}, computed {disk.misses}" if disk else ""))
    if args.json:
        write_text(args.json, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
