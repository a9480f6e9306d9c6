"""The end of every ``samliverseg segment`` run: the output file, the JSON report, one line on stdout."""

from __future__ import annotations

import time
from typing import Any, Dict

import numpy as np

from samliverseg.core.jsonutil import write_json


def write_result(args, volume, mask: np.ndarray, report: Dict[str, Any], t0: float, t_read: float,
                 note: str = "") -> Dict[str, Any]:
    """Write ``mask`` (non-zero = the object) as label ``--label`` to ``-o`` in the format its
    extension says, complete ``report`` (input, output, label, grid, read and wall time), write
    it to ``--report`` when asked, and print the summary line (``note`` goes before the time)."""
    from samliverseg.io.export import segments_for, write_segmentation

    label = int(args.label)
    write_segmentation((np.asarray(mask) > 0).astype(np.uint8) * label, volume, args.output,
                       segments_for(label, args.segment_name))
    report = dict(report)
    report.update({"input": str(args.image), "output": str(args.output), "label": label,
                   "volume_shape_kji": list(volume.array.shape), "spacing_ijk_mm": list(map(float, volume.spacing)),
                   "read_s": round(t_read, 3), "wall_s": round(time.perf_counter() - t0, 3)})
    if args.report:
        write_json(args.report, report)
    print(f"wrote {args.output}: {report['voxels']} voxels, {report['volume_ml']} ml, "
          f"slices {report['slices_with_mask']}{note} ({report['timings']['total_s']} s)")
    return report
