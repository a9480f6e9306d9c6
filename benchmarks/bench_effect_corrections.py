#!/usr/bin/env python
"""Seconds per correction as a clinician meets them in the effect. Prints tables (it is no test).

    PYTHONPATH=SAMLiverSegLib .venv/bin/python benchmarks/bench_effect_corrections.py \
        [--cases ircadb,totalseg] [--starts 20,50,80] [--clicks 5] [--backend auto] [--json out.json]

The Segment Editor effect's Qt-free session (``SAMLiverSegLogic.effect_logic.SegmentAnythingSession``)
in a real MRML scene (slicer-core) with a real inference worker, driven as Slicer drives it (the
answers taken when the worker's pipe is readable, ``select()`` standing in for the
QSocketNotifier):

* the liver is boxed on the axial slice at ``--starts`` percent of its extent (the reference's box
  there plus the case's margin, as ``bench_simulated_user.py``), dragged in a slice view, then
  Propagate; the slices of the liver's extent +-10 are then embedded in the worker (``prefetch``),
  so that what follows is a correction with cached embeddings;
* up to ``--clicks`` clicks in the slice view, each where ``bench_simulated_user.next_click`` puts
  it (the deepest point of the largest 3D error component; positive for a miss, negative for a
  leak), which the session sends as a ``correct`` request.

For each click: **its slice shown**, from the click to the clicked slice corrected in the scene (the
worker's ``partial`` event, sent before the correction walks through the other slices; for a cut
that HU carries, which comes whole, the end to end time); **end to end**, from the click to the whole corrected
3D result shown (the request, the worker's correction, the mask file written and read back, the
preview segmentation node updated); the worker's own compute time; and the rest. Then "Undo correction" once: its
seconds, and whether Dice is back where it was before the last click. Dice after each step, and whether the
worker corrected the result it held (it always should here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMLiverSeg"))
sys.path.insert(0, str(REPO / "SAMLiverSeg" / "Testing" / "Python"))

import slicer  # noqa: E402  (slicer-core)
from slicer_test_helpers import centre_view_on, pump, slice_node_for  # noqa: E402

from samliverseg.core.evaluation import dice  # noqa: E402
from SAMLiverSegLogic import effect_logic, geometry, slice_clicks, volume_nodes  # noqa: E402
from SAMLiverSegLogic.worker_client import WorkerClient  # noqa: E402

import variants  # noqa: E402
from bench_engine import print_table  # noqa: E402
from bench_simulated_user import PREFETCH_MARGIN, next_click  # noqa: E402


def xy_of(sn, vol, ijk):
    return slice_clicks.ras_to_xy(sn, geometry.ijk_to_ras_point(vol, ijk))[:2]


def finished(kind):
    return lambda outs: any(o.kind == kind for o in outs)


def run(client, case, start: float, clicks: int, backend: str) -> dict:
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    volume_nodes.ensure_segmentation_converters()
    vol = volume_nodes.add_volume_node(scene, case.volume.array, case.volume.ijk_to_ras_matrix(), case.name)
    truth = case.truth > 0
    session = effect_logic.SegmentAnythingSession(effect_logic.EngineSettings(device="cpu", backend=backend),
                                                  scene, client_factory=lambda s: client)
    assert session.set_volume_node(vol).ok
    sn = slice_node_for(scene, "Axial", vol, fov_mm=400.0)
    k = variants.prompt_slice(case.volume, case.truth, start)
    box = variants.box_prompt(case.truth, k, case.margin).box
    lo, hi = box.lo(), box.hi()
    centre_view_on(sn, geometry.ijk_to_ras_point(vol, ((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, k)))
    t0 = time.perf_counter()
    assert session.drag_box(sn, xy_of(sn, vol, lo), xy_of(sn, vol, hi), preview=False).ok
    assert session.start_propagate().ok
    out = [o for o in pump(session, finished("propagate"), timeout=1800) if o.kind == "propagate"][-1]
    assert out.ok, out.message
    result = {"case": case.name, "start": start, "slice": k, "propagate_s": time.perf_counter() - t0,
              "dice": [dice(session.preview, truth)], "steps": []}
    ks = np.flatnonzero(truth.any(axis=(1, 2)))
    n = truth.shape[0]
    client.request("prefetch", slice_axis="k", range=[max(0, int(ks[0]) - PREFETCH_MARGIN),
                                                      min(n - 1, int(ks[-1]) + PREFETCH_MARGIN)], timeout=3600)
    refused: List[tuple] = []
    spacing = case.volume.spacing
    for _ in range(clicks):
        click = next_click(session.preview > 0, truth, spacing, refused)
        if click is None:
            break
        ijk, positive, size = click
        centre_view_on(sn, geometry.ijk_to_ras_point(vol, ijk))
        t1 = time.perf_counter()
        sent = session.click(sn, xy_of(sn, vol, ijk), positive=positive)
        assert sent.ok, sent.message
        outs = pump(session, lambda o: finished("correct")(o) and not session.tasks, timeout=600)
        end_to_end = time.perf_counter() - t1
        o = [x for x in outs if x.kind == "correct"][-1]
        step = {"click": ("+" if positive else "-") + f"k{int(round(ijk[2]))}({size})", "ok": o.ok,
                "end_to_end_s": end_to_end}
        if not o.ok:
            step["error"] = o.message
            refused.append(ijk)
        else:
            timings = (o.data or {}).get("timings") or {}
            c = (o.data or {}).get("correction") or {}
            first = (o.data or {}).get("first_shown_s")
            step.update(worker_s=float(timings.get("total_ms", float("nan"))) / 1000.0,
                        first_shown_s=end_to_end if first is None else float(first),
                        incremental=bool((o.data or {}).get("incremental")),
                        decoded=len(c.get("decoded_slices", [])), changed=len(c.get("changed_slices", [])))
            step["rest_s"] = end_to_end - step["worker_s"]
        result["steps"].append(step)
        result["dice"].append(dice(session.preview, truth))
    if session.can_undo():  # "Undo correction": the last one taken back
        before = result["dice"][-2] if len(result["dice"]) > 1 else None
        t1 = time.perf_counter()
        assert session.undo_correction().ok
        outs = pump(session, lambda o: finished("correct")(o) and not session.tasks, timeout=600)
        o = [x for x in outs if x.kind == "correct"][-1]
        result["undo"] = {"ok": o.ok, "seconds": time.perf_counter() - t1, "dice": dice(session.preview, truth),
                          "dice_before_last": before, "incremental": bool((o.data or {}).get("incremental"))}
    session.shutdown()
    scene.Clear(1)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="ircadb,totalseg")
    ap.add_argument("--starts", default="20,50,80", help="percent of the liver's extent where the box is drawn")
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--backend", default="auto", choices=("torch", "auto", "openvino", "onnxruntime"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cases = variants.load_cases(args.cases.split(","))
    results = []
    with WorkerClient(device="cpu", backend=args.backend) as client:
        for case in cases:
            for s in args.starts.split(","):
                r = run(client, case, int(s) / 100.0, args.clicks, args.backend)
                results.append(r)
                print(f"{r['case']}@{s}%: propagate {r['propagate_s']:.1f} s, Dice "
                      + " ".join(f"{d:.3f}" for d in r["dice"]), flush=True)
                for st in r["steps"]:
                    print("   ", st, flush=True)
                if "undo" in r:
                    print("    undo:", r["undo"], flush=True)
    rows = []
    for r in results:
        for st in r["steps"]:
            rows.append([r["case"], f"{int(round(100 * r['start']))} %", st["click"],
                         f"{st.get('first_shown_s', float('nan')):.2f}",
                         f"{st['end_to_end_s']:.2f}", f"{st.get('worker_s', float('nan')):.2f}",
                         f"{st.get('rest_s', float('nan')):.2f}", st.get("decoded", "-"), st.get("changed", "-"),
                         "yes" if st.get("incremental") else ("refused" if not st["ok"] else "no")])
    print_table("seconds per click in the effect (click -> corrected 3D result shown), embeddings cached; "
                f"backend {args.backend}",
                ["case", "box at", "click", "its slice shown s", "end to end s", "worker s", "rest s", "decoded",
                 "changed", "incremental"],
                rows)
    done = [st for r in results for st in r["steps"] if st["ok"]]
    if done:
        e2e = [st["end_to_end_s"] for st in done]
        first = [st["first_shown_s"] for st in done]
        rest = [st["rest_s"] for st in done]
        print(f"\n{len(done)} corrections: the clicked slice shown after median {statistics.median(first):.2f} s, "
              f"max {max(first):.2f} s ({sum(v <= 1.0 for v in first)} within 1 s); the whole correction shown after "
              f"median {statistics.median(e2e):.2f} s, max {max(e2e):.2f} s ({sum(v <= 1.0 for v in e2e)} within 1 s); "
              f"besides the worker's compute: median {statistics.median(rest):.3f} s, max {max(rest):.3f} s")
    undos = [r["undo"] for r in results if "undo" in r]
    if undos:
        secs = ", ".join(f"{u['seconds']:.2f}" for u in undos)
        back = sum(u["dice_before_last"] is not None and abs(u["dice"] - u["dice_before_last"]) < 1e-9 for u in undos)
        print(f"Undo correction ({len(undos)}): seconds {secs}; Dice back to before the last click in {back} of {len(undos)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
