"""Fixtures of the core library's tests: a tiny random-weight SAM registered for the session, a
phantom training cache and one torch thread (the helpers they use are in ``libtest_helpers.py``)."""

from __future__ import annotations

import pytest

from libtest_helpers import TINY, build_tiny_sam, register_tiny_sam


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is much faster than oversubscription."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
