"""Helpers shared by the core library's tests: the shared real-data folder and rotations."""

import os
from pathlib import Path

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
