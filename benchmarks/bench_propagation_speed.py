#!/usr/bin/env python
"""Seconds and decoder calls of one propagation (``PromptEngine.segment``) with cached embeddings,
with and without the memo of box answers (``PromptEngine.memoize_decodes``), interleaved in one
run. Prints a table (no test); the masks must be identical.

    .venv/bin/python benchmarks/bench_propagation_speed.py --embed-cache DIR [--repeats 3]

One box (the truth's box + the case's margin) on the slice at 20, 50 and 80 % of the liver's
extent of ``ircadb-1.1`` and the TotalSegmentator example (original geometry). Every embedding
is computed (or read from ``--embed-cache``) before the clock starts, so the seconds are those of
propagation, the sweep and the post-processing: what a user waits for after the box once the
volume is embedded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from samliverseg.core.evaluation import dice
from samliverseg.interactive.engine import PromptEngine

import variants
from bench_engine import print_table
from bench_propagation import DiskEmbeddings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="ircadb,totalseg")
    ap.add_argument("--starts", default="20,50,80", help="box slices, percent of the liver's extent")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant (interleaved); the median is shown")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--embed-cache", type=Path, default=None)
    args = ap.parse_args(argv)

    engine = PromptEngine("lite_medsam", device="cpu", backend=args.backend, cache_mb=4096)
    if args.embed_cache is not None:
        DiskEmbeddings(engine, args.embed_cache)
    rows = []
    for case in variants.load_cases(args.cases.split(",")):
        v = variants.make_variant(case, "original")
        engine.set_volume(v.volume)
        engine.prefetch(range(v.volume.array.shape[0]))
        for pct in (float(p) for p in args.starts.split(",")):
            prompts = variants.box_prompt_at(v, pct / 100.0)
            secs = {False: [], True: []}
            decodes, masks = {}, {}
            for _ in range(args.repeats):
                for memo in (False, True):
                    engine.memoize_decodes = memo
                    t0 = time.perf_counter()
                    res = engine.segment(prompts)
                    secs[memo].append(time.perf_counter() - t0)
                    decodes[memo] = res.report["timings"]["decodes"]
                    masks[memo] = res.mask
            same = np.array_equal(masks[False], masks[True])
            rows.append([v.name, f"{pct:g}%", f"{dice(masks[True], v.truth > 0):.4f}", "yes" if same else "NO",
                         decodes[False], decodes[True],
                         f"{np.median(secs[False]):.2f}", f"{np.median(secs[True]):.2f}",
                         f"{1 - np.median(secs[True]) / np.median(secs[False]):.0%}"])
            print("  " + " ".join(str(c) for c in rows[-1]), flush=True)
    engine.memoize_decodes = True
    print_table(f"propagation with cached embeddings, backend {engine.backend.name} ({engine.backend.precision}); "
                f"median of {args.repeats} interleaved runs",
                ["case", "box at", "Dice", "same mask", "decodes", "decodes (memo)", "s", "s (memo)", "saved"], rows)
    return 0 if all(r[3] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys_exit = main()
    raise SystemExit(sys_exit)
