"""Helpers shared by the core library's tests: the shared real-data folder, rotations, a tiny random-weight
SAM, progress capture and one tiny training config per trainer kind (``models.kinds``).

Subprocesses (torchrun-style tests) import this file too (``sys.path`` + ``import libtest_helpers``)
and call :func:`register_tiny_sam`, so the tiny model exists there as well. The fixtures are in
``conftest.py``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest

SHARED = Path(os.environ.get("SAMLIVERSEG_SHARED_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
_skip_no_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared CT data not found at {SHARED} (set SAMLIVERSEG_SHARED_DATA)")


def needs_shared(test):
    """Mark a test that reads ../shared/data; it is skipped with a reason where that is absent."""
    return pytest.mark.shared_data(_skip_no_shared(test))


def rot(axis, deg):
    """A 3x3 rotation about x, y or z by ``deg`` degrees."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    m = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
         "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
    return np.array(m, dtype=float)


TINY = "tiny_shared_sam"


TESTS_DIR = Path(__file__).resolve().parent


def build_tiny_sam():
    from samliverseg.models.build_sam import build_sam_vit
    return build_sam_vit(32, 2, 2, (1,), image_size=64, window_size=4, prompt_embed_dim=32,
                         decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)


def register_tiny_sam() -> str:
    from samliverseg.models.build_sam import ModelSpec, register_model
    register_model(ModelSpec(name=TINY, description="tiny test SAM", builder=build_tiny_sam,
                             checkpoint_filename=f"{TINY}.pth", image_size=64, window="abdomen", embedding_size=4,
                             normalization="minmax01"), replace=True)
    return TINY


class Lines:
    """A text stream that keeps what is written (progress lines of a trainer in this process)."""

    def __init__(self):
        self.buf = []

    def write(self, s):
        self.buf.append(s)

    def flush(self):
        pass

    def events(self):
        from samliverseg.training.progress import read_events
        return read_events("".join(self.buf))


def writer():
    from samliverseg.training.progress import ProgressWriter
    out = Lines()
    return ProgressWriter(stream=out, err_stream=Lines()), out


#: A tiny config per kind: seconds per run on a CPU; 2-3 optimiser steps per epoch at 1 process.
TINY_SECTIONS: Dict[str, Dict[str, Any]] = {
    "decoder": {},
    "adapter": {"adapter": {"train_decoder": True}},
    "unet": {"unet": dict(patch_size=[8, 16, 16], channels=[4, 8, 16], strides=[2, 2], num_res_units=0,
                          num_samples=1, dropout=0.1, lr=0.05, coarse_size=[8, 16, 16])},
    "student": {"student": dict(slab_depth=4, hidden=8, slabs_per_case=2, inplane_flip=False)},
    "semi": {"semi": dict(teachers=TINY, warmup_epochs=1, finetune_epochs=0, slab_depth=4, hidden=8, n_transforms=2,
                          weak_views=2, strong_views=1, rampup_epochs=1.0, rampdown_epochs=2.0)},
}


def tiny_config_dict(kind: str, cache: Dict[str, Any], out: Path, **over: Any) -> Dict[str, Any]:
    d: Dict[str, Any] = dict(kind=kind, cache=str(cache["cache"]), output=str(out), epochs=2, batch_size=1, lr=2e-3,
                             seed=5, device="cpu", max_slices_per_case=3, box_jitter_px=2, points_per_slice=1)
    if kind != "unet":
        d.update(base_model=TINY, checkpoint=str(cache["weights"]))
    else:
        for key in ("lr", "batch_size", "max_slices_per_case", "box_jitter_px", "points_per_slice"):
            d.pop(key)
    d.update(TINY_SECTIONS[kind])
    d.update(over)
    return d


def tiny_config(kind: str, cache: Dict[str, Any], out: Path, **over: Any):
    from samliverseg.training.config import config_from_dict
    return config_from_dict(tiny_config_dict(kind, cache, out, **over))
