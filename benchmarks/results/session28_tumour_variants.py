"""The simulated user on the 7 tumours of ircadb-1.1 under the variants of issue 13 (flips, crops,
resampling), which ``bench_simulated_user`` runs for the liver only: each tumour is made a case of
its own (``variants.make_variant`` on the CT with that tumour as the truth; ``crop_liver`` then crops
around the tumour plus 20 mm), boxed at ``--starts`` and corrected with ``--clicks`` clicks
(``bench_simulated_user.run_case``). Run it with the code of two commits on PYTHONPATH to compare.

    python results/session28_tumour_variants.py --embed-cache /work/embcache \
        --variants flip_k,flip_i,resample_3mm --starts 20,50,80 --json out.json
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

import bench_simulated_user as b
import variants
from bench_propagation import DiskEmbeddings
from samliverseg.demo import sample_data
from samliverseg.interactive.engine import PromptEngine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embed-cache", type=Path, default=None)
    ap.add_argument("--variants", default="flip_k,flip_i,resample_3mm")
    ap.add_argument("--starts", default="20,50,80")
    ap.add_argument("--tumours", default="", help="only these tumours, e.g. 5,6 (default: all)")
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if sample_data.shared_data_dir() is None:
        print(f"skipped: {sample_data.missing_reason()}")
        return 0
    starts = [float(v) / 100.0 for v in args.starts.split(",") if v.strip()]
    case = variants.load_cases(["ircadb"])[0]
    _, tumours = sample_data.load_ircadb(structures=sample_data.IRCADB_LIVER_STRUCTURES[1:])
    wanted = {f"livertumor{int(t):02d}" for t in args.tumours.split(",") if t.strip()}
    engine = PromptEngine("lite_medsam", device="cpu", backend="auto", cache_mb=4096)
    if args.embed_cache:
        DiskEmbeddings(engine, args.embed_cache)
    results: dict = {}
    rows: list = []
    for vname in [v for v in args.variants.split(",") if v.strip()]:
        for name in sorted(tumours):
            if wanted and name not in wanted:
                continue
            one = variants.Case(case.name, case.volume, (tumours[name] > 0).astype(np.uint8), case.margin)
            v = variants.make_variant(one, vname)
            if not v.truth.any():
                continue
            b.run_case(engine, v.name, v.volume, {name: (v.truth > 0, max(1, case.margin // 2), starts)},
                       args.clicks, results, rows)
    steps = [f"Dice@{n}" for n in range(args.clicks + 1)]
    b.print_table("simulated user, tumours under variants", ["case", "object", "start", *steps, "AUC", "box s",
                  "s/corr", "corrections"], rows)
    b.print_table("summary", ["object", "runs", *steps, "AUC", "min@1", "mean s", "median s", "max s",
                  "shown s (median/max)"], b.summary(results, args.clicks))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
