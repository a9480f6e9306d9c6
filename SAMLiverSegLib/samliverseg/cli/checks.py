"""What the CLI checks before the work (values, outputs, the input CT) and the warnings it gives
with a result (a prompt on air, a box over the whole slice).

Order in ``segment``: the argument values (argparse, exit 2), every output path
(``io.export.check_outputs``), reading the input (``io.volume.read_volume``: truncated or
corrupt files, segmentation files, the CT among several series), the CT itself
(``io.volume.check_ct_input``: label maps, non-HU intensities, implausible grids), the prompts,
and only then a model.
"""

from __future__ import annotations

import argparse
from typing import List, Optional


#: HU below which a clicked voxel is air (lung, outside the body).
AIR_HU = -500.0
#: A box covering this fraction of the slice (both sides) covers "the whole slice".
WHOLE_SLICE_FRACTION = 0.9

_AXIS = {"k": 2, "j": 1, "i": 0}  # position in an IJK tuple


def label_value(text: str) -> int:
    """argparse type of ``--label``: a whole number 1..255 (0 is the background)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number 1..255, got {text!r}") from None
    if not 1 <= value <= 255:
        raise argparse.ArgumentTypeError(f"must be 1..255 (0 is the background), got {value}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), like every other
    error of the CLI; ``--help`` still shows the usage."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def custom_window(spec: Optional[str]) -> bool:
    """True for an explicit ``--window LOW,HIGH``: the user states the intensity range, which
    accepts an image that is not in HU. A preset (wide, liver, abdomen) is in HU: it does not."""
    if spec is None:
        return False
    from samliverseg.core.windowing import PRESETS

    return str(spec).strip().lower() not in PRESETS


def segment_outputs(args) -> list:
    """The ``(option, path, suffixes)`` of every file ``segment`` writes."""
    from samliverseg.io.export import JSON_SUFFIXES, OUTPUT_SUFFIXES

    return [("-o", args.output, OUTPUT_SUFFIXES), ("--report", args.report, JSON_SUFFIXES)]


def segment_inputs(args) -> list:
    """Every file or folder ``segment`` reads (none may be overwritten)."""
    return [args.image, args.checkpoint, *args.prompts]


def prompt_warnings(prompts, volume) -> List[str]:
    """Warnings about prompts that are valid but probably not meant: a positive point on air,
    a box that covers (nearly) the whole slice. IJK prompts, ``volume.array[k, j, i]`` in HU."""
    out: List[str] = []
    a = volume.array
    for p in prompts.positive:
        i, j, k = (int(round(v)) for v in p)
        if 0 <= k < a.shape[0] and 0 <= j < a.shape[1] and 0 <= i < a.shape[2] and a[k, j, i] < AIR_HU:
            out.append(f"the positive point (i, j, k) = ({i}, {j}, {k}) lies on air ({a[k, j, i]:.0f} HU): "
                       "the result is probably not the object you meant")
    box = prompts.box
    if box is not None:
        axis = _AXIS.get(getattr(prompts, "slice_axis", "k"), 2)
        in_plane = [c for c in range(3) if c != axis]
        size_ijk = volume.shape_ijk
        lo, hi = box.lo(), box.hi()
        fractions = [(min(hi[c], size_ijk[c] - 1) - max(lo[c], 0) + 1) / size_ijk[c] for c in in_plane]
        if all(f >= WHOLE_SLICE_FRACTION for f in fractions):
            out.append(f"the box covers {100 * min(fractions):.0f}% or more of the slice along both sides: "
                       "a box should frame the object; the result is probably not what you meant")
    return out


def out_of_memory_advice(kind: Optional[str], device: str) -> str:
    """The one-line advice of an out-of-memory failure: about the GPU only when one ran out."""
    if kind == "cuda" or (kind is None and str(device).startswith(("cuda", "mps"))):
        return "out of memory on the GPU: use --device cpu, close other GPU programs, or a smaller model"
    return ("out of memory: the computer's memory is not enough; close other programs, crop the CT to the "
            "region of interest, or use a smaller model")


def print_warnings(lines: List[str]) -> None:
    import sys

    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


__all__ = ["custom_window", "label_value", "OneLineParser", "segment_outputs", "segment_inputs", "prompt_warnings",
           "out_of_memory_advice", "print_warnings", "AIR_HU", "WHOLE_SLICE_FRACTION"]
