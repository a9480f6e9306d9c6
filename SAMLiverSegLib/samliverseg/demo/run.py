"""The demo: the main job end to end, on a synthetic phantom (or a real image with a reference).

One box on the middle slice of the liver, and one on the middle slice of the largest tumour,
each propagated to 3D with the prompt engine; the results are written as a Slicer segmentation
(segments "Liver" and "Liver tumor"), a NIfTI labelmap, a PNG overlay of three orthogonal views
and a report with Dice (and HD95, volumes) against the truth.

The boxes are what a user would drag: the truth's bounding box on that slice plus a few voxels.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from samliverseg.core.errors import InputError

BOX_MARGIN_VOXELS = 4


def _box_on_middle_slice(mask3d: np.ndarray, margin: int = BOX_MARGIN_VOXELS):
    from samliverseg.core.maskutil import bbox_2d, middle_slice
    from samliverseg.core.prompts import SliceBox

    k = middle_slice(mask3d, "k")
    if k is None:
        return None
    i0, j0, i1, j1 = bbox_2d(mask3d[k])
    return SliceBox.axial(i0 - margin, j0 - margin, i1 + margin, j1 + margin, k)


def _write_image(image, path: Path, volume) -> None:
    import SimpleITK as sitk

    from samliverseg.core.atomic import atomic_path
    from samliverseg.io.export import image_file_check
    from samliverseg.io.volume import itk_quiet

    with atomic_path(path, check=image_file_check(volume)) as tmp:
        with itk_quiet():
            sitk.WriteImage(image, str(tmp), True)


#: What the demo writes into its output folder.
DEMO_FILES = ("phantom_ct.nii.gz", "phantom_truth.nii.gz", "segmentation.seg.nrrd", "segmentation.nii.gz",
              "overlay.png", "report.json", "report.md")


def check_demo_outputs(args) -> Path:
    """Refuse, before any work, an output folder the demo could not write into or whose writing
    would overwrite one of its inputs (the folder is created only when the demo runs)."""
    import os

    from samliverseg.io.export import check_outputs

    out = Path(args.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out}: is a file, not a folder; give a folder for the demo's results")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"-o {out}: the folder is not writable")
    check_outputs([("-o", out / name, ("." + name.split(".", 1)[1],)) for name in DEMO_FILES],
                  inputs=[p for p in (args.image, args.reference) if p])
    return out


def _r(v, nd=1):
    return round(v, nd) if isinstance(v, float) else v


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from samliverseg.core.postprocess import largest_connected_component

    return largest_connected_component(mask)


def run_demo(args) -> Dict:
    """Run the demo for the parsed CLI ``args``; returns the report (also written to disk)."""
    from samliverseg.interactive.engine import PromptEngine
    from samliverseg.core.evaluation import evaluate
    from samliverseg.core.jsonutil import json_safe
    from samliverseg.io.export import LIVER, LIVER_TUMOR, read_labelmap, write_labelmap, write_seg_nrrd
    from samliverseg.io.overlay import save_overlay_png, to_lps_view
    from samliverseg.core.prompts import SliceBox
    from samliverseg.io.volume import read_volume

    out = check_demo_outputs(args)
    t0 = time.perf_counter()
    tumor_truth: Optional[np.ndarray] = None
    if args.image is None:
        from samliverseg.demo.phantom import make_phantom

        print(f"demo: building a synthetic abdominal CT phantom (seed {args.seed})")
        phantom = make_phantom((80, 224, 224), (1.5, 1.5, 2.5), seed=args.seed, n_tumors=3)
        volume = phantom.to_volume()
        liver_truth = phantom.liver_mask
        tumor_truth = phantom.tumor_label_mask(0)  # the largest tumour
        _write_image(phantom.to_sitk("hu"), out / "phantom_ct.nii.gz", volume)
        write_labelmap(phantom.labels, volume, out / "phantom_truth.nii.gz")
        source = "synthetic phantom"
    else:
        volume = read_volume(args.image)
        source = str(args.image)
        liver_truth = None
        if args.reference:
            ref = read_labelmap(args.reference, volume)
            liver_truth = (ref > 0).astype(np.uint8)
            if (ref == 2).any():
                tumor_truth = _largest_component((ref == 2).astype(np.uint8))
        if args.box_ijk is None and liver_truth is None:
            raise InputError("the demo on a real image needs --reference LABELS or --box-ijk I0 J0 I1 J1 K")

    engine = PromptEngine(model=args.model, checkpoint=args.checkpoint, device=args.device, window=args.window,
                          precision=args.precision, backend=args.backend, decoder_precision=args.decoder_precision)
    engine.set_volume(volume)
    print(f"demo: model {engine.spec.name} on {engine.device}, window {engine.window.spec()}, "
          f"volume {volume.array.shape[::-1]} (i, j, k) at {tuple(round(s, 2) for s in volume.spacing)} mm")

    jobs: List[Tuple[str, object, Optional[np.ndarray], int]] = []
    liver_box = SliceBox.axial(*args.box_ijk) if args.box_ijk else _box_on_middle_slice(liver_truth)
    jobs.append(("Liver", liver_box, liver_truth, 1))
    if tumor_truth is not None and tumor_truth.any():
        jobs.append(("Liver tumor", _box_on_middle_slice(tumor_truth, margin=2), tumor_truth, 2))

    from samliverseg.core.prompts import Prompts

    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    results = {}
    for name, box, truth, value in jobs:
        lo, hi = box.lo(), box.hi()
        print(f"demo: {name}: box ({lo[0]:g}, {lo[1]:g})-({hi[0]:g}, {hi[1]:g}) on slice k={lo[2]:g}; propagating ...")
        res = engine.segment(Prompts(box=box))
        labels[res.mask > 0] = value
        entry = {"prompt": res.report["prompts"], "engine": res.report}
        if truth is not None:
            entry["metrics"] = json_safe(evaluate(res.mask, truth, volume.spacing))
            print(f"demo: {name}: Dice {entry['metrics']['dice']:.3f}, HD95 {_r(entry['metrics']['hd95_mm'])} mm, "
                  f"{entry['metrics']['volume_pred_ml']:.1f} ml (truth {entry['metrics']['volume_ref_ml']:.1f} ml), "
                  f"{res.report['timings']['total_s']} s")
        results[name] = entry

    segments = [LIVER, LIVER_TUMOR][: len(jobs)]
    write_seg_nrrd(labels, volume, out / "segmentation.seg.nrrd", segments)
    write_labelmap(labels, volume, out / "segmentation.nii.gz")
    ref_all = None
    if liver_truth is not None:
        ref_all = liver_truth
    spacing, hu_v, mask_v, ref_v = to_lps_view(volume, volume.array, (labels > 0).astype(np.uint8), ref_all)
    save_overlay_png(hu_v, mask_v, out / "overlay.png", spacing, ref=ref_v,
                     mask_name="SAMLiverSeg", ref_name="truth" if ref_all is not None else "reference",
                     title=f"{engine.spec.name}: one box per object, propagated ({source})")
    report = {
        "source": source,
        "model": engine.spec.name,
        "device": str(engine.device),
        "window": engine.window.spec(),
        "results": results,
        "outputs": {k: str(out / v) for k, v in (("segmentation", "segmentation.seg.nrrd"),
                                                  ("labelmap", "segmentation.nii.gz"), ("overlay", "overlay.png"))},
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    from samliverseg.core.atomic import write_text
    from samliverseg.core.jsonutil import write_json

    write_json(out / "report.json", report)
    lines = [f"# SAMLiverSeg demo ({source})", "", f"model `{engine.spec.name}` on {engine.device}, window `{engine.window.spec()}`", "",
             "| object | Dice | HD95 (mm) | volume (ml) | truth (ml) | time (s) |", "|---|---|---|---|---|---|"]
    for name, entry in results.items():
        m = entry.get("metrics", {})
        lines.append(f"| {name} | {m.get('dice', float('nan')):.3f} | {_r(m.get('hd95_mm'))} | "
                     f"{_r(m.get('volume_pred_ml', entry['engine']['volume_ml']))} | {_r(m.get('volume_ref_ml'))} | "
                     f"{_r(entry['engine']['timings']['total_s'])} |")
    write_text(out / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"demo: wrote {out}/segmentation.seg.nrrd, segmentation.nii.gz, overlay.png, report.json, report.md "
          f"({report['wall_s']} s)")
    return report
