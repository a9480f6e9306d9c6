"""Click -> 2D preview latency through the effect session and the inference worker, on CPU (a
measurement, not a test).

    OMP_NUM_THREADS=2 .venv/bin/python SAMLiverSeg/Testing/Python/measure_click_latency.py

A 512 x 512 phantom CT is put in a real slice node. For slices through the liver a box is dragged
(a cold slice: the volume is sent at the first one, then embedding + decode in the worker), then
points are clicked on the same slice (the embedding is cached: decode only). A click is timed as
Slicer sees it: from ``session.click()`` until ``session.poll()`` returned the preview, waiting in
``select()`` on the worker's pipe as the effect's QSocketNotifier does (preview shown in the
scene included). Interleaved with each warm click, the same prompts go to an in-process engine
(torch, same thread count): the difference is what the worker adds (transport, JSON, .npy files).
"""

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import slicer  # noqa: E402
from slicer_test_helpers import centre_view_on, pump, slice_node_for  # noqa: E402

from samliverseg.demo.phantom import make_phantom  # noqa: E402
from samliverseg.interactive.engine import PromptEngine  # noqa: E402
from SAMLiverSegLogic import effect_logic, geometry, slice_clicks, volume_nodes  # noqa: E402
from SAMLiverSegLogic.worker_client import WorkerClient  # noqa: E402

WARM_CLICKS = 20


def preview_seconds(session, act):
    t0 = time.perf_counter()
    out = act()
    assert out.ok, out.message
    outs = pump(session, lambda outs: any(o.kind == "preview" for o in outs), timeout=900)
    dt = time.perf_counter() - t0
    assert all(o.ok for o in outs), outs
    return dt


def main() -> None:
    ph = make_phantom((24, 512, 512), (0.75, 0.75, 5.0), seed=4, n_tumors=1)
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    volume_nodes.ensure_segmentation_converters()
    vol = volume_nodes.add_volume_node_from_volume(scene, ph.to_volume(), "CT")
    engine = PromptEngine(model="lite_medsam", device="cpu", backend="torch")
    engine.set_volume(volume_nodes.volume_from_node(vol))
    with WorkerClient(device="cpu", backend="torch") as client:
        session = effect_logic.SegmentAnythingSession(effect_logic.EngineSettings(device="cpu", backend="torch"),
                                                      scene, client_factory=lambda s: client)
        session.set_volume_node(vol)
        sn = slice_node_for(scene, "Axial", vol, dims=(800, 700), fov_mm=400)
        liver = ph.liver_mask
        ks = np.flatnonzero(liver.any((1, 2)))
        first, cold, warm, inproc = None, [], [], []
        for n, k in enumerate(ks[len(ks) // 2 - 2: len(ks) // 2 + 2]):
            jj, ii = np.nonzero(liver[k])
            a = geometry.ijk_to_ras_point(vol, (ii.min(), jj.min(), k))
            b = geometry.ijk_to_ras_point(vol, (ii.max(), jj.max(), k))
            centre_view_on(sn, (a + b) / 2)
            session.clear()
            dt = preview_seconds(session, lambda: session.drag_box(sn, slice_clicks.ras_to_xy(sn, a)[:2],
                                                                   slice_clicks.ras_to_xy(sn, b)[:2]))
            if first is None:
                first = dt  # worker start, model build, volume hand-over, embedding
            else:
                cold.append(dt)
            engine.embedding("k", int(k))  # the in-process engine caches this slice too
            for m in range(WARM_CLICKS // 4):
                c = geometry.ijk_to_ras_point(vol, (int(np.median(ii)) + m, int(np.median(jj)), k))
                warm.append(preview_seconds(session, lambda: session.click(sn, slice_clicks.ras_to_xy(sn, c)[:2])))
                prompts = session.builder.prompts_on_slice()
                t0 = time.perf_counter()
                engine.segment_slice(prompts)
                inproc.append(time.perf_counter() - t0)
    med = statistics.median
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, load average {os.getloadavg()[0]:.1f}")
    print(f"first prompt (start worker, build model, send volume, embed): {first:.1f} s")
    print(f"cold slice (embedding + decode):  median {med(cold) * 1000:.0f} ms over {len(cold)}")
    print(f"cached embedding, through worker: median {med(warm) * 1000:.0f} ms over {len(warm)}")
    print(f"cached embedding, in process:     median {med(inproc) * 1000:.0f} ms over {len(inproc)}")
    print(f"worker overhead (median of differences): "
          f"{med([w - i for w, i in zip(warm, inproc)]) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
