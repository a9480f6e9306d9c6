"""Fixtures of the core library's tests: a tiny random-weight SAM registered for the session, a
phantom training cache and one torch thread (the helpers they use are in ``libtest_helpers.py``)."""

from __future__ import annotations

import pytest

from libtest_helpers import TINY, TINY_SPEC, make_phantom_cache, registered, save_tiny_sam, tiny_sam_spec


@pytest.fixture(scope="session")
def tiny_sam():
    with registered(tiny_sam_spec(TINY, **TINY_SPEC)) as name:
        yield name


@pytest.fixture(scope="session")
def phantom_cache(tmp_path_factory, tiny_sam):
    """A cache of 3 labelled phantoms (p0, p1 train with a tumour; p2 val, tumour-free) and 2
    unlabelled ones, + the tiny SAM's weights file."""
    root = tmp_path_factory.mktemp("shared_cache")
    make_phantom_cache(root, 3, (10, 40, 40), (5.0, 5.0, 7.0), n_tumors=(1, 1, 0), folder="labelled", n_unlabelled=2,
                       split={"p0": "train", "p1": "train", "p2": "val"}, seed=0)
    weights = save_tiny_sam(root / f"{TINY}.pth", seed=123)
    return {"cache": root / "cache", "weights": weights, "root": root}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread is much faster than oversubscription."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
