"""Seconds per negative click: ``mask_edits.negative_region`` at a given commit (by default session
27's last, 1dc32b1) against the working tree's, interleaved on the same inputs.

The inputs are the negative clicks of simulated-user runs (``bench_simulated_user.next_click``,
LiteMedSAM on OpenVINO, embeddings from ``--embed-cache``), replayed with the working tree's code:
each click's mask, slice and pixel are timed with both versions (``--repeats`` times each,
alternating), before the session applies it. Prints one row per click and a summary table.

    python results/session28_negative_click_timing.py --embed-cache /work/embcache \
        --objects tumours --names livertumor05,livertumor06 --starts 20,50,80
"""
import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_simulated_user as b
import variants
from bench_propagation import DiskEmbeddings
from samliverseg.core.evaluation import dice
from samliverseg.demo import sample_data
from samliverseg.interactive import session3d
from samliverseg.interactive.engine import PromptEngine
from samliverseg.interactive.session3d import CorrectionSession

REPO = Path(__file__).resolve().parents[2]


def old_module(commit: str):
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:SAMLiverSegLib/samliverseg/interactive/mask_edits.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "mask_edits_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("mask_edits_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embed-cache", type=Path, required=True)
    ap.add_argument("--objects", choices=["tumours", "liver"], default="tumours")
    ap.add_argument("--names", default="", help="tumours: comma-separated names (default: all)")
    ap.add_argument("--starts", default="20,50,80")
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--commit", default="1dc32b1")
    args = ap.parse_args(argv)
    old = old_module(args.commit)
    new = session3d.negative_region
    case = variants.load_cases(["ircadb"])[0]
    if args.objects == "tumours":
        _, tumours = sample_data.load_ircadb(structures=sample_data.IRCADB_LIVER_STRUCTURES[1:])
        names = args.names.split(",") if args.names else sorted(tumours)
        objects = [(n, tumours[n] > 0) for n in names]
    else:
        objects = [("liver", case.truth > 0)]
    eng = PromptEngine("lite_medsam", device="cpu", backend="openvino", cache_mb=4096)
    DiskEmbeddings(eng, args.embed_cache)
    eng.set_volume(case.volume)
    rows = []

    def timed(mask3d, hu3d, axis, index, xy, ps, *a, **kw):
        t_old, t_new = [], []
        for _ in range(args.repeats):
            t = time.perf_counter(); old.negative_region(mask3d, hu3d, axis, index, xy, ps, *a, **kw); t_old.append(time.perf_counter() - t)
            t = time.perf_counter(); out = new(mask3d, hu3d, axis, index, xy, ps, *a, **kw); t_new.append(time.perf_counter() - t)
        rows.append((int(np.count_nonzero(mask3d)), min(t_old), min(t_new)))
        return out

    session3d.negative_region = timed
    print(f"{'object':14s} {'start':>5s} {'slice':>5s} {'mask voxels':>11s} {'old s':>7s} {'new s':>7s}")
    for name, truth in objects:
        for start in (float(s) / 100 for s in args.starts.split(",")):
            k = variants.prompt_slice(case.volume, truth, start)
            s = CorrectionSession(eng, variants.box_prompt(truth.astype(np.uint8), k, max(1, case.margin // 2)))
            refused = []
            for _ in range(args.clicks):
                ijk, pos, _size = b.next_click(s.mask > 0, truth, case.volume.spacing, refused)
                n = len(rows)
                try:
                    s.add_point(ijk, positive=pos)
                except Exception:
                    refused.append(ijk)
                for r in rows[n:]:
                    print(f"{name:14s} {start:5.2f} {int(ijk[2]):5d} {r[0]:11d} {r[1]:7.3f} {r[2]:7.3f}", flush=True)
            print(f"{name:14s} {start:5.2f} Dice after {args.clicks} clicks {dice(s.mask, truth):.4f}", flush=True)
    if rows:
        o, n = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
        print(f"\n| negative clicks | old mean / median / max s | new mean / median / max s |\n|---|---|---|\n"
              f"| {len(rows)} | {o.mean():.3f} / {np.median(o):.3f} / {o.max():.3f} | {n.mean():.3f} / {np.median(n):.3f} / {n.max():.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
