"""Click -> 2D preview latency through the effect logic, on CPU (a measurement, not a test).

    OMP_NUM_THREADS=2 .venv/bin/python SAMLiverSeg/Testing/Python/measure_click_latency.py

A 512 x 512 phantom CT is put in a real slice node; for six slices through the liver a box is
dragged (a cold slice: embedding + decode) and then a point is clicked on the same slice (the
embedding is cached: decode only). Times are wall-clock through SegmentAnythingSession, as the
effect calls it.
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import slicer  # noqa: E402
from slicer_test_helpers import centre_view_on, slice_node_for  # noqa: E402

from samliverseg.interactive.engine import PromptEngine  # noqa: E402
from samliverseg.demo.phantom import make_phantom  # noqa: E402
from SAMLiverSegLogic import effect_logic, geometry, slice_clicks, volume_nodes  # noqa: E402


def main() -> None:
    ph = make_phantom((24, 512, 512), (0.75, 0.75, 5.0), seed=4, n_tumors=1)
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    vol = volume_nodes.add_volume_node_from_volume(scene, ph.to_volume(), "CT")
    engine = PromptEngine(model="lite_medsam", device="cpu")
    session = effect_logic.SegmentAnythingSession(engine_factory=lambda s: engine)
    session.set_volume_node(vol)
    sn = slice_node_for(scene, "Axial", vol, dims=(800, 700), fov_mm=400)
    liver = ph.liver_mask
    ks = np.flatnonzero(liver.any((1, 2)))
    cold, warm = [], []
    for k in ks[len(ks) // 2 - 3: len(ks) // 2 + 3]:
        jj, ii = np.nonzero(liver[k])
        a = geometry.ijk_to_ras_point(vol, (ii.min(), jj.min(), k))
        b = geometry.ijk_to_ras_point(vol, (ii.max(), jj.max(), k))
        centre_view_on(sn, (a + b) / 2)
        session.clear()
        t0 = time.perf_counter()
        out = session.drag_box(sn, slice_clicks.ras_to_xy(sn, a)[:2], slice_clicks.ras_to_xy(sn, b)[:2])
        cold.append(time.perf_counter() - t0)
        assert out.ok and out.cold, out
        c = geometry.ijk_to_ras_point(vol, (int(np.median(ii)), int(np.median(jj)), k))
        t0 = time.perf_counter()
        out = session.click(sn, slice_clicks.ras_to_xy(sn, c)[:2])
        warm.append(time.perf_counter() - t0)
        assert out.ok and not out.cold, out
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"cold slice (embedding + decode): median {statistics.median(cold) * 1000:.0f} ms "
          f"[{', '.join(f'{x * 1000:.0f}' for x in cold)}]")
    print(f"cached embedding (decode only):  median {statistics.median(warm) * 1000:.0f} ms "
          f"[{', '.join(f'{x * 1000:.0f}' for x in warm)}]")


if __name__ == "__main__":
    main()
