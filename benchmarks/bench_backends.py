#!/usr/bin/env python
"""Benchmark of the encoder/decoder backends on real CT slices. Prints tables (it is no test).

    .venv/bin/python benchmarks/bench_backends.py [--slices 30] [--cases ircadb,totalseg] [--model lite_medsam]
        [--variants torch:fp32,torch:bf16,onnxruntime:fp32,openvino:fp32,openvino:bf16] [--threads N]
        [--e2e torch:fp32,auto:fp32,auto:auto] [--keep-cache] [--no-memory] [--json out.json]

1. Conversion: each exported variant is opened in a fresh converted-model cache (a temporary
   folder, unless ``--keep-cache``): the first-use conversion time, then the cached start-up time
   (a second open: read, verify, compile).
2. Per slice, all variants interleaved (the order rotates from slice to slice, so that a busy
   neighbour slows them alike): ``--slices`` slices evenly spread over the liver of each case, box
   prompts (the reference's bounding box on the slice + ``--margin`` voxels); ms per slice
   (encoder), ms per decode, the ratio to eager torch fp32, the embedding's relative L2 difference
   from eager and the mask Dice against eager.
3. Peak memory per variant: each in its own subprocess (model, backend, three slices), its peak RSS.
4. End to end: a cold liver from one box on the case (read the CT, embed, propagate, write the
   labelmap), for each ``--e2e`` backend:precision in the same run, with the liver Dice against
   the reference and against the first one.

Variants whose package is missing or whose precision the CPU lacks natively are skipped with
the reason. The shared cases live in ``../shared/data`` (``SAMLIVERSEG_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from samliverseg.core.evaluation import dice
from samliverseg.core.maskutil import bbox_2d, middle_slice
from samliverseg.core.prompts import Prompts, SliceBox
from samliverseg.core.windowing import apply_window, get_window
from samliverseg.demo import sample_data
from samliverseg.interactive.backends import check_slice
from samliverseg.interactive.engine import PromptEngine, pixel_spacing
from samliverseg.interactive.predictor import SlicePredictor
from samliverseg.models.build_sam import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import peak_rss_mb, print_table  # noqa: E402 (the benchmarks' shared table printer)

DEFAULT_VARIANTS = "torch:fp32,torch:bf16,onnxruntime:fp32,openvino:fp32,openvino:bf16"


def parse_variants(text: str):
    out = []
    for item in text.split(","):
        backend, _, precision = item.strip().partition(":")
        out.append((backend, precision or "fp32"))
    return out


def label(v) -> str:
    return f"{v[0]} {v[1]}"


def load_cases(names):
    cases = []
    if "ircadb" in names:
        vol, masks = sample_data.load_ircadb(structures=("liver",))
        cases.append(("ircadb-1.1", vol, masks["liver"]))
    if "totalseg" in names:
        vol, liver = sample_data.load_totalseg_example()
        cases.append(("totalseg-example", vol, liver))
    return cases


def slice_jobs(cases, n_slices: int, margin: int, window):
    """(case, k, windowed slice, pixel spacing, box) for n_slices slices spread over each liver."""
    jobs = []
    per_case = max(1, int(np.ceil(n_slices / len(cases))))
    for name, vol, liver in cases:
        ks = np.flatnonzero(liver.any(axis=(1, 2)))
        ks = ks[np.round(np.linspace(0, len(ks) - 1, min(per_case, len(ks)))).astype(int)]
        for k in ks:
            x0, y0, x1, y1 = bbox_2d(liver[k])
            rows, cols = liver[k].shape
            box = (max(0, x0 - margin), max(0, y0 - margin), min(cols - 1, x1 + margin), min(rows - 1, y1 + margin))
            jobs.append((name, int(k), apply_window(vol.array[k], window), pixel_spacing(vol, "k"), box))
    return jobs[:n_slices]


def open_variants(model, variants, notes):
    """{variant: SlicePredictor} for those that open as asked; conversion and cached start-up times."""
    preds, startup = {}, {}
    for v in variants:
        said = []
        t0 = time.perf_counter()
        pred = SlicePredictor(model, "cpu", v[1], backend=v[0], notify=said.append)
        b = pred.backend
        first = time.perf_counter() - t0
        if (b.name, b.precision) != v:
            notes.append(f"{label(v)}: skipped ({'; '.join(said) or 'not available'})")
            continue
        again = SlicePredictor(model, "cpu", v[1], backend=v[0], notify=said.append)
        t0 = time.perf_counter()
        again.backend  # noqa: B018 (opens it: the cached start-up)
        startup[v] = {"first_open_s": first, "conversion_s": b.conversion_s, "cached_startup_s": time.perf_counter() - t0}
        preds[v] = again
    return preds, startup


def per_slice(preds, jobs, reference):
    stats = {v: {"embed": [], "decode": [], "rel": [], "dice": []} for v in preds}
    order = list(preds)
    for v in order:  # warm-up (first-call allocations) on the first slice
        preds[v].embed(jobs[0][2], jobs[0][3])
    for n, (_, _, img, spacing, box) in enumerate(jobs):
        out = {}
        for v in order[n % len(order):] + order[: n % len(order)]:
            p = preds[v]
            t0 = time.perf_counter()
            emb = p.embed(img, spacing)
            t1 = time.perf_counter()
            mask = p.predict(emb, box=box, multimask_output=False).masks[0]
            t2 = time.perf_counter()
            stats[v]["embed"].append(t1 - t0)
            stats[v]["decode"].append(t2 - t1)
            out[v] = (emb.features, mask)
        ref_f, ref_m = out[reference]
        for v, (f, m) in out.items():
            stats[v]["rel"].append(float((f - ref_f).norm() / ref_f.norm()))
            stats[v]["dice"].append(dice(m, ref_m))
    return stats


def vm_hwm_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return peak_rss_mb()


def memory_child(model_name: str, backend: str, precision: str, slices: int, cache: str) -> None:
    """Subprocess: open one variant, embed and decode a few 512x512 slices, print the peak RSS (JSON)."""
    os.environ["SAMLIVERSEG_CACHE"] = cache
    model = build_model(model_name)
    rss_model = vm_hwm_mb()
    pred = SlicePredictor(model, "cpu", precision, backend=backend, notify=lambda m: None)
    b = pred.backend
    img = check_slice(512)
    for _ in range(slices):
        pred.predict(pred.embed(img, (0.7, 0.7)), box=(100, 120, 300, 330), multimask_output=False)
    print(json.dumps({"backend": b.name, "precision": b.precision, "peak_rss_mb": vm_hwm_mb(),
                      "after_model_load_mb": rss_model}))


def measure_memory(model_name, variants, cache):
    rows = []
    for v in variants:
        code = [sys.executable, __file__, "--memory-child", f"{v[0]}:{v[1]}", "--model", model_name, "--cache", cache]
        proc = subprocess.run(code, capture_output=True, text=True, timeout=1800)
        try:
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            rows.append([label(v), "failed", proc.stderr.strip().splitlines()[-1:] or ""])
            continue
        rows.append([label(v), f"{r['peak_rss_mb']:.0f}", f"{r['after_model_load_mb']:.0f}"])
    return rows


def end_to_end(model_name, e2e, case_name, margin):
    """Cold liver from one box: read, embed, propagate, write (each in a fresh engine)."""
    from samliverseg.io.export import write_labelmap
    from samliverseg.io.volume import read_volume

    _, masks = sample_data.load_ircadb(structures=("liver",))
    liver = masks["liver"]
    k = middle_slice(liver, "k")
    x0, y0, x1, y1 = bbox_2d(liver[k])
    prompts = Prompts(box=SliceBox.axial(x0 - margin, y0 - margin, x1 + margin, y1 + margin, k))
    rows, results, first = [], {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for v in e2e:
            engine = PromptEngine(model_name, device="cpu", backend=v[0], precision=v[1])  # model built outside the clock
            t0 = time.perf_counter()
            vol = read_volume(sample_data.ircadb_ct_dir())
            engine.set_volume(vol)
            res = engine.segment(prompts)
            write_labelmap(res.mask, vol, str(Path(tmp) / "liver.nii.gz"))
            total = time.perf_counter() - t0
            d = dice(res.mask > 0, liver > 0)
            if first is None:
                first = res.mask > 0
            t = res.report["timings"]
            results[label(v)] = {"total_s": total, "dice": d, "report": res.report}
            rows.append([f"{v[0]} {v[1]}", f"{res.report['backend']} {res.report['precision']}", f"{total:.1f}",
                         t["slices_embedded"], t["embed_ms_per_slice"], t["decode_ms_per_prompt"],
                         f"{d:.4f}", f"{dice(res.mask > 0, first):.4f}"])
    return rows, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lite_medsam")
    ap.add_argument("--cases", default="ircadb", help="comma list: ircadb, totalseg")
    ap.add_argument("--slices", type=int, default=30, help="slices (spread over the livers) for the per-slice table")
    ap.add_argument("--margin", type=int, default=5, help="voxels added around the reference's box")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="backend:precision list; the first is the reference")
    ap.add_argument("--e2e", default="torch:fp32,auto:fp32,auto:auto",
                    help="backend:precision list for the end-to-end cold liver (empty: skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch (and backend) threads; default torch's")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use the converted-model cache as it is (default: a fresh temporary one)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant peak memory subprocesses")
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        b, _, p = args.memory_child.partition(":")
        memory_child(args.model, b, p, 3, args.cache)
        return 0
    if sample_data.shared_data_dir() is None:
        print(f"no shared data: {sample_data.missing_reason()}", file=sys.stderr)
        return 2
    tmp = None
    if not args.keep_cache:
        tmp = tempfile.TemporaryDirectory(prefix="samliverseg-bench-")
        os.environ["SAMLIVERSEG_CACHE"] = tmp.name
    cache = os.environ.get("SAMLIVERSEG_CACHE") or str(Path.home() / ".cache" / "samliverseg")
    variants = parse_variants(args.variants)
    e2e = parse_variants(args.e2e) if args.e2e else []
    print(f"model {args.model}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")

    model = build_model(args.model)
    notes = []
    preds, startup = open_variants(model, variants, notes)
    for n in notes:
        print(n)
    reference = variants[0]
    if reference not in preds:
        print(f"the reference variant {label(reference)} is not available", file=sys.stderr)
        return 2
    print_table("first use and start-up (s)", ["variant", "first open (conversion + self-check)", "conversion",
                                              "cached start-up"],
                [[label(v), f"{s['first_open_s']:.2f}", "-" if s["conversion_s"] is None else f"{s['conversion_s']:.2f}",
                  f"{s['cached_startup_s']:.3f}"] for v, s in startup.items()])

    window = get_window(model.spec.window)
    cases = load_cases(args.cases.split(","))
    jobs = slice_jobs(cases, args.slices, args.margin, window)
    stats = per_slice(preds, jobs, reference)
    base = float(np.mean(stats[reference]["embed"]))
    rows = []
    for v, s in stats.items():
        emb, dec = 1000 * float(np.mean(s["embed"])), 1000 * float(np.mean(s["decode"]))
        rows.append([label(v), f"{emb:.0f}", f"{1000 * float(np.median(s['embed'])):.0f}",
                     f"{base * 1000 / emb:.2f}x", f"{dec:.1f}",
                     "-" if v == reference else f"{np.mean(s['rel']):.1e} / {np.max(s['rel']):.1e}",
                     "-" if v == reference else f"{np.mean(s['dice']):.4f} / {np.min(s['dice']):.4f}"])
    print_table(f"per slice: {len(jobs)} slices of {', '.join(c[0] for c in cases)}, box prompts, variants interleaved "
                f"(reference: {label(reference)}); load average {os.getloadavg()[0]:.2f} at the end",
                ["variant", "ms/slice mean", "median", "vs reference", "decode ms", "embedding rel. L2 mean / max",
                 "mask Dice vs ref. mean / min"], rows)

    mem_rows = [] if args.no_memory else measure_memory(args.model, list(preds), cache)
    if mem_rows:
        print_table("peak memory per variant (own process: model, backend, 3 synthetic 512x512 slices)",
                    ["variant", "peak RSS MB", "after model load MB"], mem_rows)

    e2e_rows, e2e_results = ([], {})
    if e2e:
        e2e_rows, e2e_results = end_to_end(args.model, e2e, "ircadb-1.1", args.margin)
        print_table("end to end: cold liver from one box on ircadb-1.1 (read, embed, propagate, write)",
                    ["asked", "ran", "total s", "slices embedded", "embed ms/slice", "decode ms", "liver Dice",
                     f"Dice vs {label(e2e[0])}"], e2e_rows)
        totals = {k: r["total_s"] for k, r in e2e_results.items()}
        if len(totals) > 1:
            first = next(iter(totals))
            print("speed-up vs " + first + ": " + ", ".join(f"{k} {totals[first] / t:.2f}x" for k, t in totals.items()))
    print(f"\npeak RSS of this process: {peak_rss_mb():.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "startup": {label(v): s for v, s in startup.items()},
            "per_slice": {label(v): s for v, s in stats.items()},
            "memory": mem_rows, "end_to_end": {k: {kk: vv for kk, vv in r.items() if kk != "report"}
                                               for k, r in e2e_results.items()},
        }, indent=2, default=str))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
