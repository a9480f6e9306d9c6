#!/usr/bin/env python
"""Latency of the inference worker against the in-process engine. Prints a table (it is no test).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_worker.py [--device cpu] [--repeats 20]

* click-to-preview with a cached embedding (a box prompt on a slice already embedded): the
  in-process ``PromptEngine.segment_slice`` call against the same prompt sent in RAS through
  ``SAMLiverSegLogic.worker_client.WorkerClient`` (request, worker, mask file read back), median
  of ``--repeats``; the transport overhead is the client's end-to-end time minus the worker's own
  compute time, and the round trip of a ``status`` request (no work at all);
* handing a 512 x 512 x 130 volume to the worker (int16 and float32 voxels): writing the array
  file, and the ``load_volume`` request until its answer (the worker maps the file, converts to
  float32 HU and windows it for the model);
* what a GUI's waiting adds: the same preview waited for as a ``QSocketNotifier`` on ``fileno()``
  wakes (``select`` on the pipe with a 100 ms timeout, then ``poll()``), against a 100 ms
  ``QTimer`` that polls (ticks at a fixed phase, independent of when the click was sent). The
  variants run interleaved (in process, notifier, timer, in turn), so a load that changes during
  the run hits all of them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMLiverSeg"))

import select  # noqa: E402

from samliverseg.core.maskutil import bbox_2d, middle_slice  # noqa: E402
from samliverseg.core.prompts import Prompts, SliceBox  # noqa: E402
from samliverseg.demo.phantom import make_phantom  # noqa: E402
from samliverseg.interactive.engine import PromptEngine  # noqa: E402
from SAMLiverSegLogic.worker_client import WorkerClient  # noqa: E402


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def table(rows, header) -> str:
    widths = [max(len(str(r[c])) for r in rows + [header]) for c in range(len(header))]
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--backend", default="torch", choices=("torch", "auto", "openvino", "onnxruntime"),
                    help="what runs the model, in process and in the worker alike (default torch)")
    ap.add_argument("--transport", default=None, choices=("pipe", "socket"),
                    help="the client's transport (default: pipe on POSIX, socket on Windows)")
    args = ap.parse_args()
    n = args.repeats

    ph = make_phantom((40, 256, 256), (1.5, 1.5, 5.0), seed=2, n_tumors=1)
    vol = ph.to_volume()
    k = middle_slice(ph.liver_mask)
    i0, j0, i1, j1 = bbox_2d(ph.liver_mask[k])
    boxes = [[[i0 - 3 - d, j0 - 3, k], [i1 + 3 + d, j1 + 3, k]] for d in range(n)]  # a slightly different drag each time

    engine = PromptEngine("lite_medsam", device=args.device, backend=args.backend)
    engine.set_volume(vol)
    engine.embedding("k", k)

    def in_process(b) -> float:
        t = time.perf_counter()
        engine.segment_slice(Prompts(box=SliceBox(tuple(b[0]), tuple(b[1]))))
        return time.perf_counter() - t

    rows = []
    with WorkerClient(device=args.device, backend=args.backend, transport=args.transport) as client:
        t = time.perf_counter()
        client.start()
        t_start = time.perf_counter() - t
        t = time.perf_counter()
        client.request("load_volume", array=client.write_array("vol", vol.array), ijk_to_ras=vol.ijk_to_ras_matrix())
        t_first_load = time.perf_counter() - t
        client.request("prefetch", slices=[k])
        tick0 = time.perf_counter()

        def through_worker(b, waiter: str):
            """One preview as the GUI gets it: send, wait as ``waiter`` does, read the mask."""
            t = time.perf_counter()
            rid = client.send("prompt", box=vol.ijk_to_ras(np.asarray(b, float)).tolist(), orientation="axial")
            final = None
            while final is None:
                if waiter == "notifier":  # QSocketNotifier on fileno(): wakes when the pipe is readable
                    select.select([client.fileno()], [], [], 0.1)
                else:  # a 100 ms QTimer: wakes at its next tick, whenever the answer came
                    now = time.perf_counter()
                    time.sleep(0.1 - ((now - tick0) % 0.1))
                final = next((m for m in client.poll() if m.get("id") == rid and "ok" in m), None)
            client.read_array(final["result"]["mask"])
            return time.perf_counter() - t, final["timings"]["compute_ms"] / 1000.0

        local, e2e, compute, timer = [], [], [], []
        for b in boxes:  # interleaved: in process, notifier, timer
            local.append(in_process(b))
            t_e2e, t_compute = through_worker(b, "notifier")
            e2e.append(t_e2e)
            compute.append(t_compute)
            timer.append(through_worker(b, "timer")[0])
        status = []
        for _ in range(n):
            t = time.perf_counter()
            client.request("status")
            status.append(time.perf_counter() - t)
        overhead = [a - b for a, b in zip(e2e, compute)]
        med = statistics.median
        rows += [
            ["click-to-preview, in process (segment_slice, cached embedding)", ms(med(local)), ms(min(local))],
            ["click-to-preview through client + worker (end to end)", ms(med(e2e)), ms(min(e2e))],
            ["  of which the worker's compute", ms(med(compute)), ms(min(compute))],
            ["  transport overhead (end to end - worker compute)", ms(med(overhead)), ms(min(overhead))],
            ["status round trip (no work)", ms(med(status)), ms(min(status))],
            ["click-to-preview through client + worker, waited by a 100 ms QTimer poll", ms(med(timer)),
             ms(min(timer))],
            ["  QTimer poll - notifier (what the timer adds)", ms(med(timer) - med(e2e)), ""],
            ["  notifier - in process (what worker + transport + waiting add)", ms(med(e2e) - med(local)), ""],
        ]

        big = np.random.default_rng(0).normal(40, 200, (130, 512, 512)).clip(-1024, 3071)
        for dtype in (np.int16, np.float32):
            arr = big.astype(dtype)
            writes, loads = [], []
            for _ in range(3):
                t = time.perf_counter()
                ref = client.write_array("big", arr)
                t_write = time.perf_counter() - t
                client.request("load_volume", array=ref, ijk_to_ras=np.eye(4))
                total = time.perf_counter() - t
                os.remove(ref["npy"])
                writes.append(t_write)
                loads.append(total)
            rows.append([f"hand over 512x512x130 {np.dtype(dtype).name} ({arr.nbytes / 2**20:.0f} MB): write + "
                         f"load_volume", ms(med(loads)), ms(min(loads))])
            rows.append(["  of which writing the array file", ms(med(writes)), ms(min(writes))])
    print(f"device {args.device}, backend {args.backend}, transport {client.transport}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{os.cpu_count()} CPUs, {n} repeats; worker start (hello) {ms(t_start)} ms, first load_volume "
          f"(model build + 40x256x256 volume) {ms(t_first_load)} ms")
    print(table(rows, ["what", "median ms", "min ms"]))


if __name__ == "__main__":
    main()
