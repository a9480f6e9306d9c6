"""``samliverseg segment ... --model sam_med3d[_turbo]``: the CLI glue of the 3D engine.

Clicks come from ``--point-ijk`` / ``--negative-ijk`` and the points of ``--prompts`` markups
files (positive points first: the first one opens the first patch). Options of the 2D engine
that have no meaning here (boxes, ROIs, ``--window``, ``--precision``) are refused.
"""

from __future__ import annotations

import sys
import time

from samliverseg.cli.output import write_result
from samliverseg.core.errors import InputError


def segment_3d(args, volume, t0: float) -> int:
    """Run ``segment`` with a 3D model (``args`` from the ``segment`` parser) on ``volume``, read
    and checked (outputs, CT) by ``cmd_segment`` at ``t0``; returns the exit code."""
    from samliverseg.api import open_model
    from samliverseg.interactive.engine3d import Sam3DSettings, validate_clicks

    if args.box_ijk or args.roi_ijk:
        raise InputError(f"{args.model} is a 3D model that takes clicks only (--point-ijk, --negative-ijk), "
                         "not --box-ijk or --roi-ijk")
    if args.window:
        raise InputError(f"--window does not apply to {args.model}: it z-scores the HU of each patch itself")
    for flag, value in (("--precision", args.precision), ("--decoder-precision", args.decoder_precision)):
        if value != "fp32":
            raise InputError(f"{flag} {value} is not supported by {args.model}; leave it at fp32")
    positive = [tuple(p) for p in args.point_ijk]
    negative = [tuple(p) for p in args.negative_ijk]
    if args.prompts:
        from samliverseg.io.markups import markups_to_prompts

        for path in args.prompts:
            extra = markups_to_prompts(path, volume)
            if extra.roi is not None or extra.box is not None:
                raise InputError(f"{path}: {args.model} takes points only, not an ROI")
            positive += list(extra.positive)
            negative += list(extra.negative)
    points = positive + negative
    labels = [1] * len(positive) + [0] * len(negative)
    validate_clicks(volume.array.shape, points, labels)  # before loading a model
    t_read = time.perf_counter() - t0
    settings = Sam3DSettings(keep_clicked_components=not args.no_postprocess)
    notes: list = []
    engine = open_model(args.model, args.checkpoint, args.device, settings=settings, notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    result = engine.segment(volume, points, labels)
    write_result(args, volume, result.mask, result.report, t0, t_read, note=f", {len(result.report['patches'])} patch(es)")
    return 0
