"""Shared training-test material: a tiny random-weight SAM, a phantom training cache, and one tiny
config per trainer kind (``models.kinds``), for tests that run every kind the same way.

Subprocesses (torchrun-style tests) import this file too (``sys.path`` + ``import conftest``) and
call :func:`register_tiny_sam`, so the tiny model exists there as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest

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


@pytest.fixture(scope="session")
def tiny_sam():
    from samliverseg.models.build_sam import unregister_model
    yield register_tiny_sam()
    unregister_model(TINY)


@pytest.fixture(scope="session")
def phantom_cache(tmp_path_factory, tiny_sam):
    """A cache of 3 labelled phantoms (p0, p1 train with a tumour; p2 val, tumour-free) and 2
    unlabelled ones, + the tiny SAM's weights file."""
    import json

    import SimpleITK as sitk
    import torch

    from samliverseg.demo.phantom import make_phantom
    from samliverseg.training.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("shared_cache")
    lab, unl = root / "labelled", root / "unlabelled"
    lab.mkdir()
    unl.mkdir()
    for i, tumours in enumerate((1, 1, 0)):
        p = make_phantom((10, 40, 40), (5.0, 5.0, 7.0), seed=i, n_tumors=tumours)
        sitk.WriteImage(p.to_sitk("hu"), str(lab / f"p{i}.nii.gz"))
        sitk.WriteImage(p.to_sitk("labels"), str(lab / f"p{i}_label.nii.gz"))
    for i in range(2):
        p = make_phantom((10, 40, 40), (5.0, 5.0, 7.0), seed=20 + i, n_tumors=1)
        sitk.WriteImage(p.to_sitk("hu"), str(unl / f"u{i}.nii.gz"))
    split = root / "split.json"
    split.write_text(json.dumps({"p0": "train", "p1": "train", "p2": "val"}))
    prepare_dataset(root / "cache", lab, unlabelled=unl, seed=0, split_file=split)
    torch.manual_seed(123)
    weights = root / f"{TINY}.pth"
    torch.save(build_tiny_sam().state_dict(), weights)
    return {"cache": root / "cache", "weights": weights, "root": root}


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is much faster than oversubscription."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
